"""Exact resume: an interrupted run continued with --resume ends bit-identical to an uninterrupted one; a run
killed mid-save keeps its previous latest.pth; a checkpoint of another config is refused with the keys listed."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import trainSSL
from tests.cuda_support import CUDA_MARKS, DEVICE
from tests.run_helpers import TINY_WIDTH, planted_miou
from engine.checkpoint import load_checkpoint
from utils.errors import UserError
from engine.run import Run
from utils.variants import TRAIN_SSL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.json")
N = 2  # the interrupted run stops after N of 2N iterations
DEMO_LR = json.load(open(DEMO))["training"]["learning_rate"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny convolutions run several times faster than with two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_argv(run_dir: str, iterations: int = 2 * N, config: str = DEMO, **extra) -> list[str]:
    """trainSSL.py arguments for the demo config (ResNet-18, class balancing) shrunk to a few CPU seconds: 33x49
    crops of 40x60 scenes, batch 2, ramp-up 1 so that the memory is filled from iteration 1 on and the contrastive
    terms, ClassMix of unlabeled views and class-balancing weights act from iteration 2 on; an evaluation after
    every iteration (so the return to the best model happens); log rows every 3 iterations (an interval that spans
    the interruption)."""
    sets = {
        "version": "2",  # the demo is v3+; batch 2 leaves one unlabeled image, too few for its image-pooling BN
        "backbone.width": TINY_WIDTH, "backbone.pretrained": "none",  # never the demo's synthetic backbone
        "training.use_teacher_train": True,  # the EMA teacher labels (the demo: the student)
        "training.batch_size": 2, "training.num_workers": 0, "training.num_iterations": iterations,
        "training.data.labeled_samples": 6, "training.data.input_size": "33,49",
        "synthetic.num_train": 24, "synthetic.num_val": 2, "synthetic.image_size": "40,60",
        "method.ramp_up_iterations": 1, "method.memory_start_offset": 1, "method.memory_confidence": 0.0,
        "method.bn_refresh_iterations": 1,
        "utils.checkpoint_dir": run_dir, "utils.run_name": "", "utils.val_per_iter": 1, "utils.save_checkpoint_every": 1000,
        "utils.save_latest_every": N, "utils.log_every": 3, "utils.log_images": 0,
        "utils.curves": False,  # tests/test_logging.py draws them
    }
    sets.update(extra)
    argv = ["--config", config, "--device", "cpu"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return argv


def resumed_from(state: dict, run_dir, *flags: str, **sets) -> Run:
    """A trainSSL.py Run resumed (--resume auto) from `state` written as run_dir/latest.pth, before its first
    iteration; `flags` and `sets` go on its command line. Its logger is closed."""
    os.makedirs(run_dir, exist_ok=True)
    torch.save(state, os.path.join(run_dir, "latest.pth"))
    run = Run(TRAIN_SSL, tiny_argv(str(run_dir), **sets) + list(flags) + ["--resume", "auto"])
    run.logger.close()
    return run


class Interrupted(Exception):
    pass


# Validation mIoU planted per iteration, so the run's course holds by construction, whatever the weights: a new best
# at iterations 1 and 2 (best_model.pth, then latest.pth at once), none at 3, so the resumed part returns to the best.
PLANTED_MIOU = {1: 0.10, 2: 0.20, 3: 0.15}


@pytest.fixture(autouse=True, scope="module")
def planted_miou_in_every_run():
    """Evaluations run for real; their mIoU is replaced by PLANTED_MIOU[i]."""
    with planted_miou(PLANTED_MIOU):
        yield


@pytest.fixture
def no_finish(monkeypatch):
    """Skip the after-loop work (final evaluation, BN refresh): latest.pth of the last iteration is written before."""
    monkeypatch.setattr(Run, "finish", lambda self: self.logger.close())


def interrupt_after(monkeypatch, iteration: int) -> None:
    """Make the run stop right after it wrote latest.pth for `iteration` completed iterations."""
    save_latest = Run.save_latest

    def save_then_stop(self, next_iteration):
        save_latest(self, next_iteration)
        if next_iteration == iteration:
            self.logger.close()
            raise Interrupted

    monkeypatch.setattr(Run, "save_latest", save_then_stop)


def train_rows(run_dir: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    return {r["iteration"]: {k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == "train"}


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Recursive bit-identity of two checkpoint trees (tensors with torch.equal, everything else with ==)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of 2N iterations (num_workers 0)."""
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    saves = []
    save_latest = Run.save_latest

    def spy(self, next_iteration):
        saves.append(next_iteration)
        save_latest(self, next_iteration)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "finish", lambda self: self.logger.close())
        mp.setattr(Run, "save_latest", spy)
        trainSSL.main(tiny_argv(run_dir))
    # every new best_model.pth is followed by latest.pth at once (else a resume could start from a state older
    # than best_model.pth and, returning to the best model, read weights from its own future)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    val = [(r["iteration"], r["miou"]) for r in rows if r["kind"] == "val"]
    assert val == sorted(PLANTED_MIOU.items())
    assert saves == [2, 3, 4]  # every N iterations, and at once after the new best of iteration 2
    return run_dir


