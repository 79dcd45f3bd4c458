"""Pieces shared by the datasets: file reading, Pillow resizes, pad-and-crop, tensor conversion, item keys.

Every dataset here returns float32 images [3,h,w] in 0..255 in the channel order of the pretraining ("BGR" for
COCO, "RGB" for imagenet) and int64 labels [h,w] in train ids with the ignore label. Training datasets are indexed
with `(index, seed)` keys: the seed alone drives the random crop (`random.Random(seed)`), so the data does not
depend on how many workers load it or in which process.
"""
from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.pixels import SWAPS_SIZE, exif_orientation, oriented, to_rgb8
from utils.errors import UserError

CHANNEL_ORDERS = ("BGR", "RGB")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """'H,W' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.split(","))
    except (ValueError, AttributeError):
        raise UserError(f"{what} must be \"H,W\" (two integers), got {json.dumps(text)}.") from None
    if h < 1 or w < 1:
        raise UserError(f"{what} must be positive, got {json.dumps(text)}.")
    return h, w


def check_labels(labels: torch.Tensor, num_classes: int, ignore_label: int, source: str = "") -> None:
    """Raise UserError when `labels` holds values outside [0, num_classes) other than the ignore label.

    Meant for the data pipeline (CPU, not a hot path: it syncs), so that a label file holding raw ids
    instead of train ids fails with the file name rather than as a CUDA assert deep inside the loss.
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_label)
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        shown = values[:20]
        more = f" (and {len(values) - 20} more)" if len(values) > 20 else ""
        where = f"label file {source!r}" if source else "labels"
        raise UserError(
            f"{where} contains values {shown}{more} outside the train ids 0..{num_classes - 1} and not the "
            f"ignore label {ignore_label}; convert the labels to train ids (e.g. utils/translate_labels.py) "
            f"or fix num_classes / ignore_label in the config."
        )


def channel_order_for(pretraining: str) -> str:
    """COCO-pretrained DeepLabv2 weights expect BGR input (caffe heritage); ImageNet weights expect RGB."""
    return "BGR" if pretraining == "COCO" else "RGB"


def parse_key(key: Any) -> tuple[int, int]:
    """Item key -> (index, seed): `(index, seed)` from `data.sampler`, or a plain int (then seed = index)."""
    if isinstance(key, (tuple, list)):
        index, seed = key
        return int(index), int(seed)
    if isinstance(key, torch.Tensor):
        key = int(key)
    return int(key), int(key)


def read_image(path: str) -> np.ndarray:
    """Image file -> [H,W,3] uint8 RGB as viewers show it: EXIF orientation applied, 16-bit, 32-bit and float modes
    scaled by their value range, never clipped (data/pixels.py). Unreadable files raise UserError naming the file.
    The one reader of training, evaluation and predict.py."""
    try:
        with Image.open(path) as img:
            arr = to_rgb8(oriented(img))
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except READ_ERRORS as e:
        raise UserError(f"cannot read image file {path} ({type(e).__name__}: {e}); the file is corrupt or not an "
                        f"image — re-extract or replace it.") from None
    return arr


def read_label(path: str) -> np.ndarray:
    """Label file (mode L or P: raw values, not palette colours) -> [H,W] uint8."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(oriented(img, count=False))  # oriented as its image; values kept, never rescaled
    except FileNotFoundError:
        raise UserError(f"label file not found: {path}") from None
    except READ_ERRORS as e:
        raise UserError(f"cannot read label file {path} ({type(e).__name__}: {e}); the file is corrupt or not an "
                        f"image — re-extract or replace it.") from None
    if arr.ndim != 2:
        raise UserError(f"label file {path} has {arr.shape[2] if arr.ndim == 3 else '?'} channels (mode {mode}); "
                        f"labels must be single-channel id images (mode L or P). Colour-coded labels must be "
                        f"converted first (GTA5: utils/translate_labels.py).")
    if arr.dtype != np.uint8:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise UserError(f"label file {path} (mode {mode}) holds values outside 0..255; expected 8-bit label ids.")
        arr = arr.astype(np.uint8)
    return arr


def read_pair(image_path: str, label_path: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Image [H,W,3] and raw label [H,W]; a size mismatch names both files (they do not belong together)."""
    image, label = read_image(image_path), read_label(label_path)
    if image.shape[:2] != label.shape:
        raise UserError(f"{dataset} image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                        f"{label_path} is {label.shape[1]}x{label.shape[0]}; "
                        + exif_note(image_path, label.shape[::-1], "the files do not belong together."))
    return image, label


