#!/usr/bin/env python3
"""Train semi-supervised domain adaptation from GTA5 to Cityscapes with trainSSL.py's method.

The domain-adaptation variant of the release (SPEC section 9).

    python3 trainSSL_domain_adaptation_targetCity.py --config configs/configSSL_city_1_30_split0_imagenet.json

Cityscapes is the target (its labeled subset and unlabeled rest); GTA5's `train` split is an extra labeled source.
The labeled batch of iteration i comes from GTA5 or Cityscapes by the schedule of the fidelity preset
(utils/variants.py, `uses_gta5_batch`); class-balancing statistics (labels and pseudo-labels) and the memory bank
are updated on Cityscapes iterations only; the labeled contrastive term uses the current batch's own labels.
Constants that differ from trainSSL.py (contrastive weight 0.2, labeled ClassMix 0.25, EMA warm-up 1 − 1/(i+1),
the release's batch-broadcast entropy mask under fidelity "code", the student in periodic checkpoints) are in
utils/variants.py.
"""
from __future__ import annotations

import torch

from trainSSL import train
from engine.entry import main_guard
from engine.run import Run
from utils.variants import DOMAIN_ADAPTATION, uses_gta5_batch


def draw_source_or_target(run: Run, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """GTA5 or Cityscapes labeled batch by the preset's schedule; the flag says whether it is Cityscapes."""
    if uses_gta5_batch(i, run.num_iterations, run.fidelity.da_source_schedule):
        images, labels = run.gta5_batches.next()[:2]
        return images, labels, False
    images, labels = run.labeled.next()[:2]
    return images, labels, True


def main(argv: list[str] | None = None) -> dict | None:
    run = Run(DOMAIN_ADAPTATION, argv, description=__doc__.splitlines()[0])
    return None if run.args.dry_run else train(run, draw_labeled=draw_source_or_target)


if __name__ == "__main__":
    main_guard(main)
