"""No host synchronisation in the method's parts (marker `cuda`, skipped without CUDA).

Under torch.cuda.set_sync_debug_mode("error") (tests/cuda_support.py: no_host_sync) any operation that makes
the host wait for the device raises. Checked:
- each part alone, after a warm-up call: memory update, contrastive loss forward + backward, class balancing,
  ClassMix, weak and strong augmentation, confusion matrix, the three losses with their backward, the EMA update;
- one whole trainSSL.py iteration after the ramp-up (benchmarks/bench_step.py's Run on random batches: ClassMix,
  class balancing, memory update and both contrastive terms active), fp32 and bf16, with the DOCUMENTED sync
  points excluded explicitly: the boolean selections of feature vectors (x[mask]) inside the memory update
  (utils/ssl_steps.update_memory) and the two contrastive terms (utils/ssl_steps.contrastive_term) are let
  through and counted (docs/speed.md; comments at those lines); any other sync fails the test.
On a CPU standing in for the device (dry run) the guard is a proxy that catches value-dependent operations and
tensors built from host data on the device (see cuda_support._proxy_violation).
"""
from __future__ import annotations

import copy
import random
import warnings
from collections import Counter

import pytest
import torch

from benchmarks.common import cpu_threads
import utils.ssl_steps as step
from benchmarks.bench_step import LoopClock, build_run, run_iterations
from model.heads import class_selector
from tests.cuda_support import CUDA_MARKS, DEVICE, HostSyncError, allowing_boolean_selections, no_host_sync
from utils.augmentations import strong_augment, weak_augment
from utils.class_balancing import ClassBalancing
from utils.classmix import classmix, classmix_masks
from engine.config import resolve_config
from utils.contrastive import contrastive_loss
from utils.ema import create_teacher, update_teacher
from utils.losses import entropy_loss, pseudo_label_ce, supervised_ce
from utils.memory_bank import MemoryBank
from utils.metrics import confusion_matrix

