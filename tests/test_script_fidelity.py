"""Details of the released training scripts that change results (issue 11): the student's forward order seen through
the BatchNorm running statistics, which network ranks the memory with use_teacher_train false, and which network
each checkpoint holds with save_teacher_test. Expected values are worked out by hand from the released scripts.

Tiny synthetic runs (depth-18 network, random initialisation) on CPU.
"""
import json
import os

import pytest
import torch

import trainSSL
from tests.run_helpers import TINY_WIDTH
from benchmarks.common import cpu_threads
from utils import ssl_steps
from utils.class_balancing import ClassBalancing
from engine.run import Run
from utils.variants import LESS_MEMORY, TRAIN_SSL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.json")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with cpu_threads(1):
        yield


def make_run(variant, run_dir, **sets) -> Run:
    """B = 5 labeled (6 labeled images), B/2 = 2 unlabeled, 32x48 crops, memory and contrast far away (R = 1000)."""
    values = {"backbone.depth": 18, "backbone.width": TINY_WIDTH, "training.batch_size": 5, "training.num_iterations": 1,
              "training.data.labeled_samples": 6, "training.data.input_size": "32,48",
              "synthetic.num_train": 10, "synthetic.num_val": 2, "synthetic.image_size": "32,48",
              "method.ramp_up_iterations": 1000, "method.class_balancing": False, "method.bn_refresh_iterations": 0,
              "utils.checkpoint_dir": str(run_dir), "utils.run_name": "", "utils.tensorboard": False,
              "utils.curves": False,
              **sets}
    argv = ["--config", DEMO, "--device", "cpu"]
    for k, v in values.items():
        argv += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return Run(variant, argv)


