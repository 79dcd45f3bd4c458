"""Return to the best model across an interruption, with `save_teacher_test` and `use_teacher_train=false`, in one
tiny trainSSL.py run of N = 5 iterations that is interrupted after iteration 2 and resumed with --resume auto.

Evaluation after every iteration with PLANTED mIoU (tests/run_helpers.py): 0.2 at iteration 1, then 0.1. Worked
out by hand (return when more than N/5 = 1 iteration passed without improvement):
  iteration 1: new best, since_best 0, best_model.pth written (with save_teacher_test: the teacher);
  iteration 2: since_best 1; latest.pth of 3 iterations (save_latest_every 3), the run stops;
  resumed, iteration 3: since_best 2 > 1: back to best_model.pth, teacher rebuilt, since_best 0;
  iteration 4: since_best 1.
A resume that forgot since_best would return at iteration 4 instead. Periodic checkpoints at 2 and 4 (trainSSL.py
puts the teacher there with save_teacher_test). With use_teacher_train false the student, in eval mode, gives the
pseudo-labels and the memory's predictions and features; the teacher never runs a forward.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import trainSSL
from data.synthetic import CLASS_NAMES
from tests.run_helpers import argv_of, planted_miou, single_thread, tiny_sets
from engine.checkpoint import load_checkpoint
from utils.errors import UserError
from engine.run import Run
from utils.variants import TRAIN_SSL

N = 5
PLANTED = {1: 0.2, 2: 0.1, 3: 0.1, 4: 0.1}
STOP_AFTER = 3  # latest.pth holding 3 iterations (0, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


class Interrupted(Exception):
    pass


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class Probe:
    """What one Run (the first part or the resumed one) did, recorded from the outside."""

    def __init__(self, run: Run, log: dict):
        self.run, self.log = run, log
        self.in_loop_step = False
        run.student_module.register_forward_pre_hook(self._forward("student"))
        run.teacher.register_forward_pre_hook(self._forward("teacher"))

        set_lr, end, evaluate_and_keep_best = run.set_learning_rate, run.end_iteration, run.evaluate_and_keep_best
        back, periodic, add = run.return_to_best, run.save_periodic, run.memory.add

        def set_learning_rate(i):
            self.in_loop_step = True
            return set_lr(i)

        def end_iteration(i, terms):
            self.in_loop_step = False  # evaluations, checkpoints
            return end(i, terms)

        def keep_best(i, final=False):
            teacher, student = state_of(run.teacher), state_of(run.student_module)
            result = evaluate_and_keep_best(i, final)
            log["since_best"][i] = run.since_best
            if i == 1:
                log["at_best"] = {"teacher": teacher, "student": student,
                                  "file": load_checkpoint(os.path.join(run.run_dir, "best_model.pth"))["model"]}
            return result

        def return_to_best(i):
            log["returns"].append(i)
            back(i)
            teacher = run.teacher
            bn = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            log["after_return"] = {
                "student": state_of(run.student_module),
                "teacher_params": [p.detach().clone() for p in teacher.parameters()],
                "student_params": [p.detach().clone() for p in run.student_module.parameters()],
                "teacher_bn_fresh": all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
                                        and torch.equal(m.running_var, torch.ones_like(m.running_var))
                                        and int(m.num_batches_tracked) == 0 for m in bn) and len(bn) > 0,
                "labeler_is_student": run.labeler is run.student_module,
                "best_file": load_checkpoint(os.path.join(run.run_dir, "best_model.pth"))["model"]}
            teacher.register_forward_pre_hook(self._forward("teacher"))  # the rebuilt teacher is watched too

        def save_periodic(i):
            teacher, student = state_of(run.teacher), state_of(run.student_module)
            periodic(i)
            saved = load_checkpoint(os.path.join(run.run_dir, f"checkpoint-iter{i}.pth"))["model"]
            log["periodic"][i] = {"teacher": same(saved, teacher), "student": same(saved, student)}

        def memory_add(features, labels, selectors, **kw):
            log["ranked_with_teacher"].append(all(a is b for a, b in zip(selectors, run.teacher.feature_selectors()))
                                              and len(selectors) == run.num_classes)
            return add(features, labels, selectors, **kw)

        run.set_learning_rate, run.end_iteration, run.evaluate_and_keep_best = set_learning_rate, end_iteration, keep_best
        run.return_to_best, run.save_periodic, run.memory.add = return_to_best, save_periodic, memory_add

    def _forward(self, name: str):
        def hook(module, args):
            if self.in_loop_step:
                self.log["forwards"].setdefault(self.run.iteration, []).append((name, module.training))
        return hook


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    argv = argv_of(tiny_sets(run_dir, N, **{
        "utils.val_per_iter": 1, "utils.save_latest_every": STOP_AFTER, "utils.save_checkpoint_every": 2,
        "training.save_teacher_test": True, "training.use_teacher_train": False,
        "method.ramp_up_iterations": 1, "method.memory_start_offset": 1, "method.memory_confidence": 0.0}))
    log = {"since_best": {}, "returns": [], "periodic": {}, "forwards": {}, "ranked_with_teacher": []}
    with planted_miou(PLANTED):
        first = Run(TRAIN_SSL, argv)
        Probe(first, log)
        save_latest = first.save_latest

        def save_then_stop(next_iteration):
            save_latest(next_iteration)
            if next_iteration == STOP_AFTER:
                raise Interrupted

        first.save_latest = save_then_stop
        with pytest.raises(Interrupted):
            trainSSL.train(first)
        first.logger.close()
        log["latest_at_stop"] = load_checkpoint(os.path.join(run_dir, "latest.pth"))
        resumed = Run(TRAIN_SSL, argv + ["--resume", "auto"])
        log["resumed_start"] = (resumed.start_iteration, resumed.since_best, resumed.best_miou)
        Probe(resumed, log)
        resumed.finish = lambda: resumed.logger.close()
        trainSSL.train(resumed)
    return run_dir, log


def test_since_best_survives_the_resume(interrupted_and_resumed):
    _, log = interrupted_and_resumed
    latest = log["latest_at_stop"]
    assert latest["iteration"] == STOP_AFTER and latest["since_best"] == 1 and latest["best_miou"] == 0.2
    assert log["resumed_start"] == (STOP_AFTER, 1, 0.2)
    assert log["since_best"] == {1: 0, 2: 1, 3: 2, 4: 1}  # after each evaluation; the return at 3 resets it
    assert log["returns"] == [3]  # an uninterrupted run returns at 3 as well (by hand, module docstring)


def test_return_to_best_loads_best_model_and_rebuilds_the_teacher(interrupted_and_resumed):
    _, log = interrupted_and_resumed
    after = log["after_return"]
    assert same(after["student"], after["best_file"])
    # with save_teacher_test the best model written in the loop is the teacher of iteration 1 (as released)
    assert same(after["student"], log["at_best"]["teacher"])
    assert all(torch.equal(t, s) for t, s in zip(after["teacher_params"], after["student_params"]))
    assert len(after["teacher_params"]) == len(after["student_params"])
    assert after["teacher_bn_fresh"]            # a new teacher: BatchNorm statistics from their defaults
    assert after["labeler_is_student"]          # use_teacher_train false stays false


def test_save_teacher_test_puts_the_teacher_in_best_and_periodic_checkpoints(interrupted_and_resumed):
    _, log = interrupted_and_resumed
    at_best = log["at_best"]
    assert not same(at_best["teacher"], at_best["student"])
    assert same(at_best["file"], at_best["teacher"])
    assert log["periodic"] == {2: {"teacher": True, "student": False}, 4: {"teacher": True, "student": False}}


def test_student_in_eval_mode_labels_when_use_teacher_train_is_false(interrupted_and_resumed):
    """Per iteration: pseudo-labels (student, eval), the two strong views and the labeled batch (student, train),
    then from iteration 1 on the memory's predictions (student, eval); the teacher only ranks the memory."""
    _, log = interrupted_and_resumed
    assert sorted(log["forwards"]) == list(range(N))
    for i, calls in log["forwards"].items():
        expected = [("student", False), ("student", True), ("student", True)] + ([("student", False)] if i >= 1 else [])
        assert calls == expected, (i, calls)
    assert log["ranked_with_teacher"] == [True] * (N - 1)


