"""The wiring of a real `Run`: what trainSSL.py's loop hands to each building block, observed inside two tiny runs
(fidelity "code" and "paper") and compared with values worked out by hand (tests/run_helpers.py), not with the
functions under test.

Each run: trainSSL.py on synthetic scenes, N = 5 iterations, ramp-up R = 2 (pseudo-label ramp before 2, class
weights and contrastive terms after 2), memory from iteration 2 on with a confidence threshold of 0.5, the memory
quota cut to 3 vectors per class and update so that the selectors rank, the student's memory selectors' last
layer scaled by 100 (their scores spread, so that the memory-weight forms differ by far). The teacher's outputs for the memory
update are PLANTED (its forward is replaced when it is asked for features), so which labeled pixels are confident
and which are correct is known:
  labeled image 0: every pixel predicts class k0 (the most frequent label of its feature-grid pixels) with
                   confidence 0.9 > 0.5: exactly its pixels labelled k0 enter the memory;
  labeled image 1: a tie of its two most frequent classes, confidence exactly 0.5, not above the threshold:
                   none of its pixels enters, although half of them are predicted correctly.
Probes record, per iteration: the learning rate the optimiser holds when it steps, the teacher against the EMA
of the student with alpha by hand, the pseudo-label pixel weights, the class weights the losses receive, the
vectors that enter the projection head and the memory, which of them the memory keeps, the contrastive loss
against both memory-weight forms, the entropy term and the DeepLabv2 classifier's sum.
"""
from __future__ import annotations

import copy
import math
import os
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainSSL
from tests.run_helpers import (DEMO, TINY_WIDTH, TeacherProbe, argv_of, ema_alpha_by_hand, poly_by_hand,
                               ramp_by_hand, single_thread, tiny_sets)
from engine.run import Run
from utils import ssl_steps
from utils.variants import LESS_MEMORY, TRAIN_SSL, resolve_method

