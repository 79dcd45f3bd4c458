"""Augmentations on the training device (SPEC 5.1), on 0..255 float images before normalisation.

Order: ClassMix -> random scale -> flip -> colour jitter -> Gaussian blur. One Python `random` draw per decision
and call decides for the whole batch (as released); once the jitter's draw fires every image is jittered, with
factors drawn per image from torch's global CPU generator exactly as kornia 0.4.1 draws them. Colour jitter and
blur follow kornia 0.4.1, which the release used, in the project's own tensor code.
Labels follow every geometric change; confidences (pseudo-label weights) follow them too.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    (labels). Enlarged (f > 1): one random crop for the whole batch, offsets from Python `random.randint`,
    the column offset drawn first, then the row offset (the release's order), even when both ranges are 0."""
    if factor <= 0:
        raise UserError(f"random_scale: factor must be > 0, got {factor}")
    H, W = images.shape[-2:]
    h, w = int(H * factor), int(W * factor)                      # floor for positive sizes
    if h < 1 or w < 1:
        raise UserError(f"random_scale: factor {factor} shrinks {H}x{W} to nothing; use a larger factor")
    if factor == 1:
        return images, labels, confidences
    if (h, w) == (H, W):                                         # 1 < f < 1 + 1/H: the crop offsets are 0
        random.randint(0, 0), random.randint(0, 0)               # drawn all the same, as released
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
    x = random.randint(0, w - W)                                 # column offset first, as released
    y = random.randint(0, h - H)
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


# ---------------------------------------------------------------------------------------------------------------
# Colour jitter and Gaussian blur with the semantics of kornia 0.4.1, the version the release pins (SPEC 5.1):
# the release calls kornia.augmentation.ColorJitter(s, s, s/2, s/3) on image/255 and
# kornia.filters.GaussianBlur2d((23, 23), (0.1, 1.5)) on the 0..255 image. Re-implemented here as plain tensor code
# (training does not depend on kornia); tests/test_augmentations.py compares both against kornia 0.4.1 itself.
# ---------------------------------------------------------------------------------------------------------------

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")     # the indices of JitterParams.order


@dataclass(frozen=True)
class JitterParams:
    """One colour-jitter draw for a batch: per-image factors [B] and one order of the four operations.

    brightness b: x + (b − 1); contrast c: c·x; saturation f: HSV S·f; hue δ: HSV H + δ, in turns (1 = a full
    circle). `order` lists indices into JITTER_OPS; the same order is used for every image of the batch."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: tuple[int, ...]

    def to(self, device: torch.device | str) -> "JitterParams":
        """The factors on `device`, in one host-to-device copy that does not wait for the device."""
        device = torch.device(device)
        factors = torch.stack([self.brightness, self.contrast, self.saturation, self.hue])     # [4, B]
        if factors.device == device:
            return self
        if factors.device.type == "cpu" and device.type == "cuda":
            factors = factors.pin_memory().to(device, non_blocking=True)
        else:
            factors = factors.to(device)
        return JitterParams(factors[0], factors[1], factors[2], factors[3], self.order)


def _uniform_draw(n: int, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """n float32 draws of U[low, high) from torch's global CPU generator: low + u·(high − low), one `torch.rand(n)`
    (what torch.distributions.Uniform.rsample does, which kornia uses)."""
    return low + torch.rand(n, dtype=torch.float32) * (high - low)


def _factor_range(half_width: float, centre: float, lower: float, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[centre − w, centre + w] in float32 (w rounded to float32 first), clipped to [lower, upper]."""
    w = torch.tensor(half_width, dtype=torch.float32)
    return (centre - w).clamp(lower, upper), (centre + w).clamp(lower, upper)


