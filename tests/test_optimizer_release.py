"""The released optimiser (issue 11, items 1 and 7; SPEC 3): ONE SGD group at the base learning rate holding every
trainable parameter, and gradients zeroed rather than freed between steps (torch 1.6's `zero_grad()`), so that
a parameter that once had a gradient keeps getting weight decay and momentum when a later loss does not reach it.
SGD values are worked out by hand below (torch's SGD: d = g + wd p; buf = d on the first step, else
momentum buf + d; p -= lr buf)."""
import os

import pytest
import torch
from torch import nn

from engine.batchnorm import BatchNormStatistics
from utils.ema import create_teacher
from engine.run import Run
from utils.variants import TRAIN_SSL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.json")


def test_run_optimiser_is_one_group_of_every_trainable_parameter(tmp_path, capsys):
    argv = ["--config", DEMO, "--device", "cpu", "--dry-run", "--set", f"utils.checkpoint_dir={tmp_path}",
            "--set", "training.learning_rate=0.004", "--set", "training.num_iterations=200",
            "--set", "training.use_teacher_train=true"]  # as before the demo's labeler became the student
    run = Run(TRAIN_SSL, argv)
    out = capsys.readouterr().out
    groups = run.optimizer.param_groups
    assert len(groups) == 1 and groups[0]["lr"] == 0.004
    ids = [id(p) for p in groups[0]["params"]]
    trainable = [id(p) for p in run.student.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    # backbone, ASPP / decoder, both heads and all 2C selectors are in it
    named = {id(p): n.split(".")[0] for n, p in run.student.named_parameters()}
    tops = {named[i] for i in ids}
    assert {"conv1", "layer4", "aspp", "decoder", "projection_head", "prediction_head",
            "contrastive_class_selector_0", f"contrastive_class_selector_memory{run.num_classes - 1}"} <= tops
    # the poly schedule sets that one rate: 0.004 (1 - 100/200)^0.9 = 0.004 * 0.535886731...
    run.set_learning_rate(100)
    assert groups[0]["lr"] == pytest.approx(0.004 * 0.5358867312681466, rel=1e-12)
    assert f"one group of {len(ids)} trainable tensors at lr 0.004" in out and "x10" not in out


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(1))
        self.b = nn.Parameter(torch.ones(1))
        self.c = nn.Parameter(torch.ones(1))   # never reached by any loss


def bare_run(model: nn.Module, fp16: bool) -> Run:
    """A Run holding only what optimizer_step uses."""
    run = Run.__new__(Run)
    run.student_module = model
    run.teacher = create_teacher(model)
    run.variant, run.num_iterations = TRAIN_SSL, 10
    run.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    run.scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    run.statistics = BatchNormStatistics(lambda: (model, run.teacher))
    return run


@pytest.mark.parametrize("fp16", [False, True])
def test_weight_decay_and_momentum_reach_a_parameter_without_gradient(fp16):
    model = Two()
    run = bare_run(model, fp16)
    # step 0: loss 2a + 3b. a: d = 2 + 0.01 = 2.01 -> a = 1 - 0.201 = 0.799; b: d = 3.01 -> b = 0.699
    run.optimizer_step(0, 2 * model.a.sum() + 3 * model.b.sum())
    assert model.a.item() == pytest.approx(0.799, rel=1e-6) and model.b.item() == pytest.approx(0.699, rel=1e-6)
    # step 1: loss 2a only. a: d = 2 + 0.00799 = 2.00799, buf = 0.9 * 2.01 + 2.00799 = 3.81699 -> 0.417301.
    # b keeps a zero gradient: d = 0.01 * 0.699 = 0.00699, buf = 0.9 * 3.01 + 0.00699 = 2.71599
    # -> b = 0.699 - 0.271599 = 0.427401 (with freed gradients b would stay 0.699)
    run.optimizer_step(1, 2 * model.a.sum())
    assert model.a.item() == pytest.approx(0.417301, rel=1e-6)
    assert model.b.item() == pytest.approx(0.427401, rel=1e-6)
    assert model.b.grad is not None and model.b.grad.item() == 0.0
    # c never had a gradient: no weight decay, no momentum, as in the release
    assert model.c.grad is None and model.c.item() == 1.0
    assert run.scaler.is_enabled() is fp16
