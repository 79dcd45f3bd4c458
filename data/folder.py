"""Your own dataset from folders (`"dataset": "folder"`): images and single-channel label maps, no code to write.

Configured in the JSON `folder` section (see docs/datasets.md, "Training on your own data"):
- `train_images` / `train_labels`, `val_images` / `val_labels`: each a directory or a list file.
  Two directories: every image file (.png .jpg .jpeg .bmp .tif .tiff .webp, searched recursively) is paired with
  the label of the same relative path and name with a lossless extension (.png .bmp .tif .tiff), e.g.
  `images/a/x.jpg` <-> `labels/a/x.png`. Two list files: line k of one pairs with line k of the other. One list
  file of two columns (`image label` per line) with `*_labels` null. Paths in list files are relative to the list
  file's folder unless absolute; blank lines and lines starting with # are skipped.
- `unlabeled_images` (optional): a directory (searched recursively) or a list file (one image per line) of training
  images without labels. They are appended to the training items after the labeled pairs and form the unlabeled
  set, with the pairs the split leaves unlabeled; their items carry an all-ignore label (never used: the method
  reads only the images of unlabeled batches). An image that is also a pair's image is left out (it is labeled).
- `class_names` and/or `num_classes`, `palette` ([[r,g,b], ...], default: the VOC colour map), `mean` ([r,g,b],
  default 127.5 each); the top-level `ignore_label` marks unlabeled pixels.
Labels hold class indices 0..C-1 or the ignore label (8-bit, mode L or P). The dataset is checked when it is built:
a missing label, a size mismatch between an image and its label, or a label value out of range stops with the
file named, before any training. Unlabeled images are not read then (there may be many): --dry-run --check-files
reads them, and an unreadable one met during training stops the run like a bad labeled file.

Training items are random crops (padded with the ignore label when the image is smaller) drawn from the item's
(index, seed) key, like Cityscapes; validation items are whole images with their names.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image

from data.common import READ_ERRORS, SegmentationDataset, exif_note, random_crop, read_image, read_label
from data.pixels import SWAPS_SIZE, exif_orientation
from data.voc import voc_palette
from utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG label has smeared class ids


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """The VOC colour map: distinct colours for up to 256 classes."""
    return voc_palette(n)


def walk_files(directory: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, str]:
    """{relative path without extension ('a/x'): path} of the files with `extensions` under `directory`."""
    found: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked: symlinked folders are followed once
    for dirpath, dirnames, files in os.walk(directory, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second link to a folder already walked
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions and not name.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, stem), directory).replace(os.sep, "/")
                if rel in found:
                    raise UserError(f"{found[rel]} and {os.path.join(dirpath, name)} have the same name; keep one "
                                    f"file per image name in {directory}.")
                found[rel] = os.path.join(dirpath, name)
    return found


def read_list(path: str, columns: int, setting: str) -> list[list[str]]:
    """Rows of a list file (paths resolved against its folder); `columns` entries per row. `setting` (the option
    that named the file) ends error messages."""
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != columns:
                raise UserError(f"{path} line {number}: expected {columns} path{'s' if columns > 1 else ''} per line"
                                f"{' (image label)' if columns == 2 else ''}, got {len(parts)} ('{line}') "
                                f"({setting}).")
            rows.append([p if os.path.isabs(p) else os.path.join(base, p) for p in parts])
    return rows


def list_pairs(images: str | None, labels: str | None, what: str) -> tuple[list[str], list[str], list[str]]:
    """(names, image paths, label paths) of one split from the `folder.<what>_images` / `_labels` settings."""
    ikey, lkey = f"{what}_images", f"{what}_labels"
    if not images:
        raise UserError(f'"dataset": "folder" needs folder.{ikey} (a directory of images or a list file).')
    if not os.path.exists(images):
        raise UserError(f"folder.{ikey}: {images} does not exist.")
    if labels is not None and not os.path.exists(labels):
        raise UserError(f"folder.{lkey}: {labels} does not exist.")
    if os.path.isdir(images):
        if labels is None or not os.path.isdir(labels):
            raise UserError(f"folder.{ikey} is a directory ({images}), so folder.{lkey} must be the directory of "
                            f"its labels (got {labels}).")
        image_files = walk_files(images, IMAGE_EXTENSIONS)
        label_files = walk_files(labels, LABEL_EXTENSIONS)
        if not image_files:
            raise UserError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {images} (folder.{ikey}).")
        names, image_paths, label_paths = [], [], []
        for rel, path in image_files.items():
            if rel not in label_files:
                raise UserError(f"image {path} has no label: expected {os.path.join(labels, rel)}.png (same relative "
                                f"path and name, extension {'/'.join(LABEL_EXTENSIONS)}) (folder.{lkey}). Images "
                                f"without labels go in another folder, named by folder.unlabeled_images.")
            names.append(os.path.relpath(path, images).replace(os.sep, "/"))
            image_paths.append(path)
            label_paths.append(label_files[rel])
        return names, image_paths, label_paths
    if labels is None:  # one list file, "image label" per line
        rows = read_list(images, 2, f"folder.{ikey}")
        image_paths, label_paths = [r[0] for r in rows], [r[1] for r in rows]
    else:
        if os.path.isdir(labels):
            raise UserError(f"folder.{ikey} is a list file ({images}) but folder.{lkey} a directory ({labels}); give "
                            f"two directories, two list files, or one two-column list file with folder.{lkey} null.")
        image_paths = [r[0] for r in read_list(images, 1, f"folder.{ikey}")]
        label_paths = [r[0] for r in read_list(labels, 1, f"folder.{lkey}")]
        if len(image_paths) != len(label_paths):
            raise UserError(f"{images} lists {len(image_paths)} images but {labels} lists {len(label_paths)} labels; "
                            f"line k of one must be the label of line k of the other (folder.{ikey}, folder.{lkey}).")
    if not image_paths:
        raise UserError(f"{images} lists no images (folder.{ikey}).")
    for path in image_paths + label_paths:
        if not os.path.isfile(path):
            raise UserError(f"{path} (listed in {images if path in image_paths else labels}) does not exist.")
    base = os.path.dirname(os.path.abspath(images))
    names = [os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/") for p in image_paths]
    return names, image_paths, label_paths


def list_images(images: str, setting: str = "folder.unlabeled_images") -> tuple[list[str], list[str]]:
    """(names, paths) of the images under a directory (searched recursively, sorted) or listed in a list file (one
    path per line, relative to the list file's folder; a second column, such as a mask, is ignored)."""
    if not os.path.exists(images):
        raise UserError(f"{setting}: {images} does not exist.")
    if os.path.isdir(images):
        paths = list(walk_files(images, IMAGE_EXTENSIONS).values())
        names = [os.path.relpath(p, images).replace(os.sep, "/") for p in paths]
        if not paths:
            raise UserError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {images} ({setting}).")
        return names, paths
    base = os.path.dirname(os.path.abspath(images))
    paths = []
    with open(images) as f:
        for line in f:
            parts = line.split()
            if parts and not parts[0].startswith("#"):
                paths.append(parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0]))
    if not paths:
        raise UserError(f"{images} lists no images ({setting}).")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(paths)} images listed in {images} ({setting}) do not exist:\n  "
                        + "\n  ".join(missing))
    return [os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/") for p in paths], paths


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header, as viewers show the image (its EXIF orientation applied)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if exif_orientation(img) in SWAPS_SIZE else (w, h)
    except READ_ERRORS as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); the file is corrupt or not an image.") from None