def sample_jitter(batch_size: int, strength: float) -> JitterParams:
    """Draw the factors of kornia 0.4.1's ColorJitter(brightness=s, contrast=s, saturation=s/2, hue=s/3) for a
    batch, from torch's global CPU generator and in kornia's order: B brightness, B contrast, B hue, B saturation
    (each a `torch.rand(B)`), then one `torch.randperm(4)` for the order of the operations. Under the same torch
    seed the draws equal kornia's."""
    if strength < 0:
        raise UserError(f"color jitter: strength must be >= 0, got {strength}")
    b_lo, b_hi = _factor_range(strength, 1.0, 0.0, 2.0)
    c_lo, c_hi = _factor_range(strength, 1.0, 0.0, math.inf)
    s_lo, s_hi = _factor_range(strength / 2.0, 1.0, 0.0, math.inf)
    h_lo, h_hi = _factor_range(strength / 3.0, 0.0, -0.5, 0.5)
    brightness = _uniform_draw(batch_size, b_lo, b_hi)
    contrast = _uniform_draw(batch_size, c_lo, c_hi)
    hue = _uniform_draw(batch_size, h_lo, h_hi)
    saturation = _uniform_draw(batch_size, s_lo, s_hi)
    order = tuple(torch.randperm(4).tolist())                    # a host tensor: no device sync
    return JitterParams(brightness, contrast, saturation, hue, order)


