"""A run directory belongs to one run (engine/run_dir.py, engine/resume.py): one directory per config, held by one
run at a time (an OS lock naming its holder; a killed holder leaves no stale lock), an earlier run in it continued
when it is this run, interrupted, and never written over without --restart; a run state names the script that wrote
it. (Issue 31, wrong behaviours 1-3: a resubmitted job destroyed the interrupted one; two runs wrote one directory;
another script resumed a run state.)"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import trainSSL
from engine import run_dir as rundir
from engine.checkpoint import load_checkpoint
from engine.run import Run
from tests.run_helpers import DEMO, ROOT, argv_of, tiny_sets
from tests.test_resume import Interrupted, interrupt_after, one_thread  # noqa: F401  (autouse fixture)
from utils.errors import UserError
from utils.variants import DOMAIN_ADAPTATION, LESS_MEMORY, TRAIN_SSL


def rule_sets(runs: str, iterations: int = 4, **extra) -> dict:
    """Tiny runs whose run directory follows the default rule: <runs>/<config name> (utils.run_name null)."""
    return tiny_sets(runs, iterations, **{"utils.run_name": None, "utils.save_latest_every": 1, **extra})


def made(argv: list[str], variant=TRAIN_SSL) -> Run:
    """A Run built (its directory claimed, a resumed state loaded) but not trained; its logger closed."""
    run = Run(variant, argv)
    run.logger.close()
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-iteration trainSSL.py run in <runs>/demo (the demo config's name)."""
    runs = str(tmp_path_factory.mktemp("runs"))
    argv = argv_of(rule_sets(runs, 2))
    trainSSL.main(argv)
    return runs, argv


def test_one_directory_per_config_and_the_same_command_resumes_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """The run directory is <checkpoint_dir>/<config name>; a run interrupted after 2 of 4 iterations, then started
    again with the very same command (a cluster's requeue), continues from its latest.pth instead of starting from 0
    over it (before: "4 iterations from 0", its latest.pth overwritten)."""
    runs = str(tmp_path / "saved")
    argv = argv_of(rule_sets(runs))
    run_dir = os.path.join(runs, "demo")
    with monkeypatch.context() as mp:
        interrupt_after(mp, 2)
        with pytest.raises(Interrupted):
            trainSSL.main(argv)
    state = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert state["iteration"] == 2 and state["script"] == "trainSSL"
    assert sorted(os.listdir(runs)) == ["demo"]
    capsys.readouterr()
    trainSSL.main(argv)  # the same command again
    out = capsys.readouterr().out
    assert (f"{run_dir} holds this run, interrupted (latest.pth after 2 of 4 iterations): resuming it, as "
            f"--resume auto does.") in out
    assert "4 iterations from 2" in out and "4 iterations from 0" not in out
    assert load_checkpoint(os.path.join(run_dir, "latest.pth"))["iteration"] == 4
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    assert [r["iteration"] for r in rows if r["kind"] == "resume"] == [2]
    assert not os.path.exists(os.path.join(run_dir, rundir.LOCK_NAME))  # a run that ends gives its lock back


def test_an_earlier_run_is_never_written_over_silently(finished, tmp_path, capsys):
    """A directory holding a finished run, a run of another config or another script, a run without latest.pth, and
    a run started from weights into it: each stops, saying what is there and what to do, and leaves every file as it
    was; --restart moves the earlier run's files into replaced-<time>/ and starts afresh."""
    runs, argv = finished
    run_dir = os.path.join(runs, "demo")
    before = {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)}
    assert {"latest.pth", "best_model.pth", "config.json", "train_log.jsonl", "evaluation.json"} <= set(before)

    cases = [
        (argv, TRAIN_SSL, [f"{run_dir} holds this run, finished (evaluation.json). To train it again, start afresh "
                           f"there with --restart", "--resume auto"]),
        (argv + ["--set", "training.learning_rate=0.02"], TRAIN_SSL,
         [f"{run_dir} holds a run of another config (latest.pth after 2 iterations). Differing keys (there -> now):",
          "  training.learning_rate: 0.01 -> 0.02", "--set utils.run_name=NAME", "--restart"]),
        (argv, LESS_MEMORY, [f"{run_dir} holds a run of trainSSL.py (latest.pth after 2 iterations); this is "
                             f"trainSSL_less_memory.py. Continue that run with:\n  python3 trainSSL.py --config "
                             f"{DEMO}"]),
        (argv + ["--resume", os.path.join(run_dir, "best_model.pth")], TRAIN_SSL,
         [f"{run_dir} holds files of an earlier run (", "(--resume auto continues that run); a run started from the "
          "weights of", "would write over them"]),
        (argv + ["--restart", "--resume", "auto"], TRAIN_SSL, ["--restart starts a new run in the run directory; it "
                                                               "does not go with --resume auto"]),
    ]
    for args, variant, expected in cases:
        with pytest.raises(UserError) as e:
            Run(variant, args)
        for text in expected:
            assert text in str(e.value), (text, str(e.value))
    assert {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)} == before

    # run files without a latest.pth (a run stopped by a kill before its first one)
    copy_dir = str(tmp_path / "copy")
    os.makedirs(os.path.join(copy_dir, "demo"))
    for name in ("config.json", "train_log.jsonl"):
        with open(os.path.join(run_dir, name), "rb") as src, open(os.path.join(copy_dir, "demo", name), "wb") as dst:
            dst.write(src.read())
    with pytest.raises(UserError, match=r"holds files of an earlier run \(config.json, train_log.jsonl\) but no "
                                        r"latest.pth to continue from"):
        Run(TRAIN_SSL, argv_of(rule_sets(copy_dir, 2)))

    # --restart: the earlier run's files move aside (nothing deleted), the new run starts from 0
    capsys.readouterr()
    run = made(argv_of(rule_sets(copy_dir, 2)) + ["--restart"])
    (moved,) = [n for n in os.listdir(os.path.join(copy_dir, "demo")) if n.startswith("replaced-")]
    assert sorted(os.listdir(os.path.join(copy_dir, "demo", moved))) == ["config.json", "train_log.jsonl"]
    assert run.start_iteration == 0 and f"--restart: the earlier run's files in {run.run_dir} are now in" in \
        capsys.readouterr().out
    rundir.release(run.run_dir)


