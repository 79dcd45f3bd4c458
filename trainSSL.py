#!/usr/bin/env python3
"""Train a segmentation network semi-supervised, with pixel-level contrastive learning from a class-wise memory bank.

The main training script of Alonso et al., ICCV 2021.

    python3 trainSSL.py --config configs/configSSL_city_1_30_split0_COCO.json

One iteration i (SPEC section 4; R = ramp-up iterations):
  1. poly learning rate; a labeled batch (B) and an unlabeled batch (B/2)
  2. pseudo-labels ŷ and confidences p from the EMA teacher on the un-augmented unlabeled batch
  3. class-balancing statistics from labels and pseudo-labels (Cityscapes)
  4. weak augmentation of the labeled batch (ClassMix on labels with probability 0.2)
  5. two strong views of the unlabeled batch (ClassMix with probability 0.75 each, after R)
  6. student forward: unlabeled views first, then the labeled batch (sets the BatchNorm running statistics)
  7. class weights (ones; Cityscapes after R: class balancing)
  8. supervised CE + ramp(i)·p^6-weighted pseudo-label CE + 0.01·entropy
  9. memory update from the teacher's confident, correct labeled pixels (after R − 1000)
 10. contrastive terms against the memory bank, labeled and unlabeled (after R), × 0.1
 11. one backward, one SGD step, EMA teacher update
 12. logs, checkpoints, evaluation, best model
After the loop: final checkpoint, evaluation, BatchNorm refresh of the best model.
"""
from __future__ import annotations

import torch

from utils import ssl_steps as step
from engine.entry import main_guard
from engine.run import Run
from utils.variants import TRAIN_SSL


