"""The faster forms of issue 17 held equal to the plain references they replaced: the contrastive loss's row
cosine (a hand-written backward) and both selector methods inside the loss, MemoryBank.add against its per-class
reference add_reference, the class-balancing pixel counts against the compare-and-sum, and the evaluation's
predicted class against argmax."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.class_balancing import _class_counts, _class_counts_reference
from utils.contrastive import _cosine_to_class_mean, contrastive_loss, contrastive_loss_reference
from engine.evaluation import predicted_class
from utils.memory_bank import MemoryBank

C, D = 6, 8


def selectors(seed: int, num: int = C, dim: int = D) -> list[nn.Sequential]:
    torch.manual_seed(seed)
    out = []
    for _ in range(num):
        s = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(0.2), nn.Linear(dim, 1))
        with torch.no_grad():
            s[1].bias.normal_(0, 0.5)
            s[3].weight.mul_(3)
        out.append(s)
    return out


# ------------------------------------------------------------------------------------ contrastive loss
def test_row_cosine_gradients_match_autograd_of_normalize():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    x[3] = 0.0                                       # a zero row: F.normalize's eps, no gradient through the norm
    x[7] = 1e-14                                     # below the eps too
    x[11] = 0.0
    x[11, 2] = 1e-12                                 # a norm of exactly the eps: clamped, no gradient through it
    labels = torch.randint(0, 4, (40,), generator=g)
    mu = torch.randn(4, 5, generator=g, dtype=torch.float64)
    xa, ma = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    xb, mb = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    assert float(torch.linalg.vector_norm(x[11])) == 1e-12
    t = _cosine_to_class_mean(xa, labels, ma)
    t_ref = (F.normalize(xb, dim=1) * mb[labels]).sum(1)
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(40, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((t * w).sum(), [xa, ma]), torch.autograd.grad((t_ref * w).sum(), [xb, mb])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 7, 11]] = False
    assert torch.autograd.gradcheck(lambda a, b: _cosine_to_class_mean(a, labels[keep], b), (xa[keep].detach()
                                    .requires_grad_(True), ma.detach().requires_grad_(True)))


@pytest.mark.parametrize("mode", ["ones", "release", "mean"])
def test_contrastive_loss_with_each_selector_method_matches_reference(mode):
    g = torch.Generator().manual_seed(1)
    S = 10
    counts = torch.tensor([S, 4, 1, 0, S, 7])
    bank = MemoryBank(C, size=S, dim=D)
    bank.load_state_dict({"memory": torch.randn(C, S, D, generator=g), "counts": counts})
    sizes = [30, 5, 6, 4, 1, 12]                    # class 4: one vector (skipped); 2, 3: too little memory
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=g)]
    x0 = torch.randn(len(y), D, generator=g) * 2 + 0.3
    feat, mem = selectors(2), selectors(3)
    x_r = x0.clone().requires_grad_(True)
    fr, mr = copy.deepcopy(feat), copy.deepcopy(mem)
    ref = contrastive_loss_reference(x_r, y, bank, fr, mr, C, memory_weights=mode)
    ref_grads = torch.autograd.grad(ref, [x_r] + [p for s in fr + mr for p in s.parameters()], allow_unused=True)
    for method in ("segments", "blocks"):
        x = x0.clone().requires_grad_(True)
        fs, ms = copy.deepcopy(feat), copy.deepcopy(mem)
        loss = contrastive_loss(x, y, bank, fs, ms, C, memory_weights=mode, selector_method=method)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        got = torch.autograd.grad(loss, [x] + [p for s in fs + ms for p in s.parameters()], allow_unused=True)
        for a, b in zip(got, ref_grads):
            a = torch.zeros(()) if a is None else a
            b = torch.zeros(()) if b is None else b
            torch.testing.assert_close(a.expand_as(b) if a.dim() == 0 else a, b.expand_as(a) if b.dim() == 0 else b,
                                       atol=1e-6, rtol=1e-4)
        for s, s_r in zip(fs + ms, fr + mr):
            torch.testing.assert_close(s[1].running_mean, s_r[1].running_mean, atol=1e-6, rtol=1e-5)
            assert int(s[1].num_batches_tracked) == int(s_r[1].num_batches_tracked)


# ----------------------------------------------------------------------------------------- memory bank
@pytest.mark.parametrize("method", ["segments", "blocks"])
@pytest.mark.parametrize("keep", ["lowest", "highest"])
def test_memory_add_equals_its_per_class_reference(keep, method):
    g = torch.Generator().manual_seed(4)
    S, quota = 12, 5
    bank, ref = MemoryBank(C, size=S, dim=D), MemoryBank(C, size=S, dim=D)
    sel = selectors(5)
    sel_r = copy.deepcopy(sel)
    for step in range(4):                           # fills up, then the oldest fall out
        sizes = [20, 3, 5, 6, 0, 1 if step == 1 else 0]   # ranked, kept as given, exactly the quota, absent
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
        y = y[torch.randperm(len(y), generator=g)]
        x = torch.randn(len(y), D, generator=g)
        bank.add(x, y, sel, quota=quota, keep=keep, selector_method=method)
        ref.add_reference(x, y, sel_r, quota=quota, keep=keep)
        assert torch.equal(bank.counts, ref.counts)
        if method == "segments":
            assert torch.equal(bank.memory, ref.memory)
        else:
            torch.testing.assert_close(bank.memory, ref.memory, rtol=0, atol=0)
    assert bank.counts.tolist() == [S, S, S, S, 0, 1]
    assert [int(s[1].num_batches_tracked) for s in sel] == [4, 0, 0, 4, 0, 0] == \
        [int(s[1].num_batches_tracked) for s in sel_r]


def test_memory_add_with_stale_values_beyond_the_counts_of_a_loaded_state():
    """add() relies on zeros beyond each class's count; load_state_dict makes it so whatever the file holds."""
    S = 6
    memory = torch.randn(C, S, D)                   # not zero beyond the counts
    counts = torch.tensor([2, 0, 6, 1, 3, 0])
    bank, ref = MemoryBank(C, size=S, dim=D), MemoryBank(C, size=S, dim=D)
    bank.load_state_dict({"memory": memory, "counts": counts})
    ref.load_state_dict({"memory": memory, "counts": counts})
    assert torch.count_nonzero(bank.memory[0, 2:]) == 0 and torch.equal(bank.memory[2], memory[2])
    y = torch.tensor([0, 0, 1, 3, 3, 3, 3])
    x = torch.randn(len(y), D)
    bank.add(x, y, selectors(6), quota=3)
    ref.add_reference(x, y, selectors(6), quota=3)
    assert torch.equal(bank.memory, ref.memory) and bank.counts.tolist() == [4, 1, 6, 4, 3, 0]