@pytest.mark.parametrize("workers, resume", [(0, "auto"), (2, "path")])
def test_interrupted_and_resumed_run_is_bit_identical(reference, tmp_path, monkeypatch, no_finish, capsys,
                                                      workers, resume):
    run_dir = str(tmp_path / "run")
    argv = tiny_argv(run_dir, **{"training.num_workers": workers})
    with monkeypatch.context() as mp:
        interrupt_after(mp, N)
        with pytest.raises(Interrupted):
            trainSSL.main(argv)
    assert load_checkpoint(os.path.join(run_dir, "latest.pth"))["iteration"] == N
    capsys.readouterr()
    if resume == "auto":
        trainSSL.main(argv + ["--resume", "auto"])
    else:  # an explicit latest.pth continues in its own directory, whatever utils.checkpoint_dir says
        elsewhere = str(tmp_path / "elsewhere")
        trainSSL.main(tiny_argv(elsewhere, **{"training.num_workers": workers})
                      + ["--resume", os.path.join(run_dir, "latest.pth")])
        assert not os.path.exists(elsewhere)
    out = capsys.readouterr().out
    assert f"iterations from {N}" in out
    assert "back to the best model" in out  # the resumed part reloads best_model.pth written before the interruption

    ref = load_checkpoint(os.path.join(reference, "latest.pth"))
    got = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert ref["iteration"] == got["iteration"] == 2 * N
    # the interesting parts, named, then everything else in the run state
    assert ref["memory"]["counts"].sum() > 0  # the memory was filled, so its equality means something
    for key in ("model", "teacher", "memory", "optimizer", "balancing", "class_weights", "rng", "samplers"):
        assert_same_state(ref[key], got[key], key)
    for key in ("num_workers",):
        ref["config"]["training"][key] = got["config"]["training"][key]
    ref["config"]["utils"]["checkpoint_dir"] = got["config"]["utils"]["checkpoint_dir"]
    assert_same_state(ref, got)
    # the logged averages agree too, including the interval that spans the interruption (iterations 0..2)
    ref_rows, got_rows = train_rows(reference), train_rows(run_dir)
    assert sorted(ref_rows) == sorted(got_rows) == [2, 3]
    assert "loss_contr_u" in ref_rows[3]
    assert ref_rows == got_rows


