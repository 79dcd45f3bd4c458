"""Builders of tiny dataset trees on disk, in the real folder layouts and file names (for tests).

Each builder writes deterministic random content (seeded) and returns what it wrote, so a test can compare the
loader's output with an independent computation or overwrite single files.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

CITYSCAPES_TRAIN_CITIES = ("aachen", "bochum", "zurich")
CITYSCAPES_VAL_CITIES = ("frankfurt", "lindau", "munster")
# Label ids found in real gtFine files: unlabeled 0, ego vehicle 1, road 7, sidewalk 8, building 11, pole 17,
# vegetation 21, sky 23, person 24, car 26, license plate (-1 in the official table, stored as 255).
CITYSCAPES_IDS = (0, 1, 7, 8, 11, 17, 21, 23, 24, 26, 255)


def save_png(path: str, array: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> None:
    """Write an [H,W,3] RGB or [H,W] (mode L, or P with `palette`) uint8 array."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if palette is not None:  # an "L" image with a palette becomes mode "P" holding the same values
        flat = [c for rgb in palette for c in rgb]
        img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


def cityscapes_name(city: str, k: int) -> str:
    return f"{city}_{k:06d}_{19 + k:06d}"


def make_cityscapes_tree(root: str, n_train: int, n_val: int, size: tuple[int, int] = (64, 128),
                         with_trainvaltest: bool = True, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Cityscapes tree under `root`: {split: [(image path, label path), ...]} in sorted order.

    Images are random RGB PNGs of `size` (H, W); labels are random real label ids (CITYSCAPES_IDS), mode L.
    Files are spread over three cities per split.
    """
    rng = np.random.default_rng(seed)
    img_base = os.path.join(root, "leftImg8bit_trainvaltest", "leftImg8bit") if with_trainvaltest \
        else os.path.join(root, "leftImg8bit")
    lbl_base = os.path.join(root, "gtFine_trainvaltest", "gtFine") if with_trainvaltest \
        else os.path.join(root, "gtFine")
    out: dict[str, list[tuple[str, str]]] = {}
    for split, n, cities in (("train", n_train, CITYSCAPES_TRAIN_CITIES), ("val", n_val, CITYSCAPES_VAL_CITIES)):
        files = []
        for k in range(n):
            city = cities[k % len(cities)]
            stem = cityscapes_name(city, k)
            image = os.path.join(img_base, split, city, stem + "_leftImg8bit.png")
            label = os.path.join(lbl_base, split, city, stem + "_gtFine_labelIds.png")
            save_png(image, rng.integers(0, 256, (*size, 3)))
            save_png(label, rng.choice(np.array(CITYSCAPES_IDS), size))
            files.append((image, label))
        out[split] = sorted(files)
    return out


def make_voc_tree(root: str, n_train: int, n_val: int, size: tuple[int, int] = (40, 60), aug: bool = True,
                  seed: int = 0) -> dict[str, list[str]]:
    """Pascal VOC tree: JPEGImages/<id>.jpg, SegmentationClassAug (or SegmentationClass if not `aug`)/<id>.png
    (palette PNGs holding 0..20 and 255), ImageSets/Segmentation/val.txt. Returns {"train": ids, "val": ids}."""
    from data.voc import PALETTE

    rng = np.random.default_rng(seed)
    ids = [f"2007_{k:06d}" for k in range(n_train + n_val)]
    perm = rng.permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    train = sorted(set(ids) - set(val))
    labels_dir = os.path.join(root, "SegmentationClassAug" if aug else "SegmentationClass")
    for i in ids:
        image = rng.integers(0, 256, (*size, 3))
        os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(root, "JPEGImages", i + ".jpg"), quality=95)
        label = rng.integers(0, 21, size)
        label[0, :] = 255  # object borders are 255 in VOC
        save_png(os.path.join(labels_dir, i + ".png"), label, palette=PALETTE)
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("".join(i + "\n" for i in val))
    return {"train": train, "val": val}


def make_gta5_tree(root: str, n_train: int, n_val: int, size: tuple[int, int] = (64, 128),
                   seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """GTA5 tree: images/{train,val}/NNNNN.png (RGB) and labels/{train,val}/NNNNN.png (train ids 0..18, 250)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, str]]] = {}
    k = 1
    for split, n in (("train", n_train), ("val", n_val)):
        files = []
        for _ in range(n):
            image = os.path.join(root, "images", split, f"{k:05d}.png")
            label = os.path.join(root, "labels", split, f"{k:05d}.png")
            save_png(image, rng.integers(0, 256, (*size, 3)))
            save_png(label, rng.choice(np.array(list(range(19)) + [250]), size))
            files.append((image, label))
            k += 1
        out[split] = files
    return out
