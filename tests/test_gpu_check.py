"""benchmarks/gpu_check.py (`make gpu-check`): the dry run of every step on the CPU, the step machinery (time
limits, failures, the child process of a step), the targets, the rank check of the torchrun step, and the CPU
proxy of the host-sync guard used by the cuda tests."""
from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.common import cpu_threads
from tests.cuda_support import HostSyncError, allowing_boolean_selections, no_host_sync, random_draws_on_cpu
from tests.dist_worker import rank_differences
from engine.config import load_config

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run (every step at toy sizes on the CPU), as `gpu_check.py --dry-run` runs it."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    paths = {"json": str(tmp / "out" / "check.json"), "md": str(tmp / "out" / "check.md"), "work": str(tmp / "w")}
    t0 = time.monotonic()
    with cpu_threads(1):
        code = gpu_check.main(["--dry-run", "--work", paths["work"], "--json", paths["json"],
                               "--markdown", paths["md"]])
    seconds = time.monotonic() - t0
    with open(paths["json"]) as f:
        report = json.load(f)
    with open(paths["md"]) as f:
        text = f.read()
    return code, report, text, paths, seconds


def test_dry_run_runs_every_step(dry_run):
    code, report, _, _, _ = dry_run
    assert code == 0 and report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEP_NAMES)
    for name, step in steps.items():
        expected = "skipped" if name == "torchrun_nccl" else "ok"        # NCCL needs CUDA
        assert step["status"] == expected, (name, step.get("error"))
    assert "NCCL needs CUDA" in steps["torchrun_nccl"]["note"]


def test_dry_run_step_results(dry_run):
    _, report, _, _, _ = dry_run
    r = report["results"]
    tests = r["cuda_tests"]["data"]                    # the cuda tests really ran, the CPU standing in
    assert tests["passed"] >= 15 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    demo = r["demo"]["data"]
    assert 0 <= demo["train_fp32"]["best_miou"] <= 1 and demo["train_fp32"]["iterations"] == 3
    assert demo["evaluate_fp32"]["abs_difference"] == 0.0       # CPU against CPU
    runs = r["bench_step"]["data"]
    assert {run["setup"]["script"] for run in runs.values()} == {"trainSSL", "trainSSL_less_memory"}
    for run in runs.values():
        for row in run["results"]:
            assert row["iterations_per_second"] > 0 and 0 <= row["method_share"] <= 1
            assert row["peak_memory_kind"] == "cpu_peak_rss_process_lifetime"
            assert row["peak_memory_reserved_bytes"] is None
    (compiled,) = r["bench_step_compile"]["data"].values()
    assert compiled["setup"]["compile"] is True and compiled["setup"]["compile_backend"] == "eager"
    rows = {row["name"]: row for row in r["bench_components"]["data"]["components"]["results"]}
    for name in ("memory_update", "class_balancing", "contrastive_ones", "contrastive_mean"):
        assert rows[name]["reference"]["ms_median"] > 0            # each part beside its per-class reference
    dist = r["torchrun_gloo"]["data"]
    assert dist["rank_identical"] and dist["steps_recorded"] == [2, 2] and dist["backend"] == "gloo"
    ev = r["eval_full_size"]["data"]["evaluation"]
    assert ev["complete"] and ev["images"] == 3 and ev["pixels_counted"] > 0.8 * 3 * 64 * 128