# ------------------------------------------------------------------------------ the end of a run: finish()
FINISH_N = 3
FINISH_PLANTED = {1: 0.3, 2: 0.1, 3: 0.2}  # best after iteration 1; the final evaluation (at N = 3) gives 0.2


@pytest.mark.parametrize("refresh_passes, refreshed, best",
                         [(1, 0.5, 0.5), (1, 0.3, 0.3), (1, 0.25, 0.3), (0, None, 0.3)])
def test_finish_final_checkpoint_batchnorm_refresh_and_report(tmp_path, capsys, refresh_passes, refreshed, best):
    """finish(), worked by hand: the final evaluation (0.2) is no new best, so best_model.pth (iteration 1, 0.3)
    goes back into the student; with refresh passes its BatchNorm statistics are re-estimated and it is evaluated
    again: 0.5 beats 0.3 (best_model.pth rewritten: iteration N, 0.5), 0.3 and 0.25 do not (kept, and said so);
    without passes nothing more is evaluated. checkpoint-iter3.pth holds the final evaluation (and the student:
    "final" is neither a best nor a periodic checkpoint); evaluation.json the best, with the run's seconds."""
    run_dir = tmp_path / "run"
    sets = tiny_sets(str(run_dir), FINISH_N, **{"utils.val_per_iter": 1,
                                                "method.bn_refresh_iterations": refresh_passes})
    planted = {**FINISH_PLANTED, **({(FINISH_N, "val_bn_refresh"): refreshed} if refreshed is not None else {})}
    with planted_miou(planted):
        result = trainSSL.main(argv_of(sets))
    out = capsys.readouterr().out
    assert result["miou"] == best
    final = load_checkpoint(str(run_dir / f"checkpoint-iter{FINISH_N}.pth"))
    assert final["iteration"] == FINISH_N and final["miou"] == 0.2
    # the release's checkpoint format, the optimiser's state included (one SGD group at the poly lr of the end)
    assert set(final) == {"model", "config", "optimizer", "iteration", "miou"}
    assert len(final["optimizer"]["param_groups"]) == 1 and len(final["optimizer"]["state"]) > 0
    best_file = load_checkpoint(str(run_dir / "best_model.pth"))
    assert best_file["miou"] == best and best_file["iteration"] == (FINISH_N if best == 0.5 else 1)
    assert set(best_file["model"]) == set(final["model"]) and best_file["config"]["seed"] == final["config"]["seed"]
    rows = [json.loads(line) for line in open(run_dir / "train_log.jsonl")]
    refresh_rows = [r for r in rows if r["kind"] == "val_bn_refresh"]
    assert [(r["iteration"], r["miou"]) for r in refresh_rows] == ([] if refreshed is None else
                                                                   [(FINISH_N, refreshed)])
    kept = "BatchNorm refresh did not improve the best model; keeping it"
    assert (kept in out.splitlines()) == (refreshed is not None and refreshed <= 0.3)
    # the IoU table of the best evaluation (one line per class, then its mIoU), then the summary line
    table = [ln for ln in out.splitlines() if ln.startswith("class ")]
    assert [ln.split()[2] for ln in table] == list(CLASS_NAMES)
    (summary,) = [ln for ln in out.splitlines() if ln.startswith("best mIoU ")]
    assert summary.startswith(f"best mIoU {100 * best:.2f}; total time ") and summary.endswith(" s")
    with open(run_dir / "evaluation.json") as f:
        text = f.read()
    report = json.loads(text)
    assert text.startswith('{\n  "best_miou": ')  # indented by 2
    assert report["best_miou"] == best and report["iterations"] == FINISH_N
    assert list(report["iou"]) == list(CLASS_NAMES) and report["loss"] > 0
    # the run's seconds, to 0.1 s: what the summary line printed a moment later
    assert report["seconds"] == round(report["seconds"], 1) > 0
    assert abs(report["seconds"] - float(summary.split("total time ")[1][:-2])) <= 0.2


