#!/usr/bin/env python3
"""One command proves it on a GPU (`make gpu-check`): tests, a short training run, benchmarks and the targets.

    python benchmarks/gpu_check.py             # on a machine with CUDA: about 8 minutes at most
    python benchmarks/gpu_check.py --dry-run   # every step at toy sizes on the CPU (tests/test_gpu_check.py)

Steps, in order, each under its own time limit (a subprocess killed when it runs over), so that one failure or
hang does not hide the others:
  1 cuda_tests          pytest -m cuda: every method part agrees between CUDA and CPU, and one iteration makes
                        no host sync beyond the documented ones (tests/test_cuda_parts.py, tests/test_cuda_sync.py);
                        fp16, channels_last and training.compile in a run (tests/test_switches_cuda.py);
                        training.sync_batchnorm under torchrun (tests/test_distributed.py)
  2 demo                configs/demo.json for 200 iterations in fp32 and in bf16, then evaluateSSL.py of each
                        best_model.pth on CUDA and on the CPU (mIoU equal within 0.001)
  3 bench_step          benchmarks/bench_step.py at paper size: Cityscapes v2 COCO (B=5, 512x512) and v3+ (B=7),
                        fp32 and bf16; trainSSL_less_memory.py with configSSL_pascal_1_50_split2_COCO_reduced.json
  4 bench_components    benchmarks/bench_components.py --device cuda: each part, vectorised vs per-class loop
  5 torchrun_nccl       torchrun, 2 processes on the one GPU, NCCL: a few iterations of tests/dist_worker.py
                        with the rank-identical state checked after every step
  5b torchrun_gloo      the same with gloo on CUDA tensors, when NCCL refused
  6 eval_full_size      evaluation as evaluateSSL.py does it on the Cityscapes val size: 500 image/label pairs
                        1024x2048 read from PNG files by the loader's workers, DeepLabv2 ResNet-101, 19 classes
                        (target: under 60 s)
  7 bench_step_compile  step 3 in bf16 with training.compile (torch.compile of the student, v2 then v3+). Last,
                        with whatever the budget has left: compiling ResNet-101 takes minutes and is the least
                        predictable part.
Each step ends ok, failed (with the tail of its output), timed out or skipped. Outputs: a JSON record of every
step and figure (--json, default benchmarks/gpu_check.json) and a Markdown report whose tables can be pasted
into the README (--markdown, default benchmarks/gpu_check.md); logs, checkpoints and per-step records under
--work (default runs/gpu_check/). Without CUDA and without --dry-run it says so and exits 0.

--dry-run: the same steps at toy sizes on the CPU (ResNet-18 at width 16, 33x33 crops, a few iterations, fp32
only, no time budget), the cuda tests with the CPU standing in for the device (SSL_CUDA_TESTS_ON_CPU=1), NCCL
skipped; its figures are not GPU figures. Output under runs/gpu_check_dry/.

Targets (PASS/FAIL in the report): bf16 >= 1.8x fp32 iterations/s at paper size on v2; method parts (everything
but the network's forward and backward) < 10 % of an iteration; peak memory of the v2 Cityscapes config in fp32
fits a 16 GB V100 (trainSSL_less_memory.py with the reduced VOC config, and bf16, reported against it too);
the full-size evaluation under 60 s; evaluateSSL.py on CUDA equal to the CPU within 0.001 mIoU; rank-identical
state under torchrun; all cuda tests pass.

Internal: `--child STEP --work DIR [--dry-run]` runs one Python step in this process (what the subprocess of a
step runs); its record goes to DIR/steps/STEP.json after every action, so a step killed on its time limit keeps
what it finished.

This file is the runner: the steps, their order and limits, and the driver. Each step is a module of
benchmarks/gpu_steps/ (its __init__ maps them), as are the plan, the process handling and the report.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

T_START = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the repository root importable
    sys.path.insert(0, ROOT)
THIS = os.path.abspath(__file__)

# also used through this module: ROOT, VOC_REDUCED, plan_for, tail, figures, markdown, _figure (tests/test_gpu_check.py)
from benchmarks.gpu_steps import (bench_components, bench_step, cuda_tests, demo, eval_full_size,  # noqa: E402
                                  torchrun)
from benchmarks.gpu_steps.plan import (DEFAULT_BUDGET_S, DRY_RUN_LIMIT_S, PY_STEP_NAMES, PYTHON,  # noqa: E402,F401
                                       VOC_REDUCED, Plan, plan_for)
from benchmarks.gpu_steps.processes import (Completed, Started, StepContext, read_json, start_command,  # noqa: E402
                                            tail, wait_command, write_json)
from benchmarks.gpu_steps.report import _figure, environment, figures, markdown  # noqa: E402,F401


# ------------------------------------------------------------------------------------------------ the steps
@dataclass(frozen=True)
class Step:
    name: str
    title: str
    limit_s: float | None                   # time limit (None: the rest of the budget); none in-process
    kind: str                               # "python" | "command"
    command: Callable | None = None         # (plan, work) -> (cmd, env)
    result: Callable | None = None          # (plan, work, Completed) -> (data, error or None)
    skip: Callable | None = None            # (plan, results so far) -> reason or None


def _skip_nccl(plan: Plan, results: dict) -> str | None:
    return "NCCL needs CUDA; the dry run checks gloo on the CPU" if plan.dry_run else None


def _skip_gloo(plan: Plan, results: dict) -> str | None:
    nccl = results.get("torchrun_nccl", {})
    if not plan.dry_run and nccl.get("status") == "ok":
        return "NCCL ran 2 processes on the one GPU"
    return None


STEPS: tuple[Step, ...] = (
    Step("cuda_tests", "pytest -m cuda (CUDA vs CPU per part; no host sync beyond the documented ones; the CUDA-only "
         "switches)", 90,
         "command", cuda_tests.command, cuda_tests.result),
    Step("demo", "demo config, 200 iterations fp32 and bf16; evaluateSSL.py on CUDA vs CPU", 75, "python"),
    Step("bench_step", "bench_step.py at paper size, fp32 and bf16 (v2, v3+, less-memory)", 90, "python"),
    Step("bench_components", "bench_components.py --device cuda (vectorised vs per-class loop)", 35, "python"),
    Step("torchrun_nccl", "torchrun, 2 processes on the one GPU, NCCL; rank-identical state", 30, "command",
         lambda plan, work: torchrun.command(plan, work, "nccl"),
         lambda plan, work, done: torchrun.result(plan, work, "nccl", done), _skip_nccl),
    Step("torchrun_gloo", "torchrun, 2 processes, gloo on CUDA tensors (when NCCL refused); rank-identical state",
         40, "command", lambda plan, work: torchrun.command(plan, work, "gloo"),
         lambda plan, work, done: torchrun.result(plan, work, "gloo", done), _skip_gloo),
    Step("eval_full_size", "evaluation of 500 image/label pairs 1024x2048 read from PNG files (Cityscapes val size)",
         85, "python"),
    Step("bench_step_compile", "bench_step.py, bf16 + training.compile (v2, v3+)", None, "python"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
PY_STEPS: dict[str, Callable[[StepContext], None]] = {
    "demo": demo.run, "bench_step": bench_step.run, "bench_step_compile": bench_step.run_compile,
    "bench_components": bench_components.run, "eval_full_size": eval_full_size.run,
}
assert set(PY_STEPS) == set(PY_STEP_NAMES)


def command_log(work: str, step: Step) -> str:
    return os.path.join(work, "logs", f"{step.name}.log")


def step_command(step: Step, plan: Plan, work: str) -> tuple[list[str], dict]:
    """The command of a command step, or the child process of a Python step."""
    if step.kind == "command":
        return step.command(plan, work)
    return [PYTHON, THIS, "--child", step.name, "--work", work] + (["--dry-run"] if plan.dry_run else []), {}


def run_step(step: Step, plan: Plan, work: str, timeout: float, in_process: bool, results: dict,
             started: Started | None = None) -> dict:
    """Run one step; returns its record {name, title, status, seconds, limit_s, data, error}. in_process: a Python
    step in this process (no time limit), else in a child process. `started`: the step's process, already started
    (the dry run starts them first, to use both CPU cores)."""
    record = {"name": step.name, "title": step.title, "limit_s": round(timeout, 1), "status": "ok", "seconds": 0.0,
              "data": {}, "error": None}
    reason = step.skip(plan, results) if step.skip else None
    if reason:
        record.update(status="skipped", note=reason)
        return record
    if timeout <= 1:
        record.update(status="skipped", note="no time left in the budget")
        return record
    log = command_log(work, step)
    t0 = started.t0 if started is not None else time.monotonic()
    if started is None and (step.kind == "command" or not in_process):
        cmd, env = step_command(step, plan, work)
        started = start_command(cmd, log, env)
    if step.kind == "command":
        done = wait_command(started, timeout)
        data, error = step.result(plan, work, done)
    elif in_process:
        ctx = StepContext(step.name, plan, work)
        done = Completed(0, "", 0.0)
        try:
            PY_STEPS[step.name](ctx)
            ctx.finish()
        except Exception:
            ctx.error(step.name)
        data, error = ctx.data, "\n\n".join(ctx.errors) or None
    else:
        done = wait_command(started, timeout)
        stored = read_json(os.path.join(work, "steps", f"{step.name}.json")) or {}
        data = stored.get("data", {})
        error = "\n\n".join(stored.get("errors", [])) or None
        if done.returncode not in (0, None) and error is None:
            error = f"exit code {done.returncode}\n{tail(done.output)}"
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["data"] = data
    if done.timed_out:
        record.update(status="timed out", error=f"killed after {timeout:.0f} s\n{tail(done.output)}")
    elif error:
        record.update(status="failed", error=error)
    return record


# --------------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step at toy sizes on the CPU")
    p.add_argument("--json", default=None, help="JSON record (default benchmarks/gpu_check.json; dry run: in --work)")
    p.add_argument("--markdown", default=None,
                   help="Markdown report (default benchmarks/gpu_check.md; dry run: in --work)")
    p.add_argument("--work", default=None, help="logs, checkpoints, step records (default runs/gpu_check[_dry])")
    p.add_argument("--only", default=None,
                   help=f"comma-separated steps to run (others skipped): {','.join(STEP_NAMES)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-clock budget of all steps together (default {DEFAULT_BUDGET_S}; dry run: none)")
    p.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS", help="one step's time limit")
    p.add_argument("--isolation", choices=("subprocess", "inprocess"), default=None,
                   help="every Python step in its own process with a time limit (default on a GPU) or in this one "
                        "(default: the dry run keeps all but eval_full_size in this process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, t_start: float | None = None) -> int:
    """Run the check (or one --child step); 0 unless the command line is wrong. t_start: when the budget began
    (the process start when run as a script)."""
    args = build_parser().parse_args(argv)
    plan = plan_for(args.dry_run)
    work = os.path.abspath(args.work or os.path.join(ROOT, "runs", "gpu_check_dry" if args.dry_run else "gpu_check"))
    if args.child:
        ctx = StepContext(args.child, plan, work)
        try:
            PY_STEPS[args.child](ctx)
        except Exception:
            ctx.error(args.child)
        ctx.finish()
        return 1 if ctx.errors else 0

    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is present on this machine, so there is nothing to measure; nothing was "
              "written. Run it where `torch.cuda.is_available()` is true, or try `python "
              "benchmarks/gpu_check.py --dry-run` (every step at toy sizes on the CPU).")
        return 0
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else DEFAULT_BUDGET_S)
    # the limits are a GPU's; a dry run on a shared CPU only guards against hangs
    limits = {s.name: DRY_RUN_LIMIT_S if args.dry_run else (s.limit_s if s.limit_s is not None else budget)
              for s in STEPS}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in limits:
            raise SystemExit(f"--limit: unknown step {name!r}; steps: {', '.join(STEP_NAMES)}")
        limits[name] = float(seconds)
    only = None if args.only is None else {x.strip() for x in args.only.split(",") if x.strip()}
    if only is not None and only - set(STEP_NAMES):
        raise SystemExit(f"--only: unknown step(s) {sorted(only - set(STEP_NAMES))}; steps: {', '.join(STEP_NAMES)}")
    def in_process(step: Step) -> bool:
        if args.isolation is not None:
            return args.isolation == "inprocess"
        return step.name not in plan.child_steps
    json_path = args.json or (os.path.join(work, "gpu_check.json") if args.dry_run else
                              os.path.join(ROOT, "benchmarks", "gpu_check.json"))
    md_path = args.markdown or (os.path.join(work, "gpu_check.md") if args.dry_run else
                                os.path.join(ROOT, "benchmarks", "gpu_check.md"))
    os.makedirs(work, exist_ok=True)

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = t_start if t_start is not None else time.monotonic()
    deadline = t0 + budget
    results: dict[str, dict] = {}
    report = {"gpu_check": 1, "dry_run": args.dry_run, "started": started,
              "budget_s": budget if budget != float("inf") else None,
              "env": environment(plan), "steps": [], "figures": [], "results": results, "wall_s": 0.0}
    selected = [s for s in STEPS if only is None or s.name in only]
    prestarted: dict[str, Started] = {}
    if args.dry_run:  # processes run beside the in-process steps: the dry run uses both CPU cores
        for step in selected:
            if (step.kind == "command" or not in_process(step)) and not (step.skip and step.skip(plan, results)):
                cmd, env = step_command(step, plan, work)
                prestarted[step.name] = start_command(cmd, command_log(work, step), env)
    for k, step in enumerate(STEPS, 1):
        if step not in selected:
            record = {"name": step.name, "title": step.title, "status": "skipped", "note": "not in --only",
                      "seconds": 0.0, "limit_s": limits[step.name], "data": {}, "error": None}
        else:
            print(f"gpu-check [{k}/{len(STEPS)}] {step.name}: {step.title}", flush=True)
            timeout = min(limits[step.name], deadline - time.monotonic())
            record = run_step(step, plan, work, timeout, in_process(step), results, prestarted.pop(step.name, None))
            print(f"gpu-check [{k}/{len(STEPS)}] {step.name}: {record['status']} ({record['seconds']:.0f} s)"
                  + (f"\n{tail(record['error'], 12)}" if record.get("error") else ""), flush=True)
        results[step.name] = record
        report["steps"] = [{k2: v for k2, v in r.items() if k2 != "data"} for r in results.values()]
        report["figures"] = figures(results, plan)
        report["wall_s"] = time.monotonic() - t0
        write_json(json_path, report)  # after every step: an interrupted check keeps what it measured
    text = markdown(report)
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(t_start=T_START))