pytestmark = CUDA_MARKS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops: on a shared CPU (the dry run) two torch threads wait on each other far more than they gain."""
    with cpu_threads(1):
        yield

C, D, IGNORE = 5, 32, 250
SYNC_ERRORS = (HostSyncError, RuntimeError)   # CUDA: RuntimeError "called a synchronizing CUDA operation"
# The documented sync points: where they are, and at most how many boolean selections each call makes
# (the vectors, and their labels with the same mask).
DOCUMENTED = {"update_memory": 2, "contrastive_term": 2}


def sync_free(fn, warmup: int = 1):
    """Run fn `warmup` times unguarded (allocations, lazy initialisation), then once under the guard."""
    for _ in range(warmup):
        fn()
    with no_host_sync(DEVICE):
        return fn()


def labels_on_device(shape, g, classes=C):
    x = torch.randint(0, classes, shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.1] = IGNORE
    return x.to(DEVICE)


# ------------------------------------------------------------------------------------------ part by part
def test_memory_update_and_contrastive_loss_make_no_sync():
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(C, size=16, dim=D, device=DEVICE)
    feats = torch.randn(200, D, generator=g).to(DEVICE)
    labels = torch.randint(0, C, (200,), generator=g).to(DEVICE)
    sel = [class_selector(D).to(DEVICE).train() for _ in range(C)]
    mem_sel = [class_selector(D).to(DEVICE).train() for _ in range(C)]

    def add():
        with torch.no_grad():
            bank.add(feats, labels, sel, quota=4, keep="lowest")
    sync_free(add)
    assert int(bank.counts.sum()) > 0
    x = feats.clone().requires_grad_(True)

    def loss(mode):
        def fn():
            x.grad = None
            contrastive_loss(x, labels, bank, sel, mem_sel, C, memory_weights=mode).backward()
        return fn
    for mode in ("ones", "release", "mean"):
        sync_free(loss(mode))
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_class_balancing_makes_no_sync():
    g = torch.Generator().manual_seed(1)
    cb = ClassBalancing(C, labeled_slots=1, unlabeled_slots=2, device=DEVICE)
    labels, pseudo = labels_on_device((2, 16, 16), g), labels_on_device((1, 16, 16), g)
    weights = sync_free(lambda: cb.update(labels, pseudo), warmup=2)   # histories full: the weights are computed
    assert cb.filled and weights.shape == (C,)


def test_classmix_and_augmentations_make_no_sync():
    g = torch.Generator().manual_seed(2)
    images = (torch.rand(2, 3, 40, 48, generator=g) * 255).to(DEVICE)
    labels = labels_on_device((2, 40, 48), g)
    conf = torch.rand(2, 40, 48, generator=g).to(DEVICE)

    def mix():
        masks = classmix_masks(labels, IGNORE, drop_background=True)
        return classmix(masks, images, labels, conf)
    sync_free(mix)
    for seed in range(6):  # scale up and down, flip, jitter, blur: each taken in some of the seeds
        random.seed(seed)
        sync_free(lambda: weak_augment(images, labels, None, ignore_label=IGNORE, channel_order="BGR"), warmup=0)
        masks = classmix_masks(labels, IGNORE, drop_background=False)
        random.seed(seed)
        sync_free(lambda: strong_augment(images, labels, conf, ignore_label=IGNORE, channel_order="RGB",
                                         classmix_masks=masks), warmup=0)


def test_confusion_matrix_makes_no_sync():
    g = torch.Generator().manual_seed(3)
    label = labels_on_device((64, 96), g)
    pred = torch.randint(0, C, (64, 96), generator=g).to(DEVICE)
    cm = sync_free(lambda: confusion_matrix(pred, label, C))
    assert int(cm.sum()) == int((label != IGNORE).sum())


def test_losses_make_no_sync():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, C, 12, 20, generator=g).to(DEVICE).requires_grad_(True)
    labels = labels_on_device((2, 12, 20), g)
    weight = (torch.rand(C, generator=g) + 0.5).to(DEVICE)
    pixel_weight = torch.rand(2, 12, 20, generator=g).to(DEVICE)

    def losses():
        logits.grad = None
        total = supervised_ce(logits, labels, IGNORE, weight) + \
            pseudo_label_ce(logits, labels, pixel_weight, IGNORE, weight) + \
            entropy_loss(torch.softmax(logits, 1), labels != IGNORE) + \
            entropy_loss(torch.softmax(logits, 1), labels != IGNORE, broadcast_mask_bug=True)
        total.backward()
    sync_free(losses)
    assert logits.grad is not None


def test_ema_update_makes_no_sync():
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(DEVICE)
    teacher = create_teacher(student)
    sync_free(lambda: update_teacher(teacher, student, 0.99))


# --------------------------------------------------------------------------------------- one whole iteration
def tiny_config(precision: str) -> dict:
    """A tiny trainSSL.py run past its ramp-up with every part active (ClassMix always, class balancing on,
    every correctly predicted labeled pixel enters the memory)."""
    return resolve_config({
        "dataset": "folder", "folder": {"num_classes": C}, "version": "2", "precision": precision,
        "backbone": {"depth": 18, "pretrained": "none"},
        "training": {"batch_size": 2, "num_iterations": 100, "learning_rate": 0.01, "pretraining": "imagenet",
                     "data": {"labeled_samples": 4, "input_size": "33,33"}},
        "method": {"ramp_up_iterations": 1, "memory_start_offset": 1, "memory_confidence": 0.0,
                   "class_balancing": True, "labeled_classmix_prob": 1.0, "unlabeled_classmix_prob": 1.0},
        "ignore_label": IGNORE, "utils": {"log_images": 0, "tensorboard": False, "curves": False},
    }, "test_cuda_sync")


def sync_census(run, first: int) -> list[str]:
    """Every synchronising call of one iteration on CUDA, as 'file:line' of the Python caller (set_sync_debug_mode
    "warn"); [] on the CPU proxy. For the failure message."""
    if DEVICE.type != "cuda":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_iterations(run, first, 1, LoopClock(torch.device("cpu")))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# bf16 autocast on a CPU without bf16 units is ~20x slower: the CPU stand-in runs fp32 only
@pytest.mark.parametrize("precision", ["fp32", "bf16"] if DEVICE is not None and DEVICE.type == "cuda" else ["fp32"])
def test_one_iteration_makes_no_sync_beyond_the_documented_ones(precision, monkeypatch):
    random.seed(0)
    torch.manual_seed(0)
    run = build_run(tiny_config(precision), DEVICE, channels_last=DEVICE.type == "cuda")
    first = run.method["ramp_up_iterations"] + 1
    guard_box, record = [None], []
    for name in DOCUMENTED:
        monkeypatch.setattr(step, name, allowing_boolean_selections(getattr(step, name), guard_box, record, name))
    calls = Counter()
    for name in DOCUMENTED:  # count the calls of each documented site (outermost wrapper)
        inner = getattr(step, name)

        def counted(*args, _inner=inner, _name=name, **kwargs):
            calls[_name] += 1
            return _inner(*args, **kwargs)
        monkeypatch.setattr(step, name, counted)

    terms = []
    clock = LoopClock(torch.device("cpu"))  # no device synchronisation at the end of the iteration
    end = clock.end_iteration
    clock.end_iteration = lambda i, t: (terms.append(sorted(t)), end(i, t))
    run_iterations(run, first, 1, clock)                       # warm-up, unguarded
    calls.clear()
    memory_before = copy.deepcopy(run.memory.state_dict())
    try:
        with no_host_sync(DEVICE) as guard:
            guard_box[0] = guard
            try:
                run_iterations(run, first + 1, 1, clock)
            finally:
                guard_box[0] = None
    except SYNC_ERRORS as e:
        census = sync_census(run, first + 2)
        pytest.fail(f"an undocumented host sync in one {precision} iteration: {e}\n"
                    f"all sync sites of an iteration (CUDA, 'warn' mode): {census}")
    # every part ran: both contrastive terms, the memory update (it changed the bank), ClassMix
    assert terms[-1] == sorted(["loss", "loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u"])
    assert calls == {"update_memory": 1, "contrastive_term": 2}, calls
    assert not torch.equal(run.memory.state_dict()["memory"].cpu(), memory_before["memory"].cpu())
    # the documented syncs: at most DOCUMENTED[site] boolean selections per call, and only there
    selections = Counter(record)
    for name, per_call in DOCUMENTED.items():
        assert 1 <= selections[name] <= per_call * calls[name], (name, selections)
