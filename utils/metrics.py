"""Segmentation metrics (SPEC 7): confusion matrix on the device, per-class IoU, mIoU."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """Confusion matrix [C,C] int64 (rows ground truth, columns prediction) on the inputs' device.

    pred and label are integer tensors of the same shape; pixels with 0 <= label < C are counted (the
    ignore label and any other id are dropped); predictions must lie in [0, C).

    How (about 3x faster than a masked bincount on CPU, and no host sync on CUDA): the label is clamped
    to [-1, C], so every pixel gets the bin (clamp(label) + 1) * C + pred of a (C+2) x C table whose
    first row (negative labels) and last row (labels >= C, e.g. the ignore label) are cut off afterwards:
    no validity mask and no torch.where pass over the pixels. The counting is an index_add_ into that
    fixed-size table: on CUDA it needs no host sync (torch.bincount reads the largest value back to the
    host to size its output), and on CPU it measured as fast as the best bincount variants (int16/int32
    indices, which need extra conversion passes) on a 1024x2048 image.
    """
    c = num_classes
    label = label.reshape(-1).long()                                              # no copy when int64
    pred = pred.reshape(-1).to(device=label.device, dtype=torch.int64)
    index = torch.add(pred, label.clamp(-1, c), alpha=c).add_(c)                  # [P] in [0, (C+2)C)
    counts = torch.zeros((c + 2) * c, dtype=torch.int64, device=label.device)
    ones = torch.ones((), dtype=torch.int64, device=label.device).expand(index.shape[0])  # stride 0
    counts.index_add_(0, index, ones)
    return counts[c: c + c * c].reshape(c, c)


class ConfusionMatrix:
    """Accumulates confusion matrices over an evaluation run."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add the counts of one prediction / label pair (any matching shapes)."""
        self.matrix += confusion_matrix(pred, label, self.num_classes).to(self.matrix.device)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()


def class_iou(cm: Tensor) -> Tensor:
    """Per-class IoU [C] float64 = diag / (row + col - diag); NaN for classes absent in both."""
    cm = cm.to(torch.float64)
    diag = cm.diagonal()
    denom = cm.sum(dim=1) + cm.sum(dim=0) - diag
    return torch.where(denom > 0, diag / denom.clamp_min(1.0), torch.full_like(diag, math.nan))


def mean_iou(iou: Tensor) -> float:
    """Mean over classes that occur (NaN entries excluded); NaN if none does."""
    return float(torch.nanmean(iou.to(torch.float64)))


def format_iou_table(iou: Tensor, class_names: Sequence[str]) -> str:
    """One line per class ('class  i name  IoU xx.xx', 'n/a' when absent) and a final mIoU line, in percent (the
    unit of every mIoU the scripts print)."""
    values = iou.detach().to("cpu", torch.float64).tolist()
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} IoU values but {len(class_names)} class names")
    width = max((len(name) for name in class_names), default=0)
    lines = []
    for i, (name, value) in enumerate(zip(class_names, values)):
        shown = "n/a" if math.isnan(value) else f"{100 * value:.2f}"
        lines.append(f"class {i:2d} {name:<{width}}  IoU {shown}")
    lines.append(f"mIoU {100 * mean_iou(iou):.2f}")
    return "\n".join(lines)
