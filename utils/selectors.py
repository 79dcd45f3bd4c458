"""Per-class selector MLPs evaluated for the vectors of all classes (SPEC 5.2, 5.4).

A selector is `nn.Sequential(Linear(D,H), BatchNorm1d(H), LeakyReLU(s), Linear(H,1))`, one per class; vector n is
scored by the selector of its own class groups[n], with BatchNorm statistics over the vectors of that class, as the
release's `selector_c(x[labels == c])`. Two implementations of that one function, chosen by device
(`method="auto"`); tests hold both equal to the plain loop `reference_selector_scores`:

- "segments" (the CPU choice): one stable argsort groups the rows by class; each class's own module then runs on
  its rows, exact rows only, with PyTorch's fused BatchNorm. Results are bit-identical to the per-class loop (same
  rows, same order, same ops). The loop over classes reads the class sizes on the host: free on a CPU (there is no
  device to wait for), a sync per call on a GPU, hence not used there.
- "blocks" (CUDA and any other device): all classes at once, no host sync. The rows are gathered into
  fixed-size blocks of one class each ([K, P, D], K and P fixed by N and C, so no sync; blocks are padded, not
  classes, so at most C*P = N/4 padding rows); the C modules' parameters are stacked (gradients still reach
  every module); the first Linear is one bmm without bias; BatchNorm is fused per class: per-class sums with a
  masked bmm and index_add_ over blocks, one subtraction of each block's [H] shift (the batch or running mean,
  the first Linear's bias folded in) and one multiply-add with its scale and beta; LeakyReLU; the second Linear
  is one more bmm. Every tensor stays in the block layout (per-block parameters broadcast, no per-row gathers);
  the rows' scores are read back with one gather of N scalars. BatchNorm running statistics are updated exactly
  as nn.BatchNorm1d does, all classes at once.

Why two: on one CPU thread at the paper's sizes (21,125 or 38,025 vectors, 19 classes, D = H = 256) the blocks
path pays for padding, the weight gather per block and several [rows, 256] temporaries (each a fresh page-faulted
allocation at these sizes), and measured 2-4x slower than the per-class segments; the figures are in
docs/speed.md. On a GPU the segments' host sync and 19 small kernels per layer are what to avoid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METHODS", "class_counts", "grouped_selector_scores", "padded_selector_scores",
           "reference_selector_scores", "selector_method"]

METHODS = ("auto", "segments", "blocks")


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Vectors per class [C] for labels in [0, C), without the host sync of torch.bincount on CUDA."""
    return torch.zeros(num_classes, dtype=torch.long, device=labels.device).index_add_(
        0, labels, torch.ones_like(labels, dtype=torch.long))


def selector_method(method: str, device: torch.device) -> str:
    """"auto" -> "segments" on CPU, "blocks" elsewhere; an explicit choice is returned as is."""
    if method not in METHODS:
        raise ValueError(f"selector method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "segments" if device.type == "cpu" else "blocks"
    return method


def _check_selector(module: nn.Module, c: int) -> tuple[nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]:
    layers = list(module.children()) if isinstance(module, nn.Sequential) else []
    ok = (len(layers) == 4 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.BatchNorm1d)
          and isinstance(layers[2], nn.LeakyReLU) and isinstance(layers[3], nn.Linear)
          and layers[3].out_features == 1)
    if not ok:
        raise TypeError(f"selector {c} must be nn.Sequential(Linear(D,H), BatchNorm1d(H), LeakyReLU, Linear(H,1)), "
                        f"got {module!r}")
    return layers[0], layers[1], layers[2], layers[3]


# ------------------------------------------------------------------------------------------ segments (CPU)
def _run_selector(module: nn.Module, x_c: torch.Tensor, c: int) -> torch.Tensor:
    """module(x_c)[:, 0], layer by layer with the LeakyReLU in place (the same values and gradients, one
    [n, H] temporary fewer). A single vector with batch statistics normalises to 0 (nn.BatchNorm1d would
    raise) and leaves the running statistics alone, as in the blocks path."""
    lin1, bn, act, lin2 = _check_selector(module, c)
    h = lin1(x_c)
    if x_c.shape[0] == 1 and (bn.training or bn.running_mean is None):
        z = h - h                                          # zeros, with a (zero) gradient path to lin1
        if bn.weight is not None:
            z = z * bn.weight + bn.bias
    else:
        z = bn(h)
    # in place is exact for slope > 0 (autograd then keys the backward on the output's sign, the input's sign)
    a = F.leaky_relu(z, act.negative_slope, inplace=act.negative_slope > 0 or not torch.is_grad_enabled())
    return lin2(a)[:, 0]