def test_resume_refuses_another_config(reference, tmp_path):
    argv = tiny_argv(str(tmp_path), **{"training.learning_rate": 2 * DEMO_LR, "method.memory_size": 128,
                                       "training.num_workers": 1})
    with pytest.raises(UserError) as e:
        trainSSL.main(argv + ["--resume", os.path.join(reference, "latest.pth")])
    msg = str(e.value)
    assert f"training.learning_rate: {DEMO_LR} -> {2 * DEMO_LR}" in msg and "method.memory_size: 256 -> 128" in msg
    lines = msg.splitlines()  # one differing key per line, indented, between the heading and the hint
    assert lines[0].endswith("it belongs to a run with another config. Differing keys (checkpoint -> now):")
    assert sorted(lines[1:-1]) == ["  method.memory_size: 256 -> 128",
                                   f"  training.learning_rate: {DEMO_LR} -> {2 * DEMO_LR}"]
    assert lines[-1] == ("(training.learning_rate, precision may differ with --recover, e.g. to continue after a "
                         "divergence.)")
    assert "training.num_workers" not in msg  # keys that change no result may differ


KILL_SCRIPT = r"""
import os, sys, time, torch
import trainSSL
torch.set_num_threads(1)
real_save = torch.save
def slow_save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("format") == "ssl-run-state-1" and obj["iteration"] == 2:
        import io
        buf = io.BytesIO(); real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        print("MID-SAVE", flush=True)
        time.sleep(600)
    return real_save(obj, f, *a, **k)
torch.save = slow_save
trainSSL.main(sys.argv[1:])
"""


def start_mid_save(run_dir: str) -> tuple[subprocess.Popen, float]:
    """A 3-iteration run that stalls halfway through writing the latest.pth of iteration 2 (KILL_SCRIPT); returns
    the process, once the partial temporary file is on disk, and a deadline for reading its output."""
    argv = tiny_argv(run_dir, iterations=3, **{"utils.save_latest_every": 1, "utils.val_per_iter": 1000})
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT] + argv, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "MID-SAVE" in line or time.time() > deadline:
            break
    return proc, deadline


def test_sigkill_mid_save_keeps_previous_latest(tmp_path):
    run_dir = str(tmp_path)
    proc, _ = start_mid_save(run_dir)
    try:
        temp = [n for n in os.listdir(run_dir) if n.startswith(".tmp-latest.pth")]
        assert temp, "the save of iteration 2 should be in progress"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert latest["iteration"] == 1 and latest["format"] == "ssl-run-state-1"
    assert set(latest["model"]) == set(latest["teacher"])


def test_second_sigterm_mid_save_leaves_no_temporary_file(tmp_path):
    """A first SIGTERM during a save of latest.pth asks for a stop after the iteration; a second one stops at once:
    the partial temporary file is removed, latest.pth is the one written before, the process ends by SIGTERM."""
    run_dir = str(tmp_path)
    proc, deadline = start_mid_save(run_dir)
    try:
        assert [n for n in os.listdir(run_dir) if n.startswith(".tmp-latest.pth")]
        os.kill(proc.pid, signal.SIGTERM)
        for line in proc.stdout:
            if "SIGTERM received" in line or time.time() > deadline:
                break
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert [n for n in os.listdir(run_dir) if n.startswith(".tmp-")] == []
    assert load_checkpoint(os.path.join(run_dir, "latest.pth"))["iteration"] == 1


def test_checkpoints_get_the_permissions_torch_save_gives(tmp_path):
    """save_atomic's file has the mode torch.save(obj, path) gives under the same umask (0666 less the umask, not
    mkstemp's 0600), and keeps the mode of a file it replaces, as torch.save does."""
    from engine.checkpoint import save_atomic
    old = os.umask(0o022)
    try:
        for umask in (0o022, 0o002, 0o077):
            os.umask(umask)
            torch.save({"a": 1}, str(tmp_path / f"plain{umask}.pth"))
            save_atomic({"a": 1}, str(tmp_path / f"atomic{umask}.pth"))
            plain = os.stat(tmp_path / f"plain{umask}.pth").st_mode & 0o777
            assert plain == 0o666 & ~umask
            assert os.stat(tmp_path / f"atomic{umask}.pth").st_mode & 0o777 == plain
        os.umask(0o022)
        for name in ("plain", "atomic"):  # files written before, whose mode the user changed
            torch.save({"a": 1}, str(tmp_path / f"{name}-old.pth"))
            os.chmod(tmp_path / f"{name}-old.pth", 0o640)
        torch.save({"a": 2}, str(tmp_path / "plain-old.pth"))
        save_atomic({"a": 2}, str(tmp_path / "atomic-old.pth"))
        assert os.stat(tmp_path / "plain-old.pth").st_mode & 0o777 == 0o640
        assert os.stat(tmp_path / "atomic-old.pth").st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []


