"""GTA5 (SPEC 6.3): synthetic driving frames whose labels already hold Cityscapes train ids (ignore 250).

Loaded like Cityscapes v2 training: Pillow resize to half size (image BILINEAR, label NEAREST) then a random crop.
The label is resized to the half size of its image, so the few GTA5 frames whose label size differs from the
image come out aligned.
"""
from __future__ import annotations

import os
import random

import numpy as np

from data.cityscapes_labels import CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, PALETTE
from data.common import SegmentationDataset, random_crop, read_image, read_label, resize_image, resize_label
from utils.errors import UserError


def expected_tree(root: str) -> str:
    return (
        f"Expected tree:\n"
        f"  {root}/\n"
        f"  |-- images/\n"
        f"  |   |-- train/*.png\n"
        f"  |   `-- val/*.png\n"
        f"  `-- labels/\n"
        f"      |-- train/*.png    (train ids; convert the released colour labels with utils/translate_labels.py)\n"
        f"      `-- val/*.png\n"
        f"Point --gta5-root / training.data.gta5_root at that folder."
    )


def list_gta5(root: str, split: str) -> tuple[list[str], list[str], list[str]]:
    """(names, image paths, label paths) of `<root>/images/<split>` and its sub-folders (searched recursively, as the
    release's loader globs them), sorted by relative path; each label at the same relative path under
    `<root>/labels/<split>`."""
    images_dir = os.path.join(root, "images", split)
    labels_dir = os.path.join(root, "labels", split)
    for d in (images_dir, labels_dir):
        if not os.path.isdir(d):
            raise UserError(f"GTA5 folder not found: looked for {os.path.abspath(d)}\n"
                            f"{expected_tree(os.path.abspath(root))}")
    names = sorted(os.path.relpath(os.path.join(folder, f), images_dir).replace(os.sep, "/")
                   for folder, _, files in os.walk(images_dir) for f in files if f.lower().endswith(".png"))
    if not names:
        raise UserError(f"no *.png images in {os.path.abspath(images_dir)}\n{expected_tree(os.path.abspath(root))}")
    images = [os.path.join(images_dir, *n.split("/")) for n in names]
    labels = [os.path.join(labels_dir, *n.split("/")) for n in names]
    for image, label in zip(images, labels):
        if not os.path.isfile(label):
            raise UserError(f"GTA5 image {image} has no label: expected {label}.")
    return names, images, labels


class GTA5Dataset(SegmentationDataset):
    """GTA5 frames of `split` ("train", "val", or "all" for both), half size then a random crop of `crop_size`."""

    name = "gta5"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root: str, split: str = "train", crop_size: tuple[int, int] | None = None,
                 channel_order: str = "BGR", ignore_label: int = IGNORE_LABEL, train: bool = True):
        super().__init__(train, crop_size, channel_order, ignore_label)
        self.root, self.split = root, split
        parts = [list_gta5(root, s) for s in (("train", "val") if split == "all" else (split,))]
        self.names = [n for p in parts for n in p[0]]
        self.images = [n for p in parts for n in p[1]]
        self.labels = [n for p in parts for n in p[2]]

    def _load(self, index: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
        image = read_image(self.images[index])
        label = read_label(self.labels[index])
        h, w = image.shape[:2]
        half = (w // 2, h // 2)
        image, label = resize_image(image, half), resize_label(label, half)
        if self.train:
            image, label = random_crop(image, label, self.crop_size, rng, self.ignore_label, x_first=True)
        return image, label, self.labels[index]
