"""Learning-rate and loss-weight schedules (SPEC 4 steps 1 and 8)."""
from __future__ import annotations

import math

import torch


def poly_lr(base_lr: float, i: int, num_iterations: int, power: float) -> float:
    """Poly decay: base_lr * (1 - i / N) ** power."""
    return base_lr * (1.0 - i / num_iterations) ** power


def ramp_up(i: int, ramp_iterations: int) -> float:
    """Sigmoid-shaped ramp exp(-5 (1 - i / R)^2) for i < R, else 1 (and 1 when R <= 0)."""
    if ramp_iterations <= 0 or i >= ramp_iterations:
        return 1.0
    return math.exp(-5.0 * (1.0 - i / ramp_iterations) ** 2)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group gets lr. The release trains one group; its schedule would give a second group the
    same lr, never 10 lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