N, R = 5, 2
BASE_LR = 0.01
THRESHOLD = 0.5
QUOTA = 3
C = 8           # synthetic classes
IGNORE = 250


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def sampled(size: int, out: int) -> list[int]:
    """The pixels a nearest-neighbour resize from `size` to `out` reads: floor(j size / out)."""
    return [j * size // out for j in range(out)]


def counts(labels: torch.Tensor) -> np.ndarray:
    values = labels.reshape(-1).numpy()
    return np.bincount(values[values < C], minlength=C).astype(np.float64)


def balancing_by_hand(f: np.ndarray) -> np.ndarray:
    """sqrt(median(f) / f); a class never seen gets the largest finite weight (at least 1) (SPEC 5.3)."""
    median = np.median(f)
    seen = f > 0
    w = np.where(seen, median / np.where(seen, f, 1.0), 0.0)
    w[~seen] = max(w[seen].max(), 1.0)
    return np.sqrt(w)


def contrastive_by_hand(x, labels, memory, mem_counts, feature_selectors, memory_selectors, weights: str):
    """SPEC 5.4 written out class by class: 1 - cosine distances, feature weights sigmoid(selector) rescaled to mean
    1, memory weights 1 ("ones"), the release's sigmoid(memory selector) divided by itself, (1 / s) * s ("release"),
    or sigmoid(memory selector) rescaled to mean 1 ("mean"); sum over classes / C."""
    total = 0.0
    for c in range(C):
        xc = x[labels == c]
        mc = memory[c, : int(mem_counts[c])]
        if xc.shape[0] < 2 or mc.shape[0] < 2:
            continue
        xh, mh = xc / xc.norm(dim=1, keepdim=True), mc / mc.norm(dim=1, keepdim=True)
        distance = 1 - xh @ mh.T
        w = torch.sigmoid(copy.deepcopy(feature_selectors[c])(xc))[:, 0]
        w = w * xc.shape[0] / w.sum()
        v = torch.ones(mc.shape[0])
        if weights == "mean":
            v = torch.sigmoid(copy.deepcopy(memory_selectors[c])(mh))[:, 0]
            v = v * mc.shape[0] / v.sum()
        elif weights == "release":
            s = torch.sigmoid(copy.deepcopy(memory_selectors[c])(mh))[:, 0]
            v = (1.0 / s) * s
        total += float((w[:, None] * v[None, :] * distance).mean())
    return total / C


class Recorder:
    """Probes on one Run and on the step functions of utils/ssl_steps.py (the loop calls them through the module)."""

    def __init__(self, run: Run, mp: pytest.MonkeyPatch):
        self.run = run
        self.lr: dict[int, list[float]] = {}
        self.balancing_inputs: dict[int, tuple] = {}
        self.sup_weights: dict[int, torch.Tensor] = {}
        self.pseudo_weights: dict[int, torch.Tensor] = {}
        self.pixel_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # i -> (pixel weight, confidence)
        self.entropy: dict[int, dict] = {}
        self.memory_updates: list[dict] = []
        self.contrastive: list[dict] = []
        self.classifier: tuple | None = None
        self.teacher = TeacherProbe(run, div=10, other_div=1)
        self.memory_selectors_at_start = copy.deepcopy(run.student_module.memory_selectors())
        run.memory_quota = QUOTA  # per_class_quota has its own tests; here the selectors must rank
        self._planted: dict | None = None
        self._projected: list[torch.Tensor] = []

        step = run.optimizer.step

        def optimizer_step(*a, **k):
            self.lr[run.iteration] = [g["lr"] for g in run.optimizer.param_groups]
            return step(*a, **k)
        run.optimizer.step = optimizer_step

        update_cw = run.update_class_weights

        def update_class_weights(i, labels, pseudo, after_ramp_up=True):
            self.balancing_inputs[i] = (labels.clone(), pseudo.clone())
            return update_cw(i, labels, pseudo, after_ramp_up)
        run.update_class_weights = update_class_weights

        supervised_ce, pseudo_label_ce = ssl_steps.supervised_ce, ssl_steps.pseudo_label_ce

        def sup(logits, labels, ignore_label, weight=None):
            self.sup_weights[run.iteration] = weight.clone()
            return supervised_ce(logits, labels, ignore_label, weight)

        def pseudo(logits, labels, pixel_weight, ignore_label, weight=None):
            self.pseudo_weights[run.iteration] = weight.clone()
            self._pixel_weight = pixel_weight.detach().clone()
            return pseudo_label_ce(logits, labels, pixel_weight, ignore_label, weight)
        mp.setattr(ssl_steps, "supervised_ce", sup)
        mp.setattr(ssl_steps, "pseudo_label_ce", pseudo)

        unlabeled_losses = ssl_steps.unlabeled_losses

        def unlabeled(run_, i, logits, pseudo_labels, confidence, class_weights, broadcast=False):
            out = unlabeled_losses(run_, i, logits, pseudo_labels, confidence, class_weights, broadcast)
            self.pixel_weights[i] = (self._pixel_weight, confidence.detach().clone())
            with torch.no_grad():  # the entropy term written out per image, and with the release's [n,1,h,w] mask
                n, c, h, w = logits.shape
                q = torch.softmax(logits, dim=1)
                plogq = (q * torch.log2(q + 1e-30)).sum(dim=1)
                mask = (pseudo_labels != IGNORE).float()
                scale = n * h * w * math.log2(c) * mask.mean()
                self.entropy[i] = {"term": float(out[1]), "per_image": float(-(mask * plogq).sum() / scale),
                                   "broadcast": float(-(mask.unsqueeze(1) * plogq).sum() / scale)}
            return out
        mp.setattr(ssl_steps, "unlabeled_losses", unlabeled)

        update_memory = ssl_steps.update_memory

        def memory_update(run_, images, labels):
            self._labels = labels
            self._projected.clear()
            update_memory(run_, images, labels)
            self.memory_updates[-1]["projected_input"] = list(self._projected)
        mp.setattr(ssl_steps, "update_memory", memory_update)
        run.teacher.projection_head.register_forward_pre_hook(
            lambda m, args: self._projected.append(args[0].detach().clone()))
        self._plant_teacher()

        add = run.memory.add

        def memory_add(features, labels, selectors, quota, keep="lowest", **kw):
            record = self.memory_updates[-1]
            record.update(features=features.clone(), labels=labels.clone(), keep=keep, quota=quota, kept={})
            x = features.detach()
            with torch.no_grad():
                for c in range(C):
                    xc = x[labels == c]
                    if xc.shape[0] > quota:  # ranked: the scores by hand, from a copy of the class's selector
                        score = torch.sigmoid(copy.deepcopy(selectors[c])(xc))[:, 0]
                        record["kept"][c] = {"vectors": xc, "score": score}
            add(features, labels, selectors, quota, keep=keep, **kw)
            for c, k in record["kept"].items():
                k["stored"] = run.memory.memory[c, :quota].clone()
        run.memory.add = memory_add

        contrastive_loss = ssl_steps.contrastive_loss

        def contrastive(features, labels, memory, feature_selectors, memory_selectors, num_classes, **kw):
            with torch.no_grad():
                x = features.detach()
                hand = {w: contrastive_by_hand(x, labels, memory.memory, memory.counts, feature_selectors,
                                               memory_selectors, w) for w in ("ones", "release", "mean")}
                present = torch.bincount(labels, minlength=C)
                qualifying = [c for c in range(C) if present[c] > 1 and memory.counts[c] > 1]
            out = contrastive_loss(features, labels, memory, feature_selectors, memory_selectors, num_classes, **kw)
            self.contrastive.append({"i": run.iteration, "value": float(out.detach()), "qualifying": qualifying,
                                     **hand})
            return out
        mp.setattr(ssl_steps, "contrastive_loss", contrastive)

        layer5 = run.student_module.layer5

        def classifier_hook(module, args, output):
            if self.classifier is None:  # the first forward, with the weights it used
                weights = [(conv.weight.detach().clone(), conv.bias.detach().clone()) for conv in module.conv2d_list]
                self.classifier = (args[0].detach().clone(), output.detach().clone(), weights)
        layer5.register_forward_hook(classifier_hook)

    def _plant_teacher(self) -> None:
        """The teacher's forward with features (the memory update only) returns planted logits (at crop size, so
        the upsampling leaves them as they are) and planted random features; see the module docstring."""
        run, teacher = self.run, self.run.teacher
        real_forward = teacher.forward
        generator = torch.Generator().manual_seed(0)

        def forward(x, return_features=False):
            if not return_features:
                return real_forward(x)
            _, real_features = real_forward(x, return_features=True)
            b, channels, h, w = real_features.shape
            H, W = run.crop
            labels_down = self._labels[:, sampled(H, h)][:, :, sampled(W, w)]         # [B,h,w]
            k0 = int(torch.mode(labels_down[0][labels_down[0] < C]).values)
            frequent = counts(labels_down[1]).argsort()[::-1]
            k1, k1b = int(frequent[0]), int(frequent[1])
            logits = torch.zeros(b, C, H, W)
            logits[0, k0] = math.log(63.0)          # softmax: 63 / (63 + 7) = 0.9
            logits[1] = -30.0
            logits[1, k1] = logits[1, k1b] = 0.0    # 1 / (1 + 1 + 6 e^-30) = 0.5 exactly in float32
            features = torch.randn(b, channels, h, w, generator=generator)
            admitted = torch.zeros(b, h, w, dtype=torch.bool)
            admitted[0] = labels_down[0] == k0
            self.memory_updates.append({
                "i": run.iteration, "k0": k0, "labels_down": labels_down,
                "expected_vectors": features.permute(0, 2, 3, 1)[admitted],
                "expected_labels": labels_down[admitted],
                # what a missing confidence test or a missing correctness test would let in
                "unconfident_correct": int((labels_down[1] == min(k1, k1b)).sum()),
                "confident_wrong": int(((labels_down[0] != k0) & (labels_down[0] < C)).sum())})
            return logits, features

        teacher.forward = forward


def train(tmp_path_factory, fidelity: str) -> Recorder:
    run_dir = str(tmp_path_factory.mktemp(f"run_{fidelity}"))
    sets = tiny_sets(run_dir, N, fidelity=fidelity, **{
        "training.learning_rate": BASE_LR, "method.ramp_up_iterations": R, "method.memory_start_offset": 1,
        "method.memory_confidence": THRESHOLD})
    run = Run(TRAIN_SSL, argv_of(sets))
    run.finish = lambda: run.logger.close()
    with torch.no_grad():  # memory selectors with spread-out scores, so the two memory-weight forms differ by far
        for selector in run.student_module.memory_selectors():
            selector[3].weight.mul_(100.0)
    with pytest.MonkeyPatch.context() as mp:
        recorder = Recorder(run, mp)
        trainSSL.train(run)
    return recorder


@pytest.fixture(scope="module")
def code_run(tmp_path_factory) -> Recorder:
    return train(tmp_path_factory, "code")


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> Recorder:
    return train(tmp_path_factory, "paper")


# ------------------------------------------------------------------------------------------------------ tests
def test_optimiser_steps_with_the_poly_learning_rate(code_run):
    """The rate the SGD step uses (read from the optimiser's one group when it steps), not the logged one."""
    assert sorted(code_run.lr) == list(range(N))
    for i, rates in code_run.lr.items():
        assert rates == [pytest.approx(poly_by_hand(BASE_LR, i, N), rel=1e-12)], i
    # 0.01 (1 - 3/5)^0.9 = 0.01 * 0.4^0.9 = 0.0043838...
    assert code_run.lr[3][0] == pytest.approx(0.0043838, rel=1e-4)


def test_teacher_is_the_ema_of_the_student_with_trainssl_warm_up(code_run):
    """alpha_i = min(1 - 1/(10 i + 1), m_i): 0 at i = 0 (teacher = student), 10/11 at i = 1, 20/21 at i = 2 ..."""
    probe = code_run.teacher
    assert sorted(probe.deviation) == list(range(N))
    for i in range(N):
        assert probe.deviation[i] < 1e-6, (i, probe.deviation[i])
    # the other scripts' warm-up 1 - 1/(i + 1) would leave a visibly different teacher
    assert all(probe.other_deviation[i] > 1e-4 for i in range(1, N)), probe.other_deviation


def test_pseudo_label_weight_is_ramp_times_confidence_power(code_run):
    """pixel weight = exp(-5 (1 - i/R)^2) p^6 before R (exp(-5), exp(-1.25)), p^6 from R on."""
    assert sorted(code_run.pixel_weights) == list(range(N))
    assert ramp_by_hand(0, R) == pytest.approx(0.006737947) and ramp_by_hand(1, R) == pytest.approx(0.2865048)
    for i, (weight, confidence) in code_run.pixel_weights.items():
        assert confidence.shape == weight.shape and confidence.max() < 1
        expected = ramp_by_hand(i, R) * confidence.double() ** 6
        torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)