def test_sigterm_stops_after_the_iteration_and_resumes_exactly(reference, tmp_path, monkeypatch, no_finish, capsys):
    """SIGTERM right after the first log line (iteration 2, before its evaluation): the run finishes the iteration,
    leaves that evaluation pending, writes latest.pth and exits 128 + 15 without a traceback; --resume auto does
    the pending evaluation, trains on and ends bit-identical to the uninterrupted run."""
    from engine.logger import TrainLogger
    from engine.entry import main_guard

    run_dir = str(tmp_path / "run")
    argv = tiny_argv(run_dir)
    scalars = TrainLogger.scalars

    def scalars_then_sigterm(self, i, values, prefix="train", print_line=True):
        scalars(self, i, values, prefix, print_line)
        if prefix == "train":
            os.kill(os.getpid(), signal.SIGTERM)

    unhandled = []  # the pytest process's own handler: reached only if the run did not handle the signal
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    try:
        with monkeypatch.context() as mp:
            mp.setattr(TrainLogger, "scalars", scalars_then_sigterm)
            with pytest.raises(SystemExit) as e:
                main_guard(lambda: trainSSL.main(argv))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not unhandled and e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGTERM" in err and "--resume auto" in err, err
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert latest["iteration"] == 3 and latest["pending_evaluation"] == 2

    trainSSL.main(argv + ["--resume", "auto"])
    out = capsys.readouterr().out
    assert "iterations from 3" in out and "evaluation after iteration 2 was interrupted" in out
    ref = load_checkpoint(os.path.join(reference, "latest.pth"))
    got = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert got["iteration"] == 4
    ref["config"]["utils"]["checkpoint_dir"] = got["config"]["utils"]["checkpoint_dir"]
    assert_same_state(ref, got)  # weights, teacher, optimiser, memory, RNG, samplers, best mIoU: everything
    assert train_rows(reference) == train_rows(run_dir)
    val = [{r["iteration"]: r["miou"] for r in map(json.loads, open(os.path.join(d, "train_log.jsonl")))
            if r["kind"] == "val"} for d in (reference, run_dir)]
    assert val[0] == val[1] and sorted(val[0]) == [1, 2, 3]


