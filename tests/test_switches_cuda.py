"""The config switches that act on CUDA only, in one tiny trainSSL.py run on the device under test (marker `cuda`:
`make gpu-check` runs it): precision "fp16" (autocast float16 and the gradient scaler), channels_last (CUDA runs
convert student and teacher), training.compile.

SSL_CUDA_TESTS_ON_CPU=1 lets the CPU stand in, but this file is not one of the tests/test_cuda_*.py files that
gpu_check's dry run (inside `make test`) runs that way: float16 convolutions on a CPU make the run ~35 CPU seconds.

training.compile is run with TorchDynamo's "aot_eager" backend: graph capture of the student's forward and
AOTAutograd's backward, which is where the run's wiring meets the compiler (a compiled forward returning
(logits, features), heads and selectors called on the uncompiled module, state-dict names); Inductor's code
generation takes minutes on a CPU and tens of seconds on a GPU, and is timed by gpu_check's bench_step_compile step.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import trainSSL
from benchmarks.common import cpu_threads
from tests.cuda_support import CUDA_MARKS, DEVICE
from tests.run_helpers import argv_of, tiny_sets
from utils import ssl_steps
from engine.run import Run
from utils.variants import TRAIN_SSL

pytestmark = CUDA_MARKS

N = 3  # R = 1: memory from iteration 1, contrastive terms and class weights at iteration 2


@pytest.fixture(scope="module")
def switched_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    sets = tiny_sets(run_dir, N, precision="fp16", **{
        "training.compile": True, "method.ramp_up_iterations": 1, "method.memory_start_offset": 1,
        "method.memory_confidence": 0.0})
    seen = {"compiled": [], "features": [], "terms": [], "scale": []}
    real_compile = torch.compile

    def compile_(module, **kwargs):
        compiled = real_compile(module, **{**kwargs, "backend": "aot_eager"})
        seen["compiled"].append((module, compiled))
        return compiled

    forward_student = ssl_steps.forward_student

    def forward(run, images):
        logits, features = forward_student(run, images)
        seen["features"].append((logits.dtype, features.dtype))
        return logits, features

    torch._dynamo.reset()
    with cpu_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", compile_)
        mp.setattr(ssl_steps, "forward_student", forward)
        run = Run(TRAIN_SSL, argv_of(sets, device=DEVICE.type))
        end_iteration, optimizer_step = run.end_iteration, run.optimizer_step

        def end(i, terms):
            seen["terms"].append({k: float(v.detach()) for k, v in terms.items()})
            end_iteration(i, terms)

        def step(i, loss):
            optimizer_step(i, loss)
            seen["scale"].append(run.scaler.get_scale())

        run.end_iteration, run.optimizer_step = end, step
        run.finish = lambda: run.logger.close()
        before = [p.detach().clone() for p in run.teacher.parameters()]
        frames_before = torch._dynamo.utils.counters["frames"]["ok"]
        trainSSL.train(run)
        seen["frames"] = torch._dynamo.utils.counters["frames"]["ok"] - frames_before
        seen["teacher_moved"] = sum(not torch.equal(a, b) for a, b in zip(before, run.teacher.parameters()))
    torch._dynamo.reset()
    return run, seen


def test_fp16_autocast_and_gradient_scaler(switched_run):
    run, seen = switched_run
    assert run.precision == "fp16" and run.scaler.is_enabled()
    # labeled and unlabeled forwards, every iteration: network outputs in float16, logits upsampled to float32
    assert seen["features"] == [(torch.float32, torch.float16)] * (2 * N)
    assert len(seen["scale"]) == N and all(0 < s <= 65536.0 and math.log2(s).is_integer() for s in seen["scale"])
    assert [sorted(t) for t in seen["terms"]][-1] == ["loss", "loss_contr_l", "loss_contr_u", "loss_entropy",
                                                      "loss_pseudo", "loss_sup"]
    assert all(math.isfinite(v) for t in seen["terms"] for v in t.values())
    params = list(run.student_module.parameters()) + list(run.teacher.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert seen["teacher_moved"] > 0 and run.memory.memory.dtype == torch.float32 and int(run.memory.counts.sum()) > 0


def test_channels_last_on_cuda(switched_run):
    run, _ = switched_run
    convs = [m.weight for net in (run.student_module, run.teacher) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]
    layout = [w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs]
    expected = DEVICE.type == "cuda"  # a CPU run keeps the default layout
    assert len(convs) > 20 and layout == [expected] * len(convs)


def test_compiled_student_forwards_with_plain_state_dicts(switched_run):
    run, seen = switched_run
    ((module, compiled),) = seen["compiled"]
    assert module is run.student_module and run.student is compiled and compiled is not module
    assert seen["frames"] > 0  # TorchDynamo captured the student's forward
    names = set(run.student_module.state_dict())
    assert not any(n.startswith("_orig_mod.") for n in names) and "projection_head.0.weight" in names
    assert set(run.teacher.state_dict()) == names
    assert set(run.state_dict(N)["model"]) == names  # checkpoints load into an uncompiled network
