"""The part of a training iteration that needs gradients, as one forward: what DistributedDataParallel wraps.

A training script hands its function for steps 6-10 (the student's passes over both batches, the losses, the memory
update, the heads, the selectors and the contrastive terms) to `GradientPass`, whose module calls it as its forward
and returns its loss terms. In one process the module is called as it is: the call is the script's function call,
bit for bit. Under torchrun (world size > 1) DistributedDataParallel wraps the module: its reducer all-reduces the
gradients in buckets while the backward pass is still running, instead of after it. The DDP options, and why:
- find_unused_parameters=True. Parameters without a gradient in an iteration are the rule here: the heads and the
  selectors before the contrastive terms start (all through a supervised-only run), the per-class selectors of the
  classes a rank's batch lacks, the unused DeepLabv2 branches of fidelity "code", every head on a rank with fewer
  than two valid pixels. DDP marks them ready with zeros on that rank and averages them with the others'
  gradients; a parameter unused on every rank keeps its gradient untouched (None until it first had one), so SGD
  skips it (no weight decay, no momentum) exactly as one process would. That set changes from iteration to
  iteration, which rules out static_graph (DDP stops with "Your training graph has changed in this iteration");
  adding `0 * parameter` to the loss so that none is ever unused would give those parameters zero gradients, and
  SGD would then decay them: a different trajectory. The cost: one traversal of the autograd graph per iteration,
  one small all-reduce of the "used" flags, and — since some parameter is unused on every rank in every iteration
  here — DDP's wait for those flags on the host at the end of the backward pass (measured on CPU in
  docs/long-runs.md; the hand-written averaging it replaces read its own flags on the host too).
- forward_sync_buffers=False: BatchNorm running statistics stay per rank between reads and are averaged where they
  are read (engine/batchnorm.py); DDP's broadcast would cost a collective per forward and keep rank 0's
  statistics, not those of the whole global batch.
- The stop vote: a rank that must stop (a signal, a bad file among the batches it loaded ahead) uses the parameter
  `stop_vote` in its loss with a zero weight, so its gradient carries the reasons. The gradient all-reduce delivers
  the vote to every rank in the same iteration without a collective of its own; an iteration in which no rank
  voted leaves that gradient None on every rank (unused everywhere), which the host reads without touching the
  device. engine/graceful_stop.py acts on it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine import distributed as dist

# The reasons a rank may vote to stop, in the order of the vote's slots (engine/graceful_stop.py).
STOP_REASONS = ("SIGINT", "SIGTERM", "bad file")


class _Passes(nn.Module):
    """The student (whose parameters DDP reduces) and the stop vote; forward = the script's steps 6-10."""

    def __init__(self, student: nn.Module, device: torch.device):
        super().__init__()
        self.student = student
        # not in the optimiser, not in any checkpoint: it only carries the stop vote in its gradient
        self.stop_vote = nn.Parameter(torch.zeros(len(STOP_REASONS), device=device))

    def forward(self, steps: Callable[..., dict[str, torch.Tensor]], *args,
                vote: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
        terms = steps(*args)
        if any(vote):  # + 0 * stop_vote: every term keeps its value; the gradient of stop_vote is the vote
            first = next(iter(terms))
            weights = torch.tensor(vote, dtype=self.stop_vote.dtype, device=self.stop_vote.device)
            terms[first] = terms[first] + (self.stop_vote * weights).sum()
        return terms


def wrap(module: nn.Module) -> nn.Module:
    """DistributedDataParallel with the options of the module docstring. device_ids None: the module lives on one
    device and its inputs are already there (nothing to move)."""
    return nn.parallel.DistributedDataParallel(module, device_ids=None, find_unused_parameters=True,
                                               forward_sync_buffers=False)


class GradientPass:
    """Steps 6-10 of an iteration as one forward: the module called as it is in one process, DistributedDataParallel
    under torchrun. `votes()` after the backward: the stop reasons some rank voted for in this iteration."""

    def __init__(self, student: nn.Module, device: torch.device,
                 vote: Callable[[], tuple[float, ...]] = lambda: ()):
        self.module = _Passes(student, device)
        self.forward = wrap(self.module) if dist.is_distributed() else self.module
        self.vote = vote  # this rank's reasons to stop: one number per STOP_REASONS slot, non-zero where one holds

    def __call__(self, steps: Callable[..., dict[str, torch.Tensor]], *args) -> dict[str, torch.Tensor]:
        """`steps(*args)`, the loss terms, run as the forward (with this rank's stop vote under torchrun)."""
        return self.forward(steps, *args, vote=self.vote() if dist.is_distributed() else ())

    def close(self) -> None:
        """Release DistributedDataParallel (its reducer and its hold on the process group); the module stays."""
        self.forward = self.module

    def votes(self) -> tuple[bool, ...]:
        """After the backward: which reasons any rank voted for (all False when none did: no device read then).
        The vote is used up."""
        grad = self.module.stop_vote.grad
        if grad is None:
            return (False,) * len(STOP_REASONS)
        self.module.stop_vote.grad = None
        return tuple(v > 0 for v in grad.tolist())

