"""Augmentations on the training device (SPEC 5.1), on 0..255 float images before normalisation.

Order: ClassMix -> random scale -> flip -> colour jitter -> Gaussian blur. One Python `random` draw per decision
and call decides for the whole batch (as released); the jitter factors are drawn per image from torch's RNG.
Labels follow every geometric change; confidences (pseudo-label weights) follow them too.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from utils.classmix import classmix
from utils.errors import UserError

VOC_MEAN_RGB = (122.6789143, 116.66876762, 104.00698793)
CITYSCAPES_MEAN_RGB = (73.15835921, 82.90891754, 72.39239876)
OTHER_MEAN_RGB = (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and strengths of one augmentation recipe (SPEC 5.1); each step is taken for the whole batch
    when one `random.random()` draw falls below its probability."""

    scale_p: float
    scale_range: tuple[float, float]
    flip_p: float
    jitter_p: float
    jitter_strength: float
    blur_p: float


WEAK = AugmentParams(scale_p=0.5, scale_range=(0.75, 1.75), flip_p=0.5, jitter_p=0.2, jitter_strength=0.125,
                     blur_p=0.0)
STRONG = AugmentParams(scale_p=0.8, scale_range=(0.75, 1.75), flip_p=0.5, jitter_p=0.8, jitter_strength=0.25,
                       blur_p=0.2)


def mean_for_dataset(name: str) -> tuple[float, float, float]:
    """RGB mean used by `normalize` for a dataset name (GTA5 is a source for Cityscapes training)."""
    if name in ("pascal_voc", "pascal"):
        return VOC_MEAN_RGB
    if name in ("cityscapes", "gta5"):
        return CITYSCAPES_MEAN_RGB
    return OTHER_MEAN_RGB


def _check_order(channel_order: str, where: str) -> None:
    if channel_order not in ("BGR", "RGB"):
        raise UserError(f"{where}: channel_order must be 'BGR' (COCO pretraining) or 'RGB' (imagenet), "
                        f"got {channel_order!r}")


def normalize(images: torch.Tensor, mean_rgb: tuple[float, float, float], channel_order: str) -> torch.Tensor:
    """(x − mean) / 255 for [B,3,H,W] 0..255 images, with the mean given in RGB, reordered for BGR input."""
    _check_order(channel_order, "normalize")
    mean = list(mean_rgb)[::-1] if channel_order == "BGR" else list(mean_rgb)
    # Built on the host and copied without waiting: torch.tensor(..., device=cuda) is a blocking copy, a host sync
    # in every forward (pseudo-labels, student, memory update, evaluation).
    mean_t = torch.tensor(mean, dtype=images.dtype).to(images.device, non_blocking=True).view(1, 3, 1, 1)
    return (images - mean_t) / 255.0


