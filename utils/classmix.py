"""ClassMix (SPEC 5.1): paste half of the classes of one image onto the next one.

For image k, the mask covers ⌊n/2⌋+1 of the n classes present in its (pseudo-)label, picked at random; output k
takes image k+1's pixels where image k+1's mask is set (cyclic in k). Images, labels and confidences mix alike.
"""
from __future__ import annotations

import torch


def classmix_masks(labels: torch.Tensor, ignore_label: int, drop_background: bool, num_values: int = 256,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool masks [B,H,W] of ⌊n/2⌋+1 randomly chosen classes per image.

    The ignore label, and for VOC (`drop_background`) class 0, are not candidates — each only if more than one
    class would remain. Vectorised over batch and classes: presence [B, V], random keys, rank by sort.
    """
    B = labels.shape[0]
    flat = labels.reshape(B, -1).long()                                           # [B, P]
    present = torch.zeros(B, num_values, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)                                                # [B, V]
    candidates = present.clone()
    for value, enabled in ((ignore_label, True), (0, drop_background)):
        if not enabled or not 0 <= value < num_values:
            continue
        without = candidates.clone()
        without[:, value] = False
        # drop it unless it is the only class of the image
        candidates = torch.where(without.any(1, keepdim=True), without, candidates)
    n = candidates.sum(1, keepdim=True)                                            # [B, 1]
    keys = torch.rand(B, num_values, device=labels.device, generator=generator)
    keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))               # non-candidates sort last
    rank = keys.argsort(dim=1).argsort(dim=1)                                      # rank of each value
    chosen = candidates & (rank < n // 2 + 1)                                      # [B, V]
    return torch.gather(chosen, 1, flat).reshape(labels.shape)


def classmix(masks: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None = None,
             confidences: torch.Tensor | None = None):
    """Output k = (1 − M_{k+1})·x_k + M_{k+1}·x_{k+1}, cyclic in k; returns (images, labels, confidences)."""
    m_next = torch.roll(masks, shifts=-1, dims=0)                                  # M_{k+1} at position k

    def mix(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x_next = torch.roll(x, shifts=-1, dims=0)
        m = m_next if x.dim() == 3 else m_next.unsqueeze(1)
        return torch.where(m, x_next, x)

    return mix(images), mix(labels), mix(confidences)