def test_finish_without_save_best_model_leaves_best_model_pth_alone(tmp_path):
    """utils.save_best_model false, in a directory where an earlier run (flag on) left its best_model.pth: the run
    writes none and reads none. finish() does not put the other run's weights into the student, so there is no
    BatchNorm refresh evaluation (planted 0.5, which would beat the run's best 0.3), the file keeps the earlier
    run's iteration and mIoU, and the report holds this run's best."""
    run_dir = tmp_path / "run"
    sets = tiny_sets(str(run_dir), FINISH_N, **{"utils.val_per_iter": 1, "method.bn_refresh_iterations": 1})
    with planted_miou({**FINISH_PLANTED, (FINISH_N, "val_bn_refresh"): 0.3}):
        trainSSL.main(argv_of(sets))
    before = load_checkpoint(str(run_dir / "best_model.pth"))
    assert (before["iteration"], before["miou"]) == (1, 0.3)
    os.remove(run_dir / "train_log.jsonl")
    # the run-directory guard (engine/resume.py) refuses a directory holding another run's files; here it is told
    # there is none, as when a best_model.pth is put into the directory by hand
    with planted_miou({**FINISH_PLANTED, (FINISH_N, "val_bn_refresh"): 0.5}), pytest.MonkeyPatch.context() as mp:
        mp.setattr("engine.resume._earlier_run", lambda *args: None)
        result = trainSSL.main(argv_of({**sets, "utils.save_best_model": False}))
    after = load_checkpoint(str(run_dir / "best_model.pth"))
    assert (after["iteration"], after["miou"]) == (1, 0.3)
    assert result["miou"] == 0.3 and json.load(open(run_dir / "evaluation.json"))["best_miou"] == 0.3
    rows = [json.loads(line) for line in open(run_dir / "train_log.jsonl")]
    assert [r["iteration"] for r in rows if r["kind"] == "val"] == [1, 2, 3]
    assert [r for r in rows if r["kind"] == "val_bn_refresh"] == []


