"""A trained model ready to predict: network, config and dataset constants read from one checkpoint.

evaluateSSL.py and predict.py both start from `load_trained_model`, and both predict through
`engine.evaluation.segment`, so a picture from predict.py is the prediction evaluateSSL.py scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data import DatasetInfo, dataset_info
from data.common import image_tensor
from model import build_model
from model.checkpoint_io import backbone_depth_of, load_state_strict
from engine.checkpoint import load_checkpoint, model_state_from
from data.common import parse_size
from engine.config import fidelity, resolve_config
from utils.errors import UserError
from engine.evaluation import segment


@dataclass
class TrainedModel:
    model: torch.nn.Module          # in eval mode, on `device`
    cfg: dict                       # the resolved config stored in the checkpoint (with any overrides)
    checkpoint: dict
    info: DatasetInfo               # classes, palette, mean, channel order, evaluation resize
    window: tuple[int, int]         # the training crop: the window of the sliding protocol
    device: torch.device


def load_trained_model(path: str, device: torch.device, overrides: list[str] | None = None) -> TrainedModel:
    """The network of checkpoint `path` (this project's or the original release's, with its stored config),
    built as the config says, weights loaded strictly, in eval mode on `device`."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} stores no config; the network, classes and preprocessing are read from it.")
    cfg = resolve_config(ckpt["config"], f"{path} (stored config)", overrides or [], stored=True)
    info = dataset_info(cfg)
    state = model_state_from(ckpt, path)
    # backbone.depth null: the depth the weights have (DeepLabv3+ is ResNet-101 in domain adaptation, else 50)
    depth = cfg["backbone"]["depth"] or backbone_depth_of(state)
    model = build_model(cfg["version"], info.num_classes, cfg["training"]["pretraining"], depth,
                        None, v2_branches=fidelity(cfg).v2_branches, width=cfg["backbone"]["width"])
    load_state_strict(model, state, path)
    model.to(device).eval()
    window = parse_size(cfg["training"]["data"]["input_size"], "training.data.input_size")
    return TrainedModel(model, cfg, ckpt, info, window, device)


@torch.no_grad()
def predict_classes(trained: TrainedModel, image: np.ndarray, protocol: str = "whole") -> np.ndarray:
    """Class map [H,W] uint8 of one [H,W,3] uint8 RGB image of any size, at the image's size: the dataset's
    evaluation resize, then `segment` (the evaluation path) by `protocol`."""
    info = trained.info
    x = image_tensor(info.prepare(image), info.channel_order).unsqueeze(0).to(trained.device)
    _, classes = segment(trained.model, x, image.shape[:2], mean_rgb=info.mean_rgb, channel_order=info.channel_order,
                         protocol=protocol, window=trained.window)
    return classes[0].to("cpu", torch.uint8).numpy()
