#!/usr/bin/env python3
"""Train with trainSSL.py's method in alternating labeled and unlabeled steps, so that a run fits a smaller GPU.

The less-memory variant of the release (SPEC section 9).

    python3 trainSSL_less_memory.py --config configs/configSSL_pascal_1_50_split2_COCO_reduced.json

As released, the loop runs 2N steps for N = training.num_iterations: even steps are labeled-only (supervised CE,
memory update, labeled contrastive term), odd steps unlabeled-only (pseudo-label CE, entropy, unlabeled
contrastive term), and every schedule — poly learning rate, EMA momentum, ramp-up and memory gates, evaluation,
checkpoints, the return to the best model after 2N/5 steps without improvement — counts steps. Only one batch
is on the device at a time. The class-balancing statistics are added on the matching step (the labeled step
uses the weights after the ramp-up, the unlabeled step always); the EMA warm-up is 1 − 1/(i+1). In fidelity
"code" the entropy term keeps the release's batch-broadcast mask (engine/config.py, Fidelity).
Flags, outputs and checkpoints are those of trainSSL.py (the final checkpoint is checkpoint-iter<2N>.pth).
"""
from __future__ import annotations

import torch

from trainSSL import labeled_pass, unlabeled_terms
from utils import ssl_steps as step
from engine.entry import main_guard
from engine.run import Run
from utils.variants import LESS_MEMORY


def labeled_step(run: Run, i: int) -> dict[str, torch.Tensor]:
    """Even step: steps 3-10 of trainSSL.py for a labeled batch alone."""
    images, labels = run.labeled.next()[:2]
    # 3 + 7. labeled statistics; class weights only after the ramp-up
    class_weights = run.update_class_weights(i, labels, None)
    images, labels = step.augment_labeled(run.step_context(), images, labels)
    return run.gradient_pass(labeled_pass, run, i, images, labels, class_weights)


def unlabeled_pass(run: Run, i: int, views: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor,
                   class_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Steps 6, 8, 10 of trainSSL.py for the strong views alone (run by `run.gradient_pass`)."""
    logits, features = step.forward_student(run.step_context(), views)
    return unlabeled_terms(run, i, logits, features, pseudo, confidence, class_weights)


def unlabeled_step(run: Run, i: int) -> dict[str, torch.Tensor]:
    """Odd step: steps 2-10 of trainSSL.py for an unlabeled batch alone."""
    R = run.method["ramp_up_iterations"]
    unlabeled = run.unlabeled.next()[0]
    ctx = run.step_context()
    confidence, pseudo = step.pseudo_label(ctx, unlabeled)
    # 3 + 7. unlabeled statistics (they advance the histories' counter); the release applies the class weights
    # here at every step, without the i > R gate (they are ones until the histories are full)
    class_weights = run.update_class_weights(i, None, pseudo, after_ramp_up=False)
    views, mixed_pseudo, confidence = step.augment_unlabeled(ctx, unlabeled, pseudo, confidence, mix=i > R)
    run.remember_unlabeled(unlabeled, pseudo, views, mixed_pseudo)  # TensorBoard pictures at evaluations
    return run.gradient_pass(unlabeled_pass, run, i, views, mixed_pseudo, confidence, class_weights)


def train(run: Run) -> dict:
    """The alternating loop over 2N steps; returns the best evaluation."""
    for i in run.iterations():
        run.set_learning_rate(i)
        labeled_turn = i % 2 == 0 or not run.method["use_unlabeled"]
        terms = labeled_step(run, i) if labeled_turn else unlabeled_step(run, i)
        loss = sum(terms.values())
        run.optimizer_step(i, loss)
        run.end_iteration(i, {**terms, "loss": loss})
    return run.finish()


def main(argv: list[str] | None = None) -> dict | None:
    run = Run(LESS_MEMORY, argv, description=__doc__.splitlines()[0])
    return None if run.args.dry_run else train(run)


if __name__ == "__main__":
    main_guard(main)