def test_dry_run_figures_and_markdown(dry_run):
    _, report, text, paths, seconds = dry_run
    figures = {f["figure"]: f for f in report["figures"]}
    assert all(f["result"] in ("PASS", "FAIL", "n/a") for f in figures.values())
    assert figures["cuda tests passed / failed+errors / skipped"]["result"] == "PASS"
    assert any(k.startswith("demo fp32 checkpoint: evaluateSSL.py") and f["result"] == "PASS"
               for k, f in figures.items())
    assert any(k.startswith("torchrun 2 processes (gloo on cpu)") and f["result"] == "PASS" for k, f in figures.items())
    assert any(k.startswith("method parts share") for k in figures)
    peak = [f for k, f in figures.items() if k.startswith("peak memory (the target)")]
    assert len(peak) == 1 and peak[0]["result"] == "n/a"         # a CPU's RSS says nothing about a V100
    assert text.startswith("**DRY RUN on the CPU")
    for heading in ("| figure | measured | target | result |", "| step | status | seconds | limit |",
                    "| run | precision | it/s |", "| part | ms | syncs/call |"):
        assert heading in text
    for name in gpu_check.STEP_NAMES:
        assert f"| {name} |" in text
    assert_tables_well_formed(text)
    # the work folder holds every step's log or record; eval_full_size ran as on a GPU, in a child process
    work = paths["work"]
    assert os.path.isfile(os.path.join(work, "logs", "cuda_tests.log"))
    assert json.load(open(os.path.join(work, "steps", "demo.json")))["done"] is True
    assert not os.path.exists(os.path.join(work, "logs", "demo.log"))
    assert json.load(open(os.path.join(work, "steps", "eval_full_size.json")))["done"] is True
    assert os.path.isfile(os.path.join(work, "logs", "eval_full_size.log"))
    print(f"dry run: {seconds:.1f} s")


def assert_tables_well_formed(text: str) -> None:
    """Every row of every Markdown table has as many cells as its header (pipes in cells escaped)."""
    widths = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            widths.append(len(re.split(r"(?<!\\)\|", line)))
        elif widths:
            assert len(set(widths)) == 1, (widths, text)
            widths = []


# ----------------------------------------------------------------------------------------- step machinery
def command_step(name: str, code: str) -> gpu_check.Step:
    def command(plan, work):
        return [sys.executable, "-c", code], {}

    def result(plan, work, done):
        return {"returncode": done.returncode}, (None if done.returncode == 0 else f"exit {done.returncode}\n"
                                                 f"{gpu_check.tail(done.output)}")
    return gpu_check.Step(name, name, 5, "command", command, result)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_step_statuses_and_one_failure_does_not_stop_the_next(tmp_path):
    plan = gpu_check.plan_for(True)
    results = {}
    pid_file = tmp_path / "grandchild.pid"
    steps = [
        command_step("sleeps", "import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', "
                               "'import time; time.sleep(60)']); "
                               f"open({str(pid_file)!r}, 'w').write(str(g.pid)); print('started', flush=True); "
                               "time.sleep(60)"),
        command_step("fails", "import sys; print('about to fail'); sys.exit('boom: bad thing')"),
        command_step("works", "print('fine')"),
    ]
    t0 = time.monotonic()
    for step, timeout in zip(steps, (1.5, 30, 30)):
        results[step.name] = gpu_check.run_step(step, plan, str(tmp_path), timeout, True, results)
    assert time.monotonic() - t0 < 20                                  # the sleeping group was killed ...
    assert not alive(int(pid_file.read_text()))                         # ... grandchildren included
    slept, failed, worked = results["sleeps"], results["fails"], results["works"]
    assert slept["status"] == "timed out" and "killed after 2 s" in slept["error"] and "started" in slept["error"]
    assert failed["status"] == "failed" and "boom: bad thing" in failed["error"]
    assert worked["status"] == "ok" and worked["error"] is None and worked["data"] == {"returncode": 0}
    skipped = gpu_check.run_step(steps[2], plan, str(tmp_path), 0.5, True, results)
    assert skipped["status"] == "skipped" and skipped["note"] == "no time left in the budget"


def test_python_step_failure_keeps_finished_actions(tmp_path, monkeypatch):
    def half_done(ctx):
        ctx.record("first", {"value": 1})
        try:
            raise ValueError("second action broke")
        except ValueError:
            ctx.error("second")
        ctx.record("third", {"value": 3})
    monkeypatch.setitem(gpu_check.PY_STEPS, "demo", half_done)
    step = next(s for s in gpu_check.STEPS if s.name == "demo")
    record = gpu_check.run_step(step, gpu_check.plan_for(True), str(tmp_path), 60, True, {})
    assert record["status"] == "failed" and "second action broke" in record["error"]
    assert record["data"] == {"first": {"value": 1}, "third": {"value": 3}}


