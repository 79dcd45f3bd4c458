"""Vectorised method parts against plain per-class loops at realistic sizes (C=19, D=256, memory 256, N~2000).

Complements tests/test_contrastive.py and tests/test_memory_bank.py (small and hand-worked cases): here the
memory bank is filled to its full 256 entries per class by several MemoryBank.add calls (both keep modes),
checked entry by entry against the release's per-class procedure, and the contrastive loss is then compared
with the per-class reference on that full bank — value, gradients to the features and to every parameter of
both selector sets, and the selectors' BatchNorm running statistics — in both memory-weight modes.
"""
import copy

import pytest
import torch

from model.heads import class_selector
from utils.contrastive import contrastive_loss, contrastive_loss_reference
from utils.memory_bank import MemoryBank

C, D, SIZE, QUOTA = 19, 256, 256, 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small ops: on a shared 2-core machine two torch threads wait on each other far more than they gain."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
FULL = tuple(range(0, 15))      # classes that reach 256 entries (older entries fall out)
PARTIAL = 15                    # rare class: a few vectors per add, ends with fewer than 256
SINGLE_MEMORY = 16              # one vector ever enters memory: skipped by the loss (needs > 1)
EMPTY_MEMORY = 17               # never in memory; present among the features
ABSENT = 18                     # neither in memory nor among the features


def selectors(seed: int) -> list[torch.nn.Sequential]:
    """The model's selector architecture (Linear 256-256, BN1d, LeakyReLU 0.2, Linear 256-1) with spread-out
    BatchNorm affine and output weights, so scores (and the weights they give) differ visibly between vectors."""
    torch.manual_seed(seed)
    out = []
    for _ in range(C):
        s = class_selector(D)
        with torch.no_grad():
            s[1].weight.uniform_(0.5, 1.5)
            s[1].bias.normal_(0.0, 0.5)
            s[3].weight.mul_(4.0)
        out.append(s)
    return out


def add_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Five updates of ~2000 vectors: the full classes get up to 4x the quota per add (ranked by the selector),
    the partial class fewer than the quota (kept as given), the single-memory class one vector once."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(5):
        counts = {c: int(torch.randint(QUOTA + 1, 4 * QUOTA, (1,), generator=g)) for c in FULL}
        counts[FULL[-1]] = QUOTA if k == 0 else counts[FULL[-1]]     # exactly the quota once: kept, not ranked
        counts[PARTIAL] = 7 + k
        if k == 2:
            counts[SINGLE_MEMORY] = 1
        labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
        labels = labels[torch.randperm(len(labels), generator=g)]
        x = torch.randn(len(labels), D, generator=g) * 2 + 0.5
        batches.append((x, labels))
    return batches


def reference_add(bank: list[torch.Tensor], x: torch.Tensor, labels: torch.Tensor, sel, quota: int, keep: str):
    """The release's update, one class at a time: a class with more than `quota` new vectors keeps the quota
    with the lowest (code) or highest (paper) sigmoid(selector) score, in that order; the new vectors go in
    front of the stored ones; the oldest beyond SIZE fall out."""
    for c in range(C):
        x_c = x[labels == c]
        if x_c.shape[0] == 0:
            continue
        if x_c.shape[0] > quota:
            score = torch.sigmoid(sel[c](x_c))[:, 0]
            order = torch.argsort(score, descending=keep == "highest", stable=True)
            x_c = x_c[order[:quota]]
        bank[c] = torch.cat([x_c, bank[c]])[:SIZE]


@pytest.fixture(scope="module", params=["lowest", "highest"])
def filled(request):
    """A MemoryBank filled by five adds, the reference bank beside it, and the selectors used (both copies)."""
    keep = request.param
    sel = selectors(1)
    sel_ref = copy.deepcopy(sel)
    bank = MemoryBank(C, size=SIZE, dim=D)
    ref = [torch.zeros(0, D) for _ in range(C)]
    with torch.no_grad():
        for x, labels in add_batches(2):
            bank.add(x, labels, sel, quota=QUOTA, keep=keep)
            reference_add(ref, x, labels, sel_ref, QUOTA, keep)
    return keep, bank, ref, sel, sel_ref


