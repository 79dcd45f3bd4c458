"""Datasets in their real folder layouts, splits, samplers and the synthetic dataset.

`build_data(cfg)` turns the resolved config into a `DataBundle`: the training dataset (random crops, indexed by
(index, seed) keys from `data.sampler.InfiniteBatches`), the validation dataset (whole images, items
(image, label, name)), the labeled / unlabeled index lists of the split, and the dataset's constants.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from data.cityscapes import CityscapesDataset
from data.common import channel_order_for
from data.folder import FolderDataset, folder_classes
from data.gta5 import GTA5Dataset
from data.splits import make_split
from data.synthetic import SyntheticStreets
from data.voc import VOCDataset
from utils.config import parse_size
from utils.errors import UserError

CITYSCAPES_MEAN_RGB = (73.15835921, 82.90891754, 72.39239876)
VOC_MEAN_RGB = (122.6789143, 116.66876762, 104.00698793)
OTHER_MEAN_RGB = (127.5, 127.5, 127.5)
DEFAULT_ROOTS = {"cityscapes": "../data/CityScapes", "pascal_voc": "../data/VOC2012", "gta5": "../data/GTA5"}
DATASET_ALIASES = {"pascal": "pascal_voc"}
SOURCE_STYLE = {"a": "b", "b": "a"}  # synthetic domain adaptation: the source is the other style


@dataclass
class DataBundle:
    """Everything the training and evaluation scripts need to know about the data."""

    name: str                      # "cityscapes", "pascal_voc", "synthetic" or "folder"
    train: Dataset                 # training items (image [3,h,w] float 0..255, label [h,w] int64, index)
    val: Dataset                   # validation items (image, label, name), whole images
    labeled_idx: list[int]         # indices into `train` of the labeled subset
    unlabeled_idx: list[int]       # the rest of `train`
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_label: int
    mean_rgb: tuple[float, float, float]
    channel_order: str             # "BGR" (COCO pretraining) or "RGB" (imagenet)
    train_names: list[str]         # names of the training images, in index order


def default_root(dataset: str) -> str:
    """../data/<dataset folder> relative to the current working directory (as released)."""
    return DEFAULT_ROOTS[dataset]


def build_data(cfg: dict, data_root: str | None = None, split: bool = True) -> DataBundle:
    """Datasets, split and constants for the resolved config `cfg`; `data_root` overrides training.data.root.
    split=False (evaluation) skips the labeled/unlabeled split, which evaluation does not need."""
    name = DATASET_ALIASES.get(cfg["dataset"], cfg["dataset"])
    t = cfg["training"]
    d = t["data"]
    crop = parse_size(d["input_size"], "training.data.input_size")
    order = channel_order_for(t["pretraining"])
    ignore = cfg["ignore_label"]
    if name in ("cityscapes", "pascal_voc"):
        root = data_root or d.get("root") or default_root(name)
        if name == "cityscapes":
            train = CityscapesDataset(root, "train", cfg["version"], crop, order, ignore)
            val = CityscapesDataset(root, "val", cfg["version"], None, order, ignore)
            mean = CITYSCAPES_MEAN_RGB
        else:
            train = VOCDataset(root, "train", crop, order, ignore)
            val = VOCDataset(root, "val", None, order, ignore)
            mean = VOC_MEAN_RGB
    elif name == "synthetic":
        s = cfg["synthetic"]
        size = parse_size(s["image_size"], "synthetic.image_size")
        train = SyntheticStreets(s["num_train"], size, seed_offset=0, train=True, crop_size=crop, channel_order=order,
                                 ignore_label=ignore, style=s.get("style", "a"))
        val = SyntheticStreets(s["num_val"], size, seed_offset=1, train=False, channel_order=order, ignore_label=ignore,
                               style=s.get("style", "a"))
        mean = OTHER_MEAN_RGB
    elif name == "folder":
        f = dict(cfg["folder"])
        root = data_root or d.get("root")
        if root:  # relative folder paths are relative to --data-root / training.data.root when given
            for key in ("train_images", "train_labels", "val_images", "val_labels"):
                if f[key] and not os.path.isabs(f[key]):
                    f[key] = os.path.join(root, f[key])
        n, names, palette, mean = folder_classes(f, ignore)
        common = dict(num_classes=n, class_names=names, palette=palette, channel_order=order, ignore_label=ignore)
        # evaluation (split=False) lists the training pairs but does not read them
        train = FolderDataset(f["train_images"], f["train_labels"], "train", train=True, crop_size=crop, check=split,
                              **common)
        val = FolderDataset(f["val_images"], f["val_labels"], "val", train=False, crop_size=None, **common)
    else:
        raise UserError(f"dataset {name!r} is not supported by build_data; use \"cityscapes\", \"pascal_voc\" "
                        f"(alias \"pascal\"), \"synthetic\" or \"folder\".")
    labeled, unlabeled = make_split(len(train), d["labeled_samples"], d["split_id_list"], cfg["seed"],
                                    names=train.names, split_file=d.get("split_file")) if split else ([], [])
    return DataBundle(name=name, train=train, val=val, labeled_idx=labeled, unlabeled_idx=unlabeled,
                      num_classes=train.num_classes, class_names=list(train.class_names), palette=list(train.palette),
                      ignore_label=ignore, mean_rgb=mean, channel_order=order, train_names=list(train.names))


def build_source(cfg: dict, gta5_root: str | None = None) -> Dataset:
    """The fully labeled source domain of domain adaptation for the config's target dataset: GTA5 for Cityscapes;
    for the synthetic scenes, `synthetic.num_source` scenes of the other style (their own scenes: seed offset 2),
    so that style "a" stands in for GTA5 and style "b" for Cityscapes."""
    name = DATASET_ALIASES.get(cfg["dataset"], cfg["dataset"])
    if name == "cityscapes":
        return build_gta5(cfg, gta5_root)
    if name == "synthetic":
        s, t = cfg["synthetic"], cfg["training"]
        return SyntheticStreets(s["num_source"], parse_size(s["image_size"], "synthetic.image_size"), seed_offset=2,
                                train=True, crop_size=parse_size(t["data"]["input_size"], "training.data.input_size"),
                                channel_order=channel_order_for(t["pretraining"]), ignore_label=cfg["ignore_label"],
                                style=SOURCE_STYLE[s.get("style", "a")])
    raise UserError(f"domain adaptation adapts GTA5 to Cityscapes (or synthetic style \"a\" to \"b\"); the config's "
                    f"dataset is '{name}'. Use a configs/configSSL_city_*.json config, or \"dataset\": \"synthetic\".")


def build_gta5(cfg: dict, root: str | None = None) -> GTA5Dataset:
    """The whole GTA5 set, train and val (half size, random crops of training.data.input_size): the extra
    labeled source of domain adaptation."""
    t = cfg["training"]
    root = root or t["data"].get("gta5_root") or default_root("gta5")
    crop = parse_size(t["data"]["input_size"], "training.data.input_size")
    return GTA5Dataset(root, "all", crop, channel_order_for(t["pretraining"]), cfg["ignore_label"])


__all__ = ["DataBundle", "build_data", "build_gta5", "CityscapesDataset", "VOCDataset", "GTA5Dataset",
           "SyntheticStreets", "FolderDataset", "make_split", "CITYSCAPES_MEAN_RGB", "VOC_MEAN_RGB", "OTHER_MEAN_RGB"]
