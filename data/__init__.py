"""Datasets in their real folder layouts, splits, samplers and the synthetic dataset.

`build_data(cfg)` turns the resolved config into a `DataBundle`: the training dataset (random crops, indexed by
(index, seed) keys from `data.sampler.InfiniteBatches`), the validation dataset (whole images, items
(image, label, name)), the labeled / unlabeled index lists of the split, and the dataset's constants.
`dataset_info(cfg)` gives those constants and the evaluation preprocessing from the config alone, without any
dataset folder (predict.py).

`data.synthetic` is imported on first use, so that `python3 -m data.synthetic` runs a module not yet imported.
`pair_lists.py` reads the split files of today's papers (`image mask` lines) for Cityscapes and Pascal VOC.
Dataset tools live here too: `check_files.py` (--dry-run --check-files), `translate_labels.py` (GTA5 labels to train
ids; `python3 utils/translate_labels.py` starts it) and `progress.py` (their progress lines).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from data import cityscapes_labels, voc
from data.cityscapes import CityscapesDataset, list_cityscapes, validation_input
from data.common import channel_order_for, parse_size
from data.folder import FolderDataset, folder_classes
from data.gta5 import GTA5Dataset
from data.pair_lists import is_pair_list, read_pair_split, refuse_validation_images
from data.splits import make_split
from data.voc import VOCDataset, list_voc
from utils.errors import UserError

CITYSCAPES_MEAN_RGB = (73.15835921, 82.90891754, 72.39239876)
VOC_MEAN_RGB = (122.6789143, 116.66876762, 104.00698793)
OTHER_MEAN_RGB = (127.5, 127.5, 127.5)
DEFAULT_ROOTS = {"cityscapes": "../data/CityScapes", "pascal_voc": "../data/VOC2012", "gta5": "../data/GTA5"}
DATASET_ALIASES = {"pascal": "pascal_voc"}
SOURCE_STYLE = {"a": "b", "b": "a", "c": "a"}  # synthetic domain adaptation: the source style of each target


@dataclass
class DataBundle:
    """Everything the training and evaluation scripts need to know about the data."""

    name: str                      # "cityscapes", "pascal_voc", "synthetic" or "folder"
    train: Dataset                 # training items (image [3,h,w] float 0..255, label [h,w] int64, index)
    val: Dataset                   # validation items (image, label, name), whole images
    labeled_idx: list[int]         # indices into `train` of the labeled subset
    unlabeled_idx: list[int]       # the rest of `train` (items of images without labels: an all-ignore label)
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_label: int
    mean_rgb: tuple[float, float, float]
    channel_order: str             # "BGR" (COCO pretraining) or "RGB" (imagenet)
    train_names: list[str]         # names of the training images, in index order


@dataclass
class DatasetInfo:
    """What a trained model needs to know about its data, from the config alone: classes, colours and the
    evaluation preprocessing (`prepare`: the resize applied to a whole [H,W,3] uint8 RGB image before the
    forward; predictions are made at the original size)."""

    name: str
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_label: int
    mean_rgb: tuple[float, float, float]
    channel_order: str
    prepare: Callable[[np.ndarray], np.ndarray]


def _unchanged(image: np.ndarray) -> np.ndarray:
    return image


def dataset_info(cfg: dict) -> DatasetInfo:
    """The dataset constants of a resolved config; reads no dataset file."""
    name = DATASET_ALIASES.get(cfg["dataset"], cfg["dataset"])
    order = channel_order_for(cfg["training"]["pretraining"])
    ignore = cfg["ignore_label"]
    prepare = _unchanged
    if name == "cityscapes":
        n, names, palette, mean = (cityscapes_labels.NUM_CLASSES, cityscapes_labels.CLASS_NAMES,
                                   cityscapes_labels.PALETTE, CITYSCAPES_MEAN_RGB)
        prepare = functools.partial(validation_input, version=str(cfg["version"]))  # v2: half size
    elif name == "pascal_voc":
        n, names, palette, mean = voc.NUM_CLASSES, voc.CLASS_NAMES, voc.PALETTE, VOC_MEAN_RGB
    elif name == "synthetic":
        from data import synthetic
        n, names, palette, mean = synthetic.NUM_CLASSES, synthetic.CLASS_NAMES, synthetic.PALETTE, OTHER_MEAN_RGB
    elif name == "folder":
        n, names, palette, mean = folder_classes(cfg["folder"], ignore)
    else:
        raise UserError(f"dataset {name!r} is not supported; use \"cityscapes\", \"pascal_voc\" (alias \"pascal\"), "
                        f"\"synthetic\" or \"folder\".")
    return DatasetInfo(name=name, num_classes=n, class_names=list(names), palette=[tuple(c) for c in palette],
                       ignore_label=ignore, mean_rgb=tuple(mean), channel_order=order, prepare=prepare)


def default_root(dataset: str) -> str:
    """../data/<dataset folder> relative to the current working directory (as released)."""
    return DEFAULT_ROOTS[dataset]


def build_data(cfg: dict, data_root: str | None = None, split: bool = True,
               cityscapes_half_size: bool = False, check_pairs: bool = True) -> DataBundle:
    """Datasets, split and constants for the resolved config `cfg`; `data_root` overrides training.data.root.
    split=False (evaluation) skips the labeled/unlabeled split, which evaluation does not need.
    cityscapes_half_size: Cityscapes crops and validation images from half-size images (the v2 rule) whatever
    the version (the domain-adaptation script); otherwise by version. check_pairs=False leaves the folder dataset's
    pair checks to `--check-files`, which lists the bad files of both splits (instead of stopping at the first)."""
    info = dataset_info(cfg)
    name, order, ignore = info.name, info.channel_order, info.ignore_label
    d = cfg["training"]["data"]
    crop = parse_size(d["input_size"], "training.data.input_size")
    listed = None  # training items from split files of `image mask` lines (data/pair_lists.py)
    if name in ("cityscapes", "pascal_voc"):
        root = data_root or d.get("root") or default_root(name)
        if split and is_pair_list(d.get("split_file")):
            standard = (lambda: list_cityscapes(root, "train")[1]) if name == "cityscapes" else \
                (lambda: list_voc(root, "train")[1])
            listed = read_pair_split(name, root, d["split_file"], d.get("unlabeled_file"), standard,
                                     d["labeled_samples"])
        items = listed.items if listed else None
        if name == "cityscapes":
            resolution = "2" if cityscapes_half_size else cfg["version"]  # the version whose resize rule applies
            train = CityscapesDataset(root, "train", resolution, crop, order, ignore, items=items)
            val = CityscapesDataset(root, "val", resolution, None, order, ignore)
        else:
            train = VOCDataset(root, "train", crop, order, ignore, items=items)
            val = VOCDataset(root, "val", None, order, ignore)
        if listed:
            refuse_validation_images(train.images, val.images, d["split_file"])
    elif name == "synthetic":
        from data.synthetic import SyntheticStreets
        s = cfg["synthetic"]
        size = parse_size(s["image_size"], "synthetic.image_size")
        train = SyntheticStreets(s["num_train"], size, seed_offset=0, train=True, crop_size=crop, channel_order=order,
                                 ignore_label=ignore, style=s.get("style", "a"))
        val = SyntheticStreets(s["num_val"], size, seed_offset=1, train=False, channel_order=order, ignore_label=ignore,
                               style=s.get("style", "a"))
    else:  # "folder" (dataset_info refuses any other name)
        f = dict(cfg["folder"])
        root = data_root or d.get("root")
        if root:  # relative folder paths are relative to --data-root / training.data.root when given
            for key in ("train_images", "train_labels", "val_images", "val_labels", "unlabeled_images"):
                if f.get(key) and not os.path.isabs(f[key]):
                    f[key] = os.path.join(root, f[key])
        common = dict(num_classes=info.num_classes, class_names=info.class_names, palette=info.palette,
                      channel_order=order, ignore_label=ignore)
        # evaluation (split=False) lists the training pairs but does not read them
        train = FolderDataset(f["train_images"], f["train_labels"], "train", train=True, crop_size=crop,
                              check=split and check_pairs, unlabeled=f.get("unlabeled_images") if split else None,
                              **common)
        val = FolderDataset(f["val_images"], f["val_labels"], "val", train=False, crop_size=None, check=check_pairs,
                            **common)
    labeled, unlabeled = (listed.split() if listed else split_of(train, cfg, name)) if split else ([], [])
    return DataBundle(name=name, train=train, val=val, labeled_idx=labeled, unlabeled_idx=unlabeled,
                      num_classes=train.num_classes, class_names=list(train.class_names), palette=list(train.palette),
                      ignore_label=ignore, mean_rgb=info.mean_rgb, channel_order=order, train_names=list(train.names))


def split_of(train: Dataset, cfg: dict, name: str) -> tuple[list[int], list[int]]:
    """(labeled, unlabeled) indices into `train`. The split rule (SPEC 6.4) chooses among the labeled items: the
    first `num_pairs` of a folder dataset with unlabeled images (the others, images without labels, join the
    unlabeled set), every item otherwise."""
    d = cfg["training"]["data"]
    if d.get("unlabeled_file"):
        raise UserError("training.data.unlabeled_file goes with a training.data.split_file of `image mask` lines "
                        "(Cityscapes, Pascal VOC); for \"dataset\": \"folder\" name the images without labels "
                        "in folder.unlabeled_images.")
    pairs = getattr(train, "num_pairs", len(train))
    if pairs < len(train) and d["labeled_samples"] > pairs and not d.get("split_file"):
        raise UserError(f"training.data.labeled_samples is {d['labeled_samples']} but the folder dataset has "
                        f"{pairs} labeled pairs (folder.train_images / train_labels; folder.unlabeled_images adds "
                        f"{len(train) - pairs} images without labels); use at most {pairs}: all of them, or fewer "
                        f"chosen by the split rule.")
    labeled, unlabeled = make_split(pairs, d["labeled_samples"], d["split_id_list"], cfg["seed"],
                                    names=train.names[:pairs], split_file=d.get("split_file"), dataset=name)
    return labeled, unlabeled + list(range(pairs, len(train)))


def build_source(cfg: dict, gta5_root: str | None = None) -> Dataset:
    """The fully labeled source domain of domain adaptation for the config's target dataset: GTA5 for Cityscapes;
    for the synthetic scenes, `synthetic.num_source` scenes of the other style (their own scenes: seed offset 2),
    so that style "a" stands in for GTA5 and style "b" for Cityscapes."""
    name = DATASET_ALIASES.get(cfg["dataset"], cfg["dataset"])
    if name == "cityscapes":
        return build_gta5(cfg, gta5_root)
    if name == "synthetic":
        from data.synthetic import SyntheticStreets
        s, t = cfg["synthetic"], cfg["training"]
        return SyntheticStreets(s["num_source"], parse_size(s["image_size"], "synthetic.image_size"), seed_offset=2,
                                train=True, crop_size=parse_size(t["data"]["input_size"], "training.data.input_size"),
                                channel_order=channel_order_for(t["pretraining"]), ignore_label=cfg["ignore_label"],
                                style=SOURCE_STYLE[s.get("style", "a")])
    raise UserError(f"domain adaptation adapts GTA5 to Cityscapes (or synthetic style \"a\" to \"b\"); the config's "
                    f"dataset is '{name}'. Use a configs/configSSL_city_*.json config, or \"dataset\": \"synthetic\".")


def build_gta5(cfg: dict, root: str | None = None) -> GTA5Dataset:
    """GTA5's `train` split (half size, random crops of training.data.input_size): the extra labeled source of
    domain adaptation. The release's loader reads `images/train` only; `val` is not used."""
    t = cfg["training"]
    root = root or t["data"].get("gta5_root") or default_root("gta5")
    crop = parse_size(t["data"]["input_size"], "training.data.input_size")
    return GTA5Dataset(root, "train", crop, channel_order_for(t["pretraining"]), cfg["ignore_label"])


def __getattr__(name: str):
    if name == "SyntheticStreets":  # imported on first use (see the module docstring)
        from data.synthetic import SyntheticStreets
        return SyntheticStreets
    raise AttributeError(f"module 'data' has no attribute {name!r}")


__all__ = ["DataBundle", "DatasetInfo", "build_data", "build_gta5", "dataset_info", "CityscapesDataset", "VOCDataset",
           "GTA5Dataset", "SyntheticStreets", "FolderDataset", "make_split", "CITYSCAPES_MEAN_RGB", "VOC_MEAN_RGB",
           "OTHER_MEAN_RGB"]
