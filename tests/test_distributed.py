"""Data-parallel training under torchrun: gloo, 2 CPU processes, a demo-sized trainSSL.py run.

tests/dist_worker.py is the program torchrun starts: trainSSL.py with probes that write, after every iteration,
digests of each rank's student, teacher, optimiser, memory bank and class balancing, the dataset indices it
drew, the memory rows it contributed and received, the collectives it ran, and every evaluation's confusion
matrix. The checks:
- after every step both ranks hold bit-identical student and teacher parameters, optimiser, memory bank,
  class-balancing histories and weights, while drawing disjoint batches; after every step that saved or evaluated
  (and so averaged the BatchNorm statistics) every buffer too, by name (running statistics and step counters); in
  iteration 2 rank 1 has no valid pixel for the memory and the contrastive terms ($DW_STARVE_RANK), so its heads
  and selectors skip a step that rank 0's take;
- DistributedDataParallel ends with the parameters of the gradient averaging it replaced (a copy of that kept in
  tests/dist_worker.py trains the same run a second time in the same job);
- the collectives of an iteration: DDP's gradient buckets and its "used" flags, the memory gather and the
  class-balancing counts; none for the stop decision;
- the memory bank received the selected rows of both ranks (gathered count = sum of the ranks' counts);
- the split evaluation equals evaluateSSL.py's single-process evaluation of the saved checkpoint;
- the 2-rank latest.pth loads into a 1-process run (weights, memory, RNG of rank 0);
- a rank that raises ends the whole job non-zero, with its message, well before any collective timeout (that job
  runs with scale_lr_with_world_size: its first step uses twice the config's learning rate on both ranks);
- with training.sync_batchnorm (CUDA only, marker `cuda`): the same identity with SyncBatchNorm layers;
- before training, the same job checks the helpers of engine/distributed.py against hand-worked values
  (tests/dist_worker.py: check_collectives), so the suite starts only two torchrun jobs (startup dominates).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from tests.dist_worker import compared_keys, digest, rank_differences
from tests.run_helpers import TINY_WIDTH
from engine import distributed as dist
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
CONFIG = os.path.join(ROOT, "configs", "demo.json")
N = 4   # iterations
R = 1   # ramp-up: memory from iteration 1 (offset 1), contrastive terms from iteration 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def tiny_args(run_dir: str) -> list[str]:
    sets = {
        "version": "2",  # the demo is v3+; batch 2 leaves one unlabeled image, too few for its image-pooling BN
        "backbone.depth": 18, "backbone.width": TINY_WIDTH, "backbone.pretrained": "none",
        "training.use_teacher_train": True,
        "training.batch_size": 2, "training.num_workers": 0, "training.num_iterations": N,
        "training.data.input_size": "33,49", "training.data.labeled_samples": 4,
        "synthetic.num_train": 12, "synthetic.num_val": 4, "synthetic.image_size": "40,60",
        "method.ramp_up_iterations": R, "method.memory_start_offset": 1, "method.memory_confidence": 0.0,
        "method.bn_refresh_iterations": 1, "utils.val_per_iter": 2, "utils.save_checkpoint_every": 2,
        "utils.save_latest_every": 2, "utils.log_every": 1, "utils.tensorboard": False, "utils.curves": False,
        "utils.checkpoint_dir": run_dir, "utils.run_name": "",
    }
    args = ["--config", CONFIG, "--device", "cpu"]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], out_dir: str, timeout: float, **env_extra: str) -> tuple[int, str, float]:
    """tests/dist_worker.py under torchrun with 2 processes; (exit code, output, seconds). A job still running
    after `timeout` is killed and the test fails (that is the hang the failure test guards against)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--max_restarts", "0", "--monitor_interval", "0.5", WORKER, *args]
    env = {**os.environ, "DW_OUT": out_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"torchrun job still running after {timeout} s (hang); output tail:\n{out[-4000:]}")
    return p.returncode, out, time.time() - t0


