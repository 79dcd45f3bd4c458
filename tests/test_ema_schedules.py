"""EMA teacher (SPEC 5.5) and the lr / ramp-up schedules, with values worked out by hand."""
import math

import pytest
import torch
from torch import nn

from utils.ema import create_teacher, ema_alpha, ema_momentum, update_teacher
from utils.schedules import poly_lr, ramp_up, set_lr


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.bn.weight.requires_grad_(False)  # frozen affine, still a parameter

    def forward(self, x):
        return self.bn(self.conv(x))


class Wrapper(nn.Module):
    """Stand-in for DistributedDataParallel: the model is at `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_ema_momentum():
    assert ema_momentum(0, 1000) == pytest.approx(0.995, abs=1e-12)
    assert ema_momentum(500, 1000) == pytest.approx(0.9975, abs=1e-12)
    assert ema_momentum(1000, 1000) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "warmup_div, expected",
    [(10, {0: 0.0, 1: 1 - 1 / 11, 10: 1 - 1 / 101}), (1, {0: 0.0, 1: 0.5, 10: 1 - 1 / 11})],
)
def test_ema_alpha_warm_up(warmup_div, expected):
    for i, value in expected.items():
        assert ema_alpha(i, 1000, warmup_div) == pytest.approx(value, abs=1e-12)
    # late: the momentum is the smaller one
    assert ema_alpha(500, 1000, warmup_div) == pytest.approx(0.9975, abs=1e-12)


def _fill(module, start):
    with torch.no_grad():
        for k, p in enumerate(module.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + start + 8 * k)


def test_create_teacher_copies_parameters_and_resets_buffers():
    student = Tiny()
    student.train()
    student(torch.randn(4, 2, 3, 3) * 5 + 3)  # moves the student's running statistics
    student.eval()
    assert student.bn.num_batches_tracked.item() == 1
    teacher = create_teacher(Wrapper(student))
    assert isinstance(teacher, Tiny) and teacher.training
    for (name, tp), (_, sp) in zip(teacher.named_parameters(), student.named_parameters()):
        assert torch.equal(tp, sp), name
        assert not tp.requires_grad
        assert tp.data_ptr() != sp.data_ptr()
    assert torch.equal(teacher.bn.running_mean, torch.zeros(2))
    assert torch.equal(teacher.bn.running_var, torch.ones(2))
    assert teacher.bn.num_batches_tracked.item() == 0
    assert not torch.equal(student.bn.running_mean, torch.zeros(2))  # student untouched
    assert student.conv.weight.requires_grad


def test_update_teacher_exact_parameters_only():
    student, teacher_src = Tiny(), Tiny()
    _fill(student, 0.0)
    teacher = create_teacher(teacher_src)
    _fill(teacher, 4.0)
    with torch.no_grad():
        teacher.bn.running_mean.fill_(7.0)
        student.bn.running_mean.fill_(-3.0)
    expected = [0.75 * tp.clone() + 0.25 * sp for tp, sp in zip(teacher.parameters(), student.parameters())]
    # values are small dyadic numbers, so 0.75 t + 0.25 s is exact in float32: 3 + s
    update_teacher(teacher, Wrapper(student), 0.75)
    for tp, sp, e in zip(teacher.parameters(), student.parameters(), expected):
        assert torch.equal(tp, e)
        assert torch.equal(tp, sp + 3.0)
    assert torch.equal(teacher.bn.running_mean, torch.full((2,), 7.0))
    assert torch.equal(student.bn.running_mean, torch.full((2,), -3.0))
    update_teacher(teacher, student, 0.0)  # alpha 0: the teacher becomes the student
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(tp, sp)


def test_update_teacher_with_student_grad_enabled():
    student = Tiny()
    teacher = create_teacher(student)
    loss = student(torch.randn(1, 2, 2, 2)).sum()
    update_teacher(teacher, student, 0.5)  # must not record into the student's graph
    loss.backward()
    assert all(not p.requires_grad for p in teacher.parameters())


def test_poly_lr():
    assert poly_lr(2.5e-4, 0, 100, 0.9) == pytest.approx(2.5e-4, rel=1e-12)
    assert poly_lr(2.5e-4, 50, 100, 0.9) == pytest.approx(2.5e-4 * 0.5 ** 0.9, rel=1e-12)
    assert poly_lr(1.0, 75, 100, 2.0) == pytest.approx(0.0625, rel=1e-12)


def test_ramp_up():
    assert ramp_up(0, 2000) == pytest.approx(math.exp(-5.0), rel=1e-12)
    assert ramp_up(1000, 2000) == pytest.approx(math.exp(-1.25), rel=1e-12)
    assert ramp_up(2000, 2000) == 1.0
    assert ramp_up(5000, 2000) == 1.0
    assert ramp_up(0, 0) == 1.0
    assert ramp_up(3, -1) == 1.0


def test_set_lr_groups():
    # the release sets one rate for every group (it has one; its schedule set a second group to lr too, not 10 lr)
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 10.0}], lr=1.0)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    single = torch.optim.SGD([a], lr=1.0)
    set_lr(single, 0.02)
    assert single.param_groups[0]["lr"] == 0.02