def test_child_entry_writes_the_step_record(tmp_path):
    """What the child process of a Python step runs (`--child STEP`): its record, done, in the work folder."""
    assert gpu_check.main(["--child", "eval_full_size", "--dry-run", "--work", str(tmp_path)]) == 0
    stored = json.load(open(tmp_path / "steps" / "eval_full_size.json"))
    assert stored["done"] is True and stored["errors"] == []
    ev = stored["data"]["evaluation"]
    assert ev["complete"] and ev["images"] == 3 and ev["size"] == [64, 128]


def test_no_gpu_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code = gpu_check.main(["--json", str(out / "a.json"), "--markdown", str(out / "a.md"), "--work", str(out)])
    assert code == 0
    assert "no CUDA GPU is present" in capsys.readouterr().out
    assert not out.exists()


def test_bad_step_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--only", "demo,bogus"])
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--limit", "bogus=3"])


def test_plans_use_existing_configs():
    for dry in (False, True):
        plan = gpu_check.plan_for(dry)
        for run in plan.bench_runs + plan.bench_compile_runs:
            cfg = load_config(os.path.join(gpu_check.ROOT, run.config), list(run.sets))
            assert cfg["training"]["batch_size"] >= 2
    paper = gpu_check.plan_for(False)
    v2, v3 = (load_config(os.path.join(gpu_check.ROOT, r.config)) for r in paper.bench_runs[:2])
    assert (v2["version"], v2["training"]["batch_size"], v2["training"]["data"]["input_size"]) == ("2", 5, "512,512")
    assert (v3["version"], v3["training"]["batch_size"]) == ("3", 7)
    assert paper.bench_runs[2].script == "trainSSL_less_memory" and paper.bench_runs[2].config == gpu_check.VOC_REDUCED


# ------------------------------------------------------------------------------------------------ targets
def bench_row(precision, ips, network_ms=90.0, other=10.0, reserved=None, kind="cuda_max_memory_allocated"):
    return {"precision": precision, "iterations_per_second": ips, "ms_per_iteration_median": 1e3 / ips,
            "peak_memory_bytes": 2 ** 30, "peak_memory_kind": kind, "peak_memory_reserved_bytes": reserved,
            "syncs_per_iteration": 3, "network_ms": network_ms, "method_ms": other, "other_ms": 0.0,
            "method_share": other / (network_ms + other)}


def fake_results(bf16_ips, method_ms, reserved_gib, eval_s, eval_complete, miou_diff):
    plan = gpu_check.plan_for(False)
    v2 = plan.bench_runs[0].label
    setup = {"script": "trainSSL", "compile": False}
    return {
        "demo": {"status": "ok", "data": {"evaluate_fp32": {"device": "cuda", "abs_difference": miou_diff}}},
        "bench_step": {"status": "ok", "data": {v2: {"setup": setup, "results": [
            bench_row("fp32", 1.0, other=method_ms, reserved=int(reserved_gib * 2 ** 30)),
            bench_row("bf16", bf16_ips, other=method_ms)]}}},
        "eval_full_size": {"status": "ok", "data": {"evaluation": {
            "images": 500 if eval_complete else 300, "of": 500, "size": [1024, 2048], "seconds": eval_s,
            "complete": eval_complete}}},
        "torchrun_nccl": {"status": "ok", "data": {"backend": "nccl", "device": "cuda", "iterations": 4,
                                                   "rank_identical": True}},
    }, plan


def results_of(figures):
    out = {}
    for f in figures:
        key = f["figure"].split(",")[0].split(":")[0].split(" (")[0]
        out.setdefault(key, []).append((f["value"], f["result"]))
    return out


def test_targets_pass():
    results, plan = fake_results(bf16_ips=1.9, method_ms=9.0, reserved_gib=15.0, eval_s=59.0, eval_complete=True,
                                 miou_diff=0.0005)
    got = results_of(gpu_check.figures(results, plan))
    assert got["bf16 / fp32 iterations/s"] == [(1.9, "PASS")]
    assert got["method parts share of an iteration"] == [(9.1, "PASS"), (9.1, "PASS")]   # 9 / 99 ms
    # 15 GiB reserved + 600 MiB context = 15960 MiB <= 16160 MiB
    assert got["peak memory"][0] == (15960, "PASS")
    assert got["evaluation of 500 images 1024x2048"] == [(59.0, "PASS")]
    assert got["demo fp32 checkpoint"] == [(0.0005, "PASS")]
    assert got["torchrun 2 processes"] == [("yes", "PASS")]