def test_bank_matches_the_per_class_procedure(filled):
    keep, bank, ref, sel, sel_ref = filled
    counts = bank.counts.tolist()
    assert counts == [r.shape[0] for r in ref]
    assert all(counts[c] == SIZE for c in FULL)
    assert 0 < counts[PARTIAL] < SIZE and counts[PARTIAL] == sum(7 + k for k in range(5))
    assert counts[SINGLE_MEMORY] == 1 and counts[EMPTY_MEMORY] == 0 and counts[ABSENT] == 0
    for c in range(C):
        torch.testing.assert_close(bank.class_memory(c), ref[c], rtol=0, atol=0)
    assert torch.equal(bank.memory[PARTIAL, counts[PARTIAL]:], torch.zeros(SIZE - counts[PARTIAL], D))
    for s, s_ref in zip(sel, sel_ref):   # only ranked classes ran their selector, and identically
        assert torch.equal(s[1].num_batches_tracked, s_ref[1].num_batches_tracked)
        torch.testing.assert_close(s[1].running_mean, s_ref[1].running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s[1].running_var, s_ref[1].running_var, atol=1e-5, rtol=1e-5)
    assert sel[FULL[0]][1].num_batches_tracked.item() == 5 and sel[PARTIAL][1].num_batches_tracked.item() == 0


def features_and_labels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """~2000 vectors: skewed full classes (one dominant, as road in Cityscapes), one vector of a full class,
    the single-memory and empty-memory classes present, one class absent."""
    g = torch.Generator().manual_seed(seed)
    counts = {c: int(n) for c, n in zip(FULL, torch.randint(40, 150, (len(FULL),), generator=g))}
    counts[0] = 700                         # the dominant class sets the padding of the grouped selectors
    counts[FULL[-1]] = 1                    # a single vector: skipped by the loss (needs > 1)
    counts[PARTIAL] = 30
    counts[SINGLE_MEMORY] = 25
    counts[EMPTY_MEMORY] = 40
    labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    labels = labels[torch.randperm(len(labels), generator=g)]
    return torch.randn(len(labels), D, generator=g) * 1.5 - 0.2, labels


@pytest.mark.parametrize("memory_weights", ["ones", "release", "mean"])
def test_contrastive_loss_on_full_bank_matches_reference(filled, memory_weights):
    _, bank, _, _, _ = filled
    feat, mem = selectors(3), selectors(4)
    feat_r, mem_r = copy.deepcopy(feat), copy.deepcopy(mem)
    x0, labels = features_and_labels(5)
    assert 1900 < len(labels) < 2400
    x, x_r = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)

    loss = contrastive_loss(x, labels, bank, feat, mem, C, memory_weights=memory_weights)
    ref = contrastive_loss_reference(x_r, labels, bank, feat_r, mem_r, C, memory_weights=memory_weights)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    # 15 classes qualify (> 1 vector and > 1 memory entry: 14 full, the partial one); the sum is divided by
    # all 19; random vectors with opposite mean offsets sit a little beyond orthogonal: distances about 1.03
    assert 0.9 < loss.item() * C / 15 < 1.2

    params = [p for s in feat + mem for p in s.parameters()]
    params_r = [p for s in feat_r + mem_r for p in s.parameters()]
    g = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    g_r = torch.autograd.grad(ref, [x_r] + params_r, allow_unused=True)
    for k, (a, b) in enumerate(zip(g, g_r)):
        if a is None or b is None:  # a parameter without a path in one must have none (or zeros) in the other
            other = b if a is None else a
            assert other is None or torch.count_nonzero(other) == 0, k
            continue
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    # gradient reaches the vectors of qualifying classes only
    gx = g[0]
    skipped = (labels == FULL[-1]) | (labels == SINGLE_MEMORY) | (labels == EMPTY_MEMORY)
    assert torch.count_nonzero(gx[skipped]) == 0 and torch.count_nonzero(gx[~skipped].abs().sum(1)) == (~skipped).sum()
    # feature selectors of qualifying classes get a gradient; memory selectors with "release" and "mean" weights
    per_selector = 6                        # Linear weight, bias; BatchNorm weight, bias; Linear weight, bias
    assert g[1] is not None and g[1].abs().sum() > 0                          # class 0's first Linear weight
    n_feat = per_selector * C
    assert all(g[1 + per_selector * c + k] is None or torch.count_nonzero(g[1 + per_selector * c + k]) == 0
               for c in (FULL[-1], SINGLE_MEMORY, EMPTY_MEMORY, ABSENT) for k in range(per_selector))
    mem_grads = [t for t in g[1 + n_feat:] if t is not None and torch.count_nonzero(t) > 0]
    assert (len(mem_grads) > 0) == (memory_weights != "ones")
    for s, s_r in zip(feat + mem, feat_r + mem_r):   # BatchNorm running statistics moved identically
        assert torch.equal(s[1].num_batches_tracked, s_r[1].num_batches_tracked)
        torch.testing.assert_close(s[1].running_mean, s_r[1].running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s[1].running_var, s_r[1].running_var, atol=1e-5, rtol=1e-5)