def test_resume_from_a_weights_only_checkpoint(reference, tmp_path, capsys):
    """--resume with a checkpoint that is not a latest.pth run state (here the reference run's best_model.pth, of
    iteration 2; a released checkpoint alike): the student takes its weights, the optimiser its state, the teacher
    is rebuilt from the student (its parameters; fresh BatchNorm statistics, as released) and labels
    (use_teacher_train), the run continues at its iteration, memory bank and
    best mIoU start afresh, and a message says so. Without "optimizer" and "iteration": a fresh optimiser, from 0;
    with use_teacher_train false the student labels."""
    path = os.path.join(reference, "best_model.pth")
    best = load_checkpoint(path)
    assert "format" not in best and best["iteration"] == 2 and best["optimizer"]["state"]
    capsys.readouterr()
    run = Run(TRAIN_SSL, tiny_argv(str(tmp_path / "a")) + ["--resume", path])
    run.logger.close()
    out = capsys.readouterr().out
    assert f"resuming from {path}: weights and optimiser only" in out and "afresh at iteration 2" in out
    assert run.start_iteration == 2 and run.best_miou == -1.0 and int(run.memory.counts.sum()) == 0
    assert_same_state(best["model"], run.student_module.state_dict(), "student")
    assert run.teacher is not run.student_module and run.labeler is run.teacher
    teacher = dict(run.teacher.named_parameters())
    assert_same_state({k: best["model"][k] for k in teacher}, teacher, "teacher")
    assert all(float(b.abs().sum()) == 0 for k, b in run.teacher.named_buffers() if k.endswith("running_mean"))
    assert_same_state(best["optimizer"], run.optimizer.state_dict(), "optimizer")

    # the weights (and mIoU) only, without a stored config either, here with use_teacher_train false
    bare = {k: v for k, v in best.items() if k not in ("optimizer", "iteration", "config")}
    torch.save(bare, tmp_path / "bare.pth")
    run = Run(TRAIN_SSL, tiny_argv(str(tmp_path / "b"), **{"training.use_teacher_train": False})
              + ["--resume", str(tmp_path / "bare.pth")])
    run.logger.close()
    assert run.start_iteration == 0 and run.optimizer.state_dict()["state"] == {}
    assert run.labeler is run.student_module
    assert_same_state(best["model"], run.student_module.state_dict(), "student")


