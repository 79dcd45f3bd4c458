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

VOC_MEAN_RGB = (122.6789143, 116.66876762, 104.00698793)
CITYSCAPES_MEAN_RGB = (73.15835921, 82.90891754, 72.39239876)
OTHER_MEAN_RGB = (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and strengths of one augmentation recipe."""

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
    """RGB mean used by `normalize` for a dataset name."""
    if name in ("pascal_voc", "pascal"):
        return VOC_MEAN_RGB
    if name in ("cityscapes", "gta5"):
        return CITYSCAPES_MEAN_RGB
    return OTHER_MEAN_RGB


def normalize(images: torch.Tensor, mean_rgb, channel_order: str) -> torch.Tensor:
    """(x − mean) / 255 with the mean given in RGB, reordered for BGR input."""
    mean = list(mean_rgb)[::-1] if channel_order == "BGR" else list(mean_rgb)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / 255.0


def random_scale(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None,
                 factor: float, ignore_label: int):
    """Rescale by `factor`, keeping the input size: pad back (centred; the odd pixel right and top) when
    shrinking, one random crop when enlarging. Images/confidences bilinear (align_corners=True), labels nearest."""
    H, W = images.shape[-2:]
    h, w = int(H * factor), int(W * factor)
    if (h, w) == (H, W):
        return images, labels, confidences
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=True)
    if labels is not None:
        labels = F.interpolate(labels.unsqueeze(1).float(), size=(h, w), mode="nearest").squeeze(1).long()
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


def flip(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None):
    """Horizontal flip of images, labels and confidences."""
    def f(x):
        return None if x is None else x.flip(-1)
    return f(images), f(labels), f(confidences)


def color_jitter(images: torch.Tensor, strength: float, channel_order: str) -> torch.Tensor:
    """Per-image brightness/contrast (±s), saturation (±s/2) and hue (±s/3) on the image in [0, 1], RGB."""
    if strength <= 0:
        return images
    x = images / 255.0
    if channel_order == "BGR":
        x = x.flip(1)
    B = x.shape[0]
    lo = torch.tensor([1 - strength, 1 - strength, 1 - strength / 2, -strength / 3])
    hi = torch.tensor([1 + strength, 1 + strength, 1 + strength / 2, strength / 3])
    factors = lo + (hi - lo) * torch.rand(B, 4)          # CPU draws: scalars for torchvision's ops, no sync
    out = []
    for k in range(B):
        b, c, s, h = factors[k].tolist()
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
    """23×23 Gaussian blur with the released sigmas: 0.1 along the vertical (row index) direction, 1.5 along the
    horizontal one. kornia's GaussianBlur2d((23, 23), (0.1, 1.5)) in the release built kernel[i, j] = kx[i]·ky[j]
    with i the row index; torchvision's first sigma is along x (width), hence sigma=[1.5, 0.1]. Reflect padding."""
    return TF.gaussian_blur(images, kernel_size=[23, 23], sigma=[1.5, 0.1])


def augment(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None,
            params: AugmentParams, *, ignore_label: int, channel_order: str,
            classmix_masks: torch.Tensor | None = None):
    """ClassMix (when masks are given) -> random scale -> flip -> colour jitter -> blur."""
    if classmix_masks is not None:
        images, labels, confidences = classmix(classmix_masks, images, labels, confidences)
    if random.random() < params.scale_p:
        factor = random.uniform(*params.scale_range)
        images, labels, confidences = random_scale(images, labels, confidences, factor, ignore_label)
    if random.random() < params.flip_p:
        images, labels, confidences = flip(images, labels, confidences)
    if random.random() < params.jitter_p:
        images = color_jitter(images, params.jitter_strength, channel_order)
    if random.random() < params.blur_p:
        images = gaussian_blur(images)
    return images, labels, confidences


def weak_augment(images, labels, confidences=None, *, ignore_label: int, channel_order: str,
                 classmix_masks: torch.Tensor | None = None):
    """Labeled-batch augmentation (WEAK)."""
    return augment(images, labels, confidences, WEAK, ignore_label=ignore_label, channel_order=channel_order,
                   classmix_masks=classmix_masks)


def strong_augment(images, labels, confidences=None, *, ignore_label: int, channel_order: str,
                   classmix_masks: torch.Tensor | None = None):
    """Unlabeled-batch augmentation (STRONG)."""
    return augment(images, labels, confidences, STRONG, ignore_label=ignore_label, channel_order=channel_order,
                   classmix_masks=classmix_masks)