HOLDER = """
import sys, time
from engine import run_dir
run_dir.acquire(sys.argv[1])
print("HELD", flush=True)
time.sleep(600)
"""


def test_a_held_directory_stops_a_second_run_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path, monkeypatch,
                                                                                              capsys):
    """Another process holds the run directory: a run into it stops before reading any data, names the holder (pid,
    host, command) and writes nothing. The holder killed (SIGKILL: no clean-up), its lock file remains, naming it;
    the next run takes it over and says whose it was."""
    argv = argv_of(tiny_sets(str(tmp_path / "run"), 2))
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"

        def no_data(*args, **kwargs):
            raise AssertionError("the data was read before the lock was checked")

        with monkeypatch.context() as mp:
            mp.setattr("engine.run.build_data", no_data)
            with pytest.raises(UserError) as e:
                Run(TRAIN_SSL, argv)
        assert str(e.value).startswith(f"the run directory {run_dir} is in use by another run: pid {holder.pid} on "
                                       f"host {socket.gethostname()}, started ")
        assert f"command: python3 -c {run_dir}" in str(e.value) and "--set utils.run_name=NAME" in str(e.value)
        assert os.listdir(run_dir) == [rundir.LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, with the dead holder's name in it
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert json.load(open(os.path.join(run_dir, rundir.LOCK_NAME)))["pid"] == holder.pid
    capsys.readouterr()
    made(argv)
    assert f"taking over from pid {holder.pid} on host {socket.gethostname()}" in capsys.readouterr().out
    assert json.load(open(os.path.join(run_dir, rundir.LOCK_NAME)))["pid"] == os.getpid()
    rundir.release(run_dir)
    assert not os.path.exists(os.path.join(run_dir, rundir.LOCK_NAME))


def test_a_run_that_wrote_while_this_one_started_is_not_written_over(tmp_path, monkeypatch):
    """Two runs started together into one empty directory: the one that claims it second finds files that were not
    there when it looked, and stops."""
    import engine.run as training
    argv = argv_of(tiny_sets(str(tmp_path / "run"), 2))
    real = training.build_data

    def data_then_another_run_writes(*args, **kwargs):
        out = real(*args, **kwargs)
        with open(tmp_path / "run" / "train_log.jsonl", "w") as f:
            f.write("{}\n")
        return out

    os.makedirs(tmp_path / "run")
    monkeypatch.setattr(training, "build_data", data_then_another_run_writes)
    with pytest.raises(UserError, match="another run wrote to .* while this one was starting; run the command again"):
        Run(TRAIN_SSL, argv)
    assert sorted(os.listdir(tmp_path / "run")) == ["train_log.jsonl"]


def test_a_run_state_is_resumed_only_by_the_script_that_wrote_it(tmp_path):
    """latest.pth records its script: the less-memory and domain-adaptation scripts refuse trainSSL.py's run state
    (before: accepted, the other method trained on top, or "resumed" past its end), and print the command that
    continues it; a weights-only checkpoint whose iteration lies past the run's last is refused too."""
    argv = argv_of(tiny_sets(str(tmp_path / "run"), 4))
    run = made(argv)
    torch.save(run.state_dict(4), tmp_path / "run" / "latest.pth")
    rundir.release(run.run_dir)
    latest = str(tmp_path / "run" / "latest.pth")
    for variant in (LESS_MEMORY, DOMAIN_ADAPTATION):
        with pytest.raises(UserError) as e:
            Run(variant, argv + ["--resume", "auto"])
        assert str(e.value) == (f"cannot resume {latest} with {variant.name}.py: it is the run state of trainSSL.py "
                                f"(another method, and its iterations count trainSSL.py's steps). Continue it with:\n"
                                f"  python3 trainSSL.py {' '.join(argv)} --resume auto")
    resumed = made(argv + ["--resume", "auto"])  # its own script continues it
    assert resumed.start_iteration == 4
    rundir.release(resumed.run_dir)
    weights = {"model": run.student_module.state_dict(), "iteration": 24}
    torch.save(weights, tmp_path / "late.pth")
    with pytest.raises(UserError, match=r"late.pth holds weights of iteration 24, past this run's 4 iterations"):
        Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "other"), 4)) + ["--resume", str(tmp_path / "late.pth")])
