"""BatchNorm running statistics of a run: the same on every process where they are read, and the refresh after the
training loop."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine import distributed as dist
from utils.augmentations import normalize


class BatchNormStatistics:
    """BatchNorm running statistics of student and teacher under torchrun: each rank's forwards update them from its
    own batches, and they are averaged over ranks (engine/distributed.average_buffers) where they are read — before
    an evaluation, a checkpoint or latest.pth, and every iteration when the student in eval mode makes the
    pseudo-labels (training.use_teacher_train false) — instead of after every step. The update of a running
    statistic is linear in the batch statistics, so the average taken at a read equals the per-step average to
    float rounding; training itself reads batch statistics only. One process: nothing to do."""

    def __init__(self, modules: Callable[[], tuple[nn.Module, ...]]):
        self.modules = modules  # the networks of now (a return to the best model replaces the teacher)
        self.pending = False    # updated since the last average (the same on every rank: set by the same steps)

    def changed(self) -> None:
        self.pending = dist.is_distributed()

    def agree(self) -> None:
        """Average the buffers over ranks if they changed since the last time; call on every rank."""
        if self.pending:
            dist.average_buffers(*self.modules())
            self.pending = False


@torch.no_grad()
def refresh(run, model: nn.Module, passes: int) -> None:
    """Forward passes in train mode over unlabeled batches to re-estimate BatchNorm statistics (after the loop); over
    labeled ones when every training image is labeled (the fully supervised upper bound: no unlabeled batch exists).
    A stop request ends it (engine/graceful_stop.py). Under torchrun every process refreshes on its own batches and
    the statistics are averaged at the end."""
    model.train()
    batches = run.unlabeled if run.unlabeled.batches_per_epoch else run.labeled
    if batches is run.labeled:
        run.logger.message("BatchNorm refresh: no unlabeled images (every training image is labeled), so it draws "
                           "labeled batches")
    for _ in range(passes):
        run.stop.poll(run, "the BatchNorm refresh")
        images = batches.next()[0]
        with run.autocast():
            model(normalize(images, run.data.mean_rgb, run.data.channel_order))
    dist.average_buffers(model)
