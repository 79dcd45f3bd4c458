"""EMA teacher (SPEC 5.5): creation, momentum schedule and the parameter update."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _unwrap(module: nn.Module) -> nn.Module:
    """The underlying model of a DDP / DataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


def create_teacher(student: nn.Module) -> nn.Module:
    """A copy of the student whose parameters equal the student's and whose buffers are fresh.

    The release built a new network and copied parameters only, so BatchNorm running statistics
    start from their defaults (mean 0, var 1, num_batches_tracked 0). Parameters are frozen
    (requires_grad False, no .grad) and the teacher is in train mode, as released.
    """
    teacher = copy.deepcopy(_unwrap(student))
    for module in teacher.modules():
        if isinstance(module, _BatchNorm):
            module.reset_running_stats()
    for param in teacher.parameters():
        param.requires_grad_(False)
        param.grad = None
    teacher.train()
    return teacher


def ema_momentum(i: int, num_iterations: int) -> float:
    """m_i = 1 - 0.005 (cos(pi i / N) + 1) / 2: 0.995 at i = 0 rising to 1 at i = N."""
    return 1.0 - 0.005 * (math.cos(math.pi * i / num_iterations) + 1.0) / 2.0


def ema_alpha(i: int, num_iterations: int, warmup_div: float) -> float:
    """alpha_i = min(1 - 1 / (warmup_div * i + 1), m_i); warmup_div 10 in trainSSL.py, 1 elsewhere."""
    return min(1.0 - 1.0 / (warmup_div * i + 1.0), ema_momentum(i, num_iterations))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher_p <- alpha * teacher_p + (1 - alpha) * student_p for every parameter (buffers untouched).

    `alpha` is a Python float (no sync); the student may be DDP-wrapped. Parameters are matched in
    registration order, as the release zipped model.parameters().
    """
    t_params = list(teacher.parameters())
    s_params = list(_unwrap(student).parameters())
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher has {len(t_params)} parameters but the student {len(s_params)}; "
            "the teacher must be created from this student with create_teacher()."
        )
    if not t_params:
        return
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - alpha)