@pytest.mark.parametrize("use_teacher_train", [True, False])
def test_return_to_best_loads_the_best_weights_and_rebuilds_the_teacher(tmp_path, capsys, use_teacher_train):
    """return_to_best: the student gets best_model.pth's weights, the teacher is rebuilt as a copy of them and (when
    the teacher labels) becomes the labeler; since_best restarts; the log says so with the best mIoU."""
    run = Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 5,
                                           **{"training.use_teacher_train": use_teacher_train})))
    best = state_of(run.student_module)
    torch.save({"model": best, "config": run.cfg, "iteration": 1, "miou": 0.3}, tmp_path / "run" / "best_model.pth")
    with torch.no_grad():
        for p in run.student_module.parameters():
            p.add_(1.0)
    old_teacher = run.teacher
    run.best_miou, run.since_best = 0.3, 2
    capsys.readouterr()
    run.return_to_best(7)
    assert run.since_best == 0 and same(state_of(run.student_module), best)
    assert run.teacher is not old_teacher and same(state_of(run.teacher), best)
    assert run.labeler is (run.teacher if use_teacher_train else run.student_module)
    out = capsys.readouterr().out
    assert "iteration 7: no improvement for 2 iterations, back to the best model (mIoU 30.00)" in out
    run.logger.close()


def tiny_run(tmp_path, **sets) -> Run:
    return Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 5, **sets)))


