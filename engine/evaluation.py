"""Evaluation (SPEC section 7): confusion matrix, per-class IoU, mIoU and mean CE on the validation split.

Used by the training scripts (periodic evaluation) and by evaluateSSL.py; predict.py uses the same `segment`.
Under torchrun each rank evaluates every world_size-th image and the confusion matrix and loss sums are
all-reduced, so every rank gets the result of the whole split. The images are read and decoded by a DataLoader
(`num_workers` processes; training.num_workers in a run) while the network predicts the previous ones, into pinned
memory on CUDA and copied without blocking.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from data.sampler import _own_process_group, _worker_user_error
from engine import distributed as dist
from utils.augmentations import normalize
from utils.errors import UserError
from utils.metrics import ConfusionMatrix, class_iou, mean_iou


def predicted_class(scores: torch.Tensor) -> torch.Tensor:
    """Class with the highest score per pixel: [B,C,H,W] -> [B,H,W] int64, the first one on ties (as argmax).

    max(dim=1).indices rather than argmax(dim=1): the same indices, but on CPU argmax over a dimension that is
    not the innermost one is ~2.5x slower (19x1024x2048 scores, one thread). Against the release's path (the scores
    as a NumPy array, np.argmax over the class axis): CPU time, medians of 15 interleaved calls in one process, one
    thread, 137.9 against 140.7 ms on random scores and 103.0 against 117.9 ms on upsampled logits; the same
    indices (`tests/test_fast_forms.py`; `benchmarks/bench_components.py --compare-reference --only argmax`).
    """
    return scores.max(dim=1).indices


def predict_logits(model: torch.nn.Module, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """The paper's protocol: one forward of the whole (normalised) image, logits upsampled bilinearly
    (align_corners=True) to the label size. image [B,3,h,w] -> [B,C,H,W] float32."""
    logits = model(image)
    return F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=True)


def predict_sliding(model: torch.nn.Module, image: torch.Tensor, out_size: tuple[int, int],
                    window: tuple[int, int], overlap: float = 1 / 3) -> torch.Tensor:
    """Sliding-window protocol: crop-sized windows with `overlap`, softmax summed over the overlaps, then
    resized to the label size. Returns summed probabilities (argmax-equivalent to logits) [B,C,H,W]."""
    _, _, h, w = image.shape
    wh, ww = min(window[0], h), min(window[1], w)
    sh, sw = max(1, int(wh * (1 - overlap))), max(1, int(ww * (1 - overlap)))
    ys = list(range(0, max(h - wh, 0) + 1, sh))
    xs = list(range(0, max(w - ww, 0) + 1, sw))
    if ys[-1] != h - wh:
        ys.append(h - wh)
    if xs[-1] != w - ww:
        xs.append(w - ww)
    total = None
    for y in ys:
        for x in xs:
            crop = image[:, :, y:y + wh, x:x + ww]
            probs = torch.softmax(F.interpolate(model(crop).float(), size=(wh, ww), mode="bilinear",
                                                align_corners=True), dim=1)
            if total is None:
                total = image.new_zeros((image.shape[0], probs.shape[1], h, w), dtype=torch.float32)
            total[:, :, y:y + wh, x:x + ww] += probs
    return F.interpolate(total, size=out_size, mode="bilinear", align_corners=True)


def segment(model: torch.nn.Module, image: torch.Tensor, out_size: tuple[int, int], *, mean_rgb, channel_order: str,
            protocol: str = "whole", window: tuple[int, int] | None = None, autocast=nullcontext
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction of images [B,3,h,w] in 0..255 (pipeline channel order) at `out_size`: (scores [B,C,H,W] float32,
    classes [B,H,W] int64). Scores are logits ("whole", the paper's protocol) or summed window probabilities
    ("sliding"). The one prediction path of evaluation (evaluateSSL.py, training) and of predict.py."""
    x = normalize(image, mean_rgb, channel_order)
    with autocast():
        if protocol == "sliding":
            scores = predict_sliding(model, x, out_size, window or tuple(x.shape[2:]))
        else:
            scores = predict_logits(model, x, out_size)
    return scores, predicted_class(scores)


