"""What long runs meet (issue 12): divergence, a second signal, a bad file mid-run, --check-files.

The SIGTERM exact-resume test is in tests/test_resume.py (it reuses the uninterrupted reference run there); the
torchrun SIGTERM test is in tests/test_distributed.py.
"""
import copy
import hashlib
import json
import os
import re
import signal
from types import SimpleNamespace

import pytest
import torch

import trainSSL
from data.sampler import InfiniteBatches
from tests.fixtures_data import make_cityscapes_tree
from tests.test_resume import DEMO_LR, Interrupted, interrupt_after, one_thread, tiny_argv  # noqa: F401 (fixture)
from tests.test_train_e2e import CONFIG as CITY_CONFIG
from tests.test_train_e2e import tiny_overrides
from engine.checkpoint import load_checkpoint
from engine.fault_guard import Diverged, NonFiniteGuard
from engine.graceful_stop import GracefulStop, resume_command
from engine.entry import main_guard
from engine.run import Run


@pytest.fixture
def no_finish(monkeypatch):
    monkeypatch.setattr(Run, "finish", lambda self: self.logger.close())


def tensors_of(obj, path=""):
    """(path, tensor) of every tensor in a checkpoint tree."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_of(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            yield from tensors_of(v, f"{path}[{k}]")


def checkpoints(run_dir: str) -> dict[str, str]:
    """{file name: sha256} of the .pth files of a run directory."""
    return {n: hashlib.sha256(open(os.path.join(run_dir, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(run_dir)) if n.endswith(".pth")}


def run_guarded(argv: list[str]) -> int:
    """trainSSL.py as the command line runs it (main_guard); the exit code."""
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: trainSSL.main(argv))
    return e.value.code


# ----------------------------------------------------------------------------------------------- divergence
def test_diverging_run_writes_nothing_and_resumes_with_a_sane_learning_rate(tmp_path, monkeypatch, no_finish,
                                                                            capsys):
    """One sane iteration (latest.pth after 1); the same run continued with a learning rate of 3e37 stops with
    exit 3 and no traceback, naming the iteration and the terms, and writes nothing — not the evaluation's
    best_model.pth nor the periodic checkpoint due at that iteration; continued from the kept latest.pth with a
    sane learning rate it trains on. (The weights check before writes is tested below, on its own.)"""
    run_dir = str(tmp_path / "run")
    argv = tiny_argv(run_dir, iterations=3, **{"utils.val_per_iter": 2, "utils.save_checkpoint_every": 2,
                                               "utils.save_latest_every": 1, "utils.log_every": 1})
    with monkeypatch.context() as mp:
        interrupt_after(mp, 1)
        with pytest.raises(Interrupted):
            trainSSL.main(argv)
    kept = checkpoints(run_dir)
    assert sorted(kept) == ["latest.pth"]
    capsys.readouterr()

    # continued with an absurd learning rate and latest.pth every 1000 iterations (the default): the step of
    # iteration 1 overflows the weights, the loss of iteration 2 is NaN and stops the run before the evaluation
    # and the periodic checkpoint of iteration 2
    code = run_guarded(argv + ["--resume", "auto", "--recover", "--set", "training.learning_rate=3e37",
                               "--set", "utils.save_latest_every=1000"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err and "training diverged: non-finite loss terms" in err, err
    assert re.search(r"loss_sup=(nan|inf).* loss=(nan|inf) in iteration 2 \(", err), err
    assert "latest.pth is still the state this run resumed from (1 iteration)" in err, err
    assert "--resume auto --recover --set training.learning_rate=1.5e+37" in err, err
    assert checkpoints(run_dir) == kept  # not one byte written
    for path, t in tensors_of(load_checkpoint(os.path.join(run_dir, "latest.pth"))):
        assert not t.is_floating_point() or torch.isfinite(t).all(), path

    monkeypatch.setattr(Run, "iterations", lambda self: range(1, 2))  # one iteration shows it: latest.pth after 2
    trainSSL.main(argv + ["--resume", "auto", "--recover", "--set", f"training.learning_rate={DEMO_LR / 2}"])
    out = capsys.readouterr().out
    assert "iterations from 1" in out and f"training.learning_rate: {DEMO_LR} -> {DEMO_LR / 2}" in out, out
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert latest["iteration"] == 2
    assert all(torch.isfinite(t).all() for _, t in tensors_of(latest) if t.is_floating_point())


def fake_run(tmp_path, sums: dict[str, float], precision: str = "fp32") -> SimpleNamespace:
    """The parts of a Run the guard reads: loss sums, a tiny student/teacher/optimiser, memory, messages."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 2)).sum().backward()
    optimizer.step()  # momentum buffers exist
    memory = torch.zeros(2, 4, 256)
    return SimpleNamespace(
        start_iteration=0, iteration=0, _sums={k: torch.tensor(v) for k, v in sums.items()}, student_module=net,
        teacher=copy.deepcopy(net), optimizer=optimizer, memory=SimpleNamespace(state_dict=lambda: {"memory": memory}),
        class_weights=torch.ones(2), device=torch.device("cpu"), stop=SimpleNamespace(end=lambda run: None),
        latest_saved=4, cfg={"training": {"learning_rate": 0.01}}, precision=precision, run_dir=str(tmp_path),
        argv=["--config", "c.json", "--set", "training.learning_rate=0.01", "--resume", "old.pth", "--recover",
              "--set=utils.log_every=5"],
        args=SimpleNamespace(config="c.json"), variant=SimpleNamespace(name="trainSSL"))


