"""The steps of one training iteration (SPEC section 4), shared by the three training scripts.

Each function is one numbered step of the algorithm; the scripts call them in their own order. They take the
`Run` (utils/training.py) for the networks, memory bank and constants, and tensors on the training device.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from utils.augmentations import normalize, strong_augment, weak_augment
from utils.classmix import classmix_masks
from utils.contrastive import contrastive_loss
from utils.losses import entropy_loss, pseudo_label_ce, supervised_ce
from utils.schedules import ramp_up


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits [B,C,h,w] -> [B,C,H,W] float32, bilinear with align_corners=True as released."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)


def resize_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels or confidences [B,H,W] -> [B,h,w], nearest neighbour."""
    out = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    return out.to(labels.dtype)


@contextmanager
def eval_mode(model: torch.nn.Module, enabled: bool):
    """Temporarily put the student in eval mode (pseudo-labels from the student: use_teacher_train false)."""
    was_training = model.training
    if enabled:
        model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pseudo_label(run, unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: confidence p and label ŷ [B,H,W] from the teacher (or the student in eval mode) on the
    un-augmented unlabeled batch, at crop size."""
    net = run.labeler
    with torch.no_grad(), eval_mode(net, enabled=net is run.student_module), run.autocast():
        logits = net(normalize(unlabeled, run.data.mean_rgb, run.data.channel_order))
    probs = torch.softmax(upsample(logits, run.crop), dim=1)
    confidence, labels = probs.max(dim=1)
    return confidence, labels


def augment_labeled(run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: weak augmentation of the labeled batch, with ClassMix on its labels with probability p."""
    masks = None
    if random.random() < run.method["labeled_classmix_prob"]:
        masks = classmix_masks(labels, run.ignore_label, drop_background=run.drop_background)
    images, labels, _ = weak_augment(images, labels, None, ignore_label=run.ignore_label,
                                     channel_order=run.data.channel_order, classmix_masks=masks)
    return images, labels


def augment_unlabeled(run, images: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, mix: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 5: two independent strong views of the unlabeled batch, each with ClassMix (probability p, only
    when `mix`) mixing images, pseudo-labels and confidences; the views are concatenated."""
    views = []
    for _ in range(2):
        masks = None
        if mix and random.random() < run.method["unlabeled_classmix_prob"]:
            masks = classmix_masks(pseudo, run.ignore_label, drop_background=run.drop_background)
        views.append(strong_augment(images, pseudo, confidence, ignore_label=run.ignore_label,
                                    channel_order=run.data.channel_order, classmix_masks=masks))
    mixed, mixed_pseudo, mixed_confidence = (torch.cat(parts) for parts in zip(*views))
    run.remember_unlabeled(images, pseudo, mixed, mixed_pseudo)  # references only, for TensorBoard pictures
    return mixed, mixed_pseudo, mixed_confidence


def forward_student(run, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6: student forward (train mode) -> logits at crop size (fp32) and features at the output stride."""
    with run.autocast():
        logits, features = run.student(normalize(images, run.data.mean_rgb, run.data.channel_order),
                                       return_features=True)
    return upsample(logits, run.crop), features


def supervised_loss(run, logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Step 8, first term: CE over non-ignored labeled pixels with class weights."""
    return supervised_ce(logits, labels, run.ignore_label, class_weights)


def unlabeled_losses(run, i: int, logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor,
                     class_weights: torch.Tensor, broadcast_entropy_mask: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 8, second and third terms: confidence-weighted pseudo-label CE with ramp-up, and the entropy term
    (`broadcast_entropy_mask`: the [n,1,h,w] mask of the less-memory and domain-adaptation scripts, see
    utils/losses.entropy_loss)."""
    m = run.method
    pixel_weight = ramp_up(i, m["ramp_up_iterations"]) * confidence.float() ** m["pseudo_label_power"]
    loss_pseudo = pseudo_label_ce(logits, pseudo, pixel_weight, run.ignore_label, class_weights)
    loss_entropy = entropy_loss(torch.softmax(logits, dim=1), pseudo != run.ignore_label,
                                broadcast_mask_bug=broadcast_entropy_mask)
    return loss_pseudo, m["entropy_weight"] * loss_entropy


def update_memory(run, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Step 9: the teacher's projected features of confidently and correctly predicted labeled pixels
    enter the class-wise memory bank. With use_teacher_train false the student (eval mode) gives predictions,
    features and projections, but the EMA teacher's selectors still rank them, as released."""
    net = run.labeler
    with torch.no_grad(), eval_mode(net, enabled=net is run.student_module), run.autocast():
        logits, features = net(normalize(images, run.data.mean_rgb, run.data.channel_order), return_features=True)
        probs = torch.softmax(upsample(logits, run.crop), dim=1)
        confidence, prediction = probs.max(dim=1)
        size = features.shape[2:]
        labels_down = resize_nearest(labels, size)
        keep = (resize_nearest(prediction, size) == labels_down) & \
               (resize_nearest(confidence, size) > run.method["memory_confidence"])
        vectors = features.permute(0, 2, 3, 1)[keep]                 # [n, F] (boolean indexing: one sync)
        vectors_labels = labels_down[keep]
        if vectors.shape[0] < 2:  # the heads' BatchNorm needs two vectors; nothing to learn from fewer
            projected = vectors.new_zeros((0, run.memory.memory.shape[-1]))
            vectors_labels = vectors_labels[:0]
        else:
            projected = net.projection_head(vectors).float()       # [n, 256]
    with torch.no_grad():
        projected, vectors_labels = run.gather_rows(projected, vectors_labels)
        run.memory.add(projected, vectors_labels, run.teacher.feature_selectors(), quota=run.memory_quota,
                       keep=run.fidelity.memory_keep)


def contrastive_term(run, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 10: student features at pixels with a valid (pseudo-)label -> projection -> prediction head ->
    contrastive loss against the memory bank (SPEC 5.4)."""
    model = run.student_module
    labels_down = resize_nearest(labels, features.shape[2:])
    valid = labels_down != run.ignore_label
    vectors = features.permute(0, 2, 3, 1)[valid]                    # [n, F] (boolean indexing: one sync)
    if vectors.shape[0] < 2:  # the heads' BatchNorm needs two vectors
        return features.sum() * 0.0
    with run.autocast():
        vectors = model.prediction_head(model.projection_head(vectors))
    return contrastive_loss(vectors.float(), labels_down[valid], run.memory, model.feature_selectors(),
                            model.memory_selectors(), run.num_classes, memory_weights=run.fidelity.memory_weights)