def random_scale(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None,
                 factor: float, ignore_label: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Rescale by `factor`, keeping the input size (H, W).

    New size (⌊H·f⌋, ⌊W·f⌋): images and confidences bilinear (align_corners=True), labels nearest. Shrunk: pad
    back centred, the odd pixel on the right and the top, with 0 (images, confidences) and the ignore label
    (labels). Enlarged: one random crop (offsets from Python `random.randint`) for the whole batch."""
    if factor <= 0:
        raise UserError(f"random_scale: factor must be > 0, got {factor}")
    H, W = images.shape[-2:]
    h, w = int(H * factor), int(W * factor)                      # floor for positive sizes
    if h < 1 or w < 1:
        raise UserError(f"random_scale: factor {factor} shrinks {H}x{W} to nothing; use a larger factor")
    if (h, w) == (H, W):
        return images, labels, confidences
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=True)
    if labels is not None:
        labels = F.interpolate(labels.unsqueeze(1).float(), size=(h, w), mode="nearest").squeeze(1).to(labels.dtype)
    if confidences is not None:
        confidences = F.interpolate(confidences.unsqueeze(1), size=(h, w), mode="bilinear",
                                    align_corners=True).squeeze(1)
    if h <= H and w <= W:
        dh, dw = H - h, W - w
        pad = (dw // 2, dw - dw // 2, dh - dh // 2, dh // 2)  # left, right (odd pixel), top (odd pixel), bottom
        images = F.pad(images, pad, value=0.0)
        labels = None if labels is None else F.pad(labels, pad, value=ignore_label)
        confidences = None if confidences is None else F.pad(confidences, pad, value=0.0)
        return images, labels, confidences
    # enlarged: one random crop of the input size for the whole batch
    y = random.randint(0, h - H)
    x = random.randint(0, w - W)
    images = images[..., y:y + H, x:x + W]
    labels = None if labels is None else labels[..., y:y + H, x:x + W]
    confidences = None if confidences is None else confidences[..., y:y + H, x:x + W]
    return images, labels, confidences


def flip(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Horizontal flip of images, labels and confidences."""
    def f(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.flip(-1)                 # last dim = width
    return f(images), f(labels), f(confidences)


def color_jitter(images: torch.Tensor, strength: float, channel_order: str) -> torch.Tensor:
    """Per-image random brightness and contrast factors U[1−s, 1+s], saturation U[1−s/2, 1+s/2], hue shift
    U[−s/3, s/3] (torch RNG), applied in that order with torchvision on the image scaled to [0, 1] in RGB order
    (BGR input is converted and back), clamped to [0, 1], returned in 0..255. s = 0 returns the input."""
    _check_order(channel_order, "color_jitter")
    if strength <= 0:
        return images
    x = images / 255.0
    if channel_order == "BGR":
        x = x.flip(1)
    B = x.shape[0]
    lo = torch.tensor([1 - strength, 1 - strength, 1 - strength / 2, -strength / 3])
    hi = torch.tensor([1 + strength, 1 + strength, 1 + strength / 2, strength / 3])
    # Drawn on the CPU (torch's global CPU RNG) whatever the images' device: torchvision's ops take Python
    # scalars, and reading a CPU tensor is no device sync.
    factors = (lo + (hi - lo) * torch.rand(B, 4)).tolist()       # B x [brightness, contrast, saturation, hue]
    out = []
    for k, (b, c, s, h) in enumerate(factors):
        img = TF.adjust_brightness(x[k], b)
        img = TF.adjust_contrast(img, c)
        img = TF.adjust_saturation(img, s)
        img = TF.adjust_hue(img.clamp(0, 1), h)
        out.append(img.clamp(0, 1))
    x = torch.stack(out)
    if channel_order == "BGR":
        x = x.flip(1)
    return x * 255.0


def gaussian_blur(images: torch.Tensor) -> torch.Tensor:
    """23×23 Gaussian blur of [B,3,H,W] images with the released sigmas: 0.1 vertically, 1.5 horizontally."""
    # The release used kornia's GaussianBlur2d((23, 23), (0.1, 1.5)), whose kernel2d[i, j] = kx[i]·ky[j] with
    # kx built from the FIRST sigma and i the row index: σ = 0.1 along rows (vertical), σ = 1.5 along columns
    # (horizontal). torchvision's first sigma is along x (width), so the same kernel is sigma=[1.5, 0.1].
    # Both pad with "reflect" (needs H, W > 11).
    return TF.gaussian_blur(images, kernel_size=[23, 23], sigma=[1.5, 0.1])


def augment(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None,
            params: AugmentParams, *, ignore_label: int, channel_order: str,
            classmix_masks: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ClassMix (when masks are given) -> random scale -> flip -> colour jitter -> blur; one `random.random()`
    draw per decision, for the whole batch (none for a step whose probability is 0, e.g. the weak blur)."""
    if classmix_masks is not None:
        images, labels, confidences = classmix(classmix_masks, images, labels, confidences)
    if random.random() < params.scale_p:
        factor = random.uniform(*params.scale_range)
        images, labels, confidences = random_scale(images, labels, confidences, factor, ignore_label)
    if random.random() < params.flip_p:
        images, labels, confidences = flip(images, labels, confidences)
    if random.random() < params.jitter_p:
        images = color_jitter(images, params.jitter_strength, channel_order)
    if params.blur_p > 0 and random.random() < params.blur_p:
        images = gaussian_blur(images)
    return images, labels, confidences


def weak_augment(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None = None, *,
                 ignore_label: int, channel_order: str, classmix_masks: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Labeled-batch augmentation (WEAK)."""
    return augment(images, labels, confidences, WEAK, ignore_label=ignore_label, channel_order=channel_order,
                   classmix_masks=classmix_masks)


def strong_augment(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None = None, *,
                   ignore_label: int, channel_order: str, classmix_masks: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Unlabeled-batch augmentation (STRONG)."""
    return augment(images, labels, confidences, STRONG, ignore_label=ignore_label, channel_order=channel_order,
                   classmix_masks=classmix_masks)
