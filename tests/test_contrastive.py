"""Contrastive loss (SPEC 5.4) and the grouped per-class selectors: hand-worked values and vectorised == loop."""
import copy
import math

import pytest
import torch
from torch import nn

from utils.contrastive import contrastive_loss, contrastive_loss_reference
from utils.errors import UserError
from utils.memory_bank import MemoryBank
from utils.selectors import grouped_selector_scores, reference_selector_scores


def sig(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def probe_selector(dim: int, coord: int, omega: float, bias: float, eps: float = 1e-5) -> nn.Sequential:
    """H=1 selector: Linear picks x[coord], BN(eps; tiny eps makes its output exact to 1e-10) with weight 1 bias 0, LeakyReLU(0.2), output omega*a + bias.
    omega=0 gives the constant bias whatever BN does."""
    s = nn.Sequential(nn.Linear(dim, 1), nn.BatchNorm1d(1, eps=eps), nn.LeakyReLU(0.2), nn.Linear(1, 1))
    with torch.no_grad():
        s[0].weight.zero_()
        s[0].weight[0, coord] = 1.0
        s[0].bias.zero_()
        s[3].weight.fill_(omega)
        s[3].bias.fill_(bias)
    return s


def random_selectors(num: int, dim: int, hidden: int) -> list[nn.Sequential]:
    out = []
    for _ in range(num):
        s = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        with torch.no_grad():
            s[1].weight.uniform_(0.5, 1.5)
            s[1].bias.normal_(0, 0.5)
            s[3].weight.mul_(3)
        out.append(s)
    return out


def bank_with(memory_rows: dict[int, list[list[float]]], num_classes: int, size: int, dim: int) -> MemoryBank:
    bank = MemoryBank(num_classes, size=size, dim=dim)
    mem = torch.zeros(num_classes, size, dim)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for c, rows in memory_rows.items():
        mem[c, : len(rows)] = torch.tensor(rows, dtype=torch.float32)
        counts[c] = len(rows)
    bank.load_state_dict({"memory": mem, "counts": counts})
    return bank


def params_of(selectors):
    return [p for s in selectors for p in s.parameters()]


def grads(loss, params):
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]


# ---------------------------------------------------------------- hand-worked case
E0, E1, E2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
C_HAND = 5


def hand_case(feature_omega: float = 5.0):
    """Class 0: X = {2e0, 3e1}, memory {e0, e1, e1}. Class 1: X = {e1, -e1, e2}, memory {e1, e2}.
    Class 2: two vectors but one memory entry; class 3: one vector, two memory entries; class 4: nothing."""
    bank = bank_with({0: [E0, E1, E1], 1: [E1, E2], 2: [E0], 3: [E0, E1]}, C_HAND, size=4, dim=3)
    x = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 3, 0], [0, -1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0],
                      [0, 0, 1]], requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 2, 2, 3])
    feat = [probe_selector(3, 0, feature_omega, 1.0, eps=1e-10)] + [probe_selector(3, 1, 0.0, 0.7)
                                                                 for _ in range(C_HAND - 1)]
    mem_sel = [probe_selector(3, 0, 2.0, 0.0, eps=1e-10)] + [probe_selector(3, 1, 0.0, -0.3)
                                                          for _ in range(C_HAND - 1)]
    return x, y, bank, feat, mem_sel


def hand_expected(mode: str, feature_omega: float = 5.0) -> float:
    # Class 0 feature selector on coordinate 0 of (2, 0): BN -> (+1, -1), LeakyReLU -> (1, -0.2).
    sa, sb = sig(feature_omega * 1 + 1), sig(feature_omega * -0.2 + 1)
    wa, wb = 2 * sa / (sa + sb), 2 * sb / (sa + sb)
    # distances: x_a = e0 vs (e0, e1, e1) -> (0, 1, 1); x_b = e1 -> (1, 0, 0)
    if mode in ("ones", "release"):  # "release": (1/s)·s, 1 up to a rounding of 2^-24
        loss0 = (wa * 2 + wb * 1) / 6
    else:
        # memory selector on coordinate 0 of (1, 0, 0): mean 1/3, biased var 2/9 -> (sqrt2, -1/sqrt2, -1/sqrt2)
        r2 = math.sqrt(2)
        raw = [sig(2 * r2), sig(2 * -0.2 / r2), sig(2 * -0.2 / r2)]
        v = [3 * t / sum(raw) for t in raw]
        loss0 = (wa * (v[1] + v[2]) + wb * v[0]) / 6
    loss1 = 5 / 6  # constant selectors: plain mean of (0,1; 2,1; 1,0)
    return (loss0 + loss1) / C_HAND


