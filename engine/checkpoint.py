"""Checkpoints: atomic writes, safe loads.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the target,
so a run killed mid-save leaves the previous file intact. Loads use `weights_only=True`: a checkpoint is data,
never code.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from utils.errors import UserError


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to `path` atomically (temp file + fsync + os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with weights_only=True; a clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, a pickle of code objects, not a torch file at all
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a checkpoint dict (found {type(obj).__name__}).")
    return obj


def model_state_from(ckpt: dict, path: str) -> dict:
    """The model weights of a checkpoint written by this project or by the original release."""
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise UserError(f"{path} holds no model weights (expected a 'model' entry; found {sorted(ckpt)[:8]}).")
