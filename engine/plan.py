"""`--dry-run`: the plan of a run, printed before anything is trained, allocated or downloaded."""
from __future__ import annotations

import json
import os

from engine import synthetic_pretrain
from model.pretrained import default_weights
from model.weights_download import cache_status
from utils.errors import UserError


def print_plan(run) -> None:
    """--dry-run: the resolved config and what the run would do (nothing is allocated, read or downloaded)."""
    cfg, t = run.cfg, run.cfg["training"]
    n_params = sum(p.numel() for p in run.student.parameters())
    lines = [
        f"config: {run.cfg_source}",
        json.dumps(cfg, indent=2),
        f"script: {run.variant.name}; method constants: {json.dumps(run.method)}",
        f"fidelity '{cfg['fidelity']}': {run.fidelity}",
        f"data: {run.data.name}, {len(run.data.train)} train ({len(run.data.labeled_idx)} labeled, "
        f"{len(run.data.unlabeled_idx)} unlabeled), {len(run.data.val)} val, {run.num_classes} classes, "
        f"crop {run.crop}{' of half-size images (full-size final evaluations)' if run.half_size else ''}, "
        f"channel order {run.data.channel_order}"
        + (f"; GTA5: {len(run.gta5)} images" if run.gta5 is not None else ""),
        f"model: {'DeepLabv2' if cfg['version'] == '2' else 'DeepLabv3+'} ResNet-{run.student.depth}, {n_params / 1e6:.1f} M parameters, "
        f"pretrained weights: {pretrained_status(run.cfg, run.student.depth)}",
        f"optimiser: SGD, one group of {sum(len(g['params']) for g in run.optimizer.param_groups)} trainable "
        f"tensors at lr {run.base_lr}, momentum {t['momentum']}, "
        f"weight decay {t['weight_decay']}, {t['lr_schedule']} power {t['lr_schedule_power']}",
        f"memory: {run.num_classes} x {run.method['memory_size']} vectors, quota {run.memory_quota} per class "
        f"and update; class balancing: {'on' if run.balancing else 'off'}",
        f"run directory: {run.run_dir}; device {run.device}",
        "dry run: OK",
    ]
    print("\n".join(lines), flush=True)


def pretrained_status(cfg: dict, depth: int) -> str:
    """One line on the pretrained weights: none, cached, to be downloaded or built, a local file found or missing."""
    source = cfg["backbone"]["pretrained"]
    if source in (None, "none"):
        return "none (random initialisation)"
    if source == "synthetic":
        return synthetic_pretrain.status(cfg, depth)
    if source == "default":
        try:
            path, url = default_weights(cfg["version"], cfg["training"]["pretraining"], depth)
        except UserError as e:
            return f"unavailable: {e}"
        return cache_status(path, url)
    if os.path.isfile(source):
        return f"{source} (found; not loaded in a dry run)"
    return f"{source} MISSING (backbone.pretrained: give an existing file, \"default\", \"synthetic\" or \"none\")"
