"""Mixed precision: whole trainSSL.py iterations under bf16 autocast on CPU (tiny DeepLabv2, 5 classes, 33x33
crops, past the ramp-up so every term runs). The networks compute in bf16; the memory bank, the vectors it
receives, the contrastive inputs, every loss term and all parameters stay float32, and the loss is finite."""
import math

import pytest
import torch

import utils.ssl_steps as step
from tests.run_helpers import TINY_WIDTH
from benchmarks.bench_step import LoopClock, build_run, run_iterations
from engine.config import resolve_config
from utils.memory_bank import MemoryBank

CLASSES = 5
R = 1  # ramp-up iterations: iterations 2 and 3 have ClassMix, memory update and both contrastive terms


def tiny_config(precision: str) -> dict:
    return resolve_config({
        "dataset": "folder", "folder": {"num_classes": CLASSES}, "version": "2", "precision": precision,
        "backbone": {"depth": 18, "pretrained": "none", "width": TINY_WIDTH},
        "training": {"batch_size": 2, "num_iterations": 100, "learning_rate": 0.01, "pretraining": "imagenet",
                     "data": {"labeled_samples": 4, "input_size": "33,33"}},
        "method": {"ramp_up_iterations": R, "memory_start_offset": 1, "memory_confidence": 0.0},
        "ignore_label": 250, "utils": {"log_images": 0, "tensorboard": False, "curves": False},
    }, "test_precision")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bf16_run():
    """Two bf16 iterations from an EMPTY memory bank, with what the parts received recorded."""
    torch.manual_seed(0)
    run = build_run(tiny_config("bf16"), torch.device("cpu"))
    assert run.student_module.num_classes == CLASSES and run.student_module.depth == 18
    run.memory = MemoryBank(CLASSES, size=256, dim=256, device="cpu")
    seen = {"net_out": [], "memory_in": [], "contrastive_in": [], "terms": []}
    hook = run.student.register_forward_hook(
        lambda m, i, out: seen["net_out"].append(tuple(t.dtype for t in (out if isinstance(out, tuple) else (out,)))))
    add = run.memory.add

    def recording_add(features, labels, *args, **kwargs):
        seen["memory_in"].append((features.dtype, features.shape[0]))
        return add(features, labels, *args, **kwargs)
    run.memory.add = recording_add
    loss_fn = step.contrastive_loss

    def recording_loss(features, *args, **kwargs):
        seen["contrastive_in"].append(features.dtype)
        out = loss_fn(features, *args, **kwargs)
        seen["contrastive_out"] = out.dtype
        return out
    before = {k: v.detach().clone() for k, v in run.student_module.state_dict().items()}
    teacher_before = [p.detach().clone() for p in run.teacher.parameters()]
    clock = LoopClock(torch.device("cpu"))
    step.contrastive_loss = recording_loss
    try:
        original_end = clock.end_iteration

        def end_iteration(i, terms):
            seen["terms"].append({k: v.detach() for k, v in terms.items()})
            original_end(i, terms)
        clock.end_iteration = end_iteration
        run_iterations(run, R + 1, 2, clock)
    finally:
        step.contrastive_loss = loss_fn
        hook.remove()
    return run, seen, before, teacher_before


def test_autocast_context_is_bf16_on_cpu(bf16_run):
    run = bf16_run[0]
    with run.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert torch.nn.Linear(3, 2)(torch.ones(1, 3)).dtype == torch.float32  # and it ends with the block


def test_networks_ran_in_bf16(bf16_run):
    _, seen, _, _ = bf16_run
    assert len(seen["net_out"]) == 4                                    # labeled + unlabeled, two iterations
    assert all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen["net_out"])  # logits, features


def test_memory_bank_and_its_inputs_stay_float32(bf16_run):
    run, seen, _, _ = bf16_run
    assert len(seen["memory_in"]) == 2 and all(d == torch.float32 and n > 0 for d, n in seen["memory_in"])
    assert run.memory.memory.dtype == torch.float32 and run.memory.counts.dtype == torch.int64
    assert int(run.memory.counts.sum()) > 0
    assert torch.isfinite(run.memory.memory).all()


def test_losses_float32_and_finite(bf16_run):
    _, seen, _, _ = bf16_run
    assert seen["contrastive_in"] == [torch.float32] * 4 and seen["contrastive_out"] == torch.float32
    assert len(seen["terms"]) == 2
    for terms in seen["terms"]:
        assert set(terms) == {"loss", "loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u"}
        for name, value in terms.items():
            assert value.dtype == torch.float32 and value.dim() == 0, name
            assert math.isfinite(float(value)), name
        assert float(terms["loss"]) > 0
    # the second iteration found vectors in memory from the first: its contrastive terms are not zero
    assert float(seen["terms"][1]["loss_contr_l"]) > 0 and float(seen["terms"][1]["loss_contr_u"]) > 0


def test_step_updates_float32_parameters(bf16_run):
    run, _, before, teacher_before = bf16_run
    params = dict(run.student_module.named_parameters())
    changed = [name for name, p in params.items() if p.requires_grad and not torch.equal(p, before[name])]
    assert "layer5.conv2d_list.0.weight" in changed and "projection_head.0.weight" in changed
    assert "contrastive_class_selector_0.0.weight" in changed or "contrastive_class_selector_1.0.weight" in changed
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    moved = sum(not torch.equal(a, b) for a, b in zip(teacher_before, run.teacher.parameters()))
    assert moved > 0 and all(p.dtype == torch.float32 for p in run.teacher.parameters())
