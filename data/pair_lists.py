"""Split files of today's semi-supervised segmentation papers, read as they are (training.data.split_file and
training.data.unlabeled_file, Cityscapes and Pascal VOC).

The peers (UniMatch, U2PL and their successors) publish their labeled and unlabeled lists as text files of
`image mask` lines, both paths relative to the dataset root, e.g. Cityscapes
 leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png gtFine/train/jena/jena_000078_000019_gtFine_labelTrainIds.png
and Pascal VOC
 JPEGImages/2008_006748.jpg SegmentationClass/2008_006748.png
A split file whose every line has two columns is read this way: its lines are the labeled items, in file order,
with the masks they name. The unlabeled items are the images of `unlabeled_file` (first column; a mask column is
not read), or without one the training images of the dataset folder that the split file does not name. Masks of
unlabeled images are never needed.

Paths are looked up under the root in the layouts the datasets accept: Cityscapes `leftImg8bit/...` and `gtFine/...`
also under the `*_trainvaltest` folders. A Cityscapes `*_gtFine_labelTrainIds.png` mask (train ids, made by
cityscapesScripts) that is missing is replaced by the frame's `*_gtFine_labelIds.png` (mapped to train ids as
usual: the same labels); a VOC mask missing from SegmentationClass by the file of the same name in
SegmentationClassAug, and the other way round; each replacement is reported once, with its count. Every line that
names a missing file is listed in one message.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from data.cityscapes import LABEL_SUFFIX, TRAIN_ID_SUFFIX
from utils.errors import UserError

SPLIT_SETTING = "training.data.split_file"
UNLABELED_SETTING = "training.data.unlabeled_file"
VOC_MASK_FOLDERS = {"SegmentationClass": "SegmentationClassAug", "SegmentationClassAug": "SegmentationClass"}
SHOWN_WHEN_NONE_FOUND = 10  # lines listed when not one listed file exists (a wrong root, most likely)


@dataclass
class ListedSplit:
    """Training items from split files: the first `num_labeled` are labeled (label path given), the rest are
    unlabeled (label path None)."""

    names: list[str]
    images: list[str]
    labels: list[str | None]
    num_labeled: int

    @property
    def items(self) -> tuple[list[str], list[str], list[str | None]]:
        return self.names, self.images, self.labels

    def split(self) -> tuple[list[int], list[int]]:
        return list(range(self.num_labeled)), list(range(self.num_labeled, len(self.names)))


def read_rows(path: str, setting: str) -> list[tuple[int, list[str]]]:
    """(line number, columns) of the non-blank lines of a list file that do not start with #."""
    if not os.path.isfile(path):
        raise UserError(f"split file not found: {path} ({setting}).")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if parts and not parts[0].startswith("#"):
                rows.append((number, parts))
    return rows


def is_pair_list(path: str | None) -> bool:
    """Whether `path` is a split file of `image mask` lines (two columns on every line); ids lists and the
    release's .pkl files are read as before (data/splits.py)."""
    if not path or path.lower().endswith(".pkl") or not os.path.isfile(path):
        return False
    rows = read_rows(path, SPLIT_SETTING)
    return bool(rows) and all(len(parts) == 2 for _, parts in rows)


def _clean(rel: str) -> str:
    rel = rel.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def _candidates(rel: str, root: str, dataset: str) -> list[str]:
    """Where a listed path may be: under the root, and for Cityscapes under its *_trainvaltest folders too."""
    if os.path.isabs(rel):  # "/JPEGImages/x.jpg" (the release's VOC lists) is relative to the root too
        return [rel, os.path.join(root, *_clean(rel).lstrip("/").split("/"))]
    rel = _clean(rel)
    out = [os.path.join(root, *rel.split("/"))]
    top = rel.split("/", 1)[0]
    if dataset == "cityscapes" and top in ("leftImg8bit", "gtFine"):
        out.append(os.path.join(root, f"{top}_trainvaltest", *rel.split("/")))
    return out


def _find(rel: str, root: str, dataset: str) -> str | None:
    return next((p for p in _candidates(rel, root, dataset) if os.path.isfile(p)), None)


def _replacement(rel: str, dataset: str) -> str | None:
    """The mask read in place of a missing listed one: Cityscapes labelTrainIds -> labelIds of the same frame; VOC
    SegmentationClass <-> SegmentationClassAug."""
    rel = _clean(rel)
    if dataset == "cityscapes" and rel.endswith(TRAIN_ID_SUFFIX):
        return rel[: -len(TRAIN_ID_SUFFIX)] + LABEL_SUFFIX
    if dataset == "pascal_voc":
        parts = rel.split("/")
        for k, part in enumerate(parts[:-1]):
            if part in VOC_MASK_FOLDERS:
                return "/".join(parts[:k] + [VOC_MASK_FOLDERS[part]] + parts[k + 1:])
    return None


def _kind(rel: str) -> str:
    """What a replacement changes, for its warning: the Cityscapes mask suffix, or the VOC mask folder."""
    parts = _clean(rel).split("/")
    return next((p for p in parts[:-1] if p in VOC_MASK_FOLDERS), "*" + parts[-1].rsplit("_gtFine", 1)[-1])