def exif_note(image_path: str, label_wh: tuple[int, int], otherwise: str) -> str:
    """The reason an image and its label differ in size when it is the image's EXIF orientation (the label matches
    the stored, unrotated pixels), else `otherwise`."""
    try:
        with Image.open(image_path) as img:
            orientation, stored = exif_orientation(img), img.size
    except READ_ERRORS:
        return otherwise
    if orientation in SWAPS_SIZE and tuple(stored) == tuple(label_wh):
        return (f"the image's EXIF orientation ({orientation}: turned by 90 degrees) makes it {stored[1]}x{stored[0]} "
                f"as every viewer shows it and as it is read here, while the label has the size of the unrotated "
                f"pixels. Turn the label the same way (label it on the image as shown), or remove the image's EXIF "
                f"orientation by saving its pixels upright.")
    return otherwise


def resize_image(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Pillow BILINEAR resize (filters when shrinking, as released) of an [H,W,3] uint8 image to (W, H)."""
    if (image.shape[1], image.shape[0]) == tuple(size_wh):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size_wh), Image.Resampling.BILINEAR))


def resize_label(label: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Pillow NEAREST resize of an [H,W] uint8 label map to (W, H)."""
    if (label.shape[1], label.shape[0]) == tuple(size_wh):
        return label
    return np.asarray(Image.fromarray(label).resize(tuple(size_wh), Image.Resampling.NEAREST))


def pad_to(image: np.ndarray, label: np.ndarray, min_hw: tuple[int, int], ignore_label: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Pad right and bottom up to at least `min_hw` (image 0, label ignore), like the released
    cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w)."""
    h, w = label.shape
    pad_h, pad_w = max(min_hw[0] - h, 0), max(min_hw[1] - w, 0)
    if pad_h == 0 and pad_w == 0:
        return image, label
    img = np.zeros((h + pad_h, w + pad_w, image.shape[2]), dtype=image.dtype)
    img[:h, :w] = image
    lbl = np.full((h + pad_h, w + pad_w), ignore_label, dtype=label.dtype)
    lbl[:h, :w] = label
    return img, lbl


def random_crop(image: np.ndarray, label: np.ndarray, crop_hw: tuple[int, int], rng: random.Random,
                ignore_label: int, x_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pad (right/bottom) to the crop size if needed, then one random crop of `crop_hw` = (h, w).

    Offsets come from `rng.randint` (inclusive bounds, as released); `x_first` draws the column offset first
    (the released Cityscapes crop) instead of the row offset first (the released VOC crop).
    """
    th, tw = crop_hw
    image, label = pad_to(image, label, crop_hw, ignore_label)
    h, w = label.shape
    if x_first:
        x = rng.randint(0, w - tw)
        y = rng.randint(0, h - th)
    else:
        y = rng.randint(0, h - th)
        x = rng.randint(0, w - tw)
    return image[y:y + th, x:x + tw], label[y:y + th, x:x + tw]


def image_tensor(image: np.ndarray, channel_order: str) -> torch.Tensor:
    """[H,W,3] uint8 RGB -> float32 [3,H,W] 0..255 in `channel_order`."""
    if channel_order == "BGR":
        image = image[:, :, ::-1]
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C", copy=True)).float()


def to_tensors(image: np.ndarray, label: np.ndarray, channel_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[H,W,3] uint8 RGB + [H,W] label -> float32 [3,H,W] 0..255 in `channel_order`, int64 [H,W]."""
    return image_tensor(image, channel_order), torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


def check_channel_order(channel_order: str) -> str:
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
    return channel_order


class SegmentationDataset(Dataset):
    """Base class: subclasses fill `names` and implement `_load(index, rng)`.

    `_load` returns ([H,W,3] uint8 RGB image, [H,W] uint8 train-id label, label source for messages), already
    resized and, for training, cropped (using only `rng` for randomness). The base class converts to tensors,
    checks the label values and returns `(image, label, index)` for training, `(image, label, name)` otherwise.
    """

    name: str = "dataset"
    num_classes: int = 0
    class_names: list[str] = []
    palette: list[tuple[int, int, int]] = []

    def __init__(self, train: bool, crop_size: tuple[int, int] | None, channel_order: str, ignore_label: int):
        if train and crop_size is None:
            raise ValueError("a training dataset needs crop_size (h, w)")
        self.train = train
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.channel_order = check_channel_order(channel_order)
        if not 0 <= int(ignore_label) <= 255:
            raise UserError(f"ignore_label must be in 0..255 (labels are 8-bit images), got {ignore_label}.")
        self.ignore_label = int(ignore_label)
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def _load(self, index: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        index, seed = parse_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} ({len(self)} items)")
        image, label, source = self._load(index, random.Random(seed))
        img, lbl = to_tensors(image, label, self.channel_order)
        check_labels(lbl, self.num_classes, self.ignore_label, source=source)
        return (img, lbl, index) if self.train else (img, lbl, self.names[index])