def test_class_weights_are_ones_until_r_then_balanced(code_run):
    """Class balancing: 1 labeled slot (iteration 0's labels) and 2 unlabeled slots (the two latest pseudo-label
    maps): full from iteration 1 on, but the losses get ones while i <= R and sqrt(median(f)/f) after R."""
    rec = code_run
    assert sorted(rec.balancing_inputs) == sorted(rec.sup_weights) == sorted(rec.pseudo_weights) == list(range(N))
    labeled = counts(rec.balancing_inputs[0][0])
    pseudo = {i: counts(p) for i, (_, p) in rec.balancing_inputs.items()}
    balanced = {i: balancing_by_hand(labeled + pseudo[i] + pseudo[i - 1]) for i in range(1, N)}
    assert not np.allclose(balanced[1], 1) and not np.allclose(balanced[2], 1)  # full, yet not used before R
    for i in range(N):
        expected = np.ones(C) if i <= R else balanced[i]
        for used in (rec.sup_weights[i], rec.pseudo_weights[i]):
            np.testing.assert_allclose(used.numpy(), expected, rtol=1e-6, err_msg=f"iteration {i}")


def check_memory_updates(rec: Recorder, keep: str) -> None:
    updates = rec.memory_updates
    assert [u["i"] for u in updates] == [2, 3, 4]  # memory from iteration R - offset + 1 = 2 on
    for u in updates:
        # the confidence filter (image 1 is predicted correctly at these pixels) and the correctness filter (image 0
        # is confident at these) both have something to reject
        assert u["unconfident_correct"] > 0 and u["confident_wrong"] > 0, u["i"]
        (projected_input,) = u["projected_input"]
        assert torch.equal(projected_input, u["expected_vectors"]), u["i"]
        assert torch.equal(u["labels"], u["expected_labels"]) and set(u["labels"].tolist()) == {u["k0"]}
        assert u["keep"] == keep and u["quota"] == QUOTA
        (kept,) = u["kept"].values()                     # only class k0 entered, with more than the quota
        order = torch.argsort(kept["score"], descending=keep == "highest")
        assert torch.equal(kept["stored"], kept["vectors"][order[:QUOTA]]), u["i"]
        other = torch.argsort(kept["score"], descending=keep != "highest")
        assert not torch.equal(kept["stored"], kept["vectors"][other[:QUOTA]])
    expected_counts = [QUOTA * sum(u["k0"] == c for u in updates) for c in range(C)]
    assert rec.run.memory.counts.tolist() == expected_counts


def test_memory_admits_confident_correct_pixels_and_keeps_lowest_scores(code_run):
    check_memory_updates(code_run, "lowest")


def test_paper_memory_keeps_highest_scores(paper_run):
    check_memory_updates(paper_run, "highest")


@pytest.mark.parametrize("fidelity, weights", [("code", "release"), ("paper", "mean")])
def test_contrastive_memory_weights_of_the_preset(fidelity, weights, code_run, paper_run):
    rec = code_run if fidelity == "code" else paper_run
    other = "mean" if weights == "release" else "ones"
    calls = rec.contrastive
    assert [c["i"] for c in calls] == [3, 3, 4, 4]  # labeled, then unlabeled term, after R
    assert any(c[weights] > 0 for c in calls)       # some class had vectors in the batch and in memory
    for c in calls:
        assert c["value"] == pytest.approx(c[weights], rel=1e-5, abs=1e-8), c
    # the other form, where a class qualified, differs by far more than that tolerance
    assert all(abs(c[other] - c[weights]) > 1e-3 * c[weights] for c in calls if c[weights] > 0), calls


def test_code_memory_selectors_get_the_release_gradient_and_its_weight_decay(code_run):
    """Fidelity "code": the memory selector of every class that qualified for a contrastive term ran (train mode:
    its BatchNorm running statistics moved) and every one of its parameters got a gradient, so SGD applied weight
    decay and momentum to it from that iteration on, as the release's: the final values are the hand-worked SGD
    of a (nearly) zero gradient, p <- p - lr_t * buf, buf <- 0.9 buf + 5e-4 p, at the recorded learning rates.
    A class that never qualified keeps its selector untouched, with no gradient."""
    rec = code_run
    first: dict[int, int] = {}
    for call in rec.contrastive:
        for c in call["qualifying"]:
            first.setdefault(c, call["i"])
    assert first and len(first) < C  # some classes qualified, some never did
    for c, (now, start) in enumerate(zip(rec.run.student_module.memory_selectors(), rec.memory_selectors_at_start)):
        for (name, p), p0 in zip(now.named_parameters(), start.parameters()):
            if c not in first:
                assert p.grad is None and torch.equal(p, p0), (c, name)
                continue
            assert p.grad is not None, (c, name)
            expected, buf = p0.detach().double(), None
            for i in range(first[c], N):
                d = 5e-4 * expected
                buf = d if buf is None else 0.9 * buf + d
                expected = expected - rec.lr[i][0] * buf
            moved = (p.detach().double() - p0.detach().double()).abs()
            assert float(moved.max()) > 0, (c, name)
            torch.testing.assert_close(p.detach().double(), expected, rtol=2e-7, atol=1e-9, msg=(c, name))
        assert not torch.equal(now[1].running_mean, start[1].running_mean) or c not in first, c