def test_periodic_checkpoints_replace_each_other_and_hold_their_iteration(tmp_path):
    run = tiny_run(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-iter-notes.txt").write_text("kept")     # not a checkpoint: never removed
    run.save_periodic(2)
    assert load_checkpoint(str(run_dir / "checkpoint-iter2.pth"))["iteration"] == 2
    run.save_periodic(4)
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-iter")) == [
        "checkpoint-iter-notes.txt", "checkpoint-iter4.pth"]
    assert load_checkpoint(str(run_dir / "checkpoint-iter4.pth"))["iteration"] == 4
    run.logger.close()


@pytest.mark.parametrize("save", ["periodic", "best", "latest"])
def test_non_finite_weights_are_never_saved(tmp_path, save):
    """A NaN in the weights stops the run before a periodic checkpoint, best_model.pth or latest.pth is written."""
    from utils.errors import RunStopped
    run = tiny_run(tmp_path)
    with torch.no_grad():
        next(run.student_module.parameters())[0].fill_(float("nan"))
    with pytest.raises(RunStopped, match="non-finite weights"):
        with planted_miou({1: 0.5}):
            {"periodic": run.save_periodic, "best": run.evaluate_and_keep_best, "latest": run.save_latest}[save](1)
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".pth")]


def test_save_latest_writes_the_run_state_and_remembers_its_iteration(tmp_path):
    """latest.pth holds the state after the given iterations, and the run remembers it (a stop or a divergence then
    says which state latest.pth holds and does not write it again)."""
    run = tiny_run(tmp_path)
    run.save_latest(1)
    assert run.latest_saved == 1 and load_checkpoint(str(tmp_path / "run" / "latest.pth"))["iteration"] == 1
    run.logger.close()


def test_a_tie_is_no_new_best_and_save_best_model_false_writes_none(tmp_path):
    """evaluate_and_keep_best: a new best must be strictly better (0.3 then 0.3: since_best grows by val_per_iter,
    best_model.pth keeps iteration 1); with save_best_model false no best_model.pth is written, and return_to_best
    has nothing to go back to, even with another run's best_model.pth in the directory."""
    run = tiny_run(tmp_path, **{"utils.val_per_iter": 2})
    assert not run._load_best_into_student()  # before the first evaluation there is no best_model.pth to load
    with planted_miou({1: 0.3, 3: 0.3}):
        run.evaluate_and_keep_best(1)
        run.evaluate_and_keep_best(3)
    assert run.best_miou == 0.3 and run.since_best == 2
    assert load_checkpoint(str(tmp_path / "run" / "best_model.pth"))["iteration"] == 1
    run.logger.close()

    other = tiny_run(tmp_path / "b", **{"utils.save_best_model": False, "method.bn_refresh_iterations": 1})
    with planted_miou({1: 0.3}):
        other.evaluate_and_keep_best(1)
    assert other.best_miou == 0.3 and not os.path.exists(tmp_path / "b" / "run" / "best_model.pth")
    # another run's best_model.pth in the directory (other weights): not this run's, so not read
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in state_of(other.student_module).items()}
    torch.save({"model": weights, "config": other.cfg, "iteration": 1, "miou": 0.9},
               tmp_path / "b" / "run" / "best_model.pth")
    student, teacher = state_of(other.student_module), other.teacher
    other.since_best = 4
    other.return_to_best(5)
    assert other.teacher is teacher and other.since_best == 0 and same(state_of(other.student_module), student)
    assert not other._load_best_into_student()
    other.logger.close()


def test_a_best_model_file_without_weights_or_of_another_network_is_named(tmp_path):
    run = tiny_run(tmp_path)
    path = tmp_path / "run" / "best_model.pth"
    torch.save({"iteration": 1}, path)
    with pytest.raises(UserError, match=f"{path} holds no model weights"):
        run._load_best_into_student()
    other = {k: v[..., :1] if v.dim() else v for k, v in run.student_module.state_dict().items()}  # other shapes
    torch.save({"model": other, "iteration": 1}, path)
    with pytest.raises(UserError, match=f"{path} is a checkpoint of another model or config"):
        run._load_best_into_student()
    run.logger.close()
