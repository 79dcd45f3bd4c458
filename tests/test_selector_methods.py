"""The two implementations of the grouped selectors (utils/selectors.py: "segments", the CPU choice, and "blocks",
the GPU choice) held equal to the plain per-class loop and to each other, on CPU: scores, gradients to the inputs
and to every selector parameter, BatchNorm running statistics, in train, eval and mixed modes; and the method
chosen per device."""
import copy

import pytest
import torch
from torch import nn

from tests.test_contrastive import random_selectors
from utils.selectors import (grouped_selector_scores, padded_selector_scores, reference_selector_scores,
                             selector_method)

C, D, H = 7, 16, 12
METHODS = ("segments", "blocks")


def selectors(seed: int) -> list[nn.Sequential]:
    """Spread-out BatchNorm affine and output weights (scores differ visibly), one cumulative-average BatchNorm
    (momentum None) and one class with its own LeakyReLU slope."""
    torch.manual_seed(seed)
    out = random_selectors(C, D, H)
    out[4][1].momentum = None
    out[2][2].negative_slope = 0.1
    return out


def rows(sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    groups = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    groups = groups[torch.randperm(len(groups), generator=g)]
    return torch.randn(len(groups), D, generator=g) * 3 + 1, groups


def params(sel):
    return [p for s in sel for p in s.parameters()]


def grads(out, weight, inputs):
    g = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if gi is None else gi for gi, i in zip(g, inputs)]


def bn_state(sel):
    return [(s[1].running_mean.clone(), s[1].running_var.clone(), int(s[1].num_batches_tracked)) for s in sel]


def assert_same_state(a, b):
    for (m, v, k), (m_r, v_r, k_r) in zip(a, b):
        torch.testing.assert_close(m, m_r, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v, v_r, atol=1e-6, rtol=1e-5)
        assert k == k_r


SIZES = [6, 0, 5, 2, 40, 3, 9]          # an empty class, one large class (a block of its own and more)
ACTIVE = torch.tensor([True, True, True, False, True, True, True])