def test_resume_names_a_checkpoint_without_matching_weights(reference, tmp_path):
    """A checkpoint (without a stored config) whose weights miss a tensor, or that holds none, or a run state whose
    teacher misses one: the error names the file (and the teacher)."""
    best = load_checkpoint(os.path.join(reference, "best_model.pth"))
    del best["config"]
    missing = dict(best, model={k: v for k, v in list(best["model"].items())[1:]})
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="missing.pth is a checkpoint of another model"):
        Run(TRAIN_SSL, tiny_argv(str(tmp_path / "a")) + ["--resume", str(tmp_path / "missing.pth")])
    torch.save({"iteration": 2, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match="empty.pth holds no model weights"):
        Run(TRAIN_SSL, tiny_argv(str(tmp_path / "b")) + ["--resume", str(tmp_path / "empty.pth")])
    state = load_checkpoint(os.path.join(reference, "latest.pth"))  # a run state whose teacher misses a tensor
    state["teacher"] = dict(list(state["teacher"].items())[1:])
    (tmp_path / "c").mkdir()
    torch.save(state, tmp_path / "c" / "latest.pth")
    with pytest.raises(UserError, match=r"latest.pth \(teacher\) is a checkpoint of another model"):
        Run(TRAIN_SSL, tiny_argv(str(tmp_path / "c")) + ["--resume", "auto"])


def test_where_a_resumed_run_takes_its_config_and_directory(reference, tmp_path, capsys, monkeypatch):
    """Dry runs (the checkpoint is read and checked before the plan): a latest.pth without --config brings its own
    config (with --set applied) and directory (a bare file name: "."); no config at all is refused (by the parser;
    a checkpoint that stores none, by the run); --resume auto
    without a latest.pth starts afresh and says so, with one it resumes that file; a latest.pth given with a config
    that points elsewhere continues in its own directory, and says so, warning when best_model.pth is not beside it;
    --recover names the recovery keys that changed."""
    latest = os.path.join(reference, "latest.pth")
    stored = load_checkpoint(latest)["config"]
    assert load_checkpoint(latest)["best_miou"] == 0.2  # the planted best of iteration 2

    no_config = r"^--config is required \(or --resume with a checkpoint that stores its config\)\.$"
    run = Run(TRAIN_SSL, ["--resume", latest, "--set", "utils.log_every=7", "--dry-run"])
    assert run.cfg_source == latest and run.run_dir == reference and run.cfg["utils"]["log_every"] == 7
    assert run.cfg["training"] == stored["training"] and run.cfg["method"] == stored["method"]
    for argv in (["--dry-run"], ["--resume", "auto", "--dry-run"]):  # refused by the parser: --config is required
        with pytest.raises(SystemExit) as e:
            Run(TRAIN_SSL, argv)
        assert e.value.code == 2 and "the following arguments are required: -c/--config" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "bare.pth")  # a checkpoint without a stored config
    with pytest.raises(UserError, match=no_config):
        Run(TRAIN_SSL, ["--resume", str(tmp_path / "bare.pth"), "--dry-run"])
    with monkeypatch.context() as m:  # a bare file name: the run directory is the working directory
        m.chdir(reference)
        assert Run(TRAIN_SSL, ["--resume", "latest.pth", "--dry-run"]).run_dir == "."
    capsys.readouterr()

    fresh = str(tmp_path / "fresh")
    run = Run(TRAIN_SSL, tiny_argv(fresh) + ["--resume", "auto", "--dry-run"])
    out = capsys.readouterr().out
    assert f"--resume auto: no {os.path.join(fresh, 'latest.pth')} yet, starting a new run" in out
    assert run.args.resume == "auto" and run.run_dir == fresh

    run = Run(TRAIN_SSL, tiny_argv(reference) + ["--resume", "auto", "--dry-run"])
    out = capsys.readouterr().out
    assert run.args.resume == latest and "starting a new run" not in out and "continuing the run" not in out
    assert "is missing" not in out and "--recover" not in out  # best_model.pth is beside it; no --recover given

    alone = tmp_path / "alone"
    alone.mkdir()
    state = load_checkpoint(latest)
    state["best_miou"] = 0.0  # a best of 0 is a best: its best_model.pth is missing
    torch.save(state, alone / "latest.pth")
    run = Run(TRAIN_SSL, tiny_argv(str(tmp_path / "elsewhere")) + ["--resume", str(alone / "latest.pth"), "--dry-run"])
    out = capsys.readouterr().out
    assert run.run_dir == str(alone) and run.cfg["utils"]["checkpoint_dir"] == str(alone)
    assert (f"--resume {alone / 'latest.pth'}: continuing the run in its directory {alone} (utils.checkpoint_dir "
            f"{tmp_path / 'elsewhere'} is not used)") in out
    assert f"warning: {alone / 'best_model.pth'} is missing, so the return to the best model" in out
    del state["best_miou"]  # a state without the key (this project always writes it) has no best to miss
    torch.save(state, alone / "latest.pth")
    Run(TRAIN_SSL, ["--resume", str(alone / "latest.pth"), "--dry-run"])
    assert "is missing" not in capsys.readouterr().out

    Run(TRAIN_SSL, tiny_argv(reference) + ["--resume", "auto", "--recover", "--dry-run"])
    assert f"--recover: resuming {latest} with no changed key" in capsys.readouterr().out
    Run(TRAIN_SSL, tiny_argv(reference, **{"training.learning_rate": DEMO_LR / 2, "precision": "bf16"})
        + ["--resume", "auto", "--recover", "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert (f'--recover: resuming {latest} with precision: "fp32" -> "bf16"; '
            f"training.learning_rate: {DEMO_LR} -> {DEMO_LR / 2}") in out


def test_a_checkpoint_with_an_invalid_stored_config_is_named(reference, tmp_path):
    """A run state whose stored config does not validate (an unknown key, e.g. of a newer version) stops with the
    config error naming the checkpoint's stored config, with --config and without."""
    state = load_checkpoint(os.path.join(reference, "latest.pth"))
    state["config"]["training"]["bogus"] = 1
    path = tmp_path / "latest.pth"
    torch.save(state, path)
    for config in ([], tiny_argv(str(tmp_path))):
        expected = f"{path} (stored config): unknown config key 'training.bogus'"
        with pytest.raises(UserError, match="^" + re.escape(expected)):
            Run(TRAIN_SSL, config + ["--resume", str(path), "--dry-run"])


def test_resuming_a_run_of_another_world_size(reference, tmp_path, capsys):
    """A run state saved by 2 processes, resumed by one: a message says that data order and random draws differ
    from the original run's; this process takes rank 0's RNG state (not the state's own "rng"). The saved world size
    is the state's "world_size", also where it holds no per-rank states."""
    state = load_checkpoint(os.path.join(reference, "latest.pth"))
    assert state["world_size"] == 1 and state["rng_ranks"] is None
    rank0 = dict(state["rng"], torch=torch.Generator().manual_seed(7).get_state())
    rank1 = dict(state["rng"], torch=torch.Generator().manual_seed(8).get_state())
    message = ("resuming a run of 2 process(es) with 1: weights, optimiser, memory bank and class balancing continue; "
               "data order and random draws are not those of the original run")
    for k, ranks in enumerate(([rank0, rank1], None)):
        capsys.readouterr()
        resumed_from(dict(state, world_size=2, rng_ranks=ranks), tmp_path / f"run{k}")
        assert torch.equal(torch.get_rng_state(), (rank0 if ranks else state["rng"])["torch"])
        assert message in capsys.readouterr().out
    run = Run(TRAIN_SSL, tiny_argv(str(reference)) + ["--resume", "auto"])  # the same world size: silent
    run.logger.close()
    assert "process(es)" not in capsys.readouterr().out


def test_a_resumed_run_holds_the_saved_state(reference, tmp_path):
    """Field by field, what a resumed run holds before its first iteration: the reference run's latest.pth (4
    iterations, memory filled), with class weights, since_best, a pending evaluation and an open log window
    planted."""
    state = load_checkpoint(os.path.join(reference, "latest.pth"))
    # planted where the saved value equals the start value, so that each field's restoring is seen
    state.update(class_weights=torch.linspace(0.5, 1.2, 8), since_best=2, pending_evaluation=3,
                 log_window={"sums": {"loss": torch.tensor(3.0), "loss_sup": torch.tensor(1.0)}, "count": 2,
                             "counts": {"loss": 2, "loss_sup": 1}})
    assert state["best_result"] is not None and state["best_miou"] == 0.2
    run = resumed_from(state, tmp_path / "run")
    assert torch.equal(run.class_weights, state["class_weights"])
    assert (run.start_iteration, run.best_miou, run.since_best, run.best_result) == (
        state["iteration"], state["best_miou"], state["since_best"], state["best_result"])
    assert run.pending_evaluation == state["pending_evaluation"]
    assert torch.equal(run.memory.counts, state["memory"]["counts"]) and int(run.memory.counts.sum()) > 0
    assert_same_state(state["balancing"], run.balancing.state_dict(), "balancing")
    assert_same_state(state["samplers"]["labeled"], run.labeled.state_dict(), "labeled")
    assert_same_state(state["samplers"]["unlabeled"], run.unlabeled.state_dict(), "unlabeled")
    assert_same_state(state["log_window"], {"sums": run._sums, "count": run._count, "counts": run._counts},
                      "log_window")
    assert_same_state(run.state_dict(state["iteration"])["log_window"], state["log_window"], "saved log_window")
    assert_same_state(state["teacher"], run.teacher.state_dict(), "teacher")
    assert_same_state(state["optimizer"], run.optimizer.state_dict(), "optimizer")
    # a state written before the per-term counts: every term counted over the whole window, as then averaged
    state["log_window"] = {"sums": {"loss": torch.tensor(3.0), "loss_sup": torch.tensor(1.0)}, "count": 2}
    run = resumed_from(state, tmp_path / "old")
    assert run._counts == {"loss": 2, "loss_sup": 2} and run._count == 2


def test_resume_restores_the_gradient_scaler_of_an_fp16_run(reference, tmp_path):
    """A run state of an fp16 run holds its gradient scaler's state (scale, growth tracker); a resume restores it.
    Here the fp32 reference state with a scaler state planted, resumed with --recover --set precision=fp16."""
    state = load_checkpoint(os.path.join(reference, "latest.pth"))
    assert state["scaler"] == {}  # fp32: a disabled scaler saves nothing
    planted = {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
               "_growth_tracker": 3}
    run = resumed_from(dict(state, scaler=planted), tmp_path / "run", "--recover", precision="fp16")
    assert run.scaler.is_enabled() and run.scaler.get_scale() == 256.0 and run.scaler.state_dict() == planted


def test_resume_continues_the_gta5_source_and_an_old_state_opens_an_empty_log_window(tmp_path, monkeypatch,
                                                                                    no_finish, capsys):
    """Domain adaptation (synthetic scenes, the other style as source): the source sampler's position is restored;
    a run state written before log windows and world sizes were saved (no "log_window", no "world_size") starts
    with an empty window, as a run of one process per state it holds (here one: no message)."""
    import trainSSL_domain_adaptation_targetCity as da_script
    from utils.variants import DOMAIN_ADAPTATION
    run_dir = tmp_path / "run"
    argv = tiny_argv(str(run_dir), iterations=2, **{"utils.save_latest_every": 1, "utils.val_per_iter": 1000})
    with monkeypatch.context() as mp:
        interrupt_after(mp, 1)
        with pytest.raises(Interrupted):
            da_script.main(argv)
    state = load_checkpoint(run_dir / "latest.pth")
    assert state["samplers"]["gta5"] is not None and state["log_window"]["count"] == 1
    state["samplers"]["gta5"] = {"epoch": 2, "consumed": 1}
    del state["log_window"], state["world_size"], state["script"]  # as written before the three were recorded
    torch.save(state, run_dir / "latest.pth")
    run = Run(DOMAIN_ADAPTATION, argv + ["--resume", "auto"])
    run.logger.close()
    assert run.gta5_batches.state_dict() == {"epoch": 2, "consumed": 1}
    assert run._sums == {} and run._count == 0 and run._counts == {}
    assert "process(es)" not in capsys.readouterr().out
    run = Run(TRAIN_SSL, argv + ["--resume", "auto"])  # trainSSL.py draws no source batches: their state is left
    run.logger.close()
    assert run.gta5_batches is None and run.start_iteration == 1


@CUDA_MARKS[0]
@CUDA_MARKS[1]
def test_a_run_state_saved_on_the_cpu_resumes_on_the_device(reference, tmp_path):
    """A run state is read onto the CPU; resumed on the device, the restored tensors the loop adds to (class weights,
    log window sums, memory bank) are on the device."""
    state = load_checkpoint(os.path.join(reference, "latest.pth"))
    state.update(class_weights=torch.linspace(0.5, 1.2, 8),
                 log_window={"sums": {"loss": torch.tensor(3.0)}, "count": 2})
    run = resumed_from(state, tmp_path / "run", "--device", str(DEVICE))
    assert run.class_weights.device.type == DEVICE.type and torch.equal(run.class_weights.cpu(), state["class_weights"])
    assert run._sums["loss"].device.type == DEVICE.type and float(run._sums["loss"]) == 3.0
    assert run.memory.memory.device.type == run.memory.counts.device.type == DEVICE.type


def test_a_run_without_class_balancing_saves_and_resumes_its_state(tmp_path):
    """`method.class_balancing` false: the run state holds no balancing state (None) and resumes from it."""
    argv = tiny_argv(str(tmp_path / "run"), **{"method.class_balancing": False})
    run = Run(TRAIN_SSL, argv)
    run.logger.close()
    assert run.balancing is None
    state = run.state_dict(3)
    assert state["balancing"] is None and state["iteration"] == 3
    torch.save(state, tmp_path / "run" / "latest.pth")
    resumed = Run(TRAIN_SSL, argv + ["--resume", "auto"])
    resumed.logger.close()
    assert resumed.balancing is None and resumed.start_iteration == 3
