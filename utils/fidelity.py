"""The fidelity presets (SPEC section 8): "code" reproduces the released code, "paper" follows the paper's text."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fidelity:
    """Every behaviour where the released code and the paper differ (SPEC section 8), in one place."""

    v2_branches: int               # DeepLabv2 classifier branches summed (code: 2, paper: 4)
    memory_keep: str               # which q vectors enter memory: "lowest" (code) or "highest" selector scores
    memory_weights: str            # memory-side weights in the contrastive loss: "release" (code) or "mean"
    da_source_schedule: str        # GTA5 batches: "last100_odd" (code) or "alternate" (paper)
    entropy_mask_broadcast: bool   # n×n broadcast of the entropy mask in the less-memory and domain-adaptation scripts


FIDELITY_PRESETS = {
    "code": Fidelity(2, "lowest", "release", "last100_odd", True),
    "paper": Fidelity(4, "highest", "mean", "alternate", False),
}