def test_guard_names_the_window_the_terms_and_the_fix(tmp_path):
    run = fake_run(tmp_path, {"loss_sup": 1.0, "loss_pseudo": 2.0, "loss": 3.0}, precision="fp16")
    guard = NonFiniteGuard(run)
    run.iteration = 3
    guard.check(run, weights=True)  # finite: remembered as good through iteration 3
    run.iteration = 7
    run._sums = {"loss_sup": torch.tensor(float("nan")), "loss_pseudo": torch.tensor(2.0),
                 "loss": torch.tensor(float("inf"))}
    with pytest.raises(Diverged) as e:
        guard.check(run)
    msg = str(e.value)
    assert e.value.exit_code == 3
    assert "loss_sup=nan, loss=inf in iterations 4..7" in msg and "loss_pseudo" not in msg, msg
    assert "latest.pth holds the state after 4 iterations" in msg
    assert ("python3 trainSSL.py --config c.json --set utils.log_every=5 --resume auto --recover --set "
            "training.learning_rate=0.005") in msg, msg
    assert "precision=fp32" in msg  # the run computes in fp16


def test_guard_checks_weights_before_writes_only(tmp_path):
    run = fake_run(tmp_path, {"loss": 1.0})
    guard = NonFiniteGuard(run)
    with torch.no_grad():
        run.teacher[0].weight[1, 0] = float("inf")
    guard.check(run)  # a log row reads the loss sums alone
    with pytest.raises(Diverged, match=r"non-finite weights \(teacher.0.weight; 1 tensors\)"):
        guard.check(run, weights=True)


def test_skipped_fp16_steps_are_not_divergence(tmp_path):
    """GradScaler skips a step whose scaled gradients overflow (and lowers its scale): the loss is finite and the
    weights untouched, so the guard lets the run go on."""
    run = fake_run(tmp_path, {})
    net, optimizer = run.student_module, run.optimizer
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.randn(4, 2)).pow(2).sum() * 1e3
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 127  # the step was skipped ...
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))  # ... and left the weights
    run._sums = {"loss": loss.detach()}
    NonFiniteGuard(run).check(run, weights=True)


def test_resume_command_keeps_the_run_arguments(tmp_path):
    run = fake_run(tmp_path, {})
    assert resume_command(run) == ("python3 trainSSL.py --config c.json --set training.learning_rate=0.01 "
                                   "--set utils.log_every=5 --resume auto")
    run.args.config = None  # started from a checkpoint alone: its run directory's latest.pth
    assert resume_command(run).endswith(f"--resume {os.path.join(str(tmp_path), 'latest.pth')}")


# ----------------------------------------------------------------------------------------------- signals
def test_a_second_signal_stops_at_once():
    """SIGINT sets the flag only; a second signal ends the process by that signal's default action (in a forked
    child, so that the test process lives on)."""
    pid = os.fork()
    if pid == 0:  # child: only signal calls and os._exit
        code = 12
        try:
            stop = GracefulStop(torch.device("cpu"))
            stop.install()
            os.kill(os.getpid(), signal.SIGINT)
            code = 10 if stop.signum == signal.SIGINT else 11
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            os._exit(code)  # reached only if the second signal did not end the process
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


# ----------------------------------------------------------------------------------------------- bad files
@pytest.fixture
def city(tmp_path):
    root = str(tmp_path / "CityScapes")
    files = make_cityscapes_tree(root, n_train=8, n_val=2, size=(70, 100))
    return root, files