def rank_items(dataset, device: torch.device, num_workers: int = 0):
    """This rank's items of `dataset` (every world_size-th from its rank, in order) as (image, label, name), loaded
    by `num_workers` processes ahead of their use (in their own process group, as the training loader's: a signal
    meant for the run does not kill them), pinned on CUDA."""
    indices = list(range(dist.rank(), len(dataset), dist.world_size()))
    loader = DataLoader(Subset(dataset, indices), batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator(),  # the global RNG untouched
                        worker_init_fn=_own_process_group if num_workers > 0 else None)
    items = iter(loader)
    try:
        yield from items
    except UserError as e:  # a bad validation file: its own message, not the worker's traceback
        raise _worker_user_error(e) from None
    finally:  # the workers end now (also after an error or an early stop), not whenever the iterator is collected
        if hasattr(items, "_shutdown_workers"):
            items._shutdown_workers()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, *, num_classes: int, ignore_label: int, mean_rgb, channel_order: str,
             device: torch.device, autocast=nullcontext, protocol: str = "whole",
             window: tuple[int, int] | None = None, on_prediction: Callable | None = None,
             num_workers: int = 0) -> dict:
    """Evaluate `model` (put in eval mode, restored after) on every image of `dataset`, read by `num_workers`
    loader processes (0: in this process).

    Returns {"iou": [C] list (NaN for classes absent from both prediction and labels), "miou": float,
    "loss": mean CE over non-ignored pixels, "confusion": [C,C] tensor}. `on_prediction(name, image, label, pred)`
    is called per image (rank-local) for saving pictures.

    With cuDNN's benchmark on (engine/rng.set_determinism), every new image size is timed anew: a split whose sizes
    vary (Pascal VOC) turns the benchmark off for the rest of the evaluation at its second size.
    """
    was_training, benchmark = model.training, torch.backends.cudnn.benchmark
    model.eval()
    cm = ConfusionMatrix(num_classes, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixel_sum = torch.zeros((), dtype=torch.float64, device=device)
    items = rank_items(dataset, device, num_workers)
    first_size = None
    try:
        for image, label, name in items:
            first_size = first_size or image.shape
            if image.shape != first_size:
                torch.backends.cudnn.benchmark = False
            image = image.unsqueeze(0).to(device, non_blocking=True)
            label = label.unsqueeze(0).to(device, non_blocking=True)
            scores, pred = segment(model, image, label.shape[1:], mean_rgb=mean_rgb, channel_order=channel_order,
                                   protocol=protocol, window=window, autocast=autocast)
            if protocol == "sliding":
                log_probs = torch.log(scores / scores.sum(1, keepdim=True).clamp_min(1e-12))
            else:
                log_probs = torch.log_softmax(scores, dim=1)
            cm.update(pred, label)
            target = label.clone()
            target[(label < 0) | (label >= num_classes)] = -100
            loss_sum += F.nll_loss(log_probs, target, ignore_index=-100, reduction="sum").double()
            pixel_sum += (target != -100).sum()
            if on_prediction is not None:
                on_prediction(name, image[0], label[0], pred[0])
    finally:
        items.close()  # the loader's workers end now, also when a stop request ends the evaluation early
        torch.backends.cudnn.benchmark = benchmark
    matrix = dist.all_reduce_sum(cm.matrix)
    dist.all_reduce_sum(loss_sum)
    dist.all_reduce_sum(pixel_sum)
    model.train(was_training)
    if float(pixel_sum) == 0:  # NaN mIoU otherwise, at every evaluation of a run (one host read per evaluation)
        what = "has no image" if len(dataset) == 0 else \
            f"({len(dataset)} images) has no pixel labeled other than the ignore label {ignore_label}"
        raise UserError(f"the validation set {what}: there is nothing to score. Check the validation labels (or the "
                        f"dataset folder) and ignore_label.")
    iou = class_iou(matrix)
    return {"iou": iou.tolist(), "miou": mean_iou(iou), "loss": float(loss_sum / pixel_sum.clamp_min(1)),
            "confusion": matrix.cpu()}
