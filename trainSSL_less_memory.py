#!/usr/bin/env python3
"""Train with trainSSL.py's method in alternating labeled and unlabeled steps, so that a run fits a smaller GPU.

The less-memory variant of the release (SPEC section 9).

    python3 trainSSL_less_memory.py --config configs/configSSL_pascal_1_50_split2_COCO_reduced.json

Even iterations are labeled-only steps (supervised CE, memory update, labeled contrastive term); odd iterations
are unlabeled-only steps (pseudo-label CE, entropy, unlabeled contrastive term). Only one batch is on the device
at a time. The class-balancing statistics are added on the matching step; the EMA warm-up is 1 − 1/(i+1).
In fidelity "code" the entropy term keeps the release's batch-broadcast mask (utils/config.py, Fidelity).
Flags, outputs and checkpoints are those of trainSSL.py.
"""
from __future__ import annotations

from trainSSL import labeled_losses, unlabeled_losses
from utils import ssl_steps as step
from utils.training import Run, main_guard
from utils.variants import LESS_MEMORY


def train(run: Run) -> dict:
    """The alternating loop; returns the best evaluation."""
    for i in run.iterations():
        run.set_learning_rate(i)
        if i % 2 == 0 or not run.method["use_unlabeled"]:
            images, labels = run.labeled.next()[:2]
            class_weights = run.update_class_weights(i, labels, None)
            terms = labeled_losses(run, i, images, labels, class_weights)
        else:
            unlabeled = run.unlabeled.next()[0]
            confidence, pseudo = step.pseudo_label(run, unlabeled)
            class_weights = run.update_class_weights(i, None, pseudo)
            terms = unlabeled_losses(run, i, unlabeled, confidence, pseudo, class_weights,
                                     broadcast_entropy_mask=run.fidelity.entropy_mask_broadcast)
        loss = sum(terms.values())
        run.optimizer_step(i, loss)
        run.end_iteration(i, {**terms, "loss": loss})
    return run.finish()


def main(argv: list[str] | None = None) -> dict | None:
    run = Run(LESS_MEMORY, argv, description=__doc__.splitlines()[0])
    return None if run.args.dry_run else train(run)


if __name__ == "__main__":
    main_guard(main)
