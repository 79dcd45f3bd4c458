"""Losses: hand-worked CE / pseudo-label CE / entropy values, the broadcast-mask variant, label check."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.losses import entropy_loss, pseudo_label_ce, supervised_ce

IGN = 250
LN3 = math.log(3.0)


def _logits_1x2x1x2():
    # pixel 0: logits (0, 0) -> p = (1/2, 1/2); pixel 1: (ln 3, 0) -> p = (3/4, 1/4)
    return torch.tensor([[[[0.0, LN3]], [[0.0, 0.0]]]])  # [1,2,1,2]


def test_supervised_ce_weighted_by_hand():
    logits = _logits_1x2x1x2()
    labels = torch.tensor([[[0, 1]]])
    weight = torch.tensor([1.0, 3.0])
    # (1 * -ln(1/2) + 3 * -ln(1/4)) / (1 + 3) = (ln2 + 6 ln2) / 4
    expected = 7.0 / 4.0 * math.log(2.0)
    got = supervised_ce(logits, labels, IGN, weight)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    ref = F.cross_entropy(logits, labels, weight=weight, ignore_index=IGN)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_supervised_ce_unweighted_with_ignore():
    logits = _logits_1x2x1x2()
    labels = torch.tensor([[[IGN, 1]]])
    # only pixel 1 counts: -ln(1/4)
    assert supervised_ce(logits, labels, IGN).item() == pytest.approx(math.log(4.0), rel=1e-6)
    weight = torch.tensor([5.0, 3.0])
    # a single valid pixel: its weight cancels
    assert supervised_ce(logits, labels, IGN, weight).item() == pytest.approx(math.log(4.0), rel=1e-6)


def test_supervised_ce_matches_torch_on_random_data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g)
    labels = torch.randint(0, 5, (2, 4, 6), generator=g)
    labels[0, :2] = IGN
    weight = torch.rand(5, generator=g) + 0.1
    for w in (None, weight):
        ref = F.cross_entropy(logits, labels, weight=w, ignore_index=IGN)
        assert torch.allclose(supervised_ce(logits, labels, IGN, w), ref, rtol=1e-5, atol=1e-6)


def test_supervised_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), IGN)
    for w in (None, torch.tensor([1.0, 2.0, 3.0])):
        loss = supervised_ce(logits, labels, IGN, w)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_pseudo_label_ce_mean_over_all_pixels_by_hand():
    # pixels: (0,0) label 0 -> ln2; (ln3,0) ignored -> 0; (0,ln3) label 1 -> -ln(3/4)
    logits = torch.tensor([[[[0.0, LN3, 0.0]], [[0.0, 0.0, LN3]]]])  # [1,2,1,3]
    labels = torch.tensor([[[0, IGN, 1]]])
    pixel_weight = torch.tensor([[[0.5, 0.9, 2.0]]])
    weight = torch.tensor([1.0, 3.0])
    expected = (1.0 * math.log(2.0) * 0.5 + 0.0 + 3.0 * math.log(4.0 / 3.0) * 2.0) / 3.0
    got = pseudo_label_ce(logits, labels, pixel_weight, IGN, weight)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    expected_unweighted = (math.log(2.0) * 0.5 + math.log(4.0 / 3.0) * 2.0) / 3.0
    got = pseudo_label_ce(logits, labels, pixel_weight, IGN)
    assert got.item() == pytest.approx(expected_unweighted, rel=1e-6)


def _uniform(n, c, h, w):
    return torch.full((n, c, h, w), 1.0 / c)


def test_entropy_uniform_is_one_whatever_the_valid_fraction():
    probs = _uniform(2, 4, 3, 5)
    all_valid = torch.ones(2, 3, 5, dtype=torch.bool)
    assert entropy_loss(probs, all_valid).item() == pytest.approx(1.0, abs=1e-6)
    half = torch.zeros(2, 3, 5, dtype=torch.bool)
    half[0] = True  # half the pixels valid: sum 15*2 bits / (30 * 2 * 0.5) = 1
    assert entropy_loss(probs, half).item() == pytest.approx(1.0, abs=1e-6)


def test_entropy_by_hand():
    # c = 4; pixel 0 (1/2,1/2,0,0): 1 bit; pixel 1 (1,0,0,0): 0 bits; normalised by log2(4) = 2
    probs = torch.tensor([[0.5, 1.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 4, 1, 2)
    both = torch.tensor([[[True, True]]])
    first = torch.tensor([[[True, False]]])
    second = torch.tensor([[[False, True]]])
    # both valid: (1 + 0) / (2 * 2 * 1) = 0.25; first only: 1 / (2 * 2 * 0.5) = 0.5; second: 0
    assert entropy_loss(probs, both).item() == pytest.approx(0.25, abs=1e-7)
    assert entropy_loss(probs, first).item() == pytest.approx(0.5, abs=1e-7)
    assert entropy_loss(probs, second).item() == pytest.approx(0.0, abs=1e-7)


def test_entropy_no_valid_pixel_is_zero():
    probs = torch.softmax(torch.randn(2, 3, 2, 2), dim=1)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    for bug in (False, True):
        loss = entropy_loss(probs, mask, broadcast_mask_bug=bug)
        assert loss.item() == 0.0


def test_entropy_broadcast_bug_equals_materialised_formula():
    g = torch.Generator().manual_seed(1)
    n, c, h, w = 3, 5, 2, 4
    probs = torch.softmax(torch.randn(n, c, h, w, generator=g), dim=1)
    mask = torch.rand(n, h, w, generator=g) > 0.4
    # the released trainSSL_less_memory.py computation, materialised: [n,1,h,w] * [n,h,w] -> [n,n,h,w]
    per_pixel = (probs * torch.log2(probs + 1e-30)).sum(1)
    big = mask.float().unsqueeze(1) * per_pixel
    assert big.shape == (n, n, h, w)
    expected = -big.sum() / (n * h * w * math.log2(c) * mask.float().mean())
    got = entropy_loss(probs, mask, broadcast_mask_bug=True)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert not torch.allclose(got, entropy_loss(probs, mask), rtol=1e-2)


def test_entropy_broadcast_bug_is_n_fold_for_uniform():
    n = 4
    probs = _uniform(n, 3, 2, 3)
    mask = torch.ones(n, 2, 3, dtype=torch.bool)
    assert entropy_loss(probs, mask, broadcast_mask_bug=True).item() == pytest.approx(float(n), rel=1e-6)
    assert entropy_loss(probs, mask, broadcast_mask_bug=False).item() == pytest.approx(1.0, rel=1e-6)
