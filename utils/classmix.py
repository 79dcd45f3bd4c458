"""ClassMix (SPEC 5.1): paste half of the classes of one image onto the previous one in the batch.

For image k, the mask M_k covers ⌊n/2⌋+1 of the n candidate classes present in its (pseudo-)label, picked at
random; output k takes image k+1's pixels where M_{k+1} is set (cyclic in k). Images, labels and confidences
mix alike. Everything is tensor code on the input's device: no loop over classes or images, no host sync.
"""
from __future__ import annotations

import torch

from utils.errors import UserError


def classmix_masks(labels: torch.Tensor, ignore_label: int, drop_background: bool, num_values: int = 256,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool masks [B,H,W] covering ⌊n/2⌋+1 randomly chosen classes of each image's label map.

    Candidates are the values present in the image. The ignore label, then (VOC, `drop_background`) class 0, are
    removed from them — each only if at least one other class remains, so an image of the ignore label alone
    yields a mask of its ignore pixels. Label values must lie in [0, num_values) (train ids or the ignore label;
    not checked here, as that would need a host sync). Vectorised: presence [B, V] by scatter, one random key
    per (image, value), rank by sort, keep the ⌊n/2⌋+1 lowest-ranked candidates.
    """
    if labels.dim() != 3:
        raise UserError(f"classmix_masks: labels must be [B,H,W], got shape {tuple(labels.shape)}")
    if not 0 <= ignore_label < num_values:
        raise UserError(f"classmix_masks: ignore_label {ignore_label} must be in [0, num_values={num_values}); "
                        "pass a larger num_values")
    B = labels.shape[0]
    flat = labels.reshape(B, -1).long()                                            # [B, P]
    present = torch.zeros(B, num_values, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)                                                 # [B, V]
    candidates = present
    for value, enabled in ((ignore_label, True), (0, drop_background)):            # ignore first, then background
        if not enabled:
            continue
        without = candidates.clone()
        without[:, value] = False
        # drop the value only where some other candidate remains
        candidates = torch.where(without.any(1, keepdim=True), without, candidates)
    n = candidates.sum(1, keepdim=True)                                             # [B, 1]
    keys = torch.rand(B, num_values, device=labels.device, generator=generator)     # [B, V] in [0, 1)
    keys = keys.masked_fill(~candidates, 2.0)                                       # non-candidates rank last
    rank = keys.argsort(dim=1).argsort(dim=1)                                       # [B, V] rank of each value
    chosen = candidates & (rank < n // 2 + 1)                                       # [B, V]
    return torch.gather(chosen, 1, flat).reshape(labels.shape)                      # [B, H, W]


def classmix(masks: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None = None,
             confidences: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Cyclic mix: output k = (1 − M_{k+1})·x_k + M_{k+1}·x_{k+1} (k+1 mod B), for images [B,3,H,W], labels
    [B,H,W] and confidences [B,H,W]; None passes through. Returns (images, labels, confidences)."""
    if masks.dim() != 3 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise UserError(f"classmix: masks {tuple(masks.shape)} must be [B,H,W] matching images "
                        f"{tuple(images.shape)}")
    m_next = torch.roll(masks.bool(), shifts=-1, dims=0)                            # M_{k+1} at position k

    def mix(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x_next = torch.roll(x, shifts=-1, dims=0)                                   # x_{k+1} at position k
        m = m_next if x.dim() == 3 else m_next.unsqueeze(1)                         # broadcast over channels
        return torch.where(m, x_next, x)                                            # exact for ints and floats

    return mix(images), mix(labels), mix(confidences)