# ------------------------------------------------------------------------------------ class balancing
def test_class_counts_hand_worked_and_against_compare_and_sum():
    labels = torch.tensor([[0, 2, 2, 250], [-1, 3, 1, 2], [19, 0, -7, 2]])   # C = 3: 3 and 19 dropped
    assert _class_counts(labels, 3).tolist() == [2, 1, 4]
    g = torch.Generator().manual_seed(7)
    big = torch.randint(-3, 25, (3, 37, 41), generator=g)
    big[0, :5] = 250
    big[1, 0, :3] = -(10 ** 12)
    big[2, 0, :3] = 10 ** 12
    for dtype in (torch.int64, torch.int32):
        assert torch.equal(_class_counts(big.to(dtype), 19), _class_counts_reference(big.to(dtype), 19))
    as_png = torch.randint(0, 256, (2, 9, 11), generator=g, dtype=torch.uint8)   # labels read from PNG files
    as_png[0, 0, :4] = 250
    assert torch.equal(_class_counts(as_png, 19), _class_counts_reference(as_png.long(), 19))
    assert _class_counts(torch.zeros(0, dtype=torch.int64), 4).tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------ evaluation
def test_predicted_class_is_argmax_with_ties_and_nan():
    scores = torch.zeros(2, 4, 3, 5)
    scores[:, 1] = 1.0
    scores[:, 3] = 1.0                              # tie between 1 and 3: the first wins
    scores[0, 2, 0, 0] = 2.0
    scores[1, :, 2, 4] = float("nan")               # NaN everywhere: index 0, as argmax
    scores[1, 3, 1, 1] = float("nan")               # a NaN beats every number, as in argmax
    pred = predicted_class(scores)
    assert pred.dtype == torch.int64 and pred.shape == (2, 3, 5)
    assert pred[0, 0, 0] == 2 and pred[0, 1, 1] == 1 and pred[1, 2, 4] == 0 and pred[1, 1, 1] == 3
    g = torch.Generator().manual_seed(8)
    rounded = (torch.randn(2, 19, 33, 65, generator=g) * 3).round()               # many ties
    assert torch.equal(predicted_class(rounded), rounded.argmax(dim=1))
    # the release's evaluation path: the scores to NumPy, np.argmax over the class axis
    release = np.stack([np.argmax(s.numpy(), axis=0) for s in rounded])
    assert np.array_equal(predicted_class(rounded).numpy(), release)