def check_pair(image_path: str, label_path: str, num_classes: int, ignore_label: int) -> int:
    """Refuse an image/label pair whose sizes differ or whose label holds values other than 0..C-1 and the ignore
    label, naming the file; returns the number of labeled (not ignored) pixels."""
    image_size, label_size = _image_size(image_path), _image_size(label_path)
    if image_size != label_size:
        raise UserError(f"label {label_path} is {label_size[0]}x{label_size[1]} (WxH) but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]}; "
                        + exif_note(image_path, label_size, "labels must have their image's size."))
    counts = np.bincount(read_label(label_path).ravel(), minlength=256)
    counts[ignore_label] = 0
    bad = np.flatnonzero(counts[num_classes:]) + num_classes
    if bad.size:
        raise UserError(f"label {label_path} holds values {bad[:10].tolist()} outside the classes 0..{num_classes - 1} "
                        f"and not the ignore label {ignore_label}; fix the file or folder.num_classes / ignore_label.")
    return int(counts[:num_classes].sum())


class FolderDataset(SegmentationDataset):
    """Image/label pairs listed by `list_pairs`; every pair checked at construction (`check=True`). `unlabeled`
    (folder.unlabeled_images) appends images without labels: items num_pairs.. of the dataset, label path None."""

    name = "folder"

    def __init__(self, images: str | None, labels: str | None, what: str, *, num_classes: int,
                 class_names: Sequence[str], palette: Sequence[Sequence[int]], train: bool,
                 crop_size: tuple[int, int] | None, channel_order: str, ignore_label: int, check: bool = True,
                 unlabeled: str | None = None):
        super().__init__(train, crop_size, channel_order, ignore_label)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.names, self.image_paths, self.label_paths = list_pairs(images, labels, what)
        if check:
            pairs = list(zip(self.image_paths, self.label_paths))

            def problem(pair: tuple[str, str]) -> str | int:
                try:
                    return check_pair(pair[0], pair[1], self.num_classes, self.ignore_label)
                except UserError as e:
                    return str(e)

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
                results = list(pool.map(problem, pairs))
            problems = [p for p in results if isinstance(p, str)]
            if len(problems) == 1:
                raise UserError(problems[0])
            if problems:  # every bad pair at once, not one per attempt
                raise UserError(f"{len(problems)} of {len(pairs)} {what} pairs cannot be used:\n  "
                                + "\n  ".join(problems))
            if what == "val" and not sum(results):  # nothing to score: every evaluation would be NaN
                raise UserError(f"every pixel of the {len(pairs)} validation labels (folder.val_labels) is the ignore "
                                f"label {self.ignore_label}: there is nothing to score. Label the validation images.")
        self.num_pairs = len(self.names)
        if unlabeled:
            self._add_unlabeled(unlabeled)

    def _add_unlabeled(self, images: str) -> None:
        """Append the images of folder.unlabeled_images (not read here) as items without a label."""
        names, paths = list_images(images)
        labeled = {os.path.realpath(p) for p in self.image_paths}
        kept = [(n, p) for n, p in zip(names, paths) if os.path.realpath(p) not in labeled]
        if not kept:
            raise UserError(f"folder.unlabeled_images ({images}): all its {len(paths)} images are images of labeled "
                            f"pairs; name a folder or list of images without labels.")
        self.names += [n for n, _ in kept]
        self.image_paths += [p for _, p in kept]
        self.label_paths += [None] * len(kept)

    def check_item(self, index: int) -> None:
        """The construction's check of pair `index` (sizes, every label value, not only a crop's): --check-files.
        An image without a label has no pair to check (reading the item reads the image)."""
        if self.label_paths[index] is not None:
            check_pair(self.image_paths[index], self.label_paths[index], self.num_classes, self.ignore_label)

    def _load(self, index: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
        image = read_image(self.image_paths[index])
        if self.label_paths[index] is None:  # an unlabeled image: every pixel ignored
            label = np.full(image.shape[:2], self.ignore_label, dtype=np.uint8)
            if self.train:
                image, label = random_crop(image, label, self.crop_size, rng, self.ignore_label, x_first=True)
            return image, label, self.image_paths[index]
        label = read_label(self.label_paths[index])
        if image.shape[:2] != label.shape:
            raise UserError(f"label {self.label_paths[index]} is {label.shape[1]}x{label.shape[0]} (WxH) but its "
                            f"image {self.image_paths[index]} is {image.shape[1]}x{image.shape[0]}; "
                            + exif_note(self.image_paths[index], label.shape[::-1], "they do not belong together."))
        if self.train:
            image, label = random_crop(image, label, self.crop_size, rng, self.ignore_label, x_first=True)
        return image, label, self.label_paths[index]


def folder_classes(section: dict, ignore_label: int, source: str = "config"
                   ) -> tuple[int, list[str], list[tuple[int, int, int]], tuple[float, float, float]]:
    """(num_classes, class names, palette, mean RGB) from the config's `folder` section, validated."""
    names, n = section.get("class_names"), section.get("num_classes")
    if names is None and n is None:
        raise UserError(f'{source}: "dataset": "folder" needs folder.class_names (a list of names) or '
                        f"folder.num_classes.")
    if names is not None and (not names or not all(isinstance(c, str) for c in names)):
        raise UserError(f"{source}: folder.class_names must be a non-empty list of strings, got {names}.")
    if n is None:
        n = len(names)
    if n < 1 or n > 255:
        raise UserError(f"{source}: folder.num_classes must be in 1..255, got {n}.")
    if names is None:
        names = [f"class_{k}" for k in range(n)]
    if len(names) != n:
        raise UserError(f"{source}: folder.class_names has {len(names)} names but folder.num_classes is {n}.")
    if 0 <= ignore_label < n:
        raise UserError(f"{source}: ignore_label {ignore_label} is one of the class indices 0..{n - 1}; use a value "
                        f">= {n} (e.g. 255) for unlabeled pixels.")
    palette = section.get("palette")
    if palette is None:
        palette = default_palette(n)
    ok = isinstance(palette, list) and all(
        isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in palette)
    if not ok or len(palette) < n:
        raise UserError(f"{source}: folder.palette must list {n} colours [r, g, b] (integers 0..255), one per class.")
    mean = section.get("mean")
    if mean is None:
        mean = [127.5, 127.5, 127.5]
    if len(mean) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean):
        raise UserError(f"{source}: folder.mean must be [r, g, b] (three numbers in 0..255), got {mean}.")
    return n, list(names), [tuple(c) for c in palette[:n]], tuple(float(v) for v in mean)
