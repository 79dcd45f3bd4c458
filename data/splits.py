"""Labeled / unlabeled splits of the training list (SPEC 6.4).

Split ids 0, 1, 2 of Cityscapes and Pascal VOC are the original release's published permutations
(`data/release_splits/`, see its README) applied to the sorted training list; for the other datasets they are fixed
permutations seeded by the split id. Other ids draw a permutation from the config seed with numpy's legacy
RandomState (the same on every machine and numpy version; the release's `np.random.shuffle` after seeding draws the
same one). The first L indices are labeled, the rest unlabeled. A split file may replace this: a text list of
labeled image ids, or the original release's pickled index array.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from typing import Sequence

import numpy as np

from utils.errors import UserError

FIXED_SPLITS = (0, 1, 2)
_STRIP_SUFFIXES = ("_leftImg8bit", "_gtFine_labelIds")
RELEASE_SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release_splits")
RELEASE_SPLIT_PREFIX = {"cityscapes": "city", "pascal_voc": "voc"}
# SHA-256 of the release's VOC training list (its data/voc_list/train_aug.txt: 10,582 sorted ids joined by "\n"),
# which its published VOC permutations index.
VOC_TRAIN_LIST_SHA256 = "855dff350b7f447bf43cb98ea626a32e0d0b3b7c5786e03b2712a21355b635bf"


def release_permutation(dataset: str, split_id: int) -> np.ndarray:
    """The release's published permutation `split_id` (0, 1, 2) of `dataset` ("cityscapes" or "pascal_voc")."""
    path = os.path.join(RELEASE_SPLITS_DIR, f"{RELEASE_SPLIT_PREFIX[dataset]}_split_{split_id}.txt")
    with open(path) as f:
        return np.array([int(line) for line in f if line.strip()], dtype=np.int64)


def names_fingerprint(names: Sequence[str]) -> str:
    """SHA-256 of the training list, one name per line (compared with the release's list)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _release_split(dataset: str, split_id: int, num_train: int, names: Sequence[str] | None) -> np.ndarray:
    perm = release_permutation(dataset, split_id)
    if perm.size != num_train:
        raise UserError(f"split_id_list {split_id} selects the original release's published {dataset} split, a "
                        f"permutation of {perm.size} training images, but this training set has {num_train}; use the "
                        f"full dataset, or set training.data.split_id_list to another value (a random split from "
                        f"seed) or training.data.split_file.")
    if dataset == "pascal_voc" and names is not None and names_fingerprint(names) != VOC_TRAIN_LIST_SHA256:
        warnings.warn(f"the VOC training list ({num_train} ids from SegmentationClassAug minus val.txt) differs from "
                      f"the release's train_aug.txt, so split_id_list {split_id} does not select the paper's labeled "
                      f"images; check the dataset folder.", stacklevel=3)
    return perm


def make_split(num_train: int, labeled_samples: int, split_id: int, seed: int, names: Sequence[str] | None = None,
               split_file: str | None = None, dataset: str | None = None) -> tuple[list[int], list[int]]:
    """(labeled indices, unlabeled indices) into the training list of `num_train` items.

    `dataset` "cityscapes" or "pascal_voc" with split_id 0, 1 or 2: the release's published permutation (its length
    must be `num_train`); `names` (the sorted training list) lets a VOC list be checked against the release's.

    With `split_file`: a `.pkl` index array of the original release (its first L entries are labeled, the rest and
    any index it lacks unlabeled), or a text file of labeled image ids matched against `names` (by relative path,
    basename or stem; all listed ids are labeled, the rest unlabeled in sorted order).
    """
    if split_file:
        if not os.path.isfile(split_file):
            raise UserError(f"split file not found: {split_file} (training.data.split_file).")
        if split_file.lower().endswith(".pkl"):
            return _split_from_pickle(split_file, num_train, labeled_samples)
        if names is None:
            raise ValueError("a text split file needs the training names to match against")
        return _split_from_text(split_file, names, labeled_samples)
    if labeled_samples > num_train:
        raise UserError(f"training.data.labeled_samples is {labeled_samples} but the training set has only "
                        f"{num_train} images; use at most {num_train}.")
    if labeled_samples < 0:
        raise UserError(f"training.data.labeled_samples must not be negative, got {labeled_samples}.")
    if split_id in FIXED_SPLITS and dataset in RELEASE_SPLIT_PREFIX:
        perm = _release_split(dataset, split_id, num_train, names)
    else:
        perm = np.random.RandomState(split_id if split_id in FIXED_SPLITS else seed).permutation(num_train)
    return [int(i) for i in perm[:labeled_samples]], [int(i) for i in perm[labeled_samples:]]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: no other global can be constructed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_index_pickle(path: str) -> np.ndarray:
    """A pickled index array / list (the release's split files) -> 1-D int64 array. Nothing else is loaded."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        arr = np.asarray(obj)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f"split file {path} is not a pickled index array ({e}); give a .pkl holding a numpy array or "
                        f"list of image indices, or a .txt list of labeled image ids.") from None
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise UserError(f"split file {path} holds {type(obj).__name__} data (as an array: dtype {arr.dtype}, shape "
                        f"{arr.shape}); expected a 1-D array of image indices.")
    return arr.astype(np.int64)