def test_targets_fail():
    results, plan = fake_results(bf16_ips=1.7, method_ms=12.0, reserved_gib=15.3, eval_s=61.0, eval_complete=False,
                                 miou_diff=0.002)
    figures = gpu_check.figures(results, plan)
    got = results_of(figures)
    assert got["bf16 / fp32 iterations/s"] == [(1.7, "FAIL")]
    assert got["method parts share of an iteration"][0] == (11.8, "FAIL")                # 12 / 102 ms
    assert got["peak memory"][0] == (16267, "FAIL")                                        # 15667 + 600
    assert got["demo fp32 checkpoint"] == [(0.002, "FAIL")]
    (ev,) = [f for f in figures if f["step"] == "eval_full_size"]
    assert ev["result"] == "FAIL" and "stopped after 300 of 500 images" in ev["figure"]
    text = gpu_check.markdown({"dry_run": False, "env": {"gpu": "Test GPU", "torch": "x", "cuda": "y"},
                               "started": "now", "wall_s": 1.0, "budget_s": 465.0, "figures": figures,
                               "steps": [], "results": results})
    assert "| bf16 / fp32 iterations/s, v2 COCO B=5 512x512 | 1.7 x | >= 1.8 | FAIL |" in text
    assert_tables_well_formed(text)
    broken = gpu_check.markdown({"dry_run": False, "env": {}, "started": "now", "wall_s": 1.0, "budget_s": None,
                                 "results": {}, "figures": [gpu_check._figure("a | b", "x|y", "", "", None, "s")],
                                 "steps": [{"name": "s", "status": "failed", "seconds": 1, "limit_s": 2,
                                            "error": "Traceback\nValueError: a | b"}]})
    assert "| a \\| b | x\\|y |" in broken and "failed: ValueError: a \\| b |" in broken
    assert_tables_well_formed(broken)
    assert "Test GPU" in text and "DRY RUN" not in text


def test_torchrun_figure_and_unmeasured_targets():
    results, plan = fake_results(bf16_ips=2.0, method_ms=5.0, reserved_gib=8, eval_s=30.0, eval_complete=True,
                                 miou_diff=0.0)
    results["torchrun_nccl"] = {"status": "failed", "data": {"backend": "nccl", "device": "cuda", "iterations": 4,
                                                             "rank_identical": False, "steps_recorded": [0, 0]}}
    results["torchrun_gloo"] = {"status": "ok", "data": {"backend": "gloo", "device": "cuda", "iterations": 4,
                                                         "rank_identical": True, "steps_recorded": [4, 4]}}
    del results["eval_full_size"]
    results["bench_step"]["status"] = "failed"
    results["bench_step"]["data"] = {}
    figures = gpu_check.figures(results, plan)
    torchrun = [f for f in figures if f["figure"].startswith("torchrun")]
    assert [(f["step"], f["value"], f["result"]) for f in torchrun] == [("torchrun_gloo", "yes", "PASS")]
    unmeasured = {f["figure"]: f["value"] for f in figures if str(f["value"]).startswith("not measured")}
    assert unmeasured == {"bf16 / fp32 iterations/s": "not measured (bench_step: failed)",
                          "method parts share of an iteration": "not measured (bench_step: failed)",
                          "peak memory (the target)": "not measured (bench_step: failed)",
                          "evaluation of": "not measured (eval_full_size: not run)",
                          "cuda tests": "not measured (cuda_tests: not run)"}
    assert all(f["result"] == "n/a" for f in figures if f["figure"] in unmeasured)


