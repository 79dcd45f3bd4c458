"""Pictures of what the model sees and predicts: colour-coded label maps, overlays and side-by-side panels.

Used for TensorBoard images during training (validation image | ground truth | prediction; unlabeled image |
pseudo-label | the mixed strong views), by `evaluateSSL.py --save-output-images` and by predict.py. Everything is
uint8 [3,H,W] RGB on the CPU; callers move the few tensors they show off the device at evaluation time only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE_COLOUR = (255, 255, 255)  # ignore label and label values outside the palette are drawn white
GAP = 2                          # pixels between the tiles of a panel (drawn black)


def palette_lut(palette: Sequence[Sequence[int]]) -> torch.Tensor:
    """[257,3] uint8 lookup table: class c -> palette[c]; every other value 0..255 (the ignore label too) and the
    extra last row (for values outside 0..255) -> IGNORE_COLOUR."""
    lut = torch.tensor(IGNORE_COLOUR, dtype=torch.uint8).repeat(257, 1)
    if len(palette):
        lut[: min(len(palette), 256)] = torch.tensor([list(c)[:3] for c in palette][:256], dtype=torch.uint8)
    return lut


def colorize_labels(labels: torch.Tensor, palette: Sequence[Sequence[int]], ignore_label: int | None = None
                    ) -> torch.Tensor:
    """Label map [..., H, W] (any integer values) -> uint8 RGB [..., 3, H, W] in the palette's colours; the ignore
    label and values without a palette entry are drawn in IGNORE_COLOUR."""
    lut = palette_lut(palette)
    if ignore_label is not None and 0 <= ignore_label < 256:
        lut[ignore_label] = torch.tensor(IGNORE_COLOUR, dtype=torch.uint8)
    idx = labels.detach().to("cpu", torch.int64)
    idx = torch.where((idx >= 0) & (idx < 256), idx, torch.full_like(idx, 256))
    return lut[idx].movedim(-1, -3).contiguous()                # [..., H, W, 3] -> [..., 3, H, W]


def to_rgb_uint8(image: torch.Tensor, channel_order: str = "RGB") -> torch.Tensor:
    """Float image(s) [..., 3, H, W] in 0..255 (the pipeline's channel order) -> uint8 RGB on the CPU."""
    image = image.detach().to("cpu", torch.float32)
    if channel_order == "BGR":
        image = image.flip(-3)
    return image.round().clamp(0, 255).to(torch.uint8)


def resize_tile(tile: torch.Tensor, size: tuple[int, int], smooth: bool) -> torch.Tensor:
    """uint8 [3,h,w] -> [3,H,W]: bilinear for photos (`smooth`), nearest for label colours."""
    if tuple(tile.shape[-2:]) == tuple(size):
        return tile
    x = tile.unsqueeze(0).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if smooth else \
        F.interpolate(x, size=size, mode="nearest")
    return x.squeeze(0).round().clamp(0, 255).to(torch.uint8)


def overlay(image: torch.Tensor, colours: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend uint8 RGB [3,H,W] colours over an image resized to their size: (1-alpha)·image + alpha·colours."""
    image = resize_tile(image, tuple(colours.shape[-2:]), smooth=True)
    out = (1 - alpha) * image.float() + alpha * colours.float()
    return out.round().clamp(0, 255).to(torch.uint8)


def panel(rows: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Tiles (uint8 [3,h,w]) laid out in rows, each resized to the first tile's size (bilinear for the photos in
    column 0, nearest for the label colours elsewhere), GAP black pixels apart."""
    h, w = rows[0][0].shape[-2:]
    n_cols = max(len(r) for r in rows)
    out = torch.zeros((3, len(rows) * (h + GAP) - GAP, n_cols * (w + GAP) - GAP), dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = r * (h + GAP), c * (w + GAP)
            out[:, y:y + h, x:x + w] = resize_tile(tile, (h, w), smooth=c == 0)
    return out


def validation_panel(image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor, palette, ignore_label: int,
                     channel_order: str) -> torch.Tensor:
    """One row: the validation image | its ground truth | the prediction, at the image's size. uint8 [3,h,3w+2·GAP]."""
    return panel([[to_rgb_uint8(image, channel_order), colorize_labels(label, palette, ignore_label),
                   colorize_labels(prediction, palette, ignore_label)]])


def unlabeled_panel(image: torch.Tensor, pseudo: torch.Tensor, views: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    palette, ignore_label: int, channel_order: str) -> torch.Tensor:
    """Rows: the unlabeled image | its pseudo-label, then per strong (ClassMix) view: mixed image | mixed labels."""
    rows = [[to_rgb_uint8(image, channel_order), colorize_labels(pseudo, palette, ignore_label)]]
    rows += [[to_rgb_uint8(view, channel_order), colorize_labels(view_labels, palette, ignore_label)]
             for view, view_labels in views]
    return panel(rows)


def palette_png(classes: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """Class map [H,W] (values 0..255) -> palette ("P") image: viewers show the palette's colours, and the pixel
    values read back (Pillow, numpy) are the class indices."""
    img = Image.fromarray(np.asarray(classes, dtype=np.uint8))  # mode L; putpalette makes it P with the same values
    flat = [v for rgb in palette for v in list(rgb)[:3]][:768]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def save_overlay(path: str, image: torch.Tensor, classes: torch.Tensor, palette: Sequence[Sequence[int]],
                 channel_order: str = "RGB") -> None:
    """JPEG of the prediction's colours blended over the image (float [3,h,w] 0..255 in `channel_order`, resized to
    the prediction's [H,W]), at full-resolution colour so that class edges stay sharp."""
    blend = overlay(to_rgb_uint8(image, channel_order), colorize_labels(classes, palette))
    Image.fromarray(blend.permute(1, 2, 0).numpy()).save(path, quality=90, subsampling=0)


def log_unlabeled_panels(logger, i: int, views: tuple, n_images: int, palette, ignore_label: int,
                         channel_order: str) -> None:
    """TensorBoard pictures of an iteration's unlabeled batch: image | pseudo-label, then each strong view: mixed
    image | its labels. `views` = (images [b,3,H,W], pseudo [b,H,W], mixed [Vb,3,H,W], mixed pseudo [Vb,H,W])."""
    images, pseudo, mixed, mixed_pseudo = views
    b = images.shape[0]
    for k in range(min(n_images, b)):
        picture = unlabeled_panel(images[k], pseudo[k], [(mixed[v * b + k], mixed_pseudo[v * b + k])
                                                         for v in range(mixed.shape[0] // b)],
                                  palette, ignore_label, channel_order)
        logger.images(i, f"unlabeled_images/{k}", picture.unsqueeze(0))