@pytest.mark.parametrize("mode", ["ones", "release", "mean"])
@pytest.mark.parametrize("impl", [contrastive_loss, contrastive_loss_reference])
def test_hand_worked_value(mode, impl):
    x, y, bank, feat, mem_sel = hand_case()
    loss = impl(x, y, bank, feat, mem_sel, C_HAND, memory_weights=mode)
    assert loss.item() == pytest.approx(hand_expected(mode), abs=1e-6)
    assert hand_expected("ones") != pytest.approx(hand_expected("mean"), abs=1e-3)  # the modes differ here
    if mode == "ones":  # the default memory weights are the released "ones"
        assert impl(x, y, bank, feat, mem_sel, C_HAND).item() == loss.item()
    # labels of another integer dtype (uint8, as a label PNG holds them) give the same loss
    assert impl(x, y.to(torch.uint8), bank, feat, mem_sel, C_HAND, memory_weights=mode).item() == loss.item()


@pytest.mark.parametrize("mode", ["ones", "mean"])
def test_float64_features_with_the_float32_memory(mode):
    """Features and selectors in float64 against the bank's float32 memory: the memory is brought to the features'
    dtype, and the loss comes out in float64 with the hand-worked value."""
    x, y, bank, feat, mem_sel = hand_case()
    loss = contrastive_loss(x.detach().double(), y, bank, [s.double() for s in feat], [s.double() for s in mem_sel],
                            C_HAND, memory_weights=mode)
    assert loss.dtype == torch.float64 and bank.memory.dtype == torch.float32
    assert loss.item() == pytest.approx(hand_expected(mode), abs=1e-9)


@pytest.mark.parametrize("method", ["segments", "blocks"])
def test_the_selector_method_reaches_both_selector_calls(method, monkeypatch):
    """selector_method is passed to the feature side's and the memory side's selector scoring."""
    import utils.contrastive as contrastive
    seen = []
    for name in ("grouped_selector_scores", "padded_selector_scores"):
        real = getattr(contrastive, name)
        monkeypatch.setattr(contrastive, name, lambda *a, _real=real, _name=name, **k: (
            seen.append((_name, k.get("method"))), _real(*a, **k))[1])
    x, y, bank, feat, mem_sel = hand_case()
    loss = contrastive_loss(x, y, bank, feat, mem_sel, C_HAND, memory_weights="mean", selector_method=method)
    assert loss.item() == pytest.approx(hand_expected("mean"), abs=1e-6)
    assert sorted(seen) == [("grouped_selector_scores", method), ("padded_selector_scores", method)]