def records(out_dir: str, rank: int, prefix: str = "") -> list[dict]:
    path = os.path.join(out_dir, f"{prefix}rank{rank}.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    out_dir = str(tmp_path_factory.mktemp("probes"))
    code, out, _ = torchrun(tiny_args(run_dir), out_dir, timeout=400, DW_CHECK_COLLECTIVES="1",
                            DW_STARVE_RANK="1", DW_STARVE_ITER="2", DW_COUNT_COLLECTIVES="1", DW_REFERENCE="1")
    assert code == 0, out[-6000:]
    return run_dir, records(out_dir, 0), records(out_dir, 1), out_dir


def test_ranks_identical_after_every_step(two_rank_run):
    run_dir, rec0, rec1, _ = two_rank_run
    steps0 = [r for r in rec0 if r["kind"] == "step"]
    steps1 = [r for r in rec1 if r["kind"] == "step"]
    assert [r["i"] for r in steps0] == [r["i"] for r in steps1] == list(range(N))
    assert rank_differences([rec0, rec1], N) == []
    # the BatchNorm statistics are averaged where read: after iteration 1 (latest.pth), 2 (evaluation, periodic
    # checkpoint) and 3 (latest.pth, final evaluation), not after iteration 0, where each rank still has its own
    assert [(a["statistics_agreed"], b["statistics_agreed"]) for a, b in zip(steps0, steps1)] == \
        [(False, False)] + [(True, True)] * (N - 1)
    assert steps0[0]["student_buffers"] != steps1[0]["student_buffers"]
    for a, b in zip(steps0, steps1):
        for key in compared_keys([a, b]):
            assert a[key] == b[key], f"{key} differs between the ranks after iteration {a['i']}"
        assert len(a["student_buffers"]) > 100 and len(a["teacher_buffers"]) == len(a["student_buffers"])
        assert not a["starved"] and b["starved"] == (a["i"] == 2)
        # ... although the ranks trained on different images (disjoint shards of the same epoch)
        assert a["labeled"] and b["labeled"] and not set(a["labeled"]) & set(b["labeled"]), (a, b)
        assert a["unlabeled"] and not set(a["unlabeled"]) & set(b["unlabeled"])
    # the config's learning rate at iteration 0, not scaled by the world size (the default), in the optimiser too
    assert steps0[0]["lr"] == json.load(open(CONFIG))["training"]["learning_rate"]
    assert steps0[0]["optimizer_lr"] == [steps0[0]["lr"]]
    # every step changed the student (the digests would also agree if nothing trained)
    assert len({r["student_params"] for r in steps0}) == N
    # memory: from iteration R - offset + 1 = 1 on, every rank receives the rows of both ranks, in the same order
    events = [(a["i"], ea, eb) for a, b in zip(steps0, steps1) for ea, eb in zip(a["gathered"], b["gathered"])]
    assert [i for i, _, _ in events] == list(range(1, N))
    for i, (n0, g0), (n1, g1) in events:
        assert g0 == g1 == n0 + n1, (i, n0, n1, g0, g1)
        if i == 2:
            assert n1 == 0 < n0  # the starved rank sent nothing in iteration 2; rank 0 did
    assert any(ea[0] > 0 and eb[0] > 0 for _, ea, eb in events)
    assert sum(steps0[-1]["memory_counts"]) > 0
    log = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    train_rows = {r["iteration"]: r for r in log if r["kind"] == "train"}
    assert sorted(train_rows) == list(range(N))
    for i, row in train_rows.items():
        assert ("loss_contr_l" in row) == (i > R) and ("loss_contr_u" in row) == (i > R)


def test_rank_0_holds_the_run_directory(two_rank_run):
    """Under torchrun rank 0 alone holds the run directory (run.lock names its pid, not rank 1's); the finished run
    gives it back (no run.lock left)."""
    run_dir, rec0, rec1, _ = two_rank_run
    (lock0,), (lock1,) = ([r for r in rec if r["kind"] == "lock"] for rec in (rec0, rec1))
    assert lock0["holds"] and not lock1["holds"] and lock0["pid"] != lock1["pid"]
    assert lock0["holder"] == lock1["holder"] == lock0["pid"]
    assert not os.path.exists(os.path.join(run_dir, "run.lock"))


def test_split_evaluation_equals_single_process(two_rank_run):
    import evaluateSSL
    from engine.checkpoint import load_checkpoint
    from utils.metrics import class_iou

    run_dir, rec0, rec1, _ = two_rank_run
    evals0 = [r for r in rec0 if r["kind"] == "eval"]
    evals1 = [r for r in rec1 if r["kind"] == "eval"]
    assert len(evals0) == len(evals1) >= 3  # iteration 2, the final one, the BN-refreshed one
    for a, b in zip(evals0, evals1):
        assert a["model"] == b["model"] == a["model_after"] == b["model_after"]
        assert a["confusion"] == b["confusion"] and a["miou"] == b["miou"]
        assert not set(a["names"]) & set(b["names"]) and len(a["names"]) + len(b["names"]) == 4
        assert sum(map(sum, a["confusion"])) > 0
    best_path = os.path.join(run_dir, "best_model.pth")
    best = load_checkpoint(best_path)
    matching = [r for r in evals0 if r["model"] == digest(best["model"])]
    assert matching, "best_model.pth holds a state that was never evaluated"
    record = matching[-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the single-threaded ranks
    try:
        report = evaluateSSL.main(["--model-path", best_path, "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    expected_iou = class_iou(torch.tensor(record["confusion"])).tolist()
    got_iou = list(report["iou"].values())
    assert len(got_iou) == len(expected_iou) == 8
    for g, e in zip(got_iou, expected_iou):
        assert (math.isnan(g) and math.isnan(e)) or g == e, (got_iou, expected_iou)
    assert report["miou"] == record["miou"] == best["miou"]
    assert report["loss"] == pytest.approx(record["loss"], rel=1e-9)


def test_two_rank_checkpoint_resumes_in_one_process(two_rank_run, capsys):
    from trainSSL import Run
    from engine.checkpoint import load_checkpoint
    from utils.variants import TRAIN_SSL

    run_dir, rec0, _, _ = two_rank_run
    latest_path = os.path.join(run_dir, "latest.pth")
    latest = load_checkpoint(latest_path)
    assert latest["iteration"] == N and latest["world_size"] == 2
    rngs = latest["rng_ranks"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # per-rank augmentation draws
    assert torch.equal(rngs[0]["torch"], latest["rng"]["torch"])
    run = Run(TRAIN_SSL, tiny_args(run_dir) + ["--resume", latest_path])
    try:
        assert run.start_iteration == N and not run.iterations()
        assert digest(run.student.state_dict()) == digest(latest["model"])
        assert digest(run.teacher.state_dict()) == digest(latest["teacher"])
        last_step = [r for r in rec0 if r["kind"] == "step"][-1]
        assert digest(run.memory.state_dict()) == digest(latest["memory"]) == last_step["memory"]
        assert torch.equal(run.memory.counts, latest["memory"]["counts"]) and int(run.memory.counts.sum()) > 0
        assert torch.equal(torch.get_rng_state(), rngs[0]["torch"])
    finally:
        run.logger.close()
    assert "resuming a run of 2 process(es) with 1" in capsys.readouterr().out


def test_failing_rank_ends_the_job(tmp_path):
    out_dir = str(tmp_path / "probes")
    os.makedirs(out_dir)
    args = tiny_args(str(tmp_path / "run"))
    args += ["--set", "training.scale_lr_with_world_size=true"]
    code, out, seconds = torchrun(args, out_dir, timeout=240, DW_FAIL_RANK="1", DW_FAIL_ITER="0",
                                  SSL_DIST_TIMEOUT_MIN="30")
    assert code != 0, out[-4000:]
    assert "RuntimeError: injected failure on rank 1 after iteration 0" in out, out[-4000:]
    # torchrun's summary names the failing rank as the root cause, with its error (engine.distributed records it)
    root_cause = out.split("Root Cause (first observed failure)")[-1]
    assert "rank      : 1" in root_cause and "injected failure on rank 1" in root_cause, out[-4000:]
    # rank 0 got no further than iteration 0: it waited in iteration 1's first collective until torchrun stopped it
    assert [r["i"] for r in records(out_dir, 0) if r["kind"] == "step"] == [0]
    # scale_lr_with_world_size: iteration 0 stepped with 2 x the config's rate (poly factor 1) on both ranks
    lr = 2 * json.load(open(CONFIG))["training"]["learning_rate"]
    for rank in (0, 1):
        (step,) = [r for r in records(out_dir, rank) if r["kind"] == "step"]
        assert step["lr"] == lr and step["optimizer_lr"] == [lr], step
    assert seconds < 240


def test_collectives_by_hand(two_rank_run):
    """all_gather_rows, the reference gradient averaging, average_buffers, broadcasts and the all-reduced class
    balancing on 2 gloo processes (the assertions run in tests/dist_worker.py:check_collectives; a failure fails
    the job)."""
    _, rec0, rec1, _ = two_rank_run
    assert rec0[0] == rec1[0] == {"kind": "collectives", "ok": True}


def test_ddp_ends_where_the_averaging_it_replaced_ends(two_rank_run):
    """The same 2-rank run trained twice in one job: with DistributedDataParallel (the code), and with the gradient
    averaging it replaced (all-reduce after backward, zeros from a rank without a gradient, None kept where no rank
    has one; BatchNorm buffers averaged after every step: tests/dist_worker.py). Over the N iterations — memory from
    iteration 1, contrastive terms from 2, rank 1 starved in 2 — both hold the same student and teacher parameters,
    optimiser state (momentum buffers exist for the same parameters) and memory bank after every step, bit for bit:
    with 2 ranks DDP's (a/2 + b/2) equals (a + b)/2 exactly and gloo adds two numbers alike in either order. (A
    float32 tolerance would not do here: giving every unused parameter a zero gradient, so that SGD decays it,
    moves it by lr x weight decay = 1e-6 of itself per step.)"""
    _, rec0, rec1, out_dir = two_rank_run
    ddp, reference = ({rank: torch.load(os.path.join(out_dir, f"final_{prefix}rank{rank}.pt")) for rank in (0, 1)}
                      for prefix in ("", "reference_"))
    assert set(ddp[0]) == set(reference[0]) and len(ddp[0]) > 100
    for name, value in ddp[0].items():
        assert torch.equal(value, reference[0][name]), name
        assert torch.equal(value, ddp[1][name]) and torch.equal(reference[0][name], reference[1][name])
    for rank, rec in enumerate((rec0, rec1)):
        steps = [r for r in rec if r["kind"] == "step"]
        ref_steps = [r for r in records(out_dir, rank, "reference_") if r["kind"] == "step"]
        assert [r["i"] for r in ref_steps] == list(range(N)) and len({r["student_params"] for r in ref_steps}) == N
        for a, b in zip(steps, ref_steps):
            for key in ("student_all_params", "teacher_all_params", "optimizer", "memory", "balancing"):
                assert a[key] == b[key], f"{key} after iteration {a['i']} (rank {rank})"


def test_collectives_of_an_iteration(two_rank_run):
    """The collectives of each iteration on 2 gloo ranks, counted by torch's profiler (every c10d operation,
    DistributedDataParallel's own included; tests/dist_worker.py:count_collectives), in the training steps and in
    the stop decision after them:
    - all-reduce: DDP's gradient buckets (2 for this tiny network) + DDP's "used parameters" flags (1) + the
      class-balancing counts (synthetic scenes with class balancing: the unlabeled batch's every iteration, the
      labeled batch's while its history fills, iterations 0 and 1 here);
    - all-gather: the memory gather from iteration 1 on (row counts, vectors, labels: 3);
    - none for the stop decision in the loop (the votes travel with the gradients); one all-reduce before the first
      iteration agrees on the batches loaded ahead. No BatchNorm averaging, no per-iteration agreement on which
      parameters have gradients."""
    _, rec0, rec1, _ = two_rank_run
    for rec in (rec0, rec1):
        counts = {r["i"]: r for r in rec if r["kind"] == "collectives_count"}
        assert sorted(counts) == [-1] + list(range(N))
        assert counts[-1]["stop"] == {"c10d::allreduce_": 1} and not counts[-1]["voted"]
        buckets, used, balancing = 2, 1, [2, 2, 1, 1]
        memory = [0, 3, 3, 3]
        for i in range(N):
            expected = {"c10d::allreduce_": buckets + used + balancing[i]}
            if memory[i]:
                expected["c10d::allgather_"] = memory[i]
            assert counts[i]["train"] == expected, (i, counts[i])
            assert counts[i]["stop"] == {} and counts[i]["voted"], (i, counts[i])


def test_one_process_identity(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist.launched_by_torchrun() and not dist.is_distributed()
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.rank_tag()) == (0, 1, True, "")
    x, y = torch.randn(3, 2), torch.arange(3)
    gx, gy = dist.all_gather_rows(x, y)
    assert gx is x and gy is y and dist.all_gather_object(5) == [5] and dist.broadcast_object(7) == 7
    from engine.ddp_step import GradientPass
    lin = nn.Linear(2, 1)
    passes = GradientPass(lin, torch.device("cpu"), vote=lambda: (0.0, 1.0, 0.0))
    assert passes.forward is passes.module and passes.module.student is lin  # not wrapped: called as it is
    x = torch.ones(1, 2)
    terms = passes(lambda k: {"a": (lin(x) * k).sum()}, 3.0)  # no vote in one process
    terms["a"].backward()
    assert terms["a"].item() == pytest.approx(3 * (lin.weight.sum() + lin.bias).item())
    assert passes.module.stop_vote.grad is None and passes.votes() == (False, False, False)
    assert dist.run_recording_errors(lambda: 3) == 3


def test_sync_batchnorm_converts_only_the_network_body():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    net[1].weight.requires_grad_(False)  # frozen affine, as in the backbone
    weight = net[1].weight
    net[1].running_mean.fill_(0.25)
    with pytest.raises(UserError, match="training.sync_batchnorm"):
        dist.convert_sync_batchnorm(net, torch.device("cpu"))
    assert type(net[1]) is nn.BatchNorm2d  # nothing changed
    out = dist.convert_sync_batchnorm(net, torch.device("cuda"))  # conversion itself needs no GPU
    assert out is net and type(net[1]) is nn.SyncBatchNorm and type(net[2][1]) is nn.BatchNorm1d
    assert net[1].weight is weight and not net[1].weight.requires_grad
    assert net[1].running_mean.tolist() == [0.25] * 4
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                     "1.num_batches_tracked", "2.0.weight", "2.0.bias", "2.1.weight", "2.1.bias",
                                     "2.1.running_mean", "2.1.running_var", "2.1.num_batches_tracked"}


def test_sigterm_to_torchrun_stops_both_ranks_at_one_iteration(tmp_path, monkeypatch, capsys):
    """SIGTERM to the launcher after the first log line: torchrun sends it to both ranks (to their process groups;
    the loader workers live in their own), which finish the same iteration; rank 0 alone writes latest.pth, with
    both ranks' RNG states; the run resumes from it (here in one process, for one iteration: startup dominates)."""
    import threading

    import trainSSL
    from engine.checkpoint import load_checkpoint
    from engine.run import Run

    n = 4
    run_dir, out_dir = str(tmp_path / "run"), str(tmp_path / "probes")
    os.makedirs(out_dir)
    args = tiny_args(run_dir)
    for key, value in {"training.num_iterations": n, "training.num_workers": 1, "utils.val_per_iter": 1000,
                       "utils.save_checkpoint_every": 1000, "utils.save_latest_every": 1000}.items():
        args += ["--set", f"{key}={value}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--max_restarts", "0", "--monitor_interval", "0.5", WORKER, *args]
    env = {**os.environ, "DW_OUT": out_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    watchdog = threading.Timer(400, lambda: os.killpg(p.pid, signal.SIGKILL))  # a hang fails, never blocks
    watchdog.start()
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("[train] iteration 0/"):  # the first log line
                os.kill(p.pid, signal.SIGTERM)  # the launcher only
                break
        lines.append(p.stdout.read())
        p.wait()
    finally:
        watchdog.cancel()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = "".join(lines)
    assert p.returncode != 0 and "[train] iteration 0/" in out, out[-4000:]
    assert out.count("SIGTERM received") == 1, out[-4000:]  # rank 0 says it once (not its loader workers)
    assert out.count("stopped by SIGTERM (rank 0)") == 1 and "(rank 1)" not in out, out[-4000:]
    assert "DataLoader worker" not in out, out[-4000:]
    assert [name for name in os.listdir(run_dir) if "latest" in name] == ["latest.pth"]
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    k = latest["iteration"]
    assert 1 <= k < n and latest["world_size"] == 2 and len(latest["rng_ranks"]) == 2
    steps = [[r["i"] for r in records(out_dir, rank) if r["kind"] == "step"] for rank in (0, 1)]
    assert steps[0] == steps[1] == list(range(k))  # both ranks stopped after the same iteration

    monkeypatch.setattr(Run, "iterations", lambda self: range(self.start_iteration, self.start_iteration + 1))
    monkeypatch.setattr(Run, "finish", lambda self: self.logger.close())
    capsys.readouterr()
    trainSSL.main(args + ["--resume", "auto"])
    out = capsys.readouterr().out
    assert f"iterations from {k}" in out and f"[train] iteration {k}/{n}" in out, out


def test_a_bad_file_on_one_rank_stops_both_after_the_same_iteration(tmp_path):
    """Rank 1 alone cannot read its labeled batch of iteration 3: under torchrun each rank loads two iterations
    ahead, so it meets the file after iteration 1, votes in iteration 2's gradient pass, and both ranks stop after
    iteration 2 (nothing agreed outside the gradient all-reduce); rank 0 writes latest.pth with the state after 3
    iterations (samplers at 3 batches: the failed batch is loaded again on resume) and the message names the file
    and the rank; both ranks exit with code 2."""
    from engine.checkpoint import load_checkpoint

    out_dir, run_dir = str(tmp_path / "probes"), str(tmp_path / "run")
    os.makedirs(out_dir)
    code, out, _ = torchrun(tiny_args(run_dir), out_dir, timeout=300, DW_BAD_RANK="1", DW_BAD_LOAD="3",
                            DW_COUNT_COLLECTIVES="1")
    assert code != 0 and out.count("exitcode  : 2") == 2, out[-4000:]  # torchrun: 1; both ranks: 2
    assert "cannot read image /data/planted_bad_3.png: planted (rank 1)" in out, out[-4000:]
    assert "latest.pth" in out and "--resume auto" in out
    steps = [[r["i"] for r in records(out_dir, rank) if r["kind"] == "step"] for rank in (0, 1)]
    assert steps == [[0, 1, 2], [0, 1, 2]]
    stops = [[r["stop"] for r in records(out_dir, rank) if r["kind"] == "collectives_count" and r["i"] >= 0]
             for rank in (0, 1)]
    assert stops[0][:2] == stops[1][:2] == [{}, {}]  # deciding not to stop took no collective
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    # one labeled batch per epoch and rank (4 images, 2 ranks, batch 2): 3 batches drawn = epoch 3, none of it
    assert latest["iteration"] == 3 and latest["samplers"]["labeled"] == {"epoch": 3, "consumed": 0}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm has CUDA kernels only")
def test_sync_batchnorm_under_torchrun(tmp_path):
    """training.sync_batchnorm: 2 ranks on the first GPU (gloo on CUDA tensors, as gpu_check's fallback: NCCL
    refuses two ranks on one GPU), 2 iterations; the network's BatchNorm2d layers are SyncBatchNorm and every
    rank holds the same state after every step."""
    from tests.dist_worker import rank_differences

    out_dir = str(tmp_path / "probes")
    os.makedirs(out_dir)
    args = [a if a != "cpu" else "cuda" for a in tiny_args(str(tmp_path / "run"))]
    args += ["--set", "training.num_iterations=2", "--set", "training.sync_batchnorm=true"]
    code, out, _ = torchrun(args, out_dir, timeout=300, DW_SHARE_DEVICE="1", DW_BACKEND="gloo")
    assert code == 0, out[-4000:]
    recs = [records(out_dir, 0), records(out_dir, 1)]
    assert rank_differences(recs, 2) == []
    assert all(r["sync_batchnorm"] > 10 for rank in recs for r in rank if r["kind"] == "step")
