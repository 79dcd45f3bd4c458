"""Confusion matrix / IoU on a hand-made case and against a numpy np.bincount oracle."""
import math
import time

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, class_iou, confusion_matrix, format_iou_table, mean_iou


def _hand_case():
    # class 2 never appears as ground truth; predicted 2 only on the ignored pixel -> absent in both
    label = torch.tensor([[0, 0, 1], [1, 1, 250]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    return pred, label


def test_confusion_matrix_and_iou_by_hand():
    pred, label = _hand_case()
    cm = confusion_matrix(pred, label, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    iou = class_iou(cm)
    assert iou.dtype == torch.float64
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 3 - 2); class 2: 0 / 0 -> NaN
    assert iou[0].item() == pytest.approx(1 / 3, abs=1e-15)
    assert iou[1].item() == pytest.approx(1 / 2, abs=1e-15)
    assert math.isnan(iou[2].item())
    assert mean_iou(iou) == pytest.approx(5 / 12, abs=1e-15)


def test_class_predicted_but_absent_in_ground_truth_has_zero_iou():
    cm = confusion_matrix(torch.tensor([2, 1]), torch.tensor([1, 1]), 3)
    iou = class_iou(cm)
    assert iou[2].item() == 0.0 and iou[1].item() == 0.5 and math.isnan(iou[0].item())
    assert mean_iou(iou) == pytest.approx(0.25)


def test_accumulator_and_table():
    pred, label = _hand_case()
    acc = ConfusionMatrix(3, "cpu")
    acc.update(pred, label)
    acc.update(pred[:1], label[:1])  # row 0 only: (0->0), (0->1), (1->1)
    assert acc.matrix.tolist() == [[2, 2, 0], [1, 3, 0], [0, 0, 0]]
    table = format_iou_table(class_iou(acc.matrix), ["road", "sidewalk", "building"])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "road" in lines[0] and "IoU 40.00" in lines[0]  # 2 / (4 + 3 - 2), in percent as every printed mIoU
    assert "sidewalk" in lines[1] and "IoU 50.00" in lines[1]  # 3 / (4 + 5 - 3)
    assert "building" in lines[2] and "n/a" in lines[2]
    assert lines[3] == "mIoU 45.00"
    acc.reset()
    assert acc.matrix.sum().item() == 0


def _numpy_oracle(pred, label, c):
    p, lab = pred.reshape(-1), label.reshape(-1)
    keep = (lab >= 0) & (lab < c)
    return np.bincount(lab[keep] * c + p[keep], minlength=c * c).reshape(c, c)


def test_random_against_numpy_oracle():
    rng = np.random.default_rng(0)
    c = 19
    label = rng.integers(0, c, size=(3, 37, 53))
    label[rng.random(label.shape) < 0.2] = 250
    label[rng.random(label.shape) < 0.05] = 255
    pred = rng.integers(0, c, size=label.shape)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), c)
    oracle = _numpy_oracle(pred, label, c)
    assert np.array_equal(cm.numpy(), oracle)
    diag = np.diag(oracle).astype(np.float64)
    denom = oracle.sum(0) + oracle.sum(1) - diag
    assert np.allclose(class_iou(cm).numpy(), diag / denom, rtol=0, atol=1e-15)


def test_full_resolution_is_fast_and_exact():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 20, (1024, 2048), generator=g)
    label[label == 19] = 250
    pred = torch.randint(0, 19, (1024, 2048), generator=g)
    start = time.perf_counter()
    cm = confusion_matrix(pred, label, 19)
    elapsed = time.perf_counter() - start
    assert cm.sum().item() == (label != 250).sum().item()
    assert np.array_equal(cm.numpy(), _numpy_oracle(pred.numpy(), label.numpy(), 19))
    assert elapsed < 5.0  # a Python loop over pixels would take minutes