@pytest.mark.parametrize("fidelity, branches", [("code", 2), ("paper", 4)])
def test_deeplabv2_classifier_sums_the_preset_branches(fidelity, branches, code_run, paper_run):
    rec = code_run if fidelity == "code" else paper_run
    features, logits, weights = rec.classifier
    assert len(weights) == 4  # all four convolutions exist in both presets (checkpoints are the same)
    with torch.no_grad():
        parts = [F.conv2d(features, w, b, padding=d, dilation=d) for (w, b), d in zip(weights, (6, 12, 18, 24))]
    torch.testing.assert_close(logits, sum(parts[:branches]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, sum(parts[:6 - branches]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fidelity", ["code", "paper"])
def test_trainssl_entropy_mask_is_per_image(fidelity, code_run, paper_run):
    """trainSSL.py multiplies by the [n,h,w] mask in both presets (only the other two scripts broadcast it)."""
    rec = code_run if fidelity == "code" else paper_run
    assert sorted(rec.entropy) == list(range(N))
    for i, e in rec.entropy.items():
        assert e["term"] == pytest.approx(0.01 * e["per_image"], rel=1e-5), i
        assert e["broadcast"] > 1.5 * e["per_image"] > 0  # n = 2 views: the broadcast form would be about twice


def test_teacher_takes_the_momentum_once_the_warm_up_passes_it(code_run):
    """i = 30 of N = 5: 1 - 1/301 = 0.99668 > m_30 = 1 - 0.005 (cos(6 pi) + 1) / 2 = 0.995, so alpha = 0.995."""
    run, probe = code_run.run, code_run.teacher
    assert ema_alpha_by_hand(30, N, 10) == pytest.approx(0.995, abs=1e-12)
    loss = sum(p.sum() for p in run.student_module.parameters() if p.requires_grad)
    run.optimizer_step(30, loss)
    # the probe's record of step 30 is taken out again: the shared run's other tests see iterations 0..N-1 only,
    # whatever order the tests run in (mutmut orders them its own way)
    deviation, other = probe.deviation.pop(30), probe.other_deviation.pop(30)
    assert deviation < 1e-6
    assert other > 0  # 1 - 1/31 = 0.9677 there


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_context_by_precision(tmp_path, capsys, precision, dtype):
    """Run.autocast: no autocast in fp32; bf16 or fp16 autocast on the run's device otherwise."""
    run = Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 3, precision=precision)) + ["--dry-run"])
    ctx = run.autocast()
    if dtype is None:
        assert isinstance(ctx, nullcontext)
    else:
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == dtype and ctx.device == "cpu"


def test_log_rows_average_their_interval_and_checkpoints_follow_their_intervals(tmp_path, monkeypatch):
    """N = 5, log_every 2, save_checkpoint_every 2, save_latest_every 2, no evaluation, worked by hand: log rows after
    iterations 1, 3 and 4 (the last), each the mean of its interval's terms (0-1, 2-3, 4); periodic checkpoints
    after iterations 2 and 4 (not 0); latest.pth of 2 and 4 iterations, then of 5 at the end."""
    terms, periodic, latest = {}, [], []
    end, save_periodic, save_latest = Run.end_iteration, Run.save_periodic, Run.save_latest

    def end_iteration(self, i, t):
        terms[i] = {k: float(v.detach()) for k, v in t.items()}
        end(self, i, t)

    monkeypatch.setattr(Run, "end_iteration", end_iteration)
    monkeypatch.setattr(Run, "save_periodic", lambda self, i: (periodic.append(i), save_periodic(self, i)))
    monkeypatch.setattr(Run, "save_latest", lambda self, n: (latest.append(n), save_latest(self, n)))
    run_dir = tmp_path / "run"
    trainSSL.main(argv_of(tiny_sets(str(run_dir), 5, **{"utils.log_every": 2, "utils.save_checkpoint_every": 2,
                                                         "utils.save_latest_every": 2})))
    assert sorted(terms) == [0, 1, 2, 3, 4] and periodic == [2, 4] and latest == [2, 4, 5]
    import json as json_module
    rows = [json_module.loads(line) for line in open(run_dir / "train_log.jsonl")]
    train = {r["iteration"]: r for r in rows if r["kind"] == "train"}
    assert sorted(train) == [1, 3, 4]
    for i, window in ((1, [0, 1]), (3, [2, 3]), (4, [4])):
        for key in ("loss_sup", "loss"):
            expected = sum(terms[j][key] for j in window) / len(window)
            assert train[i][key] == pytest.approx(expected, rel=1e-5), (i, key)


def test_an_interval_of_one_saves_a_periodic_checkpoint_after_every_iteration_but_the_first():
    """save_checkpoint_every 1, N = 4 (end_iteration on a stand-in run): periodic checkpoints after iterations 1,
    2 and 3; never after iteration 0, which has trained one step only."""
    periodic = []
    run = SimpleNamespace(
        cfg={"utils": {"log_every": 100, "save_checkpoint_every": 1, "save_latest_every": 100}}, num_iterations=4,
        _sums={}, _counts={}, _count=0, logger=SimpleNamespace(advance=lambda i: None), _log=lambda i: None,
        save_periodic=periodic.append, evaluate_if_due=lambda i: False, save_latest=lambda n: None,
        stop=SimpleNamespace(after_iteration=lambda r, i: None))
    for i in range(4):
        Run.end_iteration(run, i, {"loss": torch.tensor(1.0)})
    assert periodic == [1, 2, 3] and run._count == 4


def test_lr_schedule_null_keeps_the_base_rate(tmp_path, capsys):
    """training.lr_schedule null: a constant learning rate (the poly factor is not applied), in the optimiser too."""
    run = Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 10, **{"training.lr_schedule": None})))
    assert run.set_learning_rate(7) == 0.01 == run.optimizer.param_groups[0]["lr"]
    run.logger.close()


def _bookkeeping(val_per_iter: int, n: int, log_images: int = 2, tensorboard: bool = True, **attrs):
    """A stand-in for a Run with just what its evaluation bookkeeping reads (its methods called unbound)."""
    run = SimpleNamespace(cfg={"utils": {"val_per_iter": val_per_iter, "log_images": log_images}}, num_iterations=n,
                          logger=SimpleNamespace(tb=object() if tensorboard else None), **attrs)
    run.periodic_evaluation_after = lambda i: Run.periodic_evaluation_after(run, i)
    run.evaluation_due = lambda i: Run.evaluation_due(run, i)
    return run


def test_evaluation_due_after_each_period_and_the_last_iteration():
    """Worked by hand: val_per_iter 3, N = 8: after iterations 3 and 6 (not 0) and 7 (the last); val_per_iter 1,
    N = 4: after 1, 2, 3; val_per_iter 1000, N = 5: after the last only."""
    assert [i for i in range(8) if Run.evaluation_due(_bookkeeping(3, 8), i)] == [3, 6, 7]
    assert [i for i in range(4) if Run.evaluation_due(_bookkeeping(1, 4), i)] == [1, 2, 3]
    assert [i for i in range(5) if Run.evaluation_due(_bookkeeping(1000, 5), i)] == [4]