def test_release_memory_weights_values_and_rounding_gradient():
    """The release's memory weight (1 / s) · s in float32, worked by hand: 1 or 1 - 2^-24 (never more than one
    rounding from 1) and, for an upstream gradient g, the gradient g·r - (g·s)·r² (r = 1/s rounded: its two paths,
    which cancel in exact arithmetic), a rounding residue: zero for powers of two, nonzero for most other s. Where
    that backward would overflow (s below ~5e-20; the release's gradient is then inf or NaN) the weight is 1 with
    no gradient, and no NaN reaches s."""
    from utils.contrastive import release_memory_weights
    s = torch.sigmoid(torch.linspace(-12, 12, 2001)).requires_grad_(True)   # float32
    v = release_memory_weights(s)
    r = s.detach().reciprocal()
    assert torch.equal(v.detach(), (r * 1) * s.detach())                    # the hand computation, bit for bit
    assert set((v.detach().double() - 1).unique().tolist()) <= {0.0, -2.0 ** -24, 2.0 ** -23}
    assert (v.detach() != 1).any()
    g = torch.rand(s.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(v, s, g)
    assert torch.equal(grad, g * r + (-(g * s.detach()) * (r * r)))
    # a residue of a few ulps of g·r: through sigmoid' = s(1 - s) a score gets at most ~2.4e-7 of g
    assert (grad != 0).float().mean() > 0.3 and bool(((grad * s.detach()).abs() <= 4 * 2.0 ** -24 * g).all())
    halves = torch.tensor([0.5, 0.25], requires_grad=True)                  # exact reciprocals: exact cancelling
    (g_exact,) = torch.autograd.grad(release_memory_weights(halves).sum(), halves)
    assert g_exact.tolist() == [0.0, 0.0]
    tiny = torch.tensor([0.0, 1e-30, 1e-21, 0.3], requires_grad=True)
    v = release_memory_weights(tiny)
    (g_tiny,) = torch.autograd.grad(v.sum(), tiny)
    assert v.tolist()[:3] == [1.0, 1.0, 1.0] and g_tiny.tolist()[:3] == [0.0, 0.0, 0.0]
    assert torch.isfinite(g_tiny).all()


def test_release_weights_give_every_qualifying_memory_selector_a_rounding_gradient():
    """memory_weights="release" (fidelity code): the loss and the feature-side gradients are those of weights 1
    (the per-class reference with the release's own operations agrees to float tolerance); each memory selector of
    a qualifying class runs in train mode (its running statistics those of the reference, bit for bit on the CPU)
    and every one of its parameters gets a gradient, of rounding size (1e-13 to 1e-7 here; the first Linear's bias,
    zero in exact arithmetic since BatchNorm follows it, ~1e-16), as in the reference;
    the other classes' memory selectors get none."""
    torch.manual_seed(0)
    C, D, S = 6, 256, 16
    counts = torch.tensor([S, 9, 1, 0, S, 3])
    bank = MemoryBank(C, size=S, dim=D)
    bank.load_state_dict({"memory": torch.randn(C, S, D), "counts": counts})
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([12, 7, 5, 4, 1, 6])])
    x0 = torch.randn(len(y), D) * 2
    feat, mem = random_selectors(C, D, D), random_selectors(C, D, D)
    out = {}
    for name, fn, kw in (("release", contrastive_loss, {}), ("reference", contrastive_loss_reference, {}),
                         ("ones", contrastive_loss, {})):
        fs, ms = copy.deepcopy(feat), copy.deepcopy(mem)
        x = x0.clone().requires_grad_(True)
        loss = fn(x, y, bank, fs, ms, C, memory_weights="ones" if name == "ones" else "release")
        loss.backward()
        out[name] = (loss, x.grad, fs, ms)
    loss, gx, fs, ms = out["release"]
    assert loss.item() == pytest.approx(out["reference"][0].item(), rel=1e-6)
    assert loss.item() == pytest.approx(out["ones"][0].item(), rel=1e-6)
    torch.testing.assert_close(gx, out["reference"][1], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(gx, out["ones"][1], rtol=1e-4, atol=1e-9)
    qualifying = {0, 1, 5}  # > 1 vector and > 1 memory entry
    for c in range(C):
        for (name, p), p_ref in zip(ms[c].named_parameters(), out["reference"][3][c].parameters()):
            if c not in qualifying:
                assert p.grad is None and p_ref.grad is None, (c, name)
                continue
            assert p.grad is not None and p_ref.grad is not None, (c, name)
            for grad in (p.grad, p_ref.grad):  # the first Linear's bias: zero in exact arithmetic (BatchNorm follows)
                assert (1e-17 if name == "0.bias" else 1e-13) < float(grad.abs().max()) < 1e-7, (c, name)
        for b, b_ref in zip(ms[c].buffers(), out["reference"][3][c].buffers()):
            assert torch.equal(b, b_ref), c
        moved = int(ms[c][1].num_batches_tracked)
        assert moved == (1 if c in qualifying else 0), c
    assert all(p.grad is None for m in out["ones"][3] for p in m.parameters())  # "ones": never evaluated


def test_ones_mode_is_unweighted_mean_and_never_runs_memory_selectors():
    # constant feature weights: class 0 -> mean(0,1,1,1,0,0) = 1/2, class 1 -> 5/6; memory selectors unused
    x, y, bank, feat, _ = hand_case(feature_omega=0.0)
    loss = contrastive_loss(x, y, bank, feat, None, C_HAND, memory_weights="ones")
    assert loss.item() == pytest.approx((0.5 + 5 / 6) / C_HAND, abs=1e-6)


def test_skipped_classes_and_division_by_all_classes():
    x, y, bank, feat, mem_sel = hand_case()
    base = contrastive_loss(x, y, bank, feat, mem_sel, C_HAND).item()
    # Same data with 10 classes (extra classes empty): the sum is divided by 10 instead of 5.
    bank10 = bank_with({0: [E0, E1, E1], 1: [E1, E2], 2: [E0], 3: [E0, E1]}, 10, size=4, dim=3)
    feat10 = feat + [probe_selector(3, 1, 0.0, 0.7) for _ in range(5)]
    loss10 = contrastive_loss(x, y, bank10, feat10, None, 10).item()
    assert loss10 == pytest.approx(base * C_HAND / 10, abs=1e-7)
    # Only classes 2 (one memory entry) and 3 (one vector): nothing qualifies -> exactly 0, grad path kept.
    keep = (y == 2) | (y == 3)
    xs = x.detach()[keep].clone().requires_grad_(True)
    zero = contrastive_loss(xs, y[keep], bank, feat, mem_sel, C_HAND, memory_weights="mean")
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.equal(xs.grad, torch.zeros_like(xs))
    # No vectors at all.
    empty = torch.zeros(0, 3, requires_grad=True)
    assert contrastive_loss(empty, torch.zeros(0, dtype=torch.long), bank, feat, None, C_HAND).item() == 0.0


def test_gradient_reaches_features_and_selectors_not_memory():
    x, y, bank, feat, mem_sel = hand_case()
    loss = contrastive_loss(x, y, bank, feat, mem_sel, C_HAND, memory_weights="mean")
    loss.backward()
    assert not bank.memory.requires_grad
    assert x.grad[y == 0].abs().sum() > 0 and x.grad[y == 1].abs().sum() > 0
    assert torch.equal(x.grad[y >= 2], torch.zeros_like(x.grad[y >= 2]))  # skipped classes get nothing
    assert feat[0][3].weight.grad.abs().sum() > 0        # feature selector through w
    assert mem_sel[0][3].weight.grad.abs().sum() > 0     # memory selector through v ("mean")
    assert feat[2][3].weight.grad is None or feat[2][3].weight.grad.abs().sum() == 0


def test_bad_mode_is_user_error():
    x, y, bank, feat, mem_sel = hand_case()
    with pytest.raises(UserError, match="memory_weights"):
        contrastive_loss(x, y, bank, feat, mem_sel, C_HAND, memory_weights="median")


# ---------------------------------------------------------------- vectorised == reference
@pytest.mark.parametrize("mode", ["ones", "release", "mean"])
def test_vectorised_matches_reference_c19(mode):
    torch.manual_seed(0)
    C, D, S = 19, 256, 24
    feat = random_selectors(C, D, D)
    mem_sel = random_selectors(C, D, D)
    feat_r, mem_r = copy.deepcopy(feat), copy.deepcopy(mem_sel)
    # memory: full classes (S entries), partly filled, single-entry and empty classes
    counts = torch.tensor([S, S, 5, 1, 0, S, 2, 7, 0, 3, S, 1, 9, S, 4, 0, 6, S, 2])
    mem = torch.randn(C, S, D) * (torch.arange(S)[None, :] < counts[:, None])[:, :, None]
    bank = MemoryBank(C, size=S, dim=D)
    bank.load_state_dict({"memory": mem, "counts": counts})
    # features: classes with many, one, or no vectors
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([9, 1, 6, 4, 5, 0, 3, 1, 0, 2, 7, 3, 0, 2, 8, 1, 4,
                                                                0, 5])])
    y = y[torch.randperm(len(y))]
    x = (torch.randn(len(y), D) * 2).requires_grad_(True)
    x_r = x.detach().clone().requires_grad_(True)

    loss = contrastive_loss(x, y, bank, feat, mem_sel, C, memory_weights=mode)
    ref = contrastive_loss_reference(x_r, y, bank, feat_r, mem_r, C, memory_weights=mode)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    g = grads(loss, [x] + params_of(feat) + params_of(mem_sel))
    g_r = grads(ref, [x_r] + params_of(feat_r) + params_of(mem_r))
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert g[0].abs().sum() > 0
    for s, s_r in zip(feat + mem_sel, feat_r + mem_r):  # BN running statistics updated identically
        torch.testing.assert_close(s[1].running_mean, s_r[1].running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s[1].running_var, s_r[1].running_var, atol=1e-6, rtol=1e-5)
        assert torch.equal(s[1].num_batches_tracked, s_r[1].num_batches_tracked)


