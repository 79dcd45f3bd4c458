"""Per-class selector MLPs evaluated for all classes at once (SPEC 5.2, 5.4).

A selector is `nn.Sequential(Linear(D,H), BatchNorm1d(H), LeakyReLU(s), Linear(H,1))`, one per class. The
release called `selector_c(x[labels == c])` in a Python loop over classes; here the C modules' parameters are
stacked (so gradients still reach every module) and all classes run in one pass:
- the first Linear is a batched matmul over blocks of ceil(N/C) vectors, each block of one class ([K, P0, D] with
  K <= 2C blocks fixed from N and C): no padding to the largest class, and no host sync;
- BatchNorm1d uses per-class batch statistics (segment sums over the valid vectors of each class) in train
  mode, the running statistics in eval mode, and updates the running statistics exactly as
  `nn.BatchNorm1d` in train mode would;
- BatchNorm, LeakyReLU and the second Linear (a per-row dot product with the row's own class weights, the
  same arithmetic as a bmm) run on the unpadded rows: only the first layer is padded, so memory stays at
  O(C*P*(D+H) + N*H) instead of four or five padded [C, P, H] activations when one class dominates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["class_counts", "grouped_selector_scores", "padded_selector_scores", "reference_selector_scores"]


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Vectors per class [C] for labels in [0, C), without the host sync of torch.bincount on CUDA."""
    return torch.zeros(num_classes, dtype=torch.long, device=labels.device).index_add_(
        0, labels, torch.ones_like(labels, dtype=torch.long))


@dataclass
class _Stacked:
    """The C selectors' parameters and buffers stacked along a leading class axis."""
    w1: torch.Tensor        # [C, H, D]
    b1: torch.Tensor        # [C, H]
    gamma: torch.Tensor     # [C, H]
    beta: torch.Tensor      # [C, H]
    w2: torch.Tensor        # [C, H]
    b2: torch.Tensor        # [C]
    eps: float | torch.Tensor       # BN eps, scalar or [C]
    slope: float | torch.Tensor     # LeakyReLU negative slope, scalar or [C]
    batch_stats: bool | torch.Tensor  # BN normalises with batch statistics (train mode, or no running stats)
    update: bool | torch.Tensor       # BN updates its running statistics (train mode with running stats)
    bns: list[nn.BatchNorm1d]


def _check_selector(module: nn.Module, c: int) -> tuple[nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]:
    layers = list(module.children()) if isinstance(module, nn.Sequential) else []
    ok = (len(layers) == 4 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.BatchNorm1d)
          and isinstance(layers[2], nn.LeakyReLU) and isinstance(layers[3], nn.Linear)
          and layers[3].out_features == 1)
    if not ok:
        raise TypeError(f"selector {c} must be nn.Sequential(Linear(D,H), BatchNorm1d(H), LeakyReLU, Linear(H,1)), "
                        f"got {module!r}")
    return layers[0], layers[1], layers[2], layers[3]