def test_unlabeled_views_are_kept_only_next_to_an_evaluation_with_images():
    """remember_unlabeled holds the batch's views (the same tensors, for the TensorBoard pictures) at an iteration
    that an evaluation follows, or that precedes one (the less-memory script draws unlabeled batches every other
    iteration); never when no images are logged or TensorBoard is off, nor before the loop's first iteration."""
    views = [torch.full((1, 2), float(k)) for k in range(4)]

    def kept(run) -> bool:
        Run.remember_unlabeled(run, *views)
        if "_unlabeled_views" not in vars(run):
            return False
        assert all(torch.equal(a, b) and a.data_ptr() == b.data_ptr() for a, b in zip(run._unlabeled_views, views))
        return True

    # val_per_iter 3, N = 8: evaluations after 3, 6, 7 -> kept at 2, 3, 5, 6, 7
    assert [i for i in range(8) if kept(_bookkeeping(3, 8, iteration=i))] == [2, 3, 5, 6, 7]
    assert not any(kept(_bookkeeping(3, 8, log_images=0, iteration=i)) for i in range(8))
    assert not any(kept(_bookkeeping(3, 8, tensorboard=False, iteration=i)) for i in range(8))
    assert kept(_bookkeeping(3, 8, log_images=1, iteration=3))
    # no iteration set yet: nothing, even where iteration 0, 1 or 2 is the last one
    assert not any(kept(_bookkeeping(1000, n)) for n in (1, 2, 3))


def test_run_files_hold_the_resolved_config_and_the_labeled_images(code_run):
    """config.json: the resolved config (defaults filled in), as JSON indented by 2; train_split.txt: the names of
    the labeled images (2 of the 4 synthetic training images), one per line, in the labeled subset's order."""
    import json
    run = code_run.run
    text = open(os.path.join(run.run_dir, "config.json")).read()
    assert json.loads(text) == run.cfg and text == json.dumps(run.cfg, indent=2)
    assert run.cfg["training"]["data"]["labeled_samples"] == 2 and "memory_size" in run.cfg["method"]
    split = open(os.path.join(run.run_dir, "train_split.txt")).read()
    lines = split.split("\n")
    assert len(lines) == 3 and lines[-1] == ""
    assert [run.data.train_names.index(name) for name in lines[:2]] == list(run.data.labeled_idx)


def test_set_up_of_networks_samplers_and_random_streams(tmp_path, capsys):
    """On the CPU: the networks keep the default (NCHW) memory format, the student is not compiled; the labeled
    sampler draws B items per batch from the labeled subset with the config's seed, the unlabeled one B/2 items from
    the rest with seed + 1; a single process keeps the config's seed for its own random draws (no per-rank offset):
    Python's stream continues as random.seed(seed) left it."""
    import random
    seed = 1234
    run_dir = str(tmp_path / "run")
    run = Run(TRAIN_SSL, argv_of(tiny_sets(run_dir, 3, seed=seed, **{"training.num_workers": 1})))
    run.logger.close()
    assert random.random() == random.Random(seed).random()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"trainSSL: synthetic v2 (imagenet), 2 labeled / 2 unlabeled, 3 iterations from 0, device cpu, fidelity code, "
        f"precision fp32, run dir {run_dir}")
    assert run.student is run.student_module
    assert run.student_module.state_dict()["conv1.weight"].shape[0] == TINY_WIDTH  # the config's backbone.width
    for net in (run.student_module, run.teacher):
        weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert weights and all(w.is_contiguous() for w in weights)
    labeled, unlabeled = run.labeled.sampler, run.unlabeled.sampler
    assert (labeled.seed, labeled.batch_size, labeled.indices) == (seed, 2, list(run.data.labeled_idx))
    assert (unlabeled.seed, unlabeled.batch_size, unlabeled.indices) == (seed + 1, 1, list(run.data.unlabeled_idx))
    assert len(labeled.indices) == 2 and len(unlabeled.indices) == 2
    assert run.labeled.loader.num_workers == 1 == run.unlabeled.loader.num_workers  # (no worker started here)
    assert (labeled.rank, labeled.world_size) == (0, 1)
    # a fresh run: no best yet, nothing since it, nothing pending or saved; the logger as configured (no TensorBoard)
    assert (run.start_iteration, run.best_miou, run.since_best, run.best_result, run.pending_evaluation,
            run.latest_saved) == (0, -1.0, 0, None, None, None)
    assert not [f for f in os.listdir(run.run_dir) if f.startswith("events.out.tfevents")] and run.logger.tb is None


def test_compile_wraps_the_student_of_a_training_run(tmp_path, monkeypatch):
    """training.compile: a training run's forwards go through torch.compile(student), while heads, selectors and
    state dicts keep using the module itself; a dry run compiles nothing. (A stand-in records the call: the real
    compiler runs in the cuda tests.)"""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module: calls.append(module) or SimpleNamespace(module=module))
    sets = tiny_sets(str(tmp_path / "run"), 3, **{"training.compile": True})
    Run(TRAIN_SSL, argv_of(sets) + ["--dry-run"])
    assert calls == []
    run = Run(TRAIN_SSL, argv_of(sets))
    run.logger.close()
    assert calls == [run.student_module] and run.student.module is run.student_module
    assert isinstance(run.student_module, torch.nn.Module)


@pytest.mark.parametrize("variant_name, dataset, expected", [
    # the scripts' own constants, as released: contrastive weight, ClassMix probability of the labeled batch
    ("TRAIN_SSL", "cityscapes", (0.1, 0.2, True)),
    ("LESS_MEMORY", "pascal_voc", (0.1, 0.2, False)),
    ("DOMAIN_ADAPTATION", "synthetic", (0.2, 0.25, False)),
])
def test_method_constants_left_null_take_the_scripts_values(variant_name, dataset, expected):
    """method.contrastive_weight and labeled_classmix_prob null: the script's value; class_balancing null: on for
    Cityscapes only. Values given in the config are kept."""
    from utils import variants
    variant = getattr(variants, variant_name)
    nulls = {"contrastive_weight": None, "labeled_classmix_prob": None, "class_balancing": None, "memory_size": 7}
    method = resolve_method({"method": dict(nulls), "dataset": dataset}, variant)
    assert method == {"contrastive_weight": expected[0], "labeled_classmix_prob": expected[1],
                      "class_balancing": expected[2], "memory_size": 7}
    given = {"contrastive_weight": 0.5, "labeled_classmix_prob": 0.0, "class_balancing": False}
    cfg = {"method": dict(given), "dataset": "cityscapes"}
    assert resolve_method(cfg, variant) == given and cfg["method"] == given  # a copy: the config is left as it is
    cfg = {"method": dict(nulls), "dataset": "cityscapes"}
    resolve_method(cfg, variant)
    assert cfg["method"] == nulls


