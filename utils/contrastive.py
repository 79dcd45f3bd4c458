"""Pixel-level contrastive loss against the class-wise memory bank (SPEC 5.4, section 8 "memory-side weights").

For every class c with more than one vector in X and more than one in memory:
    D = 1 - X̂_c M̂_cᵀ,  loss_c = mean_ij(w_i v_j D_ij)
with w = sigmoid(feature selector_c(X_c detached)) rescaled to mean 1, and v = 1 ("ones", fidelity "code": the
release's rescaling divided each memory weight by itself) or sigmoid(memory selector_c(M̂_c)) rescaled to mean 1
("mean", fidelity "paper"). Total = Σ_c loss_c / C.

Vectorised form: D is bilinear and the weights have mean 1, so with σ_i = sigmoid(feature selector) and
μ_c = Σ_j v_j m̂_j / Σ_j v_j (the weighted mean of the class's normalised memory entries)
    loss_c = 1 - Σ_i σ_i (x̂_i · μ_c) / Σ_i σ_i.
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

_MEMORY_WEIGHTS = ("ones", "mean")
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


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, memory: MemoryBank,
                     feature_selectors: list[nn.Module], memory_selectors: list[nn.Module] | None,
                     num_classes: int, memory_weights: str = "ones", selector_method: str = "auto") -> torch.Tensor:
    """Contrastive loss (SPEC 5.4) of features [N,D] with labels [N] (int64 in [0, C)) against `memory`, all
    classes at once. Gradient reaches `features` and the feature selectors (and, with memory_weights="mean",
    the memory selectors), never the memory. memory_selectors is not used with "ones". Returns a scalar; 0
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
    else:
        use = valid & qualify[:, None]
        v = torch.sigmoid(padded_selector_scores(m_hat, use, memory_selectors, method=selector_method))
        v = torch.where(use, v, torch.zeros_like(v))
    v_sum = v.sum(1)
    mu = torch.bmm(v[:, None, :], m_hat)[:, 0] / torch.where(qualify, v_sum, torch.ones_like(v_sum))[:, None]

    # Feature side: sigmoid(feature selector) on the detached vectors; only qualifying classes are scored.
    sigma = torch.sigmoid(grouped_selector_scores(features.detach(), labels, feature_selectors, qualify,
                                                  method=selector_method))
    sigma = torch.where(qualify[labels], sigma, torch.zeros_like(sigma))            # [N]
    t = _cosine_to_class_mean(features, labels, mu)                                 # [N]
    zeros = torch.zeros(C, device=device, dtype=dtype)
    weighted = zeros.index_add(0, labels, sigma * t)                                # [C]
    total = zeros.index_add(0, labels, sigma)
    loss_c = 1 - weighted / torch.where(qualify, total, torch.ones_like(total))
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
            loss = loss + distances.mean()
    return loss / num_classes
