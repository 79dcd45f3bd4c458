"""Strict loading of saved model weights with an error that says what does not match."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from model.resnet import LAYERS
from utils.errors import UserError

SHOWN = 10


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading "module." (DataParallel / DDP checkpoints) from every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _listing(title: str, names: list[str]) -> str:
    more = f" ... (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"\n  {title} ({len(names)}): " + ", ".join(names[:SHOWN]) + more


def backbone_depth_of(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The ResNet depth (18/34/50/101) whose blocks a state dict holds, from its layer1..layer4 block counts and
    block kind (bottleneck: `layer1.0.conv3`); None when it matches none. Lets evaluation load a checkpoint whose
    config leaves backbone.depth null although the script chose the depth (the release's domain-adaptation
    script trained DeepLabv3+ on ResNet-101, trainSSL.py on ResNet-50, both with the same config)."""
    state = strip_module_prefix(state_dict)
    blocks = []
    for layer in range(1, 5):
        prefix = f"layer{layer}."
        blocks.append(len({k.split(".")[1] for k in state if k.startswith(prefix)}))
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, counts in LAYERS.items():
        if tuple(blocks) == counts and bottleneck == (depth >= 50):
            return depth
    return None


def load_state_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` requiring the same names and shapes; "module." prefixes are stripped.

    On any mismatch raise UserError naming `source` and listing missing, unexpected and shape-mismatched
    tensors (the first few of each, with counts) - the file holds weights of another model or config.
    """
    state = strip_module_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        msg = (f"{source} is a checkpoint of another model or config: its weights do not match the model built "
               f"from the config ({type(model).__name__}"
               f"{'' if not hasattr(model, 'depth') else f', ResNet-{model.depth}'}"
               f"{'' if not hasattr(model, 'num_classes') else f', {model.num_classes} classes'}).")
        if missing:
            msg += _listing("missing in the file", missing)
        if unexpected:
            msg += _listing("unexpected in the file", unexpected)
        if shapes:
            msg += _listing("shape mismatch", shapes)
        msg += "\nCheck version, backbone.depth, training.pretraining and dataset against the run that saved it."
        raise UserError(msg)
    model.load_state_dict(state, strict=True)