def _segment_scores(x: torch.Tensor, groups: torch.Tensor, selectors: list[nn.Module],
                    class_use: torch.Tensor) -> torch.Tensor:
    """Per-class loop over the rows grouped by class (reads the class sizes on the host)."""
    C, N = len(selectors), x.shape[0]
    sizes = class_counts(groups, C).tolist()
    use = class_use.tolist()
    order = torch.argsort(groups, stable=True)
    rows, scores, start = [], [], 0
    for c, n in enumerate(sizes):
        if n and use[c]:
            idx = order[start:start + n]
            rows.append(idx)
            scores.append(_run_selector(selectors[c], x.index_select(0, idx), c))
        start += n
    if not rows:
        return x.new_zeros(N)
    return x.new_zeros(N).index_copy(0, torch.cat(rows), torch.cat(scores))


# --------------------------------------------------------------------------------------- blocks (any device)
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


def _block_scores(xb: torch.Tensor, valid: torch.Tensor, block_class: torch.Tensor | None,
                  selectors: list[nn.Module], class_use: torch.Tensor) -> torch.Tensor:
    """Core of the blocks path: xb [K,P,D] rows in blocks of one class each (block k of class block_class[k];
    None: block k is class k), valid [K,P] the rows that count. Returns pre-sigmoid scores [K,P] (garbage where
    not valid); BatchNorm statistics per class over the valid rows of its blocks; running statistics updated."""
    C = len(selectors)
    p = _stack(selectors, xb)
    bc = block_class if block_class is not None else torch.arange(C, device=xb.device)
    w1 = p.w1 if block_class is None else p.w1.index_select(0, bc)                # [K, H, D]
    h = torch.bmm(xb, w1.transpose(1, 2))                                           # [K, P, H] = x W1ᵀ (no bias)
    H = h.shape[2]
    m = valid.to(h.dtype).unsqueeze(1)                                              # [K, 1, P]
    zeros = h.new_zeros(C, H)

    def per_class(t: torch.Tensor) -> torch.Tensor:                                 # [K, H] -> [C, H]
        return t if block_class is None else zeros.index_add(0, bc, t)

    n = h.new_zeros(C).index_add(0, bc, valid.sum(1).to(h.dtype))                   # [C] rows per class
    n_safe = n.clamp(min=1)[:, None]
    mean0 = per_class(torch.bmm(m, h)[:, 0]) / n_safe                               # [C, H] batch mean of x W1ᵀ
    # BatchNorm input x W1ᵀ + b1, centred on mu: train mode mu = its batch mean, where b1 cancels ((b1 - b1) only
    # keeps the bias's zero gradient, as the loop's autograd gives it one); eval mode mu = the running mean.
    shift = mean0 + (p.b1 - p.b1)                                                   # [C, H]
    if p.batch_stats is not True:
        rm = torch.stack([bn.running_mean if bn.running_mean is not None else zeros[0] for bn in p.bns])
        eval_shift = rm.to(h.dtype) - p.b1
        shift = eval_shift if p.batch_stats is False else torch.where(p.batch_stats[:, None], shift, eval_shift)
    centred = h - shift.index_select(0, bc).unsqueeze(1)                            # [K, P, H]
    var = per_class(torch.bmm(m, centred.square())[:, 0]) / n_safe                  # [C, H] biased batch variance
    if p.batch_stats is True:
        sigma2 = var
    else:
        rv = torch.stack([bn.running_var if bn.running_var is not None else zeros[0] for bn in p.bns])
        sigma2 = rv.to(h.dtype) if p.batch_stats is False else torch.where(p.batch_stats[:, None], var,
                                                                           rv.to(h.dtype))
    scale = torch.rsqrt(sigma2 + _col(p.eps)) * p.gamma                             # [C, H]
    z = torch.addcmul(p.beta.index_select(0, bc).unsqueeze(1), centred, scale.index_select(0, bc).unsqueeze(1))
    if isinstance(p.slope, float):
        a = F.leaky_relu(z, p.slope)
    else:
        a = torch.where(z >= 0, z, z * p.slope.index_select(0, bc)[:, None, None])
    s = torch.baddbmm(p.b2.index_select(0, bc)[:, None, None], a, p.w2.index_select(0, bc).unsqueeze(2))  # [K,P,1]
    if p.update is not False:  # active classes with more than one vector whose BN is in train mode
        update = class_use & (n > 1)
        if isinstance(p.update, torch.Tensor):
            update = update & p.update
        _update_running_stats(p, update, (mean0 + p.b1).detach(), var.detach(), n)
    return s[:, :, 0]