def _split_from_pickle(path: str, num_train: int, labeled_samples: int) -> tuple[list[int], list[int]]:
    arr = load_index_pickle(path)
    warnings.warn(f"split file {path}: the indices of the original release's .pkl splits refer to its own file order "
                  f"(its sorted train_aug.txt for VOC, the same as this project's sorted list of a standard folder; an "
                  f"unsorted os.walk order for Cityscapes, which differs), and the published ones are built in "
                  f"(split_id_list 0, 1, 2); prefer a .txt list of image ids to select given images.", stacklevel=3)
    bad = arr[(arr < 0) | (arr >= num_train)]
    if bad.size:
        raise UserError(f"split file {path} holds indices outside 0..{num_train - 1} (e.g. {bad[:5].tolist()}); it "
                        f"does not belong to this training set of {num_train} images.")
    if np.unique(arr).size != arr.size:
        raise UserError(f"split file {path} lists some indices more than once.")
    if labeled_samples > arr.size:
        raise UserError(f"training.data.labeled_samples is {labeled_samples} but split file {path} holds only "
                        f"{arr.size} indices.")
    labeled = [int(i) for i in arr[:labeled_samples]]
    rest = [int(i) for i in arr[labeled_samples:]]
    seen = np.zeros(num_train, dtype=bool)
    seen[arr] = True
    return labeled, rest + [int(i) for i in np.flatnonzero(~seen)]


def _keys(text: str) -> list[str]:
    """Lookup keys of a name or listed id, most specific first: path, path without extension, basename, stem,
    stem without a Cityscapes suffix."""
    text = text.replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    text = text.lstrip("/")
    base = text.rsplit("/", 1)[-1]
    stem = os.path.splitext(base)[0]
    keys = [text, os.path.splitext(text)[0], base, stem]
    for suffix in _STRIP_SUFFIXES:
        if stem.endswith(suffix):
            keys.append(stem[: -len(suffix)])
    return list(dict.fromkeys(keys))


def _split_from_text(path: str, names: Sequence[str], labeled_samples: int) -> tuple[list[int], list[int]]:
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        for key in _keys(name):
            lookup[key] = -1 if key in lookup and lookup[key] != i else i  # -1: ambiguous
    with open(path) as f:
        lines = [ln.split()[0] for ln in f.read().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    labeled, unknown, ambiguous = [], [], []
    for line in lines:
        index = next((lookup[k] for k in _keys(line) if k in lookup), None)
        if index is None:
            unknown.append(line)
        elif index < 0:
            ambiguous.append(line)
        else:
            labeled.append(index)
    if unknown:
        raise UserError(f"split file {path}: {len(unknown)} of {len(lines)} ids are not in the training set, e.g. "
                        f"{unknown[:5]}; training images are named like {list(names[:2])} (ids match by relative "
                        f"path, file name or file name without extension).")
    if ambiguous:
        raise UserError(f"split file {path}: ids {ambiguous[:5]} match several training images; give relative paths.")
    if len(set(labeled)) != len(labeled):
        raise UserError(f"split file {path} lists some images more than once.")
    if not labeled:
        raise UserError(f"split file {path} lists no image ids.")
    if len(labeled) != labeled_samples:
        warnings.warn(f"split file {path} lists {len(labeled)} labeled images; training.data.labeled_samples "
                      f"({labeled_samples}) is superseded by the file.", stacklevel=3)
    chosen = set(labeled)
    return labeled, [i for i in range(len(names)) if i not in chosen]
