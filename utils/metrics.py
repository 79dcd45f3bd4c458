"""Segmentation metrics (SPEC 7): confusion matrix on the device, per-class IoU, mIoU."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """Confusion matrix [C,C] int64 (rows ground truth, columns prediction) on the inputs' device.

    pred and label are long tensors of the same shape; pixels with 0 <= label < C are counted (the
    ignore label and any other id are dropped); predictions must lie in [0, C).
    One torch.bincount over label * C + pred; dropped pixels go to an extra bin that is cut off,
    so no boolean indexing is needed. Note: bincount on CUDA reads the maximum back to the host
    (one sync per call); it is used anyway for its fast shared-memory histogram (evaluation only).
    """
    c = num_classes
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long().to(label.device)
    valid = (label >= 0) & (label < c)
    index = torch.where(valid, label * c + pred, torch.full_like(label, c * c))  # [P]
    counts = torch.bincount(index, minlength=c * c + 1)[: c * c]
    return counts.reshape(c, c)


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
    """One line per class ('class  i name  IoU x.xxxx', 'n/a' when absent) and a final mIoU line."""
    values = iou.detach().to("cpu", torch.float64).tolist()
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} IoU values but {len(class_names)} class names")
    width = max((len(name) for name in class_names), default=0)
    lines = []
    for i, (name, value) in enumerate(zip(class_names, values)):
        shown = "n/a" if math.isnan(value) else f"{value:.4f}"
        lines.append(f"class {i:2d} {name:<{width}}  IoU {shown}")
    lines.append(f"mIoU {mean_iou(iou):.4f}")
    return "\n".join(lines)