def city_argv(root: str, run_dir: str, **sets) -> list[str]:
    argv = ["--config", CITY_CONFIG, "--data-root", root, "--device", "cpu"] + tiny_overrides(run_dir, 2)
    for k, v in sets.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    return argv


def test_bad_image_mid_run_writes_latest_and_names_the_file(city, tmp_path, no_finish, capsys):
    """The labeled batch of iteration 1 holds an unreadable image (loaded by a worker process): the run writes
    latest.pth with the state after iteration 0 — samplers included — and names the file; once the file is
    back, --resume auto trains the last iteration."""
    root, files = city
    run_dir = str(tmp_path / "run")
    argv = city_argv(root, run_dir, **{"training.num_workers": 1, "utils.val_per_iter": 1000,
                                       "utils.save_latest_every": 1000, "utils.save_checkpoint_every": 1000})
    plan = Run(trainSSL.TRAIN_SSL, argv + ["--dry-run"])  # the draws of the run, without training
    first, second = plan.labeled.sampler.epoch_batches(0)[:2]
    bad = plan.data.train.images[second[0][0]]
    assert second[0][0] not in [index for index, _ in first]
    good = open(bad, "rb").read()
    open(bad, "wb").write(b"not a png")
    capsys.readouterr()

    assert run_guarded(argv) == 2
    err = capsys.readouterr().err
    assert bad in err and "latest.pth" in err and "--resume auto" in err, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert latest["iteration"] == 1 and latest["pending_evaluation"] is None
    assert latest["samplers"]["labeled"] == {"epoch": 0, "consumed": 1}
    assert latest["samplers"]["unlabeled"] == {"epoch": 0, "consumed": 1}

    open(bad, "wb").write(good)
    trainSSL.main(argv + ["--resume", "auto"])
    assert "iterations from 1" in capsys.readouterr().out
    assert load_checkpoint(os.path.join(run_dir, "latest.pth"))["iteration"] == 2