# ---------------------------------------------------------------- grouped selectors
def _grouped_case(seed: int = 1):
    torch.manual_seed(seed)
    C, D, H = 7, 16, 12
    sel = random_selectors(C, D, H)
    sel[4][1].momentum = None                      # cumulative average variant of nn.BatchNorm1d
    sel[2][2].negative_slope = 0.1                 # slope read from each module
    sizes = [6, 0, 5, 1, 9, 3, 2]                  # an empty class and a single-vector class
    g = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    g = g[torch.randperm(len(g))]
    x = torch.randn(len(g), D) * 3 + 1
    active = torch.tensor([True, True, True, False, True, False, True])  # class 3 (one vector) inactive
    return x, g, sel, active


def test_grouped_scores_grads_and_running_stats_match_loop():
    x, g, sel, active = _grouped_case()
    sel_r = copy.deepcopy(sel)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for _ in range(2):  # two steps: the running statistics accumulate
        s = grouped_selector_scores(xa, g, sel, active)
        s_r = reference_selector_scores(xb, g, sel_r, active)
    torch.testing.assert_close(s, s_r, atol=1e-5, rtol=1e-5)
    assert torch.equal(s[~active[g]], torch.zeros_like(s[~active[g]]))   # inactive classes score 0
    weight = torch.randn(len(g))
    ga = grads((s * weight).sum(), [xa] + params_of(sel))
    gb = grads((s_r * weight).sum(), [xb] + params_of(sel_r))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for c, (m, m_r) in enumerate(zip(sel, sel_r)):
        torch.testing.assert_close(m[1].running_mean, m_r[1].running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m[1].running_var, m_r[1].running_var, atol=1e-6, rtol=1e-5)
        assert m[1].num_batches_tracked.item() == m_r[1].num_batches_tracked.item()
    # updated: active classes with > 1 vector (0, 2, 4, 6); untouched: empty 1, inactive 3 and 5
    assert [m[1].num_batches_tracked.item() for m in sel] == [2, 0, 2, 0, 2, 0, 2]
    assert torch.equal(sel[5][1].running_mean, torch.zeros(12))


