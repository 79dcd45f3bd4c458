"""Tiny training runs for tests: the argv of a real `Run` on the synthetic demo config shrunk to CPU seconds,
planted evaluation results, and the schedules written out by hand (expected values that do not come from the
functions under test)."""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

import pytest
import torch

from engine import run as training
from engine.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.json")
# backbone.width of the tests' tiny runs: a ResNet-18 with a quarter of the standard channels (stem 16, layer4 128)
# trains, evaluates and checkpoints about 4x faster; what these runs check (the run's machinery) does not depend
# on it. tests/test_model_width.py checks the width itself; the networks of the release are checked at width 64.
TINY_WIDTH = 16


def tiny_sets(run_dir: str, iterations: int, **extra) -> dict:
    """The demo config (synthetic scenes) shrunk to a few CPU seconds per run: DeepLabv2 on ResNet-18, batch 2
    (one unlabeled image, two strong views), 33x49 crops of 40x60 scenes, 4 training images of which 2 labeled
    (class-balancing histories of 1 labeled and 2 unlabeled slots: full from iteration 1 on), 2 validation
    images, no evaluation, checkpoint or BatchNorm refresh unless asked for."""
    sets = {
        "version": "2", "backbone.depth": 18, "backbone.width": TINY_WIDTH,
        "training.batch_size": 2, "training.num_workers": 0,
        "training.num_iterations": iterations, "training.learning_rate": 0.01,
        "training.data.labeled_samples": 2, "training.data.input_size": "33,49",
        "synthetic.num_train": 4, "synthetic.num_val": 2, "synthetic.image_size": "40,60",
        "method.class_balancing": True, "method.bn_refresh_iterations": 0,
        "utils.checkpoint_dir": run_dir, "utils.run_name": "", "utils.val_per_iter": 1000, "utils.save_checkpoint_every": 1000,
        "utils.save_latest_every": 1000, "utils.log_every": 1, "utils.tensorboard": False, "utils.log_images": 0,
        "utils.curves": False,  # about a second of matplotlib per run; tests/test_logging.py draws them
    }
    sets.update(extra)
    return sets


def argv_of(sets: dict, config: str = DEMO, device: str = "cpu") -> list[str]:
    argv = ["--config", config, "--device", device]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return argv


@contextmanager
def single_thread():
    """One intra-op thread: on a shared 2-core machine these tiny convolutions run several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def planted_miou(by_iteration: dict):
    """Evaluations run for real, but report the mIoU `by_iteration[(i, tag)]` or else `by_iteration[i]` (0.0 where
    neither is given), so a run's new bests and returns to the best model happen where the test says, whatever the
    weights. Tags: "val", and "val_bn_refresh" for the evaluation after the final BatchNorm refresh."""
    real_evaluate = Run.evaluate

    def planted(self, model, i, tag="val"):
        miou = by_iteration.get((i, tag), by_iteration.get(i, 0.0))
        with pytest.MonkeyPatch.context() as mp:
            inner = training.evaluate
            mp.setattr(training, "evaluate", lambda *a, **k: {**inner(*a, **k), "miou": miou})
            return real_evaluate(self, model, i, tag)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "evaluate", planted)
        yield


# ------------------------------------------------------------------------------------- schedules by hand
def poly_by_hand(base: float, i: int, n: int, power: float = 0.9) -> float:
    return base * (1 - i / n) ** power


def ema_alpha_by_hand(i: int, n: int, div: int) -> float:
    """min(1 - 1/(div i + 1), 1 - 0.005 (cos(pi i / N) + 1) / 2) (SPEC 5.5)."""
    return min(1 - 1 / (div * i + 1), 1 - 0.005 * (math.cos(math.pi * i / n) + 1) / 2)


def ramp_by_hand(i: int, r: int) -> float:
    """exp(-5 (1 - i/R)^2) before R, 1 from R on (SPEC 4 step 8)."""
    return math.exp(-5 * (1 - i / r) ** 2) if i < r else 1.0


class TeacherProbe:
    """Wraps `run.optimizer_step` and checks, after every step, the teacher against the EMA of the step's
    student with alpha worked out by hand: teacher' = a teacher + (1 - a) student'. Records per iteration the
    largest deviation from that, and from the same formula with `other_div` (the other scripts' warm-up), so a
    test can see that the two are told apart."""

    def __init__(self, run: Run, div: int, other_div: int):
        self.run, self.div, self.other_div = run, div, other_div
        self.deviation: dict[int, float] = {}
        self.other_deviation: dict[int, float] = {}
        step = run.optimizer_step

        def optimizer_step(i, loss):
            before = [p.detach().clone() for p in run.teacher.parameters()]
            step(i, loss)
            student = [p.detach() for p in run.student_module.parameters()]
            after = [p.detach() for p in run.teacher.parameters()]
            for div, out in ((self.div, self.deviation), (self.other_div, self.other_deviation)):
                a = ema_alpha_by_hand(i, run.num_iterations, div)
                out[i] = max(float((t - (a * b + (1 - a) * s)).abs().max())
                             for t, b, s in zip(after, before, student))

        run.optimizer_step = optimizer_step