def _per_image(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)       # [B] -> [B,1,1,1]


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Additive brightness on [B,3,H,W] images in [0, 1]: clamp(x + (b − 1), 0, 1) per image (b: [B])."""
    return (x + (_per_image(factor, x) - 1)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Contrast as a multiplication about 0: clamp(c·x, 0, 1) per image (c: [B])."""
    return (x * _per_image(factor, x)).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV saturation S = (V − min)/V (0 where V = 0) scaled to clamp(f·S, 0, 1), hue and V kept (f: [B]).

    Every channel of an HSV colour is V − (V − min)·w with a weight w set by the hue alone, so the same result
    is x' = V − (V − x)·S'/S, with no round trip through HSV."""
    v = x.amax(dim=1, keepdim=True)                                  # [B,1,H,W]
    m = x.amin(dim=1, keepdim=True)
    sat = torch.where(v > 0, (v - m) / v, torch.zeros_like(v))
    f = _per_image(factor, x)
    ratio = torch.where(sat * f > 1, 1.0 / sat, f)                  # S'/S, S' = min(f·S, 1); f where S = 0
    return (v - (v - x) * ratio).clamp(min=0.0)       # the clipped minimum may round to −1e-8; HSV gives exactly 0


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """HSV hue rotated by δ turns per image ((H + δ) mod 1), saturation and V kept (δ: [B]); channel 0 is red."""
    r, g, b = x.unbind(dim=1)                                        # [B,H,W] each
    v = x.amax(dim=1)
    m = x.amin(dim=1)
    d = v - m
    d_safe = torch.where(d > 0, d, torch.ones_like(d))
    # hue in sixths of a turn, from the channel holding the maximum (red first on ties, then green)
    h6 = torch.where(v == r, (g - b) / d_safe, torch.where(v == g, 2 + (b - r) / d_safe, 4 + (r - g) / d_safe))
    hue = torch.remainder(h6 / 6 + shift.to(device=x.device, dtype=x.dtype).view(-1, 1, 1), 1.0)
    # channel value V − (V − min)·clamp(min(k, 4 − k), 0, 1) with k = (n + 6H) mod 6, n = 5, 3, 1 for R, G, B
    # (made on the device: a host tensor would cost a blocking copy)
    n = torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6 * hue.unsqueeze(1), 6.0)               # [B,3,H,W]
    w = torch.minimum(k, 4 - k).clamp(0.0, 1.0)
    return v.unsqueeze(1) - d.unsqueeze(1) * w


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """The four operations on [B,3,H,W] images in [0, 1], in `params.order`, with per-image factors."""
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for k in params.order:
        x = _JITTER_FUNCTIONS[k](x, factors[k])
    return x


def color_jitter(images: torch.Tensor, strength: float, channel_order: str) -> torch.Tensor:
    """The release's colour jitter (kornia 0.4.1 ColorJitter(s, s, s/2, s/3) on images/255, then ×255) of a
    [B,3,H,W] batch of 0..255 images: every image jittered, factors per image, one operation order per call
    (`sample_jitter`, `apply_jitter`).

    Channel 0 is taken as red whatever `channel_order` says, as kornia did in the release: a BGR batch (COCO
    networks) gets the same brightness, contrast and saturation, and a hue shift of −δ instead of δ, which has the
    same distribution. s = 0 returns the input and draws nothing."""
    _check_order(channel_order, "color_jitter")
    if strength <= 0:
        return images
    params = sample_jitter(images.shape[0], strength).to(images.device)
    return apply_jitter(images / 255.0, params) * 255.0


BLUR_KERNEL_SIZE = 23
BLUR_SIGMA_ROWS = 0.1      # along the height (kornia's first sigma, which it applies to the kernel's rows)
BLUR_SIGMA_COLS = 1.5      # along the width


def gaussian_kernel1d(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """[size] normalised Gaussian exp(−(i − size//2)² / 2σ²), i = 0..size−1, built on `like`'s device."""
    i = torch.arange(size, dtype=torch.float32, device=like.device) - size // 2
    g = torch.exp(-(i * i) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(like.dtype)


def gaussian_blur(images: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE, sigma_rows: float = BLUR_SIGMA_ROWS,
                  sigma_cols: float = BLUR_SIGMA_COLS) -> torch.Tensor:
    """The release's blur, kornia 0.4.1 GaussianBlur2d((23, 23), (0.1, 1.5)): the fixed kernel g_0.1 (rows,
    vertical) × g_1.5 (columns, horizontal), reflect padding, per channel; applied as two 1-D passes."""
    B, C, H, W = images.shape
    r = kernel_size // 2
    if H <= r or W <= r:
        raise UserError(f"gaussian_blur: images of {H}x{W} are too small for reflect padding of {r}; "
                        f"use crops larger than {r}x{r}")
    k_rows = gaussian_kernel1d(kernel_size, sigma_rows, images).view(1, 1, kernel_size, 1).repeat(C, 1, 1, 1)
    k_cols = gaussian_kernel1d(kernel_size, sigma_cols, images).view(1, 1, 1, kernel_size).repeat(C, 1, 1, 1)
    x = F.pad(images, (r, r, r, r), mode="reflect")                  # [B,C,H+2r,W+2r]
    x = F.conv2d(x, k_rows, groups=C)                                # [B,C,H,W+2r]
    return F.conv2d(x, k_cols, groups=C)                             # [B,C,H,W]


def augment(images: torch.Tensor, labels: torch.Tensor | None, confidences: torch.Tensor | None,
            params: AugmentParams, *, ignore_label: int, channel_order: str,
            classmix_masks: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ClassMix (when masks are given) -> random scale -> flip -> colour jitter -> blur, each decided for the
    whole batch.

    Python `random` is drawn in the release's order and number: flip, jitter, blur (drawn even when its
    probability is 0, as for the weak blur), two draws for the release's disabled grayscale and solarize steps,
    the scale gate, then the factor when the gate fires (and the crop offsets inside `random_scale`). With the
    same `random` state the decisions are the release's."""
    do_flip = random.random() < params.flip_p
    do_jitter = random.random() < params.jitter_p
    do_blur = random.random() < params.blur_p
    random.random(), random.random()                          # the release's grayscale and solarize (p = 0)
    factor = random.uniform(*params.scale_range) if random.random() < params.scale_p else 1.0
    if classmix_masks is not None:
        images, labels, confidences = classmix(classmix_masks, images, labels, confidences)
    if factor != 1.0:
        images, labels, confidences = random_scale(images, labels, confidences, factor, ignore_label)
    if do_flip:
        images, labels, confidences = flip(images, labels, confidences)
    if do_jitter:
        images = color_jitter(images, params.jitter_strength, channel_order)
    if do_blur:
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