def _grouped_blocks(x: torch.Tensor, groups: torch.Tensor, selectors: list[nn.Module],
                    class_use: torch.Tensor) -> torch.Tensor:
    """Rows -> fixed-size blocks of one class each -> _block_scores -> rows; no host sync."""
    C = len(selectors)
    N = x.shape[0]
    device = x.device
    counts = class_counts(groups, C)                                                # [C]
    used = counts * class_use                                                       # rows that get a score
    # Block size ceil(N / 4C), known on the host: at most C*P = N/4 padding rows, K <= 5C blocks. Blocks of
    # ceil(N / C) rows (K <= 2C) pad up to N rows; on one CPU thread they measured 1.5-1.7x slower, and they move
    # more memory (activations ~2NH per temporary against a weight gather of K*H*D ~ 5CHD with the smaller ones).
    P = -(-N // (4 * C))
    K = C + -(-N // P)                  # static bound on the number of blocks: sum_c ceil(used_c / P)
    blocks = (used + P - 1) // P                                                    # [C] blocks per class
    block_end = torch.cumsum(blocks, 0)
    block_start = block_end - blocks
    order = torch.argsort(groups, stable=True)                                      # rows grouped by class
    starts = torch.cumsum(counts, 0) - counts                                       # [C] first sorted row
    kk = torch.arange(K, device=device)
    block_class = torch.searchsorted(block_end, kk, right=True).clamp(max=C - 1)    # [K] (spare blocks: C-1)
    first = (kk - block_start[block_class])[:, None] * P + torch.arange(P, device=device)  # [K, P] row in class
    valid = (first < used[block_class][:, None]) & (kk < block_end[-1])[:, None]
    src = order[(starts[block_class][:, None] + first).clamp(max=N - 1)]            # [K, P] (padding: any row)
    xb = x.index_select(0, src.reshape(-1)).view(K, P, x.shape[1])
    s = _block_scores(xb, valid, block_class, selectors, class_use)                 # [K, P]
    # row r sits in block block_start[c] + pos // P at slot pos % P, pos = its index within its class
    pos = torch.empty_like(groups)
    pos[order] = torch.arange(N, device=device) - starts[groups[order]]
    flat = ((block_start[groups] + pos // P) * P + pos % P).clamp(max=K * P - 1)
    out = s.reshape(-1).index_select(0, flat)
    return torch.where(class_use[groups], out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------- public
def grouped_selector_scores(x: torch.Tensor, groups: torch.Tensor, selectors: list[nn.Module],
                            active: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """Pre-sigmoid score of each vector x[n] [N,D] by its own class's selector selectors[groups[n]].

    Differentiable w.r.t. x and every selector's parameters. BatchNorm uses per-class batch statistics (train
    mode) or running statistics (eval mode) and, in train mode, updates the running statistics of each active
    class with more than one vector as nn.BatchNorm1d would. Vectors of inactive classes (active[c] False) score
    0 and do not enter any statistics. A train-mode class with a single vector normalises to 0 (nn.BatchNorm1d
    would raise instead). groups: [N] int64 in [0, C); active: [C] bool or None (all active); method: "auto"
    (segments on CPU, blocks elsewhere), "segments" or "blocks" (see the module docstring). Returns [N].
    """
    C = len(selectors)
    N = x.shape[0]
    method = selector_method(method, x.device)
    for c, s in enumerate(selectors):
        _check_selector(s, c)
    if N == 0:
        return x.new_zeros(0)
    class_use = (torch.ones(C, dtype=torch.bool, device=x.device) if active is None
                 else active.to(device=x.device, dtype=torch.bool))
    if method == "segments":
        return _segment_scores(x, groups, selectors, class_use)
    return _grouped_blocks(x, groups, selectors, class_use)


def padded_selector_scores(x_pad: torch.Tensor, valid: torch.Tensor, selectors: list[nn.Module],
                           method: str = "auto") -> torch.Tensor:
    """Same as grouped_selector_scores for vectors already stored per class: x_pad [C,P,D], valid [C,P] bool
    (entries of class c that count). Returns pre-sigmoid scores [C,P] (0 where not valid)."""
    C, P, D = x_pad.shape
    method = selector_method(method, x_pad.device)
    if P == 0:
        return x_pad.new_zeros(C, P)
    if method == "segments":   # the valid entries as rows of their class (nonzero: free on CPU, a sync on GPU)
        rows = valid.reshape(-1).nonzero()[:, 0]
        scores = x_pad.new_zeros(C * P)
        if rows.numel():
            s = _segment_scores(x_pad.reshape(C * P, D).index_select(0, rows), rows // P, selectors,
                                torch.ones(C, dtype=torch.bool, device=x_pad.device))
            scores = scores.index_copy(0, rows, s)
        return scores.view(C, P)
    for c, s in enumerate(selectors):
        _check_selector(s, c)
    s = _block_scores(x_pad, valid, None, selectors, valid.any(1))
    return torch.where(valid, s, torch.zeros_like(s))


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