def _name(path: str, root: str, listed: str | None = None) -> str:
    """An item's name: the image path as its list writes it (without a leading ./ or /), else relative to the root
    in the peers' form (Cityscapes without the *_trainvaltest folder); a path outside the root stays absolute."""
    if listed is not None and not (os.path.isabs(listed) and os.path.normpath(listed) == os.path.normpath(path)):
        return _clean(listed).lstrip("/")
    inside = os.path.relpath(path, root).replace(os.sep, "/")
    if inside.startswith(".."):
        return path
    first, _, rest = inside.partition("/")
    return rest if first in ("leftImg8bit_trainvaltest", "gtFine_trainvaltest") else inside


def read_pair_split(dataset: str, root: str, split_file: str, unlabeled_file: str | None,
                    training_images: Callable[[], Sequence[str]], labeled_samples: int) -> ListedSplit:
    """The training items named by a split file of `image mask` lines (and `unlabeled_file`); without
    `unlabeled_file`, `training_images()` (the dataset folder's training list) gives the unlabeled images."""
    rows = read_rows(split_file, SPLIT_SETTING)
    missing: list[str] = []
    replaced: Counter = Counter()
    checked = 0
    names: list[str] = []
    images: list[str] = []
    labels: list[str | None] = []
    for number, (image_rel, mask_rel) in rows:
        image, mask = _find(image_rel, root, dataset), _find(mask_rel, root, dataset)
        checked += 2
        other = _replacement(mask_rel, dataset) if mask is None else None
        if other is not None:
            mask = _find(other, root, dataset)
            if mask is not None:
                replaced[(_kind(mask_rel), _kind(other))] += 1
        if image is None:
            missing.append(f"{split_file} line {number}: image {image_rel}")
        if mask is None:
            missing.append(f"{split_file} line {number}: mask {mask_rel}" + (f" (nor {other})" if other else ""))
        names.append(_name(image or image_rel, root, image_rel))
        images.append(image or image_rel)
        labels.append(mask)
    if not rows:
        raise UserError(f"split file {split_file} lists no images ({SPLIT_SETTING}).")
    num_labeled = len(names)
    if unlabeled_file:
        for number, parts in read_rows(unlabeled_file, UNLABELED_SETTING):
            image = _find(parts[0], root, dataset)
            checked += 1
            if image is None:
                missing.append(f"{unlabeled_file} line {number}: image {parts[0]}")
            names.append(_name(image or parts[0], root, parts[0]))
            images.append(image or parts[0])
            labels.append(None)
    if missing:
        raise UserError(_missing_message(missing, checked, root, dataset))
    for (listed, used), count in replaced.items():
        warnings.warn(f"{count} mask(s) listed as {listed} in {split_file} are not in {root}; the {used} files of "
                      f"the same images are read instead"
                      + (" (label ids mapped to train ids: the same labels)" if dataset == "cityscapes" else
                         " (the fine and the augmented VOC labels of an image may differ)"), stacklevel=2)
    if not unlabeled_file:
        chosen = {os.path.realpath(p) for p in images}
        for path in training_images():
            if os.path.realpath(path) not in chosen:
                names.append(_name(path, root))
                images.append(path)
                labels.append(None)
    _refuse_repeats(images, split_file, unlabeled_file)
    if num_labeled != labeled_samples:
        warnings.warn(f"split file {split_file} lists {num_labeled} labeled images; training.data.labeled_samples "
                      f"({labeled_samples}) is superseded by the file.", stacklevel=2)
    return ListedSplit(names, images, labels, num_labeled)


def _refuse_repeats(images: list[str], split_file: str, unlabeled_file: str | None) -> None:
    counts = Counter(os.path.realpath(p) for p in images)
    repeated = [p for p, n in counts.items() if n > 1]
    if repeated:
        where = f"{split_file} and {unlabeled_file}" if unlabeled_file else split_file
        raise UserError(f"{len(repeated)} image(s) are listed more than once in {where} (an image is labeled or "
                        f"unlabeled, once), e.g. {repeated[:5]}.")


def _missing_message(missing: list[str], checked: int, root: str, dataset: str) -> str:
    where = os.path.abspath(root)
    if len(missing) < checked:
        many = len(missing) > 1
        return (f"{len(missing)} file{'s' if many else ''} named by the split files {'are' if many else 'is'} missing "
                f"from the dataset folder {where} (paths are relative to it):\n  " + "\n  ".join(missing))
    holds = "leftImg8bit/ and gtFine/" if dataset == "cityscapes" else "JPEGImages/ and SegmentationClass(Aug)/"
    shown = missing[:SHOWN_WHEN_NONE_FOUND]
    more = f"\n  ... and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
    return (f"none of the {checked} files named by the split files is in {where}: their paths are relative to the "
            f"dataset root, the folder that holds {holds}; point --data-root / training.data.root at it.\n  "
            + "\n  ".join(shown) + more)


def refuse_validation_images(train_images: Sequence[str], val_images: Sequence[str], split_file: str) -> None:
    """A split file that names validation images would train on what the run evaluates on: refused."""
    val = {os.path.realpath(p) for p in val_images}
    shared = [p for p in train_images if os.path.realpath(p) in val]
    if shared:
        raise UserError(f"the split files ({split_file}) name {len(shared)} image(s) of the validation set, e.g. "
                        f"{shared[:3]}; training lists must name training images only.")
