"""Pixel-level contrastive loss against the class-wise memory bank (SPEC 5.4, section 8 "memory-side weights").

For every class c with more than one vector in X and more than one in memory:
    D = 1 - X̂_c M̂_cᵀ,  loss_c = mean_ij(w_i v_j D_ij)
with w = sigmoid(feature selector_c(X_c detached)) rescaled to mean 1, and v one of
- "release" (fidelity "code"): the release's rescaling, which divides each memory weight s_j = sigmoid(memory
  selector_c(m̂_j)) by itself: v_j = (1 / s_j) · s_j in float arithmetic, 1 or 1 - 2^-24, and autograd through both
  factors gives every memory selector a gradient of rounding size (so the release's SGD applies weight decay and
  momentum to those selectors; docs/fidelity.md has the measurements). The selectors run in the module's mode
  (train mode in training: per-class batch statistics, running statistics updated), as in the release;
- "ones": exactly 1, the memory selectors not evaluated (what "release" is in exact arithmetic);
- "mean" (fidelity "paper"): sigmoid(memory selector_c(M̂_c)) rescaled to mean 1.
Total = Σ_c loss_c / C.

Vectorised form: D is bilinear and w has mean 1, so with σ_i = sigmoid(feature selector),
μ_c = Σ_j v_j m̂_j / Σ_j v_j (the weighted mean of the class's normalised memory entries; "release": divided by
the count m_c instead, and v̄_c = Σ_j v_j / m_c, the mean weight, which "ones" and "mean" make 1)
    loss_c = v̄_c - Σ_i σ_i (x̂_i · μ_c) / Σ_i σ_i.
The row terms x̂_i · μ_{c_i} = (x_i · μ_{c_i}) / ‖x_i‖ come from one [N, C] product X μᵀ and the row norms: no
|X_c| x |M_c| matrix, and no [N, D] temporary for them besides the gradient itself. Same function, same gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.memory_bank import MemoryBank
from utils.selectors import class_counts, grouped_selector_scores, padded_selector_scores

__all__ = ["contrastive_loss", "contrastive_loss_reference"]

_MEMORY_WEIGHTS = ("ones", "release", "mean")
_NORM_EPS = 1e-12  # F.normalize's default


def _check_mode(memory_weights: str) -> None:
    if memory_weights not in _MEMORY_WEIGHTS:
        raise UserError(f"memory_weights must be one of {_MEMORY_WEIGHTS}, got {memory_weights!r}")


class _CosineToClassMean(torch.autograd.Function):
    """t_i = x̂_i · mu[labels[i]] with x̂ = F.normalize(x): x [N,D], labels [N], mu [C,D] -> [N].

    Written out because autograd's composition (normalise, gather, multiply) builds several [N, D] temporaries
    in the backward pass; here the gradient dx is the only one: with a_i = g_i / ‖x_i‖,
        dx_i = a_i mu_{c_i} - (a_i t_i / ‖x_i‖) x_i   (one [N,C] @ [C,D] product, then one in-place update),
        dmu_c = Σ_{i in c} a_i x_i.
    The norm is clamped at F.normalize's eps (no gradient through a norm at or below it), as F.normalize does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1)                                   # [N]
        r = norm.clamp_min(_NORM_EPS)
        t = torch.mm(x, mu.t()).gather(1, labels[:, None])[:, 0] / r                # [N] via [N, C]
        ctx.save_for_backward(x, labels, mu, r, t, norm > _NORM_EPS)  # clamp_min's gradient: norm > eps only
        return t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, labels, mu, r, t, through_norm = ctx.saved_tensors
        a = g / r                                                                   # [N]
        coef = torch.zeros(x.shape[0], mu.shape[0], dtype=x.dtype, device=x.device).scatter_(
            1, labels[:, None], a[:, None])                                         # [N, C]: a_i at column c_i
        dx = dmu = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(coef, mu)                                                 # [N, D]
            radial = torch.where(through_norm, a * t / r, torch.zeros_like(a))
            dx.addcmul_(x, radial[:, None], value=-1)
        if ctx.needs_input_grad[2]:
            dmu = torch.mm(coef.t(), x)                                             # [C, D]
        return dx, None, dmu


