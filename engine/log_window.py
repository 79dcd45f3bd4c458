"""The log window: the loss terms summed on the device since the last log row, and the mean each row logs.

Each term is averaged over the iterations in which it was computed (trainSSL_less_memory.py computes the labeled
terms on even steps only and the unlabeled ones on odd steps; the contrastive terms start after the ramp-up), and
the terms of every row come in one fixed order (`TERM_ORDER`, then any other term by name), whatever order the
steps produced them in.
"""
from __future__ import annotations

import torch

from engine import distributed as dist

TERM_ORDER = ("loss", "loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u")


def ordered(keys) -> list[str]:
    """The terms in the order of every log row: TERM_ORDER first, any other term after them by name."""
    keys = set(keys)
    return [k for k in TERM_ORDER if k in keys] + sorted(keys - set(TERM_ORDER))


def add_terms(sums: dict[str, torch.Tensor], counts: dict[str, int], terms: dict[str, torch.Tensor]) -> None:
    """Add one iteration's terms to the window (on the device: no host sync)."""
    for k, v in terms.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v
        counts[k] = counts.get(k, 0) + 1


def window_means(sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
    """Each term's mean over the iterations that computed it (and over all processes under torchrun: every
    process computes the same terms at the same iterations), in the fixed order; one host read per row."""
    keys = ordered(sums)
    if not keys:
        return {}
    total = torch.stack([sums[k] for k in keys])
    if dist.is_distributed():
        total = dist.all_reduce_sum(total) / dist.world_size()
    return {k: float(v) / counts[k] for k, v in zip(keys, total.tolist())}
