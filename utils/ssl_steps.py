"""The steps of one training iteration (SPEC section 4), shared by the three training scripts.

Each function is one numbered step of the algorithm; the scripts call them in their own order. They take a
`StepContext` (what a step may touch: the networks, the memory bank, the method's and the data's constants, and two
services of the engine) and tensors on the training device.
"""
from __future__ import annotations

import random
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils.augmentations import normalize, strong_augment, weak_augment
from utils.classmix import classmix_masks
from utils.contrastive import contrastive_loss
from utils.fidelity import Fidelity
from utils.losses import entropy_loss, pseudo_label_ce, supervised_ce
from utils.memory_bank import MemoryBank
from utils.schedules import ramp_up


@dataclass
class StepContext:
    """Everything the steps read: built by the run (engine/run.py, `Run.step_context`) for each iteration."""

    # networks
    student: nn.Module            # the student's forward (train mode; compiled when training.compile)
    student_module: nn.Module     # the student itself: projection/prediction heads, selectors
    teacher: nn.Module            # EMA teacher (train mode): its feature selectors rank the memory
    labeler: nn.Module            # pseudo-labels and memory features: the teacher, or the student in eval mode
    memory: MemoryBank
    # the method's constants (config `method` with the script's values resolved) and the fidelity preset
    method: dict
    fidelity: Fidelity
    memory_quota: int             # vectors per class and memory update (SPEC 5.2)
    # the data's constants
    num_classes: int
    ignore_label: int
    drop_background: bool         # ClassMix never picks class 0 (Pascal VOC's background)
    crop: tuple[int, int]         # training crop (H, W): logits are upsampled to it
    mean_rgb: tuple[float, float, float]
    channel_order: str
    # services of the engine
    autocast: Callable[[], AbstractContextManager]    # mixed precision around network forwards
    gather_rows: Callable[..., tuple[torch.Tensor, ...]]  # memory vectors of every process (torchrun)


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