def test_log_rows_carry_the_schedules_and_the_per_class_vectors(code_run):
    """Every log row (log_every 1): the learning rate, the EMA alpha of trainSSL's warm-up and the momentum m_i,
    worked out by hand; the per-class rows: the class weights the losses received and the memory fill per class."""
    import json
    run = code_run.run
    rows = [json.loads(line) for line in open(os.path.join(run.run_dir, "train_log.jsonl"))]
    train = {r["iteration"]: r for r in rows if r["kind"] == "train"}
    assert sorted(train) == list(range(N))
    for i, row in train.items():
        assert row["lr"] == pytest.approx(poly_by_hand(BASE_LR, i, N), rel=1e-12)
        assert row["ema_alpha"] == pytest.approx(ema_alpha_by_hand(i, N, 10), rel=1e-12)
        assert row["ema_momentum"] == pytest.approx(1 - 0.005 * (math.cos(math.pi * i / N) + 1) / 2, rel=1e-12)
    names = run.data.class_names
    weights = {r["iteration"]: r["values"] for r in rows if r["kind"] == "class_weights"}
    assert sorted(weights) == list(range(N))
    for i, values in weights.items():
        assert list(values) == names
        assert list(values.values()) == pytest.approx(code_run.sup_weights[i].tolist(), rel=1e-6), i
    assert weights[N - 1] != weights[0]  # balanced after R, ones before
    fill = {r["iteration"]: r["values"] for r in rows if r["kind"] == "memory_fill"}
    assert list(fill[N - 1]) == names and list(fill[N - 1].values()) == run.memory.counts.tolist()
    assert sum(fill[N - 1].values()) > 0 and sum(fill[0].values()) == 0  # the memory is filled from iteration 2 on


class _RecordingLogger:
    def __init__(self, tensorboard: bool = True):
        self.tb = object() if tensorboard else None
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


@pytest.mark.parametrize("log_images, tensorboard", [(2, True), (5, True), (2, False), (0, True)])
def test_evaluate_logs_the_result_and_the_first_pictures(monkeypatch, log_images, tensorboard):
    """Run.evaluate with stand-ins for the evaluation and the panels (worked by hand): 3 validation images; the
    mIoU and loss as "<tag>" scalars without a printed line, the per-class IoU, one panel per image for the first
    log_images images (TensorBoard only), the unlabeled batch kept for it (b = 2 images, 2 strong views each:
    image k's views are rows k and b + k) shown as min(log_images, b) panels, once; a stop is polled after each
    image; one message line; the ETA clock paused around it; the BatchNorm statistics agreed over processes first;
    the loader workers from training.num_workers."""
    from engine import run as training
    from engine import visualize
    polls, evaluated = [], {}

    def fake_evaluate(model, dataset, **k):
        evaluated.update(model=model, dataset=dataset, **k)
        for j in range(3):
            k["on_prediction"](f"img{j}", f"image{j}", f"label{j}", f"pred{j}")
        return {"miou": 0.375, "loss": 1.25, "iou": [0.5, 0.25]}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    def fake_validation_panel(image, label, pred, palette, ignore, order):
        assert (label, pred, palette, order) == (f"label{image[-1]}", f"pred{image[-1]}", "palette", "RGB")
        return torch.tensor([int(image[-1]), ignore])

    def fake_unlabeled_panel(image, pseudo, views, palette, ignore, order):
        assert (palette, ignore, order) == ("palette", 250, "RGB")
        return torch.tensor([float(image), float(pseudo)] + [float(x) for view in views for x in view])

    monkeypatch.setattr(training, "validation_panel", fake_validation_panel)
    monkeypatch.setattr(visualize, "unlabeled_panel", fake_unlabeled_panel)
    data = SimpleNamespace(val=["v0", "v1", "v2"], palette="palette", class_names=["a", "b"], mean_rgb="mean",
                           channel_order="RGB")
    logger = _RecordingLogger(tensorboard)
    b = 2
    images, pseudo = torch.tensor([10.0, 11.0]), torch.tensor([20.0, 21.0])
    mixed, mixed_pseudo = torch.tensor([30.0, 31.0, 32.0, 33.0]), torch.tensor([40.0, 41.0, 42.0, 43.0])
    run = SimpleNamespace(cfg={"utils": {"log_images": log_images}, "training": {"num_workers": 5}}, logger=logger,
                          data=data, val_set="val set", num_classes=2, ignore_label=250, device="the device",
                          autocast="autocast",
                          stop=SimpleNamespace(evaluation_poll=lambda r, n: (polls.append((r, n)), lambda: polls.append(
                              "poll"))[1]),
                          statistics=SimpleNamespace(agree=lambda: logger.calls.append(("statistics_agreed", (), {}))),
                          _unlabeled_views=(images, pseudo, mixed, mixed_pseudo))
    model = torch.nn.Identity()
    result = Run.evaluate(run, model, 7, tag="val_x")
    assert result == {"miou": 0.375, "loss": 1.25, "iou": [0.5, 0.25]}
    assert evaluated == {"model": model, "dataset": "val set", "num_classes": 2, "ignore_label": 250,
                         "mean_rgb": "mean", "channel_order": "RGB", "device": "the device", "autocast": "autocast",
                         "on_prediction": evaluated["on_prediction"], "num_workers": 5}
    assert polls == [(run, 3), "poll", "poll", "poll"]
    shown = min(log_images, 3) if tensorboard else 0
    views = min(log_images, b) if tensorboard else 0
    expected = [("statistics_agreed", (), {}), ("evaluation_started", (), {}),
                ("scalars", (7, {"miou": 0.375, "loss": 1.25}), {"prefix": "val_x", "print_line": False}),
                ("vector", (7, "val_x_iou", [0.5, 0.25], ["a", "b"]), {})]
    expected += [("images", (7, f"val_x_images/{j}", [[j, 250]]), {}) for j in range(shown)]
    expected += [("images", (7, f"unlabeled_images/{k}", [[10.0 + k, 20.0 + k, 30.0 + k, 40.0 + k, 32.0 + k,
                                                           42.0 + k]]), {}) for k in range(views)]
    expected += [("message", ("[val_x] iteration 7: mIoU 37.50  loss 1.2500",), {}), ("evaluation_finished", (), {})]
    got = [(name, tuple(x.tolist() if isinstance(x, torch.Tensor) else x for x in a), k) for name, a, k in logger.calls]
    assert got == expected
    assert "_unlabeled_views" not in vars(run)  # shown once


def test_classmix_drops_the_background_on_pascal_voc_only(tmp_path, capsys):
    """Pascal VOC: ClassMix never pastes class 0 (background); other datasets (the synthetic scenes here) keep it.
    VOC's memory quota has its own rule: B x int(C/3 x round(256/L)) = 2 x int(21/3 x 128) = 1792 vectors per class
    and update (synthetic scenes: B x round(256/L) = 256)."""
    from tests.fixtures_data import make_voc_tree
    voc = str(tmp_path / "VOC2012")
    make_voc_tree(voc, n_train=4, n_val=1, size=(40, 60))
    sets = {"training.data.input_size": "32,48", "training.data.labeled_samples": 2, "training.batch_size": 2,
            "training.data.split_id_list": 7, "training.num_workers": 0, "utils.checkpoint_dir": str(tmp_path / "r")}
    config = os.path.join(os.path.dirname(DEMO), "configSSL_pascal_1_20_split0_COCO.json")
    run = Run(TRAIN_SSL, argv_of(sets, config=config) + ["--data-root", voc, "--dry-run"])
    assert run.drop_background and run.memory_quota == 1792
    run = Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 3)) + ["--dry-run"])
    assert not run.drop_background and run.memory_quota == 256