@pytest.mark.parametrize("eval_classes", [(), (0, 2, 4, 6), tuple(range(C))], ids=["train", "mixed", "eval"])
def test_both_methods_match_the_loop(eval_classes):
    x, g = rows(SIZES, 1)
    base = selectors(2)
    grouped_selector_scores(x, g, base, ACTIVE, method="segments")   # non-default running statistics
    for c in eval_classes:
        base[c].eval()
    weight = torch.randn(len(g))
    ref_sel = copy.deepcopy(base)
    xr = x.clone().requires_grad_(True)
    ref = reference_selector_scores(xr, g, ref_sel, ACTIVE)
    ref_grads = grads(ref, weight, [xr] + params(ref_sel))
    for method in METHODS:
        sel = copy.deepcopy(base)
        xm = x.clone().requires_grad_(True)
        s = grouped_selector_scores(xm, g, sel, ACTIVE, method=method)
        torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(s[~ACTIVE[g]], torch.zeros(int((~ACTIVE[g]).sum())))
        for a, b in zip(grads(s, weight, [xm] + params(sel)), ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert_same_state(bn_state(sel), bn_state(ref_sel))
    expected = [2 if (c not in eval_classes and ACTIVE[c] and SIZES[c] > 1) else 1 if SIZES[c] > 1 and ACTIVE[c]
                else 0 for c in range(C)]
    assert [k for _, _, k in bn_state(ref_sel)] == expected


def test_segments_are_bit_identical_to_the_loop():
    """Same rows, same order, same ops: the CPU choice reproduces the per-class loop exactly."""
    x, g = rows(SIZES, 3)
    sel, ref_sel = selectors(4), selectors(4)
    s = grouped_selector_scores(x, g, sel, ACTIVE, method="segments")
    assert torch.equal(s, reference_selector_scores(x, g, ref_sel, ACTIVE))
    for a, b in zip(bn_state(sel), bn_state(ref_sel)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_single_vector_class_normalises_to_beta_in_both_methods():
    """nn.BatchNorm1d raises on one vector in train mode; both methods give BN output 0 (then beta), leave the
    running statistics alone, and keep a (zero) gradient to the first Linear."""
    x, g = rows([1, 3], 5)
    x = x[:, :D]
    out = {}
    for method in METHODS:
        sel = selectors(6)[:2]
        first = sel[0][0].weight
        s = grouped_selector_scores(x, g, sel, method=method)
        bn = sel[0][1]
        a = nn.functional.leaky_relu(bn.bias, 0.2)
        expected = (a * sel[0][3].weight[0]).sum() + sel[0][3].bias[0]
        torch.testing.assert_close(s[g == 0][0], expected)
        assert int(bn.num_batches_tracked) == 0 and int(sel[1][1].num_batches_tracked) == 1
        (gw,) = torch.autograd.grad(s[g == 0].sum(), [first])
        assert torch.count_nonzero(gw) == 0
        out[method] = s.detach()
    torch.testing.assert_close(out["segments"], out["blocks"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_first_linear_bias_gets_a_zero_gradient_in_train_mode(method):
    """Batch statistics cancel the first Linear's bias, but it still gets a (zero) gradient, as in the loop:
    with grad None, SGD would skip its weight decay."""
    x, g = rows(SIZES, 12)
    sel = selectors(13)
    grouped_selector_scores(x, g, sel, ACTIVE, method=method).sum().backward()
    for c, s in enumerate(sel):
        if ACTIVE[c] and SIZES[c] > 1:
            assert s[0].bias.grad is not None and float(s[0].bias.grad.abs().max()) < 1e-5, c
            assert float(s[0].weight.grad.abs().max()) > 1e-3, c


def test_padded_scores_both_methods_match_the_loop():
    torch.manual_seed(7)
    P = 9
    x_pad = torch.randn(C, P, D) * 2
    valid = torch.rand(C, P) < 0.6                     # any mask, not only prefixes
    valid[1] = False                                   # a class with no valid entry
    valid[3] = torch.arange(P) < 2                     # a prefix, as in the memory bank
    rows_, groups = valid.reshape(-1).nonzero()[:, 0], valid.reshape(-1).nonzero()[:, 0] // P
    ref_sel = selectors(8)
    ref = torch.zeros(C * P).index_put((rows_,), reference_selector_scores(
        x_pad.reshape(C * P, D)[rows_], groups, ref_sel)).view(C, P)
    for method in METHODS:
        sel = selectors(8)
        s = padded_selector_scores(x_pad, valid, sel, method=method)
        torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(s[~valid], torch.zeros(int((~valid).sum())))
        assert_same_state(bn_state(sel), bn_state(ref_sel))


def test_blocks_of_a_class_larger_than_the_block_size():
    """19 classes, one holding most of the rows (spans many blocks of ceil(N/C) rows), several tiny ones."""
    sizes = [300, 1, 2, 0, 5, 17, 3, 40, 2, 9, 0, 30, 6, 2, 4, 11, 2, 3, 60]
    g = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    g = g[torch.randperm(len(g), generator=torch.Generator().manual_seed(9))]
    x = torch.randn(len(g), D, generator=torch.Generator().manual_seed(10))
    torch.manual_seed(11)
    sel = [nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.LeakyReLU(0.2), nn.Linear(H, 1)) for _ in sizes]
    active = torch.tensor([n > 1 for n in sizes])
    ref = reference_selector_scores(x, g, copy.deepcopy(sel), active)
    s = grouped_selector_scores(x, g, sel, active, method="blocks")
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)


def test_method_choice():
    assert selector_method("auto", torch.device("cpu")) == "segments"
    assert selector_method("auto", torch.device("cuda", 0)) == "blocks"
    assert selector_method("blocks", torch.device("cpu")) == "blocks"
    with pytest.raises(ValueError, match="selector method"):
        selector_method("loop", torch.device("cpu"))