def _per_class(values: list, like: torch.Tensor, dtype: torch.dtype):
    """A Python scalar when all classes agree (the usual case), else a [C] tensor built on the device with fill
    kernels (torch.tensor(list, device=cuda) would be a blocking host-to-device copy)."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.stack([like.new_full((), v, dtype=dtype) for v in values])


def _col(v):
    """[C] tensor -> [C, 1] for broadcasting over features; scalars unchanged."""
    return v[:, None] if isinstance(v, torch.Tensor) else v


def _stack(selectors: list[nn.Module], like: torch.Tensor) -> _Stacked:
    """torch.stack of the modules' parameters: differentiable, so each module's parameters get their gradient."""
    parts = [_check_selector(s, c) for c, s in enumerate(selectors)]
    lin1, bns, acts, lin2 = (list(p) for p in zip(*parts))
    h = lin1[0].out_features

    def stack(tensors, fill):
        return torch.stack([t if t is not None else like.new_full((h,), fill) for t in tensors])

    tracking = [bn.running_mean is not None for bn in bns]
    return _Stacked(
        w1=torch.stack([m.weight for m in lin1]),
        b1=stack([m.bias for m in lin1], 0.0),
        gamma=stack([bn.weight for bn in bns], 1.0),
        beta=stack([bn.bias for bn in bns], 0.0),
        w2=torch.stack([m.weight[0] for m in lin2]),
        b2=torch.stack([m.bias[0] if m.bias is not None else like.new_zeros(()) for m in lin2]),
        eps=_per_class([float(bn.eps) for bn in bns], like, like.dtype),
        slope=_per_class([float(a.negative_slope) for a in acts], like, like.dtype),
        # eval mode without running statistics falls back to batch statistics, as nn.BatchNorm1d does
        batch_stats=_per_class([bn.training or not t for bn, t in zip(bns, tracking)], like, torch.bool),
        update=_per_class([bn.training and t for bn, t in zip(bns, tracking)], like, torch.bool),
        bns=bns,
    )


def _update_running_stats(p: _Stacked, update: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                          n: torch.Tensor) -> None:
    """nn.BatchNorm1d's train-mode running-stat update for the classes where `update` [C] is True, vectorised:
    stack the buffers, update all rows with torch.where, copy back with one foreach op (no host syncs)."""
    tracked = [c for c, bn in enumerate(p.bns) if bn.running_mean is not None]
    if not tracked:
        return
    with torch.no_grad():
        # classes without running statistics get placeholders here and are never written back
        ones = mean.new_ones(mean.shape[1])
        rm = torch.stack([bn.running_mean if bn.running_mean is not None else ones for bn in p.bns])  # [C, H]
        rv = torch.stack([bn.running_var if bn.running_var is not None else ones for bn in p.bns])
        zero = torch.zeros((), dtype=torch.int64, device=mean.device)
        nbt = torch.stack([bn.num_batches_tracked if bn.num_batches_tracked is not None else zero
                           for bn in p.bns])                                           # [C]
        nbt_new = nbt + update.long()
        moms = [bn.momentum for bn in p.bns]
        if all(m_ is not None for m_ in moms):
            factor = _col(_per_class([float(m_) for m_ in moms], mean, mean.dtype))
        else:  # momentum None = cumulative moving average: 1 / num_batches_tracked (after the increment)
            mom = _per_class([float("nan") if m_ is None else float(m_) for m_ in moms], mean, mean.dtype)
            cma = 1.0 / nbt_new.clamp(min=1).to(mean.dtype)
            factor = torch.where(torch.isnan(mom), cma, mom)[:, None] if isinstance(mom, torch.Tensor) \
                else cma[:, None]
        unbiased = var * (n / (n - 1).clamp(min=1))[:, None]
        upd = update[:, None]
        rm_new = torch.where(upd, factor * mean.to(rm.dtype) + (1 - factor) * rm, rm).unbind(0)
        rv_new = torch.where(upd, factor * unbiased.to(rv.dtype) + (1 - factor) * rv, rv).unbind(0)
        nbt_new = nbt_new.unbind(0)
        torch._foreach_copy_([p.bns[c].running_mean for c in tracked], [rm_new[c] for c in tracked])
        torch._foreach_copy_([p.bns[c].running_var for c in tracked], [rv_new[c] for c in tracked])
        torch._foreach_copy_([p.bns[c].num_batches_tracked for c in tracked], [nbt_new[c] for c in tracked])


def _selector_rows(x_pad: torch.Tensor, row_class: torch.Tensor, row_slot: torch.Tensor, row_use: torch.Tensor,
                   class_use: torch.Tensor, selectors: list[nn.Module], block_class=None, row_block=None) -> torch.Tensor:
    """Core: x_pad [C,P,D] vectors padded per class; row r is x_pad[row_class[r], row_slot[r]] and counts when
    row_use[r]. Returns the pre-sigmoid score per row [R] (0 for unused rows); BN statistics over used rows."""
    C = len(selectors)
    p = _stack(selectors, x_pad)
    if block_class is None:
        h_pad = torch.baddbmm(p.b1.unsqueeze(1), x_pad, p.w1.transpose(1, 2))          # [C, P, H]
        h = h_pad[row_class, row_slot]                                                  # [R, H]
    else:
        h_pad = torch.baddbmm(p.b1[block_class].unsqueeze(1), x_pad, p.w1[block_class].transpose(1, 2))  # [K, P0, H]
        h = h_pad[row_block, row_slot]
    H = h.shape[1]
    m = row_use.to(h.dtype)                                                         # [R]
    n = torch.zeros(C, device=h.device, dtype=h.dtype).index_add(0, row_class, m)  # [C] vectors per class
    n_safe = n.clamp(min=1)[:, None]
    zeros = torch.zeros(C, H, device=h.device, dtype=h.dtype)
    mean = zeros.index_add(0, row_class, h * m[:, None]) / n_safe                   # [C, H]
    centred = h - mean[row_class]
    var = zeros.index_add(0, row_class, centred.square() * m[:, None]) / n_safe     # [C, H] biased
    if p.batch_stats is not True:  # some class in eval mode: its running statistics
        rm = torch.stack([bn.running_mean if bn.running_mean is not None else zeros[0] for bn in p.bns])
        rv = torch.stack([bn.running_var if bn.running_var is not None else zeros[0] for bn in p.bns])
        if p.batch_stats is False:
            mu, sigma2 = rm.to(h.dtype), rv.to(h.dtype)
        else:
            mu = torch.where(p.batch_stats[:, None], mean, rm.to(h.dtype))
            sigma2 = torch.where(p.batch_stats[:, None], var, rv.to(h.dtype))
        centred = h - mu[row_class]
    else:
        sigma2 = var
    scale = torch.rsqrt(sigma2 + _col(p.eps)) * p.gamma                             # [C, H]
    z = centred * scale[row_class] + p.beta[row_class]                             # [R, H]
    if isinstance(p.slope, float):
        a = F.leaky_relu(z, p.slope)
    else:
        a = torch.where(z >= 0, z, z * p.slope[row_class][:, None])
    s = (a * p.w2[row_class]).sum(1) + p.b2[row_class]                             # [R]
    # running stats: active classes with more than one vector whose BN is in train mode
    if p.update is not False:
        update = class_use & (n > 1)
        if isinstance(p.update, torch.Tensor):
            update = update & p.update
        _update_running_stats(p, update, mean.detach(), var.detach(), n)
    return torch.where(row_use, s, torch.zeros_like(s))


def grouped_selector_scores(x: torch.Tensor, groups: torch.Tensor, selectors: list[nn.Module],
                            active: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-sigmoid score of each vector x[n] [N,D] by its own class's selector selectors[groups[n]].

    All classes in one pass (stacked weights, bmm over fixed-size class blocks, segment reductions; no host sync); differentiable w.r.t. x and
    every selector's parameters. BatchNorm uses per-class batch statistics (train mode) or running statistics
    (eval mode) and, in train mode, updates the running statistics of each active class with more than one
    vector as nn.BatchNorm1d would. Vectors of inactive classes (active[c] False) score 0 and do not enter any
    statistics. A train-mode class with a single vector normalises to 0 (nn.BatchNorm1d would raise instead).
    groups: [N] int64 in [0, C); active: [C] bool or None (all active). Returns [N].
    """
    C = len(selectors)
    N, D = x.shape
    if N == 0:
        return x.new_zeros(0)
    device = x.device
    class_use = (torch.ones(C, dtype=torch.bool, device=device) if active is None
                 else active.to(device=device, dtype=torch.bool))
    counts = class_counts(groups, C)                                                # [C]
    used = counts * class_use
    P0 = -(-N // C)                                     # block size: ceil(N / C), known on the host
    K = C + -(-N // P0)                                 # static bound on the number of blocks: sum ceil(n_c/P0)
    blocks = (used + P0 - 1) // P0                                                   # [C] blocks per class
    block_start = torch.cumsum(blocks, 0) - blocks                                  # [C]
    order = torch.argsort(groups, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    ar = torch.arange(N, device=device)
    pos = torch.empty_like(groups)
    pos[order] = ar - starts[groups[order]]                                         # index within own class
    row_block = (block_start[groups] + pos // P0).clamp(max=K - 1)
    row_slot = pos % P0
    # block k -> its class (blocks beyond the used ones: class 0, all padding)
    kk = torch.arange(K, device=device)
    block_class = (torch.searchsorted(torch.cumsum(blocks, 0), kk, right=True)).clamp(max=C - 1)
    within = kk - block_start[block_class]                                          # block index within class
    slot = torch.arange(P0, device=device)
    first = within[:, None] * P0 + slot[None, :]                                   # [K, P0] position in class
    valid = (first < used[block_class][:, None]) & (kk[:, None] < blocks.sum())
    src = order[(starts[block_class][:, None] + first).clamp(max=N - 1)]
    src = torch.where(valid, src, torch.full_like(src, N))
    x_pad = torch.cat([x, x.new_zeros(1, D)])[src]                                  # [K, P0, D]
    row_use = class_use[groups]
    return _selector_rows(x_pad, groups, row_slot, row_use, class_use, selectors, block_class, row_block)


def padded_selector_scores(x_pad: torch.Tensor, valid: torch.Tensor, selectors: list[nn.Module]) -> torch.Tensor:
    """Same as grouped_selector_scores for vectors already stored per class: x_pad [C,P,D], valid [C,P] bool
    (entries of class c that count). No host sync. Returns pre-sigmoid scores [C,P] (0 where not valid)."""
    C, P, _ = x_pad.shape
    if P == 0:
        return x_pad.new_zeros(C, P)
    device = x_pad.device
    row_class = torch.arange(C, device=device).repeat_interleave(P)
    row_slot = torch.arange(P, device=device).repeat(C)
    row_use = valid.reshape(-1)
    class_use = valid.any(1)
    return _selector_rows(x_pad, row_class, row_slot, row_use, class_use, selectors).view(C, P)


def reference_selector_scores(x: torch.Tensor, groups: torch.Tensor, selectors: list[nn.Module],
                              active: torch.Tensor | None = None) -> torch.Tensor:
    """Plain per-class loop `selectors[c](x[groups == c])` (tests only). Inactive/absent classes score 0."""
    out = x.new_zeros(x.shape[0])
    for c, selector in enumerate(selectors):
        idx = torch.nonzero(groups == c).flatten()
        if idx.numel() == 0 or (active is not None and not bool(active[c])):
            continue
        out = out.index_put((idx,), selector(x[idx])[:, 0])
    return out
