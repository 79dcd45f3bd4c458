"""Class-wise memory bank of projected feature vectors (SPEC 5.2, section 8 "memory: which q vectors are kept").

Per class c a store of at most `size` vectors, newest first: `memory[c, :counts[c]]`; the slots beyond counts[c]
hold zeros. Every update handles all classes at once with sorts and gathers (no loop over classes; the selector
scores come from utils.selectors, whose CPU choice loops over classes and whose GPU choice does not; no host sync on
a GPU). `add_reference` is the same update written as the release's per-class loop (tests and benchmarks).
"""
from __future__ import annotations

import torch
from torch import nn

from utils.errors import UserError
from utils.selectors import class_counts, grouped_selector_scores

__all__ = ["MemoryBank", "per_class_quota"]

_KEEP = ("lowest", "highest")


def per_class_quota(dataset: str, batch_size: int, labeled_samples: int, num_classes: int) -> int:
    """Vectors a class may add per update: q = B * k (SPEC 5.2), with Python 3's round (banker's), as released.
    VOC ("pascal_voc"/"pascal"): k = max(1, int(C/3 * round(256/L))); anything else: k = max(1, round(256/L))."""
    if labeled_samples <= 0:
        raise UserError(f"training.data.labeled_samples must be positive to size the memory quota, "
                        f"got {labeled_samples}")
    if dataset in ("pascal_voc", "pascal"):
        k = max(1, int(num_classes / 3 * round(256 / labeled_samples)))
    else:
        k = max(1, round(256 / labeled_samples))
    return batch_size * k


