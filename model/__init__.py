"""The networks (SPEC 3). `build_model` is the one entry point the scripts use."""
from __future__ import annotations

import json

from model.deeplabv2 import DeepLabV2
from model.deeplabv3plus import DeepLabV3Plus
from model.heads import SegmentationModel
from model.pretrained import load_pretrained
from model.resnet import LAYERS, STANDARD_WIDTH
from utils.errors import UserError

__all__ = ["build_model", "SegmentationModel", "DeepLabV2", "DeepLabV3Plus"]

VERSIONS = {"2": 101, "3": 50}      # version -> default depth
PRETRAININGS = {"coco": "COCO", "imagenet": "imagenet"}


def build_model(version: str, num_classes: int, pretraining: str = "COCO", depth: int | None = None,
                pretrained: str | None = None, v2_branches: int = 2, *, width: int = STANDARD_WIDTH,
                verbose: bool = True) -> SegmentationModel:
    """DeepLabv2 ("2") or DeepLabv3+ ("3") with contrastive heads, released init, then pretrained weights.

    pretraining "COCO" selects the COCO ResNet variant for v2 (stride on the 1x1 conv, ceil-mode max-pool),
    "imagenet" the torchvision one; v3+ is always torchvision-style. depth None: 101 for v2, 50 for v3.
    pretrained: None/"none", "default" (released weights in torch hub's folder, downloaded on first use) or a
    file path; the load report is printed when verbose. v2_branches: classifier branches summed, 2 ("code")
    or 4 ("paper"). width: the ResNet's base width (64: the standard network, the only one the "default"
    weights fit; a local file loads at any width whose tensors it fits).
    """
    version = str(version)
    if version not in VERSIONS:
        raise UserError(f"model version {version!r} is not known; choose \"2\" (DeepLabv2) or \"3\" (DeepLabv3+).")
    if not isinstance(pretraining, str) or pretraining.lower() not in PRETRAININGS:
        raise UserError(f"pretraining {pretraining!r} is not known; choose \"COCO\" or \"imagenet\".")
    pretraining = PRETRAININGS[pretraining.lower()]
    depth = VERSIONS[version] if depth is None else depth
    if depth not in LAYERS:
        raise UserError(f"backbone depth {depth!r} is not supported; choose one of {sorted(LAYERS)} (or null).")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise UserError(f"backbone width {width!r}: give a positive integer (64: the standard ResNet).")
    if width != STANDARD_WIDTH and pretrained == "default":
        raise UserError(width_without_weights(width, pretrained))
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if version == "2":
        if v2_branches not in (2, 4):
            raise UserError(f"v2_branches {v2_branches!r}: choose 2 (fidelity \"code\") or 4 (\"paper\").")
        variant = "coco" if pretraining == "COCO" else "torchvision"
        model = DeepLabV2(num_classes, depth, variant, v2_branches, width=width)
    else:
        model = DeepLabV3Plus(num_classes, depth, width=width)
    report = load_pretrained(model, pretrained, version, pretraining, depth)
    model.pretrained_report = report
    if report is not None and verbose:
        print(report.summary())
    return model


def width_without_weights(width: int, pretrained: object) -> str:
    """The message refusing the released weights for a backbone of non-standard width."""
    return (f"backbone.width is {width} but backbone.pretrained is {json.dumps(pretrained)}: the released backbones "
            f"(ImageNet, COCO) are standard ResNets of width {STANDARD_WIDTH}, whose tensors do not fit a narrower "
            f"or wider one. Set backbone.width to {STANDARD_WIDTH}, or backbone.pretrained to \"synthetic\" (a "
            f"backbone of this width trained on synthetic scenes), a file of this width, or \"none\" (random "
            f"initialisation).")