def test_grouped_eval_mode_uses_running_stats():
    x, g, sel, active = _grouped_case(seed=2)
    grouped_selector_scores(x, g, sel, active)           # give the running stats non-default values
    for s in sel[::2]:
        s.eval()                                         # classes 0, 2, 4, 6 in eval mode, the rest train
    sel_r = copy.deepcopy(sel)
    before = [m[1].running_mean.clone() for m in sel]
    s = grouped_selector_scores(x, g, sel, active)
    s_r = reference_selector_scores(x, g, sel_r, active)
    torch.testing.assert_close(s, s_r, atol=1e-5, rtol=1e-5)
    for c in (0, 2, 4, 6):                               # eval classes: running stats untouched
        assert torch.equal(sel[c][1].running_mean, before[c])
    for m, m_r in zip(sel, sel_r):
        torch.testing.assert_close(m[1].running_mean, m_r[1].running_mean, atol=1e-6, rtol=1e-5)
        assert m[1].num_batches_tracked.item() == m_r[1].num_batches_tracked.item()
    for s_ in sel + sel_r:                               # all in eval mode
        s_.eval()
    s = grouped_selector_scores(x, g, sel, active)
    torch.testing.assert_close(s, reference_selector_scores(x, g, sel_r, active), atol=1e-5, rtol=1e-5)
    assert [m[1].num_batches_tracked.item() for m in sel] == [1, 0, 1, 0, 1, 0, 1]


def test_grouped_bn_hand_value_and_nothing_active():
    # one class, two vectors with coordinate 0 = 2 and 0: BN -> (+1, -1), LeakyReLU -> (1, -0.2), 5a + 1
    sel = [probe_selector(3, 0, 5.0, 1.0, eps=1e-10)]
    x = torch.tensor([[2.0, 7, 7], [0.0, -7, 7]])
    s = grouped_selector_scores(x, torch.zeros(2, dtype=torch.long), sel)
    torch.testing.assert_close(s, torch.tensor([6.0, 0.0]))
    bn = sel[0][1]  # running: 0.9*0 + 0.1*mean(1) ; 0.9*1 + 0.1*unbiased var(2)
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.1]))
    torch.testing.assert_close(bn.running_var, torch.tensor([1.1]))
    none = grouped_selector_scores(x, torch.zeros(2, dtype=torch.long), sel, torch.tensor([False]))
    assert torch.equal(none, torch.zeros(2)) and bn.num_batches_tracked.item() == 1