class MemoryBank:
    """memory [C, size, D] float32 and counts [C] int64 on one device; entries 0..counts[c]-1 valid, newest first."""

    def __init__(self, num_classes: int, size: int = 256, dim: int = 256,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1 or size < 1 or dim < 1:
            raise UserError(f"memory bank needs num_classes, size and dim >= 1, got {num_classes}, {size}, {dim}")
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.memory = torch.zeros(num_classes, size, dim, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.memory.device

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor, selectors: list[nn.Module], quota: int,
            keep: str = "lowest", selector_method: str = "auto") -> None:
        """Add features [N,D] of classes labels [N] (int64 in [0, C)).

        Per class with more than `quota` new vectors, only `quota` are kept, ranked by sigmoid(selector_c):
        keep="lowest" (fidelity "code": the release sorted ascending and took the first q) stores the q lowest in
        ascending score order; keep="highest" (fidelity "paper") the q highest in descending order. Classes with
        at most `quota` vectors keep all, in the given order. The new vectors go in front of the stored ones and
        the oldest beyond `size` fall out. Selectors in train mode update their BN running statistics, as the
        release's selector call did. selector_method: see utils.selectors (the default picks per device).
        """
        if keep not in _KEEP:
            raise UserError(f"memory keep must be one of {_KEEP}, got {keep!r}")
        if quota < 1:
            raise UserError(f"memory quota per class must be >= 1, got {quota}")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise UserError(f"memory bank holds vectors of size {self.dim}, got features of shape "
                            f"{tuple(features.shape)}; set the memory feature size to the projection head's output")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match features {tuple(features.shape)}")
        N = features.shape[0]
        if N == 0:
            return
        C, S, D = self.num_classes, self.size, self.dim
        device = self.device
        x = features.detach().to(device=device, dtype=torch.float32)
        labels = labels.to(device=device, dtype=torch.int64)

        n = class_counts(labels, C)                                                 # [C] new vectors per class
        active = n > quota                                                          # classes that get ranked
        scores = torch.sigmoid(grouped_selector_scores(x, labels, selectors, active, method=selector_method))
        ar = torch.arange(N, device=device)
        if keep == "highest":
            scores = -scores
        # Within a class: by score for ranked classes, by arrival for the others (float64 holds both exactly).
        key = torch.where(active[labels], scores.double(), ar.double())
        by_key = torch.argsort(key, stable=True)
        order = by_key[torch.argsort(labels[by_key], stable=True)]                 # grouped by class, then key
        starts = torch.cumsum(n, 0) - n                                             # [C]

        # Slot j of class c after the update: new vector j (j < k_c) or stored entry j - k_c. Stored entries
        # beyond counts[c] are zeros, so slots past the new count come out zero without a mask.
        k = n.clamp(max=quota)                                                      # [C] vectors entering
        j = torch.arange(S, device=device)
        old_j = (j[None, :] - k[:, None]).clamp(min=0)                              # [C, S]
        flat = self.memory.view(C * S, D)
        out = flat.index_select(0, (old_j + (torch.arange(C, device=device) * S)[:, None]).reshape(-1))
        out = out.view(C, S, D)                                                     # stored entries, shifted
        q = min(quota, S)                                # only the first q slots can take a new vector
        jq = j[:q]
        new = x.index_select(0, order[(starts[:, None] + jq[None, :]).clamp(max=N - 1)].reshape(-1)).view(C, q, D)
        out[:, :q] = torch.where((jq[None, :] < k[:, None])[:, :, None], new, out[:, :q])
        self.memory = out                                                           # a fresh tensor: no copy
        self.counts = (self.counts + k).clamp(max=S)

    @torch.no_grad()
    def add_reference(self, features: torch.Tensor, labels: torch.Tensor, selectors: list[nn.Module], quota: int,
                      keep: str = "lowest") -> None:
        """The same update as `add`, one class at a time as the release wrote it (tests and benchmarks): per
        class, its vectors; with more than `quota`, the selector's sigmoid scores, a stable sort (descending for
        keep="highest") and the first `quota`; then the new vectors in front of the stored ones, cut at `size`."""
        if keep not in _KEEP:
            raise UserError(f"memory keep must be one of {_KEEP}, got {keep!r}")
        x = features.detach().to(device=self.device, dtype=torch.float32)
        labels = labels.to(device=self.device, dtype=torch.int64)
        for c in range(self.num_classes):
            x_c = x[labels == c]
            if x_c.shape[0] == 0:
                continue
            if x_c.shape[0] > quota:
                score = torch.sigmoid(selectors[c](x_c))[:, 0]
                x_c = x_c[torch.argsort(score, descending=keep == "highest", stable=True)[:quota]]
            stored = torch.cat([x_c, self.class_memory(c)])[: self.size]
            self.memory[c].zero_()
            self.memory[c, : stored.shape[0]] = stored
            self.counts[c] = stored.shape[0]

    def class_memory(self, c: int) -> torch.Tensor:
        """The stored vectors of class c, newest first [counts[c], D] (host sync; tests and inspection)."""
        return self.memory[c, : int(self.counts[c])]

    def fill(self) -> torch.Tensor:
        """Stored vectors per class [C] (a copy of counts)."""
        return self.counts.clone()

    def state_dict(self) -> dict:
        return {"memory": self.memory.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict(); shapes must match this bank (classes, size, feature size)."""
        if not isinstance(state, dict) or set(state) != {"memory", "counts"}:
            raise UserError(f"memory bank state must hold exactly 'memory' and 'counts', got "
                            f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        memory, counts = state["memory"], state["counts"]
        expected = (self.num_classes, self.size, self.dim)
        if tuple(memory.shape) != expected or tuple(counts.shape) != (self.num_classes,):
            raise UserError(f"checkpoint memory bank has shape {tuple(memory.shape)} (counts "
                            f"{tuple(counts.shape)}) but this run expects {expected} (classes, memory size, "
                            f"feature size); resume with the same dataset and memory settings")
        counts = counts.to(device=self.device, dtype=torch.int64)
        if bool(((counts < 0) | (counts > self.size)).any()):
            raise UserError(f"checkpoint memory bank counts must lie in [0, {self.size}]")
        self.memory.copy_(memory.to(self.device, torch.float32))
        self.counts.copy_(counts)
        # `add` relies on the slots beyond each count holding zeros
        unused = torch.arange(self.size, device=self.device)[None, :] >= counts[:, None]      # [C, S]
        self.memory.masked_fill_(unused[:, :, None], 0.0)


def format_fill(memory: MemoryBank, class_names: list[str], used: bool = True) -> str:
    """One line: the memory bank's vectors per class (of its size per class), or that the run did not use it."""
    if not used:
        return "memory bank at the end: not used (method.use_contrastive false)"
    counts = memory.counts.tolist()
    return (f"memory bank at the end, vectors per class (of {memory.size}): "
            + ", ".join(f"{name} {n}" for name, n in zip(class_names, counts)))
