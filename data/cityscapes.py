"""Cityscapes (SPEC 6.1): the official folder layout, label ids -> 19 train ids, the released resizes and crops.

Training, DeepLabv2 ("2"): Pillow resize to half size (image BILINEAR, label NEAREST) then a random crop;
DeepLabv3+ ("3"): random crop at full resolution. Validation: v2 image at half size with the label at full size
(predictions are upsampled to the label), v3 both at full size.
"""
from __future__ import annotations

import os
import random

import numpy as np

from data.cityscapes_labels import CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, PALETTE, id_to_trainid_lut
from data.common import SegmentationDataset, random_crop, read_image, read_pair, resize_image, resize_label
from utils.errors import UserError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"  # cityscapesScripts' train-id masks (ignore 255), read unmapped


def expected_tree(root: str) -> str:
    """The folder layout Cityscapes must have, drawn for error messages."""
    return (
        f"Expected tree (the *_trainvaltest level may be left out):\n"
        f"  {root}/\n"
        f"  |-- leftImg8bit_trainvaltest/\n"
        f"  |   `-- leftImg8bit/\n"
        f"  |       |-- train/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
        f"  |       `-- val/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
        f"  `-- gtFine_trainvaltest/\n"
        f"      `-- gtFine/\n"
        f"          |-- train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png\n"
        f"          `-- val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png\n"
        f"Extract leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (cityscapes-dataset.com) there, or "
        f"point --data-root / training.data.root at the folder that holds them."
    )


def _find_dir(root: str, what: str, split: str) -> str:
    """`what` is "leftImg8bit" or "gtFine"; returns the existing split folder or raises with the tree."""
    candidates = [os.path.join(root, f"{what}_trainvaltest", what, split), os.path.join(root, what, split)]
    for path in candidates:
        if os.path.isdir(path):
            return path
    looked = "\n".join(f"  {os.path.abspath(p)}" for p in candidates)
    kind = "images" if what == "leftImg8bit" else "labels"
    raise UserError(f"Cityscapes {split} {kind} not found. Looked for:\n{looked}\n"
                    f"{expected_tree(os.path.abspath(root))}")


def list_cityscapes(root: str, split: str) -> tuple[list[str], list[str], list[str]]:
    """(names, image paths, label paths) of a split, sorted by the image path relative to the split folder.

    Names are those relative paths ("aachen/aachen_000000_000019_leftImg8bit.png").
    """
    images_dir = _find_dir(root, "leftImg8bit", split)
    labels_dir = _find_dir(root, "gtFine", split)
    names = []
    for dirpath, _, files in os.walk(images_dir):
        for f in files:
            if f.endswith(IMAGE_SUFFIX):
                names.append(os.path.relpath(os.path.join(dirpath, f), images_dir).replace(os.sep, "/"))
    names.sort()
    if not names:
        raise UserError(f"no *{IMAGE_SUFFIX} files under {os.path.abspath(images_dir)} (Cityscapes {split} images).\n"
                        f"{expected_tree(os.path.abspath(root))}")
    images, labels = [], []
    for name in names:
        image = os.path.join(images_dir, *name.split("/"))
        label = image_to_label_path(name, labels_dir)
        if not os.path.isfile(label):
            raise UserError(f"Cityscapes image {image} has no label: expected {label}. Extract "
                            f"gtFine_trainvaltest.zip completely (the *{LABEL_SUFFIX} files).")
        images.append(image)
        labels.append(label)
    return names, images, labels


def image_to_label_path(name: str, labels_dir: str) -> str:
    """'<city>/<id>_leftImg8bit.png' -> '<labels_dir>/<city>/<id>_gtFine_labelIds.png'."""
    parts = name.split("/")
    parts[-1] = parts[-1][: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX
    return os.path.join(labels_dir, *parts)


def validation_input(image: np.ndarray, version: str) -> np.ndarray:
    """The network input of a whole [H,W,3] image at evaluation: DeepLabv2 half size ((W // 2, H // 2), int(size / 2)
    as released, Pillow bilinear), DeepLabv3+ unchanged. Predictions are upsampled to the full size."""
    h, w = image.shape[:2]
    return resize_image(image, (w // 2, h // 2)) if str(version) == "2" else image


def train_id_lut(ignore_label: int) -> np.ndarray:
    """[256] uint8 for *_gtFine_labelTrainIds.png masks: train ids kept, 255 -> `ignore_label` (other values pass
    through, so that the label check names a file holding them)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[255] = ignore_label
    return lut


class CityscapesDataset(SegmentationDataset):
    """Cityscapes split `split` ("train" or "val"); `train` (default: split == "train") selects random crops.

    `items` = (names, image paths, label paths) replaces the listing of the split folder (split files of `image
    mask` lines, data/pair_lists.py): a label path None is an unlabeled image (every pixel ignored), one ending in
    _gtFine_labelTrainIds.png holds train ids, any other label ids (mapped as usual).
    """

    name = "cityscapes"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root: str, split: str = "train", version: str = "2", crop_size: tuple[int, int] | None = None,
                 channel_order: str = "BGR", ignore_label: int = IGNORE_LABEL, train: bool | None = None,
                 items: tuple[list[str], list[str], list[str | None]] | None = None):
        train = split == "train" if train is None else train
        super().__init__(train, crop_size, channel_order, ignore_label)
        if version not in ("2", "3"):
            raise ValueError(f"version must be '2' or '3', got {version!r}")
        self.root, self.split, self.version = root, split, version
        self.names, self.images, self.labels = [list(v) for v in items] if items else list_cityscapes(root, split)
        self.lut = id_to_trainid_lut(self.ignore_label)  # [256] uint8: label id -> train id
        self.train_id_lut = train_id_lut(self.ignore_label)

    def _load(self, index: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
        image_path, label_path = self.images[index], self.labels[index]
        lut = self.lut
        if label_path is None:  # an unlabeled image: label id 0 ("unlabeled") everywhere, ignored once mapped
            image = read_image(image_path)
            raw, label_path = np.zeros(image.shape[:2], dtype=np.uint8), image_path
        else:
            image, raw = read_pair(image_path, label_path, "Cityscapes")
            if label_path.endswith(TRAIN_ID_SUFFIX):
                lut = self.train_id_lut
        h, w = raw.shape
        half = (w // 2, h // 2)  # Pillow sizes are (W, H); int(size / 2) as released
        if self.train:
            if self.version == "2":
                image, raw = resize_image(image, half), resize_label(raw, half)
            label = lut[raw]
            image, label = random_crop(image, label, self.crop_size, rng, self.ignore_label, x_first=True)
        else:
            image = validation_input(image, self.version)
            label = lut[raw]
        return image, label, label_path
