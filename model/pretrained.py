"""Pretrained weights: resolve the source, copy tensors by name where shapes match (SPEC 3).

"default" means the released starting point: the COCO-pretrained DeepLabv2 of AdvSemiSeg for COCO, or
torchvision's ImageNet ResNet for imagenet — for ResNet-50 and -101 the very files the release's scripts loaded
(torchvision's original uploads), for 18 and 34 (not in the release) torchvision's IMAGENET1K_V1 files — looked up
in torch hub's checkpoint folder and downloaded there on first use (model/weights_download.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from model.heads import BACKBONE_MODULES
from model.weights_download import fetch_weights
from utils.errors import UserError

COCO_FILE = "resnet101COCO-41f33a49.pth"
COCO_URL = "http://vllab1.ucmerced.edu/~whung/adv-semi-seg/" + COCO_FILE
# 50 and 101: the files named in the release's trainSSL*.py; 18 and 34: torchvision's IMAGENET1K_V1.
IMAGENET_FILES = {18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth",
                  50: "resnet50-19c8e357.pth", 101: "resnet101-5d3b4d8f.pth"}
IMAGENET_URL = "https://download.pytorch.org/models/"
PREFIXES = ("module.", "Scale.")


@dataclass
class PretrainedReport:
    """What load_pretrained did: tensors copied, tensors of the file skipped (name, reason), and how many
    model tensors the file did not provide (they keep their random init)."""

    path: str
    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_in_file: list[str] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        lines = [f"pretrained weights {self.path}: loaded {self.loaded} tensors, skipped {len(self.skipped)}, "
                 f"{len(self.not_in_file)} model tensors not in the file (random init)"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more skipped")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def default_weights(version: str, pretraining: str, depth: int) -> tuple[str, str]:
    """(local path, download URL) of the released starting weights for this model."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    if pretraining.lower() == "coco":
        if str(version) != "2" or depth != 101:
            raise UserError(f"there are no default COCO weights for DeepLabv{version} with ResNet-{depth} "
                            f"(only DeepLabv2 ResNet-101). Set training.pretraining to \"imagenet\", or "
                            f"backbone.pretrained to a local file or \"none\".")
        return os.path.join(folder, COCO_FILE), COCO_URL
    name = IMAGENET_FILES[depth]
    return os.path.join(folder, name), IMAGENET_URL + name


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def refuse_unfitting_backbone(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str) -> None:
    """Stop when most backbone tensors (conv1, bn1, layer1..4) that the file and the model both name differ in
    shape: the file is for another backbone (width, depth or block type), and loading the few that fit would start
    training from a mixture. Files of another depth whose common tensors fit (ResNet-101 into -50) load."""
    common = [n for n, t in weights.items() if n.split(".")[0] in BACKBONE_MODULES and n in own
              and isinstance(t, torch.Tensor)]
    wrong = [n for n in common if weights[n].shape != own[n].shape]
    if wrong and len(wrong) * 2 > len(common):
        n = wrong[0]
        raise UserError(f"pretrained weights {path}: {len(wrong)} of the {len(common)} backbone tensors it shares "
                        f"with the model do not fit (e.g. {n}: file {tuple(weights[n].shape)}, model "
                        f"{tuple(own[n].shape)}); the file is for another backbone. Set backbone.width and "
                        f"backbone.depth to the file's network, or backbone.pretrained to another file or \"none\".")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (raw state dict, or {"state_dict"/"model": ...}), prefixes stripped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read pretrained weights {path}: {type(e).__name__}: {e}") from None
    return state_dict_of(obj, path)


def state_dict_of(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded weights file `obj` (read from `path`), prefixes stripped."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors; give a model weights file as "
                        f"backbone.pretrained.")
    return {_strip(k): v for k, v in obj.items()}


def load_pretrained(model: nn.Module, source: str | None, version: str, pretraining: str,
                    depth: int) -> PretrainedReport | None:
    """Copy the tensors of `source` into `model` where name and shape match; returns the report.

    source: None/"none" -> nothing (None returned); "default" -> the released file at torch hub's
    checkpoint folder, downloaded there first when missing; anything else -> a local file path (the training
    engine turns "synthetic" into one). A missing local file, or a failed download, raises UserError saying what
    to download and where to put it; so does a file whose backbone tensors mostly do not fit the model.
    """
    if source is None or source.lower() == "none":
        return None
    if source == "synthetic":
        raise UserError("backbone.pretrained \"synthetic\" is built by the training engine "
                        "(engine/synthetic_pretrain.py); give build_model the path of the built file.")
    downloaded = None
    if source == "default":
        path, url = default_weights(version, pretraining, depth)
        downloaded = fetch_weights(url, path)
    else:
        path = os.path.expanduser(source)
        if not os.path.isfile(path):
            raise UserError(f"pretrained weights file not found: {path} (backbone.pretrained). Give an existing "
                            f"file, \"default\" or \"none\".")
    weights = read_state_dict(path) if downloaded is None else state_dict_of(downloaded, path)
    own = model.state_dict()            # detached tensors sharing storage with the model
    refuse_unfitting_backbone(weights, own, path)
    report = PretrainedReport(path)
    with torch.no_grad():
        for name, tensor in weights.items():
            if not isinstance(tensor, torch.Tensor):
                report.skipped.append((name, "not a tensor"))
            elif name not in own:
                report.skipped.append((name, "missing in model"))
            elif own[name].shape != tensor.shape:
                report.skipped.append((name, f"shape mismatch: file {tuple(tensor.shape)}, "
                                             f"model {tuple(own[name].shape)}"))
            else:
                own[name].copy_(tensor)
                report.loaded += 1
    report.not_in_file = [n for n in own if n not in weights]
    return report