@pytest.mark.parametrize("save_best_model", [True, False])
def test_evaluate_if_due_evaluates_each_period_and_tells_a_new_saved_best(save_best_model):
    """Worked by hand with stand-ins, val_per_iter 2, N = 10 (return to the best after more than 2 iterations
    without improvement): evaluations after 2, 4, 6, 8 (not 0, 1, 3, ...), each inside the stop's pending-evaluation
    guard; planted mIoU 0.3, 0.2, 0.1, 0.4: a new best after 2 and 8 (True only when best models are saved),
    since_best 2 then 4 > 2 after 6: back to the best."""
    from contextlib import contextmanager
    events = []
    planted = {2: 0.3, 4: 0.2, 6: 0.1, 8: 0.4}

    @contextmanager
    def pending_evaluation(run_, i):
        events.append(("guard", run_ is run, i))
        yield

    def evaluate_and_keep_best(i):
        events.append(("evaluate", i))
        if planted[i] > run.best_miou:
            run.best_miou, run.since_best = planted[i], 0
        else:
            run.since_best += 2

    run = SimpleNamespace(cfg={"utils": {"val_per_iter": 2, "save_best_model": save_best_model}}, num_iterations=10,
                          best_miou=-1.0, since_best=0, stop=SimpleNamespace(pending_evaluation=pending_evaluation),
                          evaluate_and_keep_best=evaluate_and_keep_best,
                          return_to_best=lambda i: (events.append(("return", i)), setattr(run, "since_best", 0)))
    run.periodic_evaluation_after = lambda i: Run.periodic_evaluation_after(run, i)
    told = {i: Run.evaluate_if_due(run, i) for i in range(10)}
    assert told == {i: save_best_model and i in (2, 8) for i in range(10)}
    assert events == [("guard", True, 2), ("evaluate", 2), ("guard", True, 4), ("evaluate", 4),
                      ("guard", True, 6), ("evaluate", 6), ("return", 6), ("guard", True, 8), ("evaluate", 8)]


@pytest.mark.parametrize("processes", [1, 2])
def test_log_row_is_the_mean_over_the_interval_and_the_processes(monkeypatch, processes):
    """Run._log with stand-ins, worked by hand: 2 iterations in the window, this process's sums loss 3, loss_sup 1;
    under torchrun with 2 processes the other's sums are loss 5, loss_sup 2 (all_reduce adds them) and the row is the
    mean over both: loss (3 + 5) / 2 / 2 = 2, loss_sup 0.75; alone: 1.5 and 0.5 (and, before any optimiser step,
    EMA alpha 0). The window is then emptied; the guard looks at the run first."""
    from engine import run as training
    other = {"loss": 5.0, "loss_sup": 2.0}
    monkeypatch.setattr(training.dist, "is_distributed", lambda: processes > 1)
    monkeypatch.setattr(training.dist, "world_size", lambda: processes)
    monkeypatch.setattr(training.dist, "all_reduce_sum",
                        lambda t: t + torch.tensor([[other["loss"]], [other["loss_sup"]]]).reshape(t.shape))
    logger, checked = _RecordingLogger(), []
    run = SimpleNamespace(_sums={"loss": torch.tensor(3.0), "loss_sup": torch.tensor(1.0)}, _count=2,
                          _counts={"loss": 2, "loss_sup": 2}, lr=0.01,
                          **({"alpha": 0.5} if processes > 1 else {}), num_iterations=10, logger=logger, class_weights=torch.tensor([1.0, 2.0]),
                          memory=SimpleNamespace(counts=torch.tensor([3, 0])),
                          data=SimpleNamespace(class_names=["a", "b"]), guard=SimpleNamespace(check=checked.append))
    Run._log(run, 4)
    expected = {"loss": 2.0, "loss_sup": 0.75} if processes > 1 else {"loss": 1.5, "loss_sup": 0.5}
    momentum = 1 - 0.005 * (math.cos(math.pi * 4 / 10) + 1) / 2
    alpha = 0.5 if processes > 1 else 0.0  # no optimiser step yet (no alpha): 0
    assert logger.calls == [("scalars", (4, {**expected, "lr": 0.01, "ema_alpha": alpha, "ema_momentum": momentum}),
                             {}),
                            ("vector", (4, "class_weights", [1.0, 2.0], ["a", "b"]), {}),
                            ("vector", (4, "memory_fill", [3, 0], ["a", "b"]), {})]
    assert checked == [run] and run._sums == {} and run._count == 0 and run._counts == {}


def test_set_up_as_rank_1_of_2_processes(tmp_path, monkeypatch, capsys):
    """Run's set-up under torchrun, with stand-ins for the collectives (one process plays rank 1 of 2): the learning
    rate scaled by the world size when asked, SyncBatchNorm when asked, rank 0's weights broadcast, this rank's
    shard of each sampler, class-balancing counts summed over ranks, its own random draws (seed + 1000003 x rank),
    the gradient pass wrapped by DistributedDataParallel, no run files and no log output (rank 0 writes them)."""
    import random
    from engine import ddp_step
    from engine import run as training
    calls = []
    monkeypatch.setattr(ddp_step, "wrap", lambda module: calls.append(("ddp", module)) or module)
    reduce = lambda t: t  # noqa: E731  (the stand-in of the sum over ranks)
    for name, value in {"is_distributed": lambda: True, "world_size": lambda: 2, "rank": lambda: 1,
                        "is_main": lambda: False, "init_distributed": lambda device: calls.append(("init", device)),
                        "broadcast_parameters": lambda module: calls.append(("broadcast", module)),
                        "convert_sync_batchnorm": lambda model, dev: calls.append(("sync_bn", model, dev)) or model,
                        "broadcast_object": lambda obj: obj, "all_reduce_sum": reduce}.items():
        monkeypatch.setattr(training.dist, name, value)
    seed, run_dir = 99, tmp_path / "run"
    sets = tiny_sets(str(run_dir), 3, seed=seed, **{"training.scale_lr_with_world_size": True,
                                                    "training.sync_batchnorm": True, "utils.tensorboard": True,
                                                    "synthetic.num_train": 8, "training.data.labeled_samples": 4})
    run = Run(TRAIN_SSL, argv_of(sets))
    assert random.random() == random.Random(seed + 1000003).random()
    assert calls == [("init", torch.device("cpu")), ("sync_bn", run.student_module, torch.device("cpu")),
                     ("broadcast", run.student), ("ddp", run.gradient_pass.module)]
    assert run.gradient_pass.module.student is run.student_module
    assert run.base_lr == 0.02 == run.optimizer.param_groups[0]["lr"]
    for sampler in (run.labeled.sampler, run.unlabeled.sampler):
        assert (sampler.rank, sampler.world_size) == (1, 2)
    assert run.balancing.reduce is reduce
    assert not run_dir.exists() and capsys.readouterr().out == ""
    run.logger.close()
    monkeypatch.setattr(training.dist, "is_distributed", lambda: False)  # one process: no SyncBatchNorm, lr as given
    calls.clear()
    run = Run(TRAIN_SSL, argv_of(dict(sets, **{"training.scale_lr_with_world_size": False})))
    run.logger.close()
    assert [c[0] for c in calls] == ["init", "broadcast"] and run.base_lr == 0.01
    # rank 0 of 2 (it logs): its start message counts the processes
    for name, value in {"is_distributed": lambda: True, "rank": lambda: 0, "is_main": lambda: True}.items():
        monkeypatch.setattr(training.dist, name, value)
    capsys.readouterr()
    run = Run(TRAIN_SSL, argv_of(dict(sets, **{"utils.checkpoint_dir": str(tmp_path / "rank0")})))
    run.logger.close()
    assert ", device cpu x2 processes, fidelity code," in capsys.readouterr().out


