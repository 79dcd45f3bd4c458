"""Pascal VOC 2012 with the augmented labels (SPEC 6.2).

Training: pad right/bottom to the crop size (image 0, label ignore) then one random crop, as the released
cv2.copyMakeBorder + crop; validation: the whole image (batch size 1, sizes differ). 21 classes, ignore 255.
"""
from __future__ import annotations

import os
import random
import warnings

import numpy as np

from data.common import SegmentationDataset, random_crop, read_image, read_pair
from utils.errors import UserError

NUM_CLASSES = 21
IGNORE_LABEL = 255
CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def voc_palette(n: int = NUM_CLASSES) -> list[tuple[int, int, int]]:
    """The standard VOC colour map: the bits of the class index spread over the high bits of R, G, B."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


PALETTE = voc_palette()


def expected_tree(root: str) -> str:
    return (
        f"Expected tree:\n"
        f"  {root}/\n"
        f"  |-- JPEGImages/<id>.jpg\n"
        f"  |-- SegmentationClassAug/<id>.png      (augmented labels; SegmentationClass/ is used if absent)\n"
        f"  `-- ImageSets/\n"
        f"      `-- Segmentation/\n"
        f"          `-- val.txt                     (one image id per line)\n"
        f"Extract VOCtrainval_11-May-2012.tar (its VOC2012 folder) and SegmentationClassAug there, or point "
        f"--data-root / training.data.root at that folder."
    )


def read_id_list(path: str) -> list[str]:
    """Image ids from a list file: one per line; the first column of 'JPEGImages/x.jpg labels/x.png' lines too."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read list file {path}: {e}") from None
    ids = []
    for line in lines:
        parts = line.split()
        if parts:
            ids.append(os.path.splitext(os.path.basename(parts[0]))[0])
    return ids


def list_voc(root: str, split: str, list_file: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """(ids, image paths, label paths) of a split. Train without a list file: every augmented label not in val."""
    aroot = os.path.abspath(root)
    images_dir = os.path.join(root, "JPEGImages")
    if not os.path.isdir(images_dir):
        raise UserError(f"Pascal VOC images not found: looked for {os.path.abspath(images_dir)}\n"
                        f"{expected_tree(aroot)}")
    labels_dir = os.path.join(root, "SegmentationClassAug")
    if not os.path.isdir(labels_dir):
        fallback = os.path.join(root, "SegmentationClass")
        if not os.path.isdir(fallback):
            raise UserError(f"Pascal VOC labels not found: looked for {os.path.abspath(labels_dir)} and "
                            f"{os.path.abspath(fallback)}\n{expected_tree(aroot)}")
        warnings.warn(f"{os.path.abspath(labels_dir)} not found; using {os.path.abspath(fallback)} (1,464 train "
                      f"labels instead of the 10,582 augmented ones the paper's splits assume)", stacklevel=3)
        labels_dir = fallback
    val_list = os.path.join(root, "ImageSets", "Segmentation", "val.txt")
    if split == "val" or list_file is None:
        if not os.path.isfile(val_list):
            raise UserError(f"Pascal VOC validation list not found: looked for {os.path.abspath(val_list)}\n"
                            f"{expected_tree(aroot)}")
    if split == "val":
        ids = read_id_list(val_list)
    elif list_file is not None:
        ids = read_id_list(list_file)
    else:
        val = set(read_id_list(val_list))
        ids = sorted(os.path.splitext(f)[0] for f in os.listdir(labels_dir)
                     if f.endswith(".png") and os.path.splitext(f)[0] not in val)
    if not ids:
        raise UserError(f"Pascal VOC {split} split is empty (labels in {os.path.abspath(labels_dir)}"
                        f"{', list ' + list_file if list_file else ''}).\n{expected_tree(aroot)}")
    images = [os.path.join(images_dir, i + ".jpg") for i in ids]
    labels = [os.path.join(labels_dir, i + ".png") for i in ids]
    # one listing per folder instead of a stat per file (12,000 of them for train + val)
    image_names, label_names = set(os.listdir(images_dir)), set(os.listdir(labels_dir))
    for i, image, label in zip(ids, images, labels):
        if i + ".jpg" not in image_names:
            raise UserError(f"Pascal VOC image {image} (id {i} of the {split} split) not found.")
        if i + ".png" not in label_names:
            raise UserError(f"Pascal VOC image {image} has no label: expected {label}.")
    return ids, images, labels


class VOCDataset(SegmentationDataset):
    """Pascal VOC split `split` ("train" or "val"); `list_file` replaces the default train list. `items` = (names,
    image paths, label paths) replaces both (split files of `image mask` lines, data/pair_lists.py); a label path
    None is an unlabeled image (every pixel ignored)."""

    name = "pascal_voc"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root: str, split: str = "train", crop_size: tuple[int, int] | None = None,
                 channel_order: str = "BGR", ignore_label: int = IGNORE_LABEL, train: bool | None = None,
                 list_file: str | None = None, items: tuple[list[str], list[str], list[str | None]] | None = None):
        train = split == "train" if train is None else train
        super().__init__(train, crop_size, channel_order, ignore_label)
        self.root, self.split = root, split
        self.names, self.images, self.labels = [list(v) for v in items] if items else list_voc(root, split, list_file)

    def _load(self, index: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
        image_path, label_path = self.images[index], self.labels[index]
        if label_path is None:  # an unlabeled image: every pixel ignored
            image = read_image(image_path)
            label, label_path = np.full(image.shape[:2], IGNORE_LABEL, dtype=np.uint8), image_path
        else:
            image, label = read_pair(image_path, label_path, "Pascal VOC")
        if self.ignore_label != IGNORE_LABEL:
            label = np.where(label == IGNORE_LABEL, np.uint8(self.ignore_label), label)
        if self.train:
            image, label = random_crop(image, label, self.crop_size, rng, self.ignore_label, x_first=False)
        return image, label, label_path