def _cosine_to_class_mean(x: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """t_i = F.normalize(x)[i] · mu[labels[i]]: x [N,D], labels [N] int64, mu [C,D] -> [N]."""
    return _CosineToClassMean.apply(x, labels, mu)


def release_memory_weights(s: torch.Tensor) -> torch.Tensor:
    """The release's memory-side weights from sigmoid weights s (any shape): each divided by itself, (1 / s) · s, in
    the release's operations (torch 1.6's `int / tensor` is a reciprocal times the int): 1 up to one rounding, and
    a gradient of rounding size through both factors. Where the backward's 1 / s² overflows (s below ~5e-20 in
    float32: a selector score below about -44, where the release's gradient is inf or NaN, and below -88 its weight
    too) the weight is 1, its exact value, with no gradient."""
    ok = torch.isfinite(s.detach().reciprocal().square())
    s = torch.where(ok, s, torch.ones_like(s))  # no inf in the backward of the entries left out
    return torch.where(ok, (s.reciprocal() * 1) * s, torch.ones_like(s))


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, memory: MemoryBank,
                     feature_selectors: list[nn.Module], memory_selectors: list[nn.Module] | None,
                     num_classes: int, memory_weights: str = "ones", selector_method: str = "auto") -> torch.Tensor:
    """Contrastive loss (SPEC 5.4) of features [N,D] with labels [N] (int64 in [0, C)) against `memory`, all
    classes at once. Gradient reaches `features` and the feature selectors (and, with memory_weights "release" or
    "mean", the memory selectors), never the memory. memory_selectors is not used with "ones". Returns a scalar; 0
    (with a grad path to `features`) when no class qualifies. selector_method: see utils.selectors (the
    default picks per device); no host sync on a GPU."""
    _check_mode(memory_weights)
    C = num_classes
    device, dtype = features.device, features.dtype
    labels = labels.to(device=device, dtype=torch.int64)

    n = class_counts(labels, C)                                                     # [C] vectors per class
    m = memory.counts.to(device)                                                    # [C] memory entries
    qualify = (n > 1) & (m > 1)                                                     # [C]

    # Memory side: the weighted mean mu_c of each class's normalised entries.
    S = memory.memory.shape[1]
    m_hat = F.normalize(memory.memory.to(device=device, dtype=dtype), dim=2)       # [C, S, D], no grad
    valid = torch.arange(S, device=device)[None, :] < m[:, None]                   # [C, S]
    if memory_weights == "ones":
        v = valid.to(dtype)
    else:  # the memory selectors of the qualifying classes only (the release evaluates no other)
        use = valid & qualify[:, None]
        v = torch.sigmoid(padded_selector_scores(m_hat, use, memory_selectors, method=selector_method))
        if memory_weights == "release":
            v = release_memory_weights(v)
        v = torch.where(use, v, torch.zeros_like(v))
    v_sum = v.sum(1)
    # "release": mu and the mean weight over the count (the weights' mean is 1 only up to rounding)
    norm = m.to(dtype) if memory_weights == "release" else v_sum
    norm = torch.where(qualify, norm, torch.ones_like(norm))
    mu = torch.bmm(v[:, None, :], m_hat)[:, 0] / norm[:, None]

    # Feature side: sigmoid(feature selector) on the detached vectors; only qualifying classes are scored.
    sigma = torch.sigmoid(grouped_selector_scores(features.detach(), labels, feature_selectors, qualify,
                                                  method=selector_method))
    sigma = torch.where(qualify[labels], sigma, torch.zeros_like(sigma))            # [N]
    t = _cosine_to_class_mean(features, labels, mu)                                 # [N]
    zeros = torch.zeros(C, device=device, dtype=dtype)
    weighted = zeros.index_add(0, labels, sigma * t)                                # [C]
    total = zeros.index_add(0, labels, sigma)
    lead = v_sum / norm if memory_weights == "release" else 1
    loss_c = lead - weighted / torch.where(qualify, total, torch.ones_like(total))
    return torch.where(qualify, loss_c, torch.zeros_like(loss_c)).sum() / C


def contrastive_loss_reference(features: torch.Tensor, labels: torch.Tensor, memory: MemoryBank,
                               feature_selectors: list[nn.Module], memory_selectors: list[nn.Module] | None,
                               num_classes: int, memory_weights: str = "ones") -> torch.Tensor:
    """The per-class loop of SPEC 5.4, written out plainly (tests only)."""
    _check_mode(memory_weights)
    loss = features.new_zeros(())
    for c in range(num_classes):
        x_c = features[labels == c]
        mem_c = memory.class_memory(c).to(features)
        if x_c.shape[0] > 1 and mem_c.shape[0] > 1:
            x_hat = F.normalize(x_c, dim=1)
            m_hat = F.normalize(mem_c, dim=1)
            distances = 1 - x_hat @ m_hat.T                                         # [n_c, m_c]
            w = torch.sigmoid(feature_selectors[c](x_c.detach()))                  # [n_c, 1]
            w = w * x_c.shape[0] / w.sum()
            distances = distances * w
            if memory_weights == "mean":
                v = torch.sigmoid(memory_selectors[c](m_hat))                      # [m_c, 1]
                v = v * mem_c.shape[0] / v.sum()
                distances = distances * v.T
            elif memory_weights == "release":  # [1, m_c], divided by its sum over its one row
                v = torch.sigmoid(memory_selectors[c](m_hat)).T
                v = (v.sum(dim=0).reciprocal() * v.shape[0]) * v
                distances = distances * v
            loss = loss + distances.mean()
    return loss / num_classes
