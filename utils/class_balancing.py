"""Class-balancing weights for Cityscapes (SPEC 5.3).

Two histories of per-class pixel counts: the labeled one has one slot per labeled batch of an epoch
and is filled once; the unlabeled one has one slot per unlabeled batch of an epoch and is a ring
buffer once full. Weights are sqrt(median(f) / f) of the summed counts f once both are full.
As released, one counter indexes both histories and advances on unlabeled updates only: a labeled
update writes the slot of the current count, and the histories count as full once the counter
reaches the longer history's length. Everything stays on the device; the counter is a Python int (it
does not depend on tensor values), so an update does no host sync.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from utils.errors import UserError


def _class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Pixels per class 0..C-1 of `labels` (any shape, integer) [C] int64; other values (ignore, >= C, < 0)
    dropped.

    One clamp to [-1, C] shifted by one puts every pixel in one of C+2 bins (bin 0: negative ids, bin C+1: ids
    >= C such as the ignore label), counted with one index_add_ of a stride-0 ones tensor; the two outer bins
    are cut off. No [C, N] temporary, no validity mask, and no host sync on CUDA (torch.bincount reads the
    largest value back to the host to size its output). Same trick as utils.metrics.confusion_matrix.
    """
    c = num_classes
    index = labels.reshape(-1).long().clamp(-1, c).add_(1)                       # [N] in [0, C+2)
    ones = torch.ones((), dtype=torch.int64, device=labels.device).expand(index.shape[0])
    return torch.zeros(c + 2, dtype=torch.int64, device=labels.device).index_add_(0, index, ones)[1:c + 1]


def _class_counts_reference(labels: Tensor, num_classes: int) -> Tensor:
    """The per-class compare-and-sum that _class_counts replaced (tests and benchmarks): [C, N] booleans."""
    flat = labels.reshape(1, -1)
    classes = torch.arange(num_classes, device=labels.device, dtype=labels.dtype).unsqueeze(1)
    return (flat == classes).sum(dim=1, dtype=torch.int64)  # [C]


class ClassBalancing:
    """Per-class pixel-count histories and the resulting loss weights (SPEC 5.3)."""

    def __init__(
        self,
        num_classes: int,
        labeled_slots: int,
        unlabeled_slots: int,
        device: torch.device | str | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if num_classes < 1 or labeled_slots < 1 or unlabeled_slots < 1:
            raise UserError(
                f"class balancing needs num_classes, labeled_slots and unlabeled_slots >= 1, got "
                f"{num_classes}, {labeled_slots}, {unlabeled_slots}; check labeled_samples and batch_size."
            )
        self.num_classes = num_classes
        self.labeled_slots = labeled_slots
        self.unlabeled_slots = unlabeled_slots
        self.labeled = torch.zeros(labeled_slots, num_classes, dtype=torch.int64, device=device)
        self.unlabeled = torch.zeros(unlabeled_slots, num_classes, dtype=torch.int64, device=device)
        # The release's one counter: unlabeled updates so far. A labeled update writes labeled slot `count` (while
        # count < labeled_slots) without advancing it; the unlabeled slot is count % unlabeled_slots (a ring).
        self.count = 0
        # Sums a batch's counts over processes under torchrun (engine.distributed.all_reduce_sum), so every rank
        # stores the counts of the global batch and holds identical histories and weights.
        self.reduce = reduce

    @staticmethod
    def labeled_slots_for(labeled_samples: int, batch_size: int) -> int:
        """Labeled history length: one slot per labeled batch, floor(L / B) (at least 1)."""
        return max(1, labeled_samples // max(1, batch_size))

    @staticmethod
    def unlabeled_slots_for(num_train: int, labeled_samples: int, batch_size: int) -> int:
        """Unlabeled history length: floor((N_train - L) / (B / 2)) (at least 1), as released."""
        return max(1, (num_train - labeled_samples) // max(1, batch_size // 2))

    @property
    def filled(self) -> bool:
        """Whether the counter has reached the longer history's length (weights are ones before), as released."""
        return self.count >= max(self.labeled_slots, self.unlabeled_slots)

    def update(self, labeled_labels: Tensor | None, pseudo_labels: Tensor | None) -> Tensor:
        """Add one labeled batch's labels and one unlabeled batch's pseudo-labels; return weights [C].

        Either input may be None to update only the other history (for scripts that see labeled and
        unlabeled batches on different steps). The labeled batch goes to slot `count`, then the unlabeled
        one to slot `count % unlabeled_slots`, which advances the counter; a labeled-only update does not.
        """
        if labeled_labels is not None and self.count < self.labeled_slots:
            counts = _class_counts(labeled_labels.to(self.labeled.device), self.num_classes)
            if self.reduce is not None:
                counts = self.reduce(counts)
            self.labeled[self.count] = counts
        if pseudo_labels is not None:
            counts = _class_counts(pseudo_labels.to(self.unlabeled.device), self.num_classes)
            if self.reduce is not None:
                counts = self.reduce(counts)
            self.unlabeled[self.count % self.unlabeled_slots] = counts
            self.count += 1
        return self.weights()

    def weights(self) -> Tensor:
        """Current weights [C] float32: ones until both histories are full, then sqrt(median(f)/f)."""
        device = self.labeled.device
        if not self.filled:
            return torch.ones(self.num_classes, dtype=torch.float32, device=device)
        freq = (self.labeled.sum(0) + self.unlabeled.sum(0)).to(torch.float64)  # [C]
        median = torch.quantile(freq, 0.5)  # numpy.median: mean of the two middle values for even C
        seen = freq > 0
        w = median / freq  # inf where a class was never seen (NaN if the median is 0 too)
        largest_finite = torch.where(seen, w, torch.full_like(w, -torch.inf)).max().clamp_min(1.0)
        w = torch.where(seen, w, largest_finite)
        return w.sqrt().to(torch.float32)

    def state_dict(self) -> dict:
        """Histories and counter, for checkpoints."""
        return {"labeled": self.labeled.clone(), "unlabeled": self.unlabeled.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the history shapes must match this instance's."""
        for key, ref in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            if key not in state or tuple(state[key].shape) != tuple(ref.shape):
                got = tuple(state[key].shape) if key in state else "missing"
                raise UserError(
                    f"class-balancing state in the checkpoint has {key} history {got}, expected "
                    f"{tuple(ref.shape)}; resume with the same dataset, labeled_samples and batch_size."
                )
        self.labeled.copy_(state["labeled"])
        self.unlabeled.copy_(state["unlabeled"])
        # states written before the single counter: their unlabeled count is the release's counter
        self.count = int(state["count"] if "count" in state else state["unlabeled_count"])
