"""Loss functions of the method (SPEC 4 step 8): supervised CE, confidence-weighted pseudo-label CE and the
entropy term.

All losses are tensor code without host syncs: "no valid pixel" cases are handled by clamping the
denominators instead of Python branches on tensor values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor



def supervised_ce(
    logits: Tensor, labels: Tensor, ignore_label: int, weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy averaged over non-ignored pixels, weighted like F.cross_entropy(weight=...).

    logits [B,C,H,W], labels [B,H,W] long, weight [C] or None. Equals
    F.cross_entropy(logits, labels, weight, ignore_index=ignore_label) (the released CrossEntropy2d),
    except that it returns 0 instead of NaN when no pixel is valid, without a host sync.
    """
    total = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_label, reduction="sum")
    valid = labels != ignore_label  # [B,H,W]
    if weight is None:
        denom = valid.sum().to(total.dtype).clamp_min(1.0)
    else:
        # Weight of each pixel's target class; ignored pixels (any id) are masked out after a safe gather.
        safe = labels.clamp(0, weight.numel() - 1)
        denom = (weight.to(total.dtype)[safe] * valid).sum()
        # Sum of valid weights is 0 only when nothing counts; then `total` is 0 as well -> 0.
        denom = denom.clamp_min(torch.finfo(total.dtype).tiny)
    return total / denom


def pseudo_label_ce(
    logits: Tensor,
    pseudo_labels: Tensor,
    pixel_weight: Tensor,
    ignore_label: int,
    weight: Tensor | None = None,
) -> Tensor:
    """Per-pixel (class-weighted) CE times `pixel_weight`, averaged over ALL pixels (ignored count as 0).

    logits [B,C,H,W], pseudo_labels [B,H,W] long, pixel_weight [B,H,W] (ramp(i) * confidence^6).
    As the released CrossEntropyLoss2dPixelWiseWeighted.
    """
    per_pixel = F.cross_entropy(
        logits, pseudo_labels, weight=weight, ignore_index=ignore_label, reduction="none"
    )  # [B,H,W], 0 at ignored pixels
    return (per_pixel * pixel_weight).mean()


def entropy_loss(probs: Tensor, valid_mask: Tensor, broadcast_mask_bug: bool = False) -> Tensor:
    """Normalised entropy of the softmax over valid pixels (the released entropy_loss).

    probs [n,c,h,w] (softmax output), valid_mask [n,h,w] bool (pseudo-label not ignore).
    Per pixel L = sum_c q log2(q + 1e-30) (<= 0); result
    -sum(mask * L) / (n*h*w * log2(c) * mean(mask)), i.e. the mean entropy (in units of log2 c) of the
    valid pixels: exactly 1 for uniform probabilities.

    broadcast_mask_bug reproduces trainSSL_less_memory.py and the domain-adaptation script (fidelity "code"):
    there the mask had shape [n,1,h,w] and broadcast against L [n,h,w] to [n,n,h,w], so the numerator is
    sum_{y,x} (sum_a mask[a,y,x]) * (sum_b L[b,y,x]); it is computed here without materialising it.
    An all-invalid mask gives 0 (denominator clamped, no sync).
    """
    n, c, h, w = probs.shape
    per_pixel = (probs * torch.log2(probs + 1e-30)).sum(dim=1)  # [n,h,w]
    mask = valid_mask.to(per_pixel.dtype)  # [n,h,w]
    if broadcast_mask_bug:
        numerator = (mask.sum(dim=0) * per_pixel.sum(dim=0)).sum()  # [h,w] x [h,w] -> scalar
    else:
        numerator = (mask * per_pixel).sum()
    fraction_valid = mask.mean().clamp_min(torch.finfo(per_pixel.dtype).tiny)
    return -numerator / (n * h * w * math.log2(c) * fraction_valid)