# ------------------------------------------------------------------------------------ rank-identical check
def step_record(i, memory="m", labeled=(0,), gathered=((1, 2),), counter="c"):
    return {"kind": "step", "i": i, "student": "s", "teacher": "t", "optimizer": "o", "memory": memory,
            "student_buffers": {"bn1.running_mean": "r", "head.1.num_batches_tracked": counter},
            "teacher_buffers": {"bn1.running_mean": "r"}, "student_all_params": "p", "teacher_all_params": "q",
            "balancing": None, "class_weights": "w", "lr": 0.1, "optimizer_lr": [0.1], "labeled": list(labeled),
            "gathered": [list(g) for g in gathered]}


def test_rank_differences():
    rank0 = [step_record(0, labeled=(0, 1)), step_record(1, labeled=(4,))]
    rank1 = [step_record(0, labeled=(2, 3)), step_record(1, labeled=(5,))]
    assert rank_differences([rank0, rank1], 2) == []
    assert rank_differences([rank0, rank1[:1]], 2) == ["rank 1 recorded iterations [0], expected 0..1"]
    diverged = [rank1[0], step_record(1, memory="other", labeled=(5,))]
    assert rank_differences([rank0, diverged], 2) == ["memory differs between the ranks after iteration 1"]
    overlap = [rank1[0], step_record(1, labeled=(4,))]
    assert rank_differences([rank0, overlap], 2) == ["ranks drew the same labeled images in iteration 1"]
    counted = [rank1[0], step_record(1, labeled=(5,), counter="d")]
    assert rank_differences([rank0, counted], 2) == [
        "student_buffers differs between the ranks after iteration 1: head.1.num_batches_tracked"]
    lost = [rank1[0], step_record(1, labeled=(5,), gathered=((1, 1),))]
    problems = rank_differences([rank0, lost], 2)
    assert problems == ["memory update of iteration 1: ranks sent 2 rows in all but received [2, 1]"]


# ------------------------------------------------------------------------- the cuda tests' CPU sync proxy
def test_sync_proxy_catches_value_reads_and_boolean_selection():
    x = torch.arange(6.0)
    mask = x > 2
    for fn in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: float(x[0]), lambda: x[mask],
               lambda: torch.nonzero(mask), lambda: x.unique(), lambda: torch.where(mask),
               lambda: torch.tensor([1.0, 2.0], device=x.device), lambda: x.new_tensor([1.0]),
               lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long)), lambda: x.clone().__setitem__(mask, 0.0)):
        with pytest.raises(HostSyncError, match="synchronises with the host"):
            with no_host_sync(CPU):
                fn()
    with no_host_sync(CPU):          # device-side work, and host data left on the host, pass
        y = torch.where(mask, x, torch.zeros_like(x)).cumsum(0)
        torch.tensor([1.0, 2.0]).tolist()
        x.repeat_interleave(2)
        x[1:3] + x[torch.tensor([0, 2])]
    assert y.shape == (6,)


def test_sync_proxy_lets_the_documented_selections_through():
    x = torch.arange(6.0)
    box, record = [None], []

    def select(t):
        return t[t > 2], t[t > 4]
    allowed = allowing_boolean_selections(select, box, record, "site")
    assert [v.tolist() for v in allowed(x)] == [[3.0, 4.0, 5.0], [5.0]] and record == []    # no guard: plain
    with no_host_sync(CPU) as guard:
        box[0] = guard
        a, b = allowed(x)
        with pytest.raises(HostSyncError):        # still caught outside the allowed function
            select(x)
        with pytest.raises(HostSyncError):        # and other syncs inside it
            allowing_boolean_selections(lambda t: t.sum().item(), box, record, "site")(x)
    assert a.tolist() == [3.0, 4.0, 5.0] and record == ["site", "site"]


def test_random_draws_on_cpu_moves_cpu_draws():
    torch.manual_seed(3)
    expected = torch.rand(2, 3)
    torch.manual_seed(3)
    with random_draws_on_cpu():
        got = torch.rand(2, 3, device="meta")     # another device: drawn on the CPU, then moved
    assert got.device.type == "meta" and got.shape == expected.shape
    torch.manual_seed(3)
    with random_draws_on_cpu():
        again = torch.rand(2, 3, device="cpu")
    assert torch.equal(again, expected)