def pseudo_label(ctx: StepContext, unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: confidence p and label ŷ [B,H,W] from the teacher (or the student in eval mode) on the
    un-augmented unlabeled batch, at crop size."""
    net = ctx.labeler
    with torch.no_grad(), eval_mode(net, enabled=net is ctx.student_module), ctx.autocast():
        logits = net(normalize(unlabeled, ctx.mean_rgb, ctx.channel_order))
    probs = torch.softmax(upsample(logits, ctx.crop), dim=1)
    confidence, labels = probs.max(dim=1)
    return confidence, labels


def augment_labeled(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: weak augmentation of the labeled batch, with ClassMix on its labels with probability p."""
    masks = None
    if random.random() < ctx.method["labeled_classmix_prob"]:
        masks = classmix_masks(labels, ctx.ignore_label, drop_background=ctx.drop_background)
    images, labels, _ = weak_augment(images, labels, None, ignore_label=ctx.ignore_label,
                                     channel_order=ctx.channel_order, classmix_masks=masks)
    return images, labels


def augment_unlabeled(ctx: StepContext, images: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor,
                      mix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 5: two independent strong views of the unlabeled batch, each with ClassMix (probability p, only
    when `mix`) mixing images, pseudo-labels and confidences; the views are concatenated."""
    views = []
    for _ in range(2):
        masks = None
        if mix and random.random() < ctx.method["unlabeled_classmix_prob"]:
            masks = classmix_masks(pseudo, ctx.ignore_label, drop_background=ctx.drop_background)
        views.append(strong_augment(images, pseudo, confidence, ignore_label=ctx.ignore_label,
                                    channel_order=ctx.channel_order, classmix_masks=masks))
    mixed, mixed_pseudo, mixed_confidence = (torch.cat(parts) for parts in zip(*views))
    return mixed, mixed_pseudo, mixed_confidence


def forward_student(ctx: StepContext, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6: student forward (train mode) -> logits at crop size (fp32) and features at the output stride."""
    with ctx.autocast():
        logits, features = ctx.student(normalize(images, ctx.mean_rgb, ctx.channel_order),
                                       return_features=True)
    return upsample(logits, ctx.crop), features


def supervised_loss(ctx: StepContext, logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor
                    ) -> torch.Tensor:
    """Step 8, first term: CE over non-ignored labeled pixels with class weights."""
    return supervised_ce(logits, labels, ctx.ignore_label, class_weights)


def unlabeled_losses(ctx: StepContext, i: int, logits: torch.Tensor, pseudo: torch.Tensor,
                     confidence: torch.Tensor, class_weights: torch.Tensor, broadcast_entropy_mask: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 8, second and third terms: confidence-weighted pseudo-label CE with ramp-up, and the entropy term
    (`broadcast_entropy_mask`: the [n,1,h,w] mask of the less-memory and domain-adaptation scripts, see
    utils/losses.entropy_loss)."""
    m = ctx.method
    pixel_weight = ramp_up(i, m["ramp_up_iterations"]) * confidence.float() ** m["pseudo_label_power"]
    loss_pseudo = pseudo_label_ce(logits, pseudo, pixel_weight, ctx.ignore_label, class_weights)
    loss_entropy = entropy_loss(torch.softmax(logits, dim=1), pseudo != ctx.ignore_label,
                                broadcast_mask_bug=broadcast_entropy_mask)
    return loss_pseudo, m["entropy_weight"] * loss_entropy


def update_memory(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Step 9: the teacher's projected features of confidently and correctly predicted labeled pixels
    enter the class-wise memory bank. With use_teacher_train false the student (eval mode) gives predictions,
    features and projections, but the EMA teacher's selectors still rank them, as released."""
    net = ctx.labeler
    with torch.no_grad(), eval_mode(net, enabled=net is ctx.student_module), ctx.autocast():
        logits, features = net(normalize(images, ctx.mean_rgb, ctx.channel_order), return_features=True)
        probs = torch.softmax(upsample(logits, ctx.crop), dim=1)
        confidence, prediction = probs.max(dim=1)
        size = features.shape[2:]
        labels_down = resize_nearest(labels, size)
        keep = (resize_nearest(prediction, size) == labels_down) & \
               (resize_nearest(confidence, size) > ctx.method["memory_confidence"])
        vectors = features.permute(0, 2, 3, 1)[keep]                 # [n, F] (boolean indexing: one sync)
        vectors_labels = labels_down[keep]
        if vectors.shape[0] < 2:  # the heads' BatchNorm needs two vectors; nothing to learn from fewer
            projected = vectors.new_zeros((0, ctx.memory.memory.shape[-1]))
            vectors_labels = vectors_labels[:0]
        else:
            projected = net.projection_head(vectors).float()       # [n, 256]
    with torch.no_grad():
        projected, vectors_labels = ctx.gather_rows(projected, vectors_labels)
        ctx.memory.add(projected, vectors_labels, ctx.teacher.feature_selectors(), quota=ctx.memory_quota,
                       keep=ctx.fidelity.memory_keep)


def contrastive_term(ctx: StepContext, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 10: student features at pixels with a valid (pseudo-)label -> projection -> prediction head ->
    contrastive loss against the memory bank (SPEC 5.4)."""
    model = ctx.student_module
    labels_down = resize_nearest(labels, features.shape[2:])
    valid = labels_down != ctx.ignore_label
    vectors = features.permute(0, 2, 3, 1)[valid]                    # [n, F] (boolean indexing: one sync)
    if vectors.shape[0] < 2:  # the heads' BatchNorm needs two vectors
        return features.sum() * 0.0
    with ctx.autocast():
        vectors = model.prediction_head(model.projection_head(vectors))
    return contrastive_loss(vectors.float(), labels_down[valid], ctx.memory, model.feature_selectors(),
                            model.memory_selectors(), ctx.num_classes, memory_weights=ctx.fidelity.memory_weights)