def test_check_files_lists_every_bad_file_in_one_pass(city, tmp_path, capsys):
    root, files = city
    bad_image = files["train"][5][0]
    open(bad_image, "wb").write(b"\x89PNG garbage")
    bad_label = files["val"][1][1]
    data = open(bad_label, "rb").read()
    open(bad_label, "wb").write(data[: len(data) // 2])  # truncated
    argv = city_argv(root, str(tmp_path / "run")) + ["--dry-run", "--check-files"]
    assert run_guarded(argv) == 2
    captured = capsys.readouterr()
    assert "dry run: OK" in captured.out and "checking files: 100% (10/10)" in captured.out
    err = captured.err
    assert "2 of 10 items (8 train, 2 val)" in err and bad_image in err and bad_label in err, err
    assert "Traceback" not in err

    with pytest.raises(SystemExit):  # --check-files is an option of --dry-run
        Run(trainSSL.TRAIN_SSL, argv[:-2] + ["--check-files"])


def test_check_files_lists_the_bad_labels_of_both_splits_of_a_folder_dataset(tmp_path, capsys):
    """A folder dataset with a bad label in each split (a class value out of range in train, another size than its
    image in val): --dry-run --check-files lists both in one pass (the pair checks of the dataset's building wait
    for it); without --check-files, building still stops at the first split's bad pairs."""
    import numpy as np
    from PIL import Image
    from data.synthetic import export_folder
    config = export_folder(str(tmp_path / "data"), num_train=4, num_val=2, image_size=(40, 60))
    folder = json.load(open(config))["folder"]
    train_label = os.path.join(folder["train_labels"], sorted(os.listdir(folder["train_labels"]))[2])
    values = np.asarray(Image.open(train_label)).copy()
    values[0, 0] = 9  # 8 classes: 0..7 and the ignore label
    Image.fromarray(values).save(train_label)
    val_label = os.path.join(folder["val_labels"], sorted(os.listdir(folder["val_labels"]))[1])
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(val_label)
    argv = tiny_argv(str(tmp_path / "run"), 2, config, **{"training.data.labeled_samples": 2})
    assert run_guarded(argv + ["--dry-run", "--check-files"]) == 2
    err = capsys.readouterr().err
    assert "--check-files: 2 of 6 items (4 train, 2 val) cannot be used" in err, err
    assert train_label in err and val_label in err and "Traceback" not in err
    assert run_guarded(argv + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert train_label in err and val_label not in err


def test_prefetch_keeps_the_position(tmp_path):
    """A prefetched batch is the next one returned and is not counted in the position until then."""
    from data.synthetic import SyntheticStreets
    data = SyntheticStreets(8, (16, 16), train=True, crop_size=(8, 8))
    a = InfiniteBatches(data, list(range(8)), 2, seed=3)
    b = InfiniteBatches(data, list(range(8)), 2, seed=3)
    a.next()
    b.next()
    a.prefetch()
    assert a.state_dict() == b.state_dict() == {"epoch": 0, "consumed": 1}
    assert torch.equal(a.next()[2], b.next()[2])


def test_prefetch_two_ahead_keeps_the_position(tmp_path):
    """Under torchrun the run loads two batches ahead: both come next, in order, and neither counts in the position
    until returned; asking again for two ahead loads nothing more."""
    from data.synthetic import SyntheticStreets
    data = SyntheticStreets(8, (16, 16), train=True, crop_size=(8, 8))
    a = InfiniteBatches(data, list(range(8)), 2, seed=3)
    b = InfiniteBatches(data, list(range(8)), 2, seed=3)
    loads = []
    load = a._load
    a._load = lambda: loads.append(1) or load()
    a.prefetch(2)
    a.prefetch(2)
    assert len(loads) == 2 and a.state_dict() == {"epoch": 0, "consumed": 0}
    assert torch.equal(a.next()[2], b.next()[2]) and a.state_dict() == {"epoch": 0, "consumed": 1}
    a.prefetch(2)
    assert len(loads) == 3
    for _ in range(3):
        assert torch.equal(a.next()[2], b.next()[2])
    assert a.state_dict() == b.state_dict() == {"epoch": 1, "consumed": 0}


def test_the_stop_decision_under_torchrun(monkeypatch):
    """GracefulStop.after_iteration with 2 processes (stand-ins for the votes, the agreement and the stop): the votes
    of iteration i's gradient pass stop every rank after i (SIGTERM before SIGINT; a bad file: failed), with no
    agreement of its own; without a vote the batches are loaded two ahead (one at the last but one iteration, none
    at the last); an evaluation interrupted after i (its polls agreed on the signal) stops at once; outside the
    loop (voted=False) one all-reduce agrees."""
    from engine import graceful_stop
    monkeypatch.setattr(graceful_stop.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(graceful_stop.dist, "is_main", lambda: True)
    calls = []

    class Stopped(Exception):
        pass

    def stopping(stop, completed, failed):  # GracefulStop._stop writes latest.pth and raises RunStopped
        calls.append(("stop", completed, failed, stop.signum))
        raise Stopped

    def batches(name):
        return SimpleNamespace(prefetch=lambda n: calls.append((name, n)))

    def run_with(votes, pending=None):
        return SimpleNamespace(num_iterations=10, labeled=batches("labeled"), unlabeled=batches("unlabeled"),
                               gta5_batches=None, pending_evaluation=pending,
                               gradient_pass=SimpleNamespace(votes=lambda: votes))

    def decide(votes, i=3, pending=None, signum=0, voted=True, agreed=(0, 0)):
        stop = GracefulStop(torch.device("cpu"))
        stop.signum = signum
        stop._agree = lambda *values: calls.append(("agree", values)) or list(agreed)
        stop._stop = lambda run, completed, failed: stopping(stop, completed, failed)
        calls.clear()
        try:
            stop.after_iteration(run_with(votes, pending), i, voted)
        except Stopped:
            pass
        return list(calls)

    nothing = (False, False, False)
    assert decide((False, True, False)) == [("stop", 4, False, signal.SIGTERM)]
    assert decide((True, True, False)) == [("stop", 4, False, signal.SIGTERM)]
    assert decide((True, False, False)) == [("stop", 4, False, signal.SIGINT)]
    assert decide((False, False, True)) == [("stop", 4, True, 0)]
    assert decide(nothing) == [("labeled", 2), ("unlabeled", 2)]
    assert decide(nothing, i=8) == [("labeled", 1), ("unlabeled", 1)] and decide(nothing, i=9) == []
    # a signal this rank met after its vote waits for the next iteration's vote ...
    assert decide(nothing, signum=signal.SIGTERM) == []
    # ... unless an evaluation after this iteration was interrupted by it (on every rank: its polls agreed)
    assert decide(nothing, pending=3, signum=signal.SIGTERM) == [("stop", 4, False, signal.SIGTERM)]
    assert decide(nothing, voted=False, agreed=(15, 0)) == [("labeled", 2), ("unlabeled", 2), ("agree", (0, 0)),
                                                            ("stop", 4, False, 15)]
    assert decide(nothing, voted=False) == [("labeled", 2), ("unlabeled", 2), ("agree", (0, 0))]
