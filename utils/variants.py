"""What differs between the three training scripts, in one table.

The scripts share every building block; these constants and schedules are the only places they differ
(SPEC sections 4, 5.5, 8 and 9), each as read in the corresponding released script. A `null` method constant in a config takes the script's value from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """Per-script constants."""

    name: str
    ema_warmup_div: int            # alpha = min(1 - 1/(div*i + 1), m_i)
    contrastive_weight: float      # weight of each contrastive term
    labeled_classmix_prob: float   # ClassMix on the labeled batch
    alternating_steps: bool        # even iterations labeled-only, odd unlabeled-only
    uses_gta5: bool                # GTA5 as an extra labeled source
    # The loop runs num_iterations x this many steps, and every schedule (poly lr, EMA momentum, ramp-up and memory
    # gates, evaluation, checkpoints, the N/5 return to the best model) counts steps: the release's less-memory
    # script doubles num_iterations on reading the config.
    steps_per_iteration: int
    # save_teacher_test also puts the teacher in the periodic checkpoints (the release's trainSSL.py; the other two
    # scripts save the student there). Best checkpoints follow save_teacher_test in all three; final ones hold the
    # student.
    teacher_in_periodic_checkpoint: bool
    # The released script multiplies the per-pixel entropy [n,h,w] by the unsqueezed mask [n,1,h,w] (an n x n
    # broadcast); kept under fidelity "code" (Fidelity.entropy_mask_broadcast).
    entropy_mask_broadcast: bool
    v3_depth: int                  # DeepLabv3+ ResNet depth when backbone.depth is null
    # Cityscapes training crops and periodic evaluations from half-size images whatever the version (else by
    # version: v2 half, v3 full). The final evaluations (after training, after the BatchNorm refresh) always
    # follow the version, as in the release's domain-adaptation script.
    cityscapes_half_size: bool


TRAIN_SSL = Variant("trainSSL", ema_warmup_div=10, contrastive_weight=0.1, labeled_classmix_prob=0.2,
                    alternating_steps=False, uses_gta5=False, steps_per_iteration=1,
                    teacher_in_periodic_checkpoint=True, entropy_mask_broadcast=False, v3_depth=50,
                    cityscapes_half_size=False)
LESS_MEMORY = Variant("trainSSL_less_memory", ema_warmup_div=1, contrastive_weight=0.1, labeled_classmix_prob=0.2,
                      alternating_steps=True, uses_gta5=False, steps_per_iteration=2,
                      teacher_in_periodic_checkpoint=False, entropy_mask_broadcast=True, v3_depth=50,
                      cityscapes_half_size=False)
DOMAIN_ADAPTATION = Variant("trainSSL_domain_adaptation_targetCity", ema_warmup_div=1, contrastive_weight=0.2,
                            labeled_classmix_prob=0.25, alternating_steps=False, uses_gta5=True, steps_per_iteration=1,
                            teacher_in_periodic_checkpoint=False, entropy_mask_broadcast=True, v3_depth=101,
                            cityscapes_half_size=True)


def backbone_depth(cfg: dict, variant: Variant) -> int | None:
    """The config's backbone.depth, else the script's DeepLabv3+ depth for version "3" (None: build_model's
    default, 101 for DeepLabv2)."""
    depth = cfg["backbone"]["depth"]
    if depth is None and str(cfg["version"]) == "3":
        return variant.v3_depth
    return depth


def uses_gta5_batch(i: int, num_iterations: int, schedule: str) -> bool:
    """Domain adaptation: does iteration i draw its labeled batch from GTA5 (else Cityscapes)?

    "last100_odd" (fidelity code): the released condition selects GTA5 only on odd iterations of the last 100.
    "alternate" (fidelity paper): GTA5 and Cityscapes alternate (GTA5 on even i); the last 100 iterations
    use Cityscapes only.
    """
    in_last_100 = i >= num_iterations - 100
    if schedule == "last100_odd":
        return in_last_100 and i % 2 == 1
    if schedule == "alternate":
        return (not in_last_100) and i % 2 == 0
    raise ValueError(f"unknown domain-adaptation schedule {schedule!r}")


def resolve_method(cfg: dict, variant: Variant) -> dict:
    """The config's method constants with the script's own values where the config leaves them null (and class
    balancing on for Cityscapes only, as released)."""
    m = dict(cfg["method"])
    if m["contrastive_weight"] is None:
        m["contrastive_weight"] = variant.contrastive_weight
    if m["labeled_classmix_prob"] is None:
        m["labeled_classmix_prob"] = variant.labeled_classmix_prob
    if m["class_balancing"] is None:
        m["class_balancing"] = cfg["dataset"] == "cityscapes"
    return m