def labeled_terms(run: Run, i: int, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                  features: torch.Tensor, class_weights: torch.Tensor, update_memory: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Steps 8, 9, 10 for the augmented labeled batch and its student outputs; returns the weighted loss terms."""
    ctx = run.step_context()
    # 8. supervised CE
    terms = {"loss_sup": step.supervised_loss(ctx, logits, labels, class_weights)}
    # 9. memory update from the teacher's confident, correct pixels
    if update_memory and run.memory_active(i):
        step.update_memory(ctx, images, labels)
    # 10. labeled contrastive term
    if run.contrastive_active(i):
        terms["loss_contr_l"] = run.method["contrastive_weight"] * step.contrastive_term(ctx, features, labels)
    return terms


def unlabeled_terms(run: Run, i: int, logits: torch.Tensor, features: torch.Tensor, pseudo: torch.Tensor,
                    confidence: torch.Tensor, class_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Steps 8 and 10 for the strong views' student outputs; returns the weighted loss terms."""
    # 8. ramp(i)·p^6-weighted pseudo-label CE and the entropy term (the released less-memory and domain-adaptation
    # scripts broadcast the entropy mask across the batch: fidelity "code" keeps that)
    ctx = run.step_context()
    broadcast = run.fidelity.entropy_mask_broadcast and run.variant.entropy_mask_broadcast
    loss_pseudo, loss_entropy = step.unlabeled_losses(ctx, i, logits, pseudo, confidence, class_weights, broadcast)
    terms = {"loss_pseudo": loss_pseudo, "loss_entropy": loss_entropy}
    # 10. unlabeled contrastive term
    if run.contrastive_active(i):
        terms["loss_contr_u"] = run.method["contrastive_weight"] * step.contrastive_term(ctx, features, pseudo)
    return terms


def draw_labeled(run: Run, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The labeled batch of iteration i: images, labels, and whether it comes from the target dataset."""
    images, labels = run.labeled.next()[:2]
    return images, labels, True


def labeled_pass(run: Run, i: int, images: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
                 update_memory: bool = True) -> dict[str, torch.Tensor]:
    """Steps 6, 8, 9, 10 for the augmented labeled batch alone (run by `run.gradient_pass`)."""
    logits, features = step.forward_student(run.step_context(), images)
    return labeled_terms(run, i, images, labels, logits, features, class_weights, update_memory)


def student_pass(run: Run, i: int, images: torch.Tensor, labels: torch.Tensor, views: torch.Tensor,
                 pseudo: torch.Tensor, confidence: torch.Tensor, class_weights: torch.Tensor, from_target: bool
                 ) -> dict[str, torch.Tensor]:
    """Steps 6, 8, 9, 10 for both batches (run by `run.gradient_pass`): everything of the iteration that needs
    gradients, the one forward that DistributedDataParallel wraps under torchrun."""
    ctx = run.step_context()
    # 6. student forward: the unlabeled views first, then the labeled batch (this order sets the BatchNorm
    #    running statistics that evaluation uses)
    logits_u, features_u = step.forward_student(ctx, views)
    logits_l, features_l = step.forward_student(ctx, images)
    # 8, 9, 10. losses, memory update, contrastive terms
    terms = labeled_terms(run, i, images, labels, logits_l, features_l, class_weights, update_memory=from_target)
    return terms | unlabeled_terms(run, i, logits_u, features_u, pseudo, confidence, class_weights)


def supervised_terms(run: Run, i: int, images: torch.Tensor, labels: torch.Tensor, from_target: bool
                     ) -> dict[str, torch.Tensor]:
    """The supervised-only ablation (method.use_unlabeled false): steps 3-10 on the labeled batch alone."""
    class_weights = run.update_class_weights(i, labels if from_target else None, None)
    images, labels = step.augment_labeled(run.step_context(), images, labels)
    return run.gradient_pass(labeled_pass, run, i, images, labels, class_weights, from_target)


def train(run: Run, draw_labeled=draw_labeled) -> dict:
    """The training loop; returns the best evaluation."""
    R = run.method["ramp_up_iterations"]
    for i in run.iterations():
        # 1. learning rate and batches
        run.set_learning_rate(i)
        images, labels, from_target = draw_labeled(run, i)
        if not run.method["use_unlabeled"]:
            terms = supervised_terms(run, i, images, labels, from_target)
        else:
            unlabeled = run.unlabeled.next()[0]
            ctx = run.step_context()  # what the steps may touch: networks, memory, constants
            # 2. pseudo-labels from the teacher
            confidence, pseudo = step.pseudo_label(ctx, unlabeled)
            # 3 + 7. class-balancing statistics (target iterations only) and this iteration's class weights
            class_weights = run.update_class_weights(i, labels if from_target else None,
                                                     pseudo if from_target else None)
            # 4. weak augmentation of the labeled batch, ClassMix on its labels with probability 0.2
            images, labels = step.augment_labeled(ctx, images, labels)
            # 5. two strong views of the unlabeled batch, ClassMix with probability 0.75 each after the ramp-up
            views, mixed_pseudo, confidence = step.augment_unlabeled(ctx, unlabeled, pseudo, confidence, mix=i > R)
            run.remember_unlabeled(unlabeled, pseudo, views, mixed_pseudo)  # TensorBoard pictures at evaluations
            # 6, 8, 9, 10. student forward (unlabeled views, then labeled batch), losses, memory update, contrastive
            #    terms: the part that needs gradients, one forward (DistributedDataParallel's under torchrun)
            terms = run.gradient_pass(student_pass, run, i, images, labels, views, mixed_pseudo, confidence,
                                      class_weights, from_target)
        loss = sum(terms.values())
        # 11. backward, SGD step, EMA teacher
        run.optimizer_step(i, loss)
        # 12. logs, checkpoints, evaluation
        run.end_iteration(i, {**terms, "loss": loss})
    return run.finish()


def main(argv: list[str] | None = None) -> dict | None:
    run = Run(TRAIN_SSL, argv, description=__doc__.splitlines()[0])
    return None if run.args.dry_run else train(run)


if __name__ == "__main__":
    main_guard(main)
