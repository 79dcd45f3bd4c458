"""CUDA against CPU (marker `cuda`, skipped without CUDA): every part of the method gives the same result on the
device as on the CPU for the same inputs — contrastive loss and its gradients, memory update, class balancing,
ClassMix, the augmentations, the confusion matrix and the losses.

Inputs are made on the CPU and copied to the device; modules are deep copies of the same CPU modules. Random
decisions are identical on both sides: Python's `random` and torch's CPU generator are seeded alike, and
`random_draws_on_cpu` makes the draws that the code takes on its input's device (ClassMix) come from the CPU
generator. Tolerances (TF32 off): integer results and copies exact; float32 arithmetic to 1e-5 relative (1e-4 where
long reductions run in a different order on the device); augmented images to 0.05 on the 0..255 scale (bilinear
resampling and the hue rotation).
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from benchmarks.common import cpu_threads
from model.heads import class_selector
from tests.cuda_support import CUDA_MARKS, DEVICE, random_draws_on_cpu
from utils.augmentations import strong_augment, weak_augment
from utils.class_balancing import ClassBalancing, _class_counts_reference
from utils.classmix import classmix, classmix_masks
from utils.contrastive import contrastive_loss
from utils.losses import entropy_loss, pseudo_label_ce, supervised_ce
from utils.memory_bank import MemoryBank
from utils.metrics import confusion_matrix

pytestmark = CUDA_MARKS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops: on a shared CPU (the dry run) two torch threads wait on each other far more than they gain."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module", autouse=True)
def full_float32():
    """TF32 off: convolutions (the Gaussian blur's among them) run in TF32 on Ampere and later GPUs by default;
    the comparison is of the code, not of TF32's 10-bit mantissa."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


CPU = torch.device("cpu")
SIDES = (("cpu", CPU), ("dut", DEVICE))  # the reference, then the device under test
C, D, IGNORE = 7, 32, 250


def close(device_value: torch.Tensor, cpu_value: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(device_value.detach().cpu(), cpu_value.detach(), rtol=rtol, atol=atol)


def skewed_labels(n: int, g: torch.Generator) -> torch.Tensor:
    """[n] class ids in [0, C) with a Zipf-like skew; class C-1 absent, class C-2 present once."""
    p = 1.0 / torch.arange(1, C - 1, dtype=torch.float64)
    labels = torch.multinomial(p, n - 1, replacement=True, generator=g)
    return torch.cat([labels, torch.tensor([C - 2])])


def label_maps(b: int, h: int, w: int, g: torch.Generator, ignore_share: float = 0.1) -> torch.Tensor:
    """[b,h,w] int64 piecewise-constant label maps (4x4 blocks) with some ignore pixels."""
    coarse = torch.randint(0, C, (b, 1, -(-h // 4), -(-w // 4)), generator=g)
    coarse[torch.rand(coarse.shape, generator=g) < ignore_share] = IGNORE
    maps = torch.nn.functional.interpolate(coarse.float(), scale_factor=4, mode="nearest").long()[:, 0]
    return maps[:, :h, :w].contiguous()


def memory_bank(device: torch.device, g: torch.Generator, size: int = 24) -> MemoryBank:
    bank = MemoryBank(C, size=size, dim=D, device=device)
    counts = torch.tensor([size, size // 2, 1, 0, size, 3, 2])  # full, partial, single, empty
    memory = torch.randn(C, size, D, generator=g) * (torch.arange(size)[None, :, None] < counts[:, None, None])
    bank.load_state_dict({"memory": memory, "counts": counts})
    return bank


def selectors(g_seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(g_seed)
    return [class_selector(D).train() for _ in range(C)]


# ------------------------------------------------------------------------------------------ contrastive loss
@pytest.mark.parametrize("memory_weights", ["ones", "release", "mean"])
def test_contrastive_loss_and_gradients_agree(memory_weights):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(300, D, generator=g)
    labels = skewed_labels(300, g)
    feature_sel, memory_sel = selectors(1), selectors(2)
    results = {}
    for side, device in SIDES:
        g_bank = torch.Generator().manual_seed(3)
        bank = memory_bank(device, g_bank)
        fs = [copy.deepcopy(m).to(device) for m in feature_sel]
        ms = [copy.deepcopy(m).to(device) for m in memory_sel]
        x = features.to(device).requires_grad_(True)
        loss = contrastive_loss(x, labels.to(device), bank, fs, ms, C, memory_weights=memory_weights)
        loss.backward()
        results[side] = (loss, x.grad, fs, ms)
    loss_c, grad_c, fs_c, ms_c = results["cpu"]
    loss_d, grad_d, fs_d, ms_d = results["dut"]
    assert float(loss_c.detach()) > 0
    close(loss_d, loss_c)
    close(grad_d, grad_c, rtol=1e-4, atol=1e-7)
    for mods_d, mods_c in ((fs_d, fs_c), (ms_d, ms_c)):
        for m_d, m_c in zip(mods_d, mods_c):
            for (name, p_d), p_c in zip(m_d.named_parameters(), m_c.parameters()):
                assert (p_d.grad is None) == (p_c.grad is None), name
                if p_c.grad is not None:
                    close(p_d.grad, p_c.grad, rtol=1e-4, atol=1e-6)
            for b_d, b_c in zip(m_d.buffers(), m_c.buffers()):   # BatchNorm running statistics
                close(b_d, b_c, rtol=1e-5, atol=1e-6)
    if memory_weights != "ones":  # the memory selectors take part with "release" and "mean"
        assert any(p.grad is not None for m in ms_c for p in m.parameters())


# ------------------------------------------------------------------------------------------- memory update
@pytest.mark.parametrize("keep", ["lowest", "highest"])
def test_memory_update_agrees(keep):
    g = torch.Generator().manual_seed(10)
    features = torch.randn(120, D, generator=g)
    labels = skewed_labels(120, g)
    sel = selectors(11)
    banks, mods = {}, {}
    for side, device in SIDES:
        bank = memory_bank(device, torch.Generator().manual_seed(12))
        ms = [copy.deepcopy(m).to(device) for m in sel]
        with torch.no_grad():
            bank.add(features.to(device), labels.to(device), ms, quota=6, keep=keep)
            bank.add(features[:40].to(device) * 2, labels[:40].to(device), ms, quota=6, keep=keep)
        banks[side], mods[side] = bank, ms
    assert banks["dut"].memory.device.type == banks["dut"].counts.device.type == DEVICE.type  # the bank lives there
    assert torch.equal(banks["dut"].counts.cpu(), banks["cpu"].counts)
    assert banks["cpu"].counts.tolist() != memory_bank(CPU, torch.Generator().manual_seed(12)).counts.tolist()
    close(banks["dut"].memory, banks["cpu"].memory, rtol=0, atol=0)     # stored vectors are copies: exact
    for m_d, m_c in zip(mods["dut"], mods["cpu"]):
        for b_d, b_c in zip(m_d.buffers(), m_c.buffers()):
            close(b_d, b_c, rtol=1e-5, atol=1e-6)


def test_memory_state_from_a_cpu_checkpoint_loads_on_the_device():
    """A resume maps the checkpoint to the CPU (engine/run.py): its memory state, CPU tensors, must load into a
    bank on the device, the unused slots zeroed on the device."""
    state = memory_bank(CPU, torch.Generator().manual_seed(13)).state_dict()
    state["memory"][:, -1] = 1.0                                      # garbage beyond every count below the size
    state["counts"] = state["counts"].clamp(max=23)                  # size 24: slot 23 is unused in every class
    loaded = {}
    for side, device in SIDES:
        bank = MemoryBank(C, size=24, dim=D, device=device)
        bank.load_state_dict({k: v.clone() for k, v in state.items()})
        assert bank.memory.device.type == bank.counts.device.type == torch.device(device).type
        loaded[side] = bank
    assert torch.equal(loaded["dut"].counts.cpu(), loaded["cpu"].counts)
    close(loaded["dut"].memory, loaded["cpu"].memory, rtol=0, atol=0)
    assert not loaded["cpu"].memory[:, -1].any()                      # the garbage is gone


# ------------------------------------------------------------------------------------------ class balancing
def test_class_balancing_agrees():
    g = torch.Generator().manual_seed(20)
    labeled = [label_maps(2, 16, 24, g) for _ in range(2)]
    pseudo = [torch.randint(0, C - 1, (1, 16, 24), generator=g) for _ in range(5)]  # class C-1 never seen
    out = {}
    for side, device in SIDES:
        cb = ClassBalancing(C, labeled_slots=2, unlabeled_slots=3, device=device)
        weights = [cb.update(labeled[k].to(device) if k < 2 else None, p.to(device)) for k, p in enumerate(pseudo)]
        out[side] = (cb, weights)
    cb_c, w_c = out["cpu"]
    cb_d, w_d = out["dut"]
    assert cb_d.labeled.device.type == cb_d.unlabeled.device.type == DEVICE.type  # the histories live there
    assert torch.equal(cb_d.labeled.cpu(), cb_c.labeled) and torch.equal(cb_d.unlabeled.cpu(), cb_c.unlabeled)
    assert w_c[0].tolist() == [1.0] * C and w_c[-1].tolist() != [1.0] * C        # filled after the third update
    for a, b in zip(w_d, w_c):
        assert a.dtype == b.dtype == torch.float32 and a.device.type == DEVICE.type  # the ones before filling too
        close(a, b)


def test_class_count_reference_counts_on_the_device():
    """The compare-and-sum reference (benchmarks/bench_components.py --compare-reference times it on the device)
    builds its class indices on the labels' device: counts as numpy's bincount gives them."""
    labels = torch.randint(0, C, (2, 16, 24), generator=torch.Generator().manual_seed(21))
    counts = _class_counts_reference(labels.to(DEVICE), C)
    assert counts.device.type == DEVICE.type and counts.dtype == torch.int64
    assert counts.cpu().tolist() == np.bincount(labels.flatten().numpy(), minlength=C).tolist()


# ------------------------------------------------------------------------------------------------ ClassMix
def test_classmix_agrees():
    g = torch.Generator().manual_seed(30)
    labels = label_maps(3, 20, 28, g)
    images = torch.rand(3, 3, 20, 28, generator=g) * 255
    confidences = torch.rand(3, 20, 28, generator=g)
    out = {}
    for side, device in SIDES:
        torch.manual_seed(31)
        with random_draws_on_cpu():
            masks = classmix_masks(labels.to(device), IGNORE, drop_background=True)
        mixed = classmix(masks, images.to(device), labels.to(device), confidences.to(device))
        out[side] = (masks, *mixed)
    for a, b in zip(out["dut"], out["cpu"]):
        assert torch.equal(a.cpu(), b)                                                   # selections: exact
    masks = out["cpu"][0]
    assert masks.any() and not masks.all()


# ------------------------------------------------------------------------------------------- augmentations
@pytest.mark.parametrize("kind", ["weak", "strong_classmix"])
def test_augmentations_agree(kind):
    g = torch.Generator().manual_seed(40)
    images = torch.rand(2, 3, 40, 56, generator=g) * 255
    labels = label_maps(2, 40, 56, g)
    confidences = torch.rand(2, 40, 56, generator=g)
    out = {}
    # several seeds: scale up (crop) and down (pad), flip, jitter and blur are each drawn in some of them
    for seed in range(6):
        for side, device in SIDES:
            random.seed(seed)
            torch.manual_seed(seed)
            x, y, p = images.to(device), labels.to(device), confidences.to(device)
            with random_draws_on_cpu():
                if kind == "weak":
                    result = weak_augment(x, y, None, ignore_label=IGNORE, channel_order="BGR")
                else:
                    masks = classmix_masks(y, IGNORE, drop_background=False)
                    result = strong_augment(x, y, p, ignore_label=IGNORE, channel_order="RGB", classmix_masks=masks)
            out[(seed, side)] = result
        (xd, yd, pd), (xc, yc, pc) = out[(seed, "dut")], out[(seed, "cpu")]
        assert xd.shape == xc.shape == images.shape
        close(xd, xc, rtol=0, atol=0.05)
        assert torch.equal(yd.cpu(), yc), f"labels differ (seed {seed})"              # nearest resampling: exact
        if pc is not None:
            close(pd, pc, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(out[(s, "cpu")][0], images) for s in range(6))           # something happened


# ---------------------------------------------------------------------------------------- confusion matrix
def test_confusion_matrix_agrees():
    g = torch.Generator().manual_seed(50)
    label = label_maps(1, 64, 96, g)[0]
    label[0, :5] = -1
    pred = torch.randint(0, C, (64, 96), generator=g)
    cm_c = confusion_matrix(pred, label, C)
    cm_d = confusion_matrix(pred.to(DEVICE), label.to(DEVICE), C)
    assert cm_d.device.type == DEVICE.type and cm_d.dtype == torch.int64
    assert torch.equal(cm_d.cpu(), cm_c)
    assert int(cm_c.sum()) == int(((label >= 0) & (label < C)).sum())


# -------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("class_weights", [False, True])
def test_losses_and_gradients_agree(class_weights):
    g = torch.Generator().manual_seed(60)
    logits = torch.randn(2, C, 12, 20, generator=g) * 3
    labels = label_maps(2, 12, 20, g)
    pixel_weight = torch.rand(2, 12, 20, generator=g) ** 6
    weight = torch.rand(C, generator=g) + 0.5 if class_weights else None
    out = {}
    for side, device in SIDES:
        x = logits.to(device).requires_grad_(True)
        y = labels.to(device)
        w = None if weight is None else weight.to(device)
        terms = [supervised_ce(x, y, IGNORE, w), pseudo_label_ce(x, y, pixel_weight.to(device), IGNORE, w),
                 entropy_loss(torch.softmax(x, 1), y != IGNORE),
                 entropy_loss(torch.softmax(x, 1), y != IGNORE, broadcast_mask_bug=True)]
        grads = [torch.autograd.grad(t, x, retain_graph=True)[0] for t in terms]
        out[side] = (terms, grads)
    for a, b in zip(out["dut"][0], out["cpu"][0]):
        assert a.dim() == 0 and float(b.detach()) > 0
        close(a, b)
    for a, b in zip(out["dut"][1], out["cpu"][1]):
        close(a, b, rtol=1e-4, atol=1e-7)


def test_rng_state_round_trip_includes_the_cuda_generator():
    """latest.pth's RNG states hold the CUDA generators when there is CUDA, and set_rng_state puts them back: the
    draws on the device after a resume are those of the uninterrupted run (on the CPU stand-in: the CPU's)."""
    from engine.rng import rng_state, set_rng_state
    torch.manual_seed(3)
    state = rng_state()
    assert ("cuda" in state) == torch.cuda.is_available()
    expected = torch.rand(4, device=DEVICE)
    torch.rand(7, device=DEVICE)
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device=DEVICE), expected)
    # a checkpoint written on a machine without CUDA resumes on one with it (its CUDA generators left as they are)
    set_rng_state({k: v for k, v in state.items() if k != "cuda"})
