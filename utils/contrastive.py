"""Pixel-level contrastive loss against the class-wise memory bank (SPEC 5.4, section 8 "memory-side weights").

For every class c with more than one vector in X and more than one in memory:
    D = 1 - X̂_c M̂_cᵀ,  loss_c = mean_ij(w_i v_j D_ij)
with w = sigmoid(feature selector_c(X_c detached)) rescaled to mean 1, and v = 1 ("ones", fidelity "code": the
release's rescaling divided each memory weight by itself) or sigmoid(memory selector_c(M̂_c)) rescaled to mean 1
("mean", fidelity "paper"). Total = Σ_c loss_c / C.

Vectorised form: D is bilinear, so with Σ_i w_i = n_c and Σ_j v_j = m_c (mean-1 weights)
    loss_c = 1 - (Σ_i w_i x̂_i) · (Σ_j v_j m̂_j) / (n_c m_c),
which needs only per-class weighted sums (segment sums over features, masked sums over the memory): no
|X_c| x |M_c| matrix, no padding of the features for the distances. Same function, same gradients.
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


def _check_mode(memory_weights: str) -> None:
    if memory_weights not in _MEMORY_WEIGHTS:
        raise UserError(f"memory_weights must be one of {_MEMORY_WEIGHTS}, got {memory_weights!r}")


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, memory: MemoryBank,
                     feature_selectors: list[nn.Module], memory_selectors: list[nn.Module] | None,
                     num_classes: int, memory_weights: str = "ones") -> torch.Tensor:
    """Contrastive loss (SPEC 5.4) of features [N,D] with labels [N] (int64 in [0, C)) against `memory`, all
    classes at once. Gradient reaches `features` and the feature selectors (and, with memory_weights="mean",
    the memory selectors), never the memory. memory_selectors is not used with "ones". Returns a scalar; 0
    (with a grad path to `features`) when no class qualifies. One host sync (the padding inside
    grouped_selector_scores)."""
    _check_mode(memory_weights)
    C = num_classes
    N, D = features.shape
    device, dtype = features.device, features.dtype
    labels = labels.to(device=device, dtype=torch.int64)

    n = class_counts(labels, C)                                    # [C] vectors per class
    m = memory.counts.to(device)                                                    # [C] memory entries
    qualify = (n > 1) & (m > 1)                                                     # [C]
    row_q = qualify[labels]                                                         # [N]

    # Row weights w: sigmoid of the feature selector on the detached vectors, rescaled to mean 1 per class.
    w = torch.sigmoid(grouped_selector_scores(features.detach(), labels, feature_selectors, qualify))
    w = torch.where(row_q, w, torch.zeros_like(w))                                  # [N]
    w_sum = torch.zeros(C, device=device, dtype=dtype).index_add(0, labels, w)      # [C]
    rescale = n.to(dtype) / torch.where(qualify, w_sum, torch.ones_like(w_sum))
    w = w * rescale[labels]
    x_hat = F.normalize(features, dim=1)
    x_sum = torch.zeros(C, D, device=device, dtype=dtype).index_add(0, labels, x_hat * w[:, None])  # [C, D]

    # Column weights v over the valid memory entries.
    S = memory.memory.shape[1]
    m_hat = F.normalize(memory.memory.to(device=device, dtype=dtype), dim=2)       # [C, S, D], no grad
    valid = torch.arange(S, device=device)[None, :] < m[:, None]                   # [C, S]
    if memory_weights == "ones":
        v = valid.to(dtype)
    else:
        use = valid & qualify[:, None]
        v = torch.sigmoid(padded_selector_scores(m_hat, use, memory_selectors))
        v = torch.where(use, v, torch.zeros_like(v))
        v_sum = v.sum(1)
        v = v * (m.to(dtype) / torch.where(qualify, v_sum, torch.ones_like(v_sum)))[:, None]
    m_sum = torch.bmm(v[:, None, :], m_hat)[:, 0]                                   # [C, D]

    denom = (n * m).clamp(min=1).to(dtype)
    loss_c = 1 - (x_sum * m_sum).sum(1) / denom                                     # [C]
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