def test_a_training_run_builds_the_configured_network_from_its_weights_file(tmp_path, monkeypatch, capsys):
    """A training run (not a dry run) builds the config's network (the tiny config's ImageNet-style ResNet-18, here
    at width 64, with the paper preset's four classifier branches) and copies every tensor of backbone.pretrained
    into the student, whose parameters the teacher copies (the release's EMA copy: parameters only; the teacher's
    BatchNorm statistics start fresh); rank 0 prints the load report, another rank does not."""
    from model import build_model
    from engine import run as training
    torch.manual_seed(5)
    weights = build_model("2", 8, "imagenet", 18, None, v2_branches=4, width=64, verbose=False).state_dict()
    path = str(tmp_path / "weights.pth")
    torch.save(weights, path)
    sets = tiny_sets(str(tmp_path / "run"), 3, fidelity="paper", **{"backbone.width": 64, "backbone.pretrained": path})
    run = Run(TRAIN_SSL, argv_of(sets))
    run.logger.close()
    assert f"pretrained weights {path}: loaded {len(weights)} tensors, skipped 0, 0 model tensors not in the file" \
        in capsys.readouterr().out
    assert run.student_module.layer5.branches == 4
    state = run.student_module.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights), "weights file not copied"
    teacher = dict(run.teacher.named_parameters())
    assert set(teacher) == {k for k, _ in run.student_module.named_parameters()}
    assert all(torch.equal(t, weights[k]) for k, t in teacher.items()), "teacher not copied from the loaded student"
    monkeypatch.setattr(training.dist, "is_main", lambda: False)
    run = Run(TRAIN_SSL, argv_of(dict(sets, **{"utils.checkpoint_dir": str(tmp_path / "rank1")})))
    run.logger.close()
    assert "pretrained weights" not in capsys.readouterr().out


def test_optimizer_step_steps_then_moves_the_teacher(monkeypatch):
    """Run.optimizer_step with a one-weight student, worked by hand: loss w^2 at w = 1, lr 0.1, no momentum: gradient
    2, w' = 0.8; the teacher's EMA step (alpha at i = 2 of N = 10 with trainSSL's warm-up: min(1 - 1/21, m_2)):
    teacher 0.5 -> alpha 0.5 + (1 - alpha) w'; then the BatchNorm statistics are marked for averaging at their next
    read, and nothing is averaged here (under torchrun DistributedDataParallel averages the gradients during the
    backward: tests/test_distributed.py)."""
    from engine import run as training
    calls = []
    monkeypatch.setattr(training.dist, "average_buffers", lambda *modules: calls.append(("buffers",) + modules))
    student = torch.nn.Linear(1, 1, bias=False)
    teacher = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.5)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    run = SimpleNamespace(optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                          student_module=student, teacher=teacher, num_iterations=10, variant=TRAIN_SSL,
                          statistics=SimpleNamespace(changed=lambda: calls.append(
                              ("changed", float(teacher.weight.detach())))))
    Run.optimizer_step(run, 2, (student.weight ** 2).sum())
    alpha = ema_alpha_by_hand(2, 10, 10)
    assert run.alpha == pytest.approx(alpha, rel=1e-12)
    assert float(student.weight.detach()) == pytest.approx(0.8, rel=1e-6)
    assert float(teacher.weight.detach()) == pytest.approx(alpha * 0.5 + (1 - alpha) * 0.8, rel=1e-6)
    assert calls == [("changed", float(teacher.weight.detach()))]


@pytest.mark.parametrize("script", ["trainSSL", "trainSSL_less_memory"])
def test_the_loop_hands_the_unlabeled_views_to_the_run(tmp_path, monkeypatch, script):
    """For the TensorBoard pictures, the loop (not the augmentation step) gives run.remember_unlabeled the
    un-augmented unlabeled batch, its pseudo-labels from step 2 and the strong views with their mixed pseudo-labels:
    the very tensors step 2 returned and the student's unlabeled forward received. 2 iterations of each loop."""
    import importlib
    module = importlib.import_module(script)
    variant = {"trainSSL": TRAIN_SSL, "trainSSL_less_memory": LESS_MEMORY}[script]
    run = Run(variant, argv_of(tiny_sets(str(tmp_path / "run"), 2)))
    run.finish = lambda: run.logger.close()
    labelled, forwarded, remembered = [], [], []
    pseudo_label, forward_student = ssl_steps.pseudo_label, ssl_steps.forward_student
    monkeypatch.setattr(ssl_steps, "pseudo_label",
                        lambda ctx, x: (labelled.append((x, *pseudo_label(ctx, x))), labelled[-1][1:])[1])
    monkeypatch.setattr(ssl_steps, "forward_student",
                        lambda ctx, x: (forwarded.append(x), forward_student(ctx, x))[1])
    monkeypatch.setattr(run, "remember_unlabeled", lambda *views: remembered.append(views))
    with single_thread():
        module.train(run)
    steps = 2 * (2 if script == "trainSSL_less_memory" else 1)   # the less-memory loop runs 2N steps
    unlabeled_steps = steps // 2 if script == "trainSSL_less_memory" else steps
    assert len(remembered) == len(labelled) == unlabeled_steps
    for (images, pseudo, views, mixed_pseudo), (x, _, labels) in zip(remembered, labelled):
        assert images is x and pseudo is labels
        assert any(views is f for f in forwarded) and views.shape[0] == 2 * x.shape[0]
        assert mixed_pseudo.shape == (2 * x.shape[0], *labels.shape[1:])
