"""Pixels as image viewers show them: the EXIF orientation applied, every image mode converted to 8-bit RGB by its
value range (never clipped).

`data.common.read_image` (training, evaluation, predict.py) and `read_label` use these. Rules:
- EXIF orientation (tag 0x0112, values 2..8: mirrored and/or rotated): applied, as every viewer does; a phone photo
  taken upright is upright here too. Labels are oriented the same way (their values are kept).
- 16-bit greyscale (Pillow modes I;16, I;16B, I;16L, I;16N): 0..65535 scaled to 0..255 (v * 255 / 65535, rounded).
- 32-bit integer (mode I): values within 0..255 kept, within 0..65535 scaled as 16-bit, any other range (negative
  values, above 65535) mapped linearly from its own minimum..maximum to 0..255.
- 32-bit float (mode F): values within 0..1 times 255, within 0..255 kept, any other range mapped from its own
  minimum..maximum; NaN becomes 0.
- Everything else (palette, greyscale, 1-bit, with alpha, CMYK, YCbCr, LAB, HSV): Pillow's conversion to RGB (alpha
  dropped). 16-bit RGB files are opened by Pillow as 8-bit RGB (the high byte): already by value range.
Labels are never rescaled: a 16-bit label keeps its values (data.common.read_label checks they fit in 0..255).

`CONVERSIONS` counts, per process, the images converted from another bit depth or rotated by EXIF, for
`--dry-run --check-files`' report.
"""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112
SWAPS_SIZE = (5, 6, 7, 8)  # orientations that rotate by 90 degrees: width and height trade places
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")

CONVERSIONS: Counter = Counter()  # "converted from 16-bit", "rotated by EXIF", ...: images read so far
_count_lock = threading.Lock()


def _note(what: str) -> None:
    with _count_lock:
        CONVERSIONS[what] += 1


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an open image (1, the identity, when absent or unreadable)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: the pixels are still readable, show them as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented(img: Image.Image, count: bool = True) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (the same object when there is none)."""
    if exif_orientation(img) == 1:
        return img
    if count:
        _note("rotated by EXIF")
    return ImageOps.exif_transpose(img)


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values in low..high -> uint8 0..255 (rounded)."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint((values.astype(np.float64) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def grey_to_uint8(values: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """A 16-bit, 32-bit integer or float greyscale array [H,W] -> uint8 [H,W] by the rules of the module docstring,
    and what was done ("converted from 16-bit", ...)."""
    if mode in SIXTEEN_BIT:
        return _scaled(values, 0, 65535), "converted from 16-bit"
    values = np.asarray(values, dtype=np.float64 if mode == "F" else np.int64)
    if mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and low >= 0 and high <= 1:
        return _scaled(values, 0, 1), "converted from float (0..1)"
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8), f"converted from {'float' if mode == 'F' else '32-bit'} (0..255)"
    if mode == "I" and low >= 0 and high <= 65535:
        return _scaled(values, 0, 65535), "converted from 16-bit"
    return _scaled(values, low, high), f"converted from {'float' if mode == 'F' else '32-bit'} (by its range)"


def to_rgb8(img: Image.Image) -> np.ndarray:
    """An open (already oriented) image -> [H,W,3] uint8 RGB, by value range (see the module docstring)."""
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
        grey, note = grey_to_uint8(np.asarray(img), img.mode)
        _note(note)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "CMYK":
        _note("converted from CMYK")
    return np.asarray(img.convert("RGB"))


def conversion_summary(before: Counter, after: Counter) -> str:
    """'3 images converted from 16-bit, 2 rotated by EXIF' for the images read between two snapshots ('' if none)."""
    done = after - before
    parts = [f"{n} image{'s' if n != 1 else ''} {what}" for what, n in sorted(done.items())]
    return ", ".join(parts)
