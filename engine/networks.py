"""The networks and optimiser of a run: student (and its compiled forward), SGD over every trainable parameter."""
from __future__ import annotations

import torch
from torch import nn

from engine import distributed as dist
from engine import synthetic_pretrain
from model import build_model
from utils.fidelity import Fidelity
from utils.variants import Variant, backbone_depth


def build_student(cfg: dict, variant: Variant, num_classes: int, device: torch.device, fidelity: Fidelity,
                  dry_run: bool) -> nn.Module:
    """The student in train mode, with the config's pretrained weights, on `device` (identical on every process).
    A dry run builds shapes only, on the meta device: nothing allocated, no weights read or downloaded."""
    t = cfg["training"]
    depth = backbone_depth(cfg, variant)
    kwargs = dict(v2_branches=fidelity.v2_branches, width=cfg["backbone"]["width"])
    if dry_run:
        with torch.device("meta"):
            student = build_model(cfg["version"], num_classes, t["pretraining"], depth, None, **kwargs)
    else:
        pretrained = cfg["backbone"]["pretrained"]
        if pretrained == "synthetic":  # built here on first use (engine/synthetic_pretrain.py), then a local file
            pretrained = synthetic_pretrain.resolve(cfg, depth, device)
        student = build_model(cfg["version"], num_classes, t["pretraining"], depth, pretrained,
                              verbose=dist.is_main(), **kwargs).to(device)
    if t["sync_batchnorm"] and dist.is_distributed():
        student = dist.convert_sync_batchnorm(student, device)
    dist.broadcast_parameters(student)
    student.train()
    if device.type == "cuda":  # NHWC convolutions on tensor cores
        student.to(memory_format=torch.channels_last)
    return student


def student_forward(student: nn.Module, cfg: dict, dry_run: bool) -> nn.Module:
    """What the student's forwards go through: the student itself, or its torch.compile'd graph
    (training.compile; heads, selectors and state dicts always use the student module)."""
    return torch.compile(student) if cfg["training"]["compile"] and not dry_run else student


def build_optimizer(student: nn.Module, cfg: dict) -> tuple[torch.optim.SGD, float]:
    """SGD with ONE group holding every trainable parameter at the base learning rate (SPEC 3), and that rate
    (times the number of processes with training.scale_lr_with_world_size)."""
    t = cfg["training"]
    lr = t["learning_rate"] * (dist.world_size() if t["scale_lr_with_world_size"] else 1)
    optimizer = torch.optim.SGD(student.optim_parameters(lr), lr=lr, momentum=t["momentum"],
                                weight_decay=t["weight_decay"])
    return optimizer, lr