def test_student_forward_order_sets_batchnorm_statistics(tmp_path):
    """Unlabeled views first, then the labeled batch (release: trainSSL.py). BatchNorm2d with momentum 0.1 from
    mean 0, var 1: after the views u then the labeled batch l, running mean = 0.9 (0.1 mean_u) + 0.1 mean_l and
    running var = 0.9 (0.9 + 0.1 var_u) + 0.1 var_l (unbiased batch variances)."""
    run = make_run(TRAIN_SSL, tmp_path / "run")
    bn = run.student_module.bn1  # the first BatchNorm of the student
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and bn.momentum == 0.1
    inputs = {}  # batch size -> the BatchNorm's input: 4 = two views of 2 unlabeled images, 5 = the labeled batch
    bn.register_forward_pre_hook(lambda module, args: inputs.setdefault(args[0].shape[0], args[0].detach().clone()))
    run.finish = lambda: (bn.running_mean.clone(), bn.running_var.clone())  # stop right after the loop
    run.save_latest = lambda next_iteration: None  # no run state written
    mean, var = trainSSL.train(run)
    assert sorted(inputs) == [4, 5]
    mean_u, var_u = inputs[4].mean(dim=(0, 2, 3)), inputs[4].var(dim=(0, 2, 3), unbiased=True)
    mean_l, var_l = inputs[5].mean(dim=(0, 2, 3)), inputs[5].var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(mean, 0.9 * 0.1 * mean_u + 0.1 * mean_l, rtol=1e-4, atol=1e-6)
    assert torch.allclose(var, 0.9 * (0.9 + 0.1 * var_u) + 0.1 * var_l, rtol=1e-4, atol=1e-6)
    # the other order would give visibly different statistics on these batches
    assert not torch.allclose(mean, 0.9 * 0.1 * mean_l + 0.1 * mean_u, rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def labeler_run(tmp_path_factory):
    """trainSSL.py with pseudo-labels from the student (use_teacher_train false) and class balancing on."""
    return make_run(TRAIN_SSL, tmp_path_factory.mktemp("run"), **{"training.use_teacher_train": False,
                                                                 "method.memory_confidence": 0.0,
                                                                 "method.class_balancing": True})


def test_student_labeler_ranks_memory_with_teacher_selectors(labeler_run, monkeypatch):
    """use_teacher_train false (release: all three scripts): pseudo-labels, memory predictions, features and
    projections come from the student in eval mode, but the memory is ranked with the EMA model's selectors."""
    run = labeler_run
    assert run.labeler is run.student_module
    calls = []
    run.student_module.register_forward_pre_hook(lambda m, a: calls.append(("student", m.training)))
    run.teacher.register_forward_pre_hook(lambda m, a: calls.append(("teacher", m.training)))
    projections = []
    run.student_module.projection_head.register_forward_pre_hook(lambda m, a: projections.append(m.training))
    ranked_with = []
    add = run.memory.add
    monkeypatch.setattr(run.memory, "add", lambda feats, labels, selectors, **kw: (ranked_with.append(selectors),
                                                                                   add(feats, labels, selectors, **kw)))
    images, labels = run.labeled.next()[:2]
    ssl_steps.update_memory(run.step_context(), images, labels)
    assert calls == [("student", False)] and projections == [False]
    assert run.student_module.training  # back in train mode
    (selectors,) = ranked_with
    teacher_selectors = run.teacher.feature_selectors()
    assert len(selectors) == len(teacher_selectors) == run.num_classes
    assert all(a is b for a, b in zip(selectors, teacher_selectors))
    assert int(run.memory.counts.sum()) > 0  # vectors were ranked and kept
    calls.clear()
    ssl_steps.pseudo_label(run.step_context(), run.unlabeled.next()[0])
    assert calls == [("student", False)]


def test_class_weights_after_ramp_up_unless_ungated(labeler_run, monkeypatch):
    """The less-memory script's unlabeled step takes the class weights without the i > R gate (release)."""
    run = labeler_run
    C, R = run.num_classes, run.method["ramp_up_iterations"]
    labels = torch.cat([torch.arange(C), torch.tensor([0])]).view(1, 1, C + 1)  # counts (2, 1, 1, ..., 1)
    pseudo = torch.arange(C).view(1, 1, C)                                       # counts (1, 1, ..., 1)
    # one slot each: f = (3, 2, ..., 2), median 2 -> sqrt(2/3) for class 0, 1 elsewhere
    expected = torch.ones(C)
    expected[0] = (2 / 3) ** 0.5
    monkeypatch.setattr(run, "balancing", ClassBalancing(C, 1, 1))
    assert torch.equal(run.update_class_weights(R, labels, pseudo), torch.ones(C))  # i = R: not yet
    assert torch.allclose(run.update_class_weights(R, None, None, after_ramp_up=False), expected)
    assert torch.allclose(run.update_class_weights(R + 1, None, None), expected)


def fake_evaluation(run, mious):
    """Replace the evaluation by scripted mIoUs (in call order)."""
    results = iter(mious)
    run.evaluate = lambda model, i, tag="val": {"miou": next(results), "loss": 0.0,
                                                "iou": [0.0] * run.num_classes}


# (variant, save_teacher_test) -> the network in: periodic checkpoint, best model during the loop, final
# checkpoint, best model of the final evaluation. Read in the released scripts: trainSSL.py saves the EMA model in
# periodic and best checkpoints when save_teacher is set; trainSSL_less_memory.py and the domain-adaptation script
# only in best ones; all three save the student in the final checkpoint and after the loop.
CHECKPOINT_MODELS = {
    (TRAIN_SSL, True): ("teacher", "teacher", "student", "student"),
    (LESS_MEMORY, True): ("student", "teacher", "student", "student"),
    (TRAIN_SSL, False): ("student", "student", "student", "student"),
}


@pytest.mark.parametrize("variant,save_teacher", list(CHECKPOINT_MODELS), ids=["train_teacher", "less_memory_teacher",
                                                                               "train_student"])
def test_which_network_each_checkpoint_holds(variant, save_teacher, tmp_path, monkeypatch):
    run = make_run(variant, tmp_path / "run", **{"training.save_teacher_test": save_teacher})
    with torch.no_grad():
        next(run.teacher.parameters()).add_(1.0)  # teacher and student now differ
    key = next(iter(run.student_module.state_dict()))
    nets = {"teacher": run.teacher.state_dict()[key].clone(), "student": run.student_module.state_dict()[key].clone()}
    assert not torch.equal(nets["teacher"], nets["student"])
    saved = {}  # checkpoint file name -> its model's first tensor, as written (kept in memory: no disk writes)
    monkeypatch.setattr("engine.run.save_atomic",
                        lambda obj, path: saved.__setitem__(os.path.basename(path), obj["model"][key].clone()))

    def holds(name: str) -> str:
        (match,) = [n for n, value in nets.items() if torch.equal(saved[name], value)]
        return match

    fake_evaluation(run, [0.5, 0.6])
    run.save_periodic(1)
    periodic = holds("checkpoint-iter1.pth")
    run.evaluate_and_keep_best(1)                   # mIoU 0.5: a new best during the loop
    best = holds("best_model.pth")
    run.finish()                                    # final evaluation, mIoU 0.6: a new best after the loop
    N = run.num_iterations
    assert N == variant.steps_per_iteration  # training.num_iterations 1
    assert (periodic, best, holds(f"checkpoint-iter{N}.pth"), holds("best_model.pth")) == \
        CHECKPOINT_MODELS[(variant, save_teacher)]
