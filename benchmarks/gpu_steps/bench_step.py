"""Steps 3 and 7, bench_step and bench_step_compile: benchmarks/bench_step.py at paper size — Cityscapes v2 COCO
(B=5, 512x512) and v3+ (B=7), fp32 and bf16, and trainSSL_less_memory.py with the reduced VOC config; then bf16
with training.compile (last: compiling ResNet-101 takes minutes)."""
from __future__ import annotations

import os

from benchmarks.gpu_steps.plan import BenchRun
from benchmarks.gpu_steps.processes import StepContext


def _runs(ctx: StepContext, runs: tuple[BenchRun, ...]) -> None:
    from benchmarks import bench_step
    p = ctx.plan
    for k, run in enumerate(runs):
        path = os.path.join(ctx.work, "bench_step", f"{ctx.name}_{k}.json")
        args = ["--config", run.config, "--device", ctx.device, "--script", run.script, "--precision",
                *run.precisions, *p.bench_args, "--json", path, *[a for s in run.sets for a in ("--set", s)]]
        if run.compile:
            args.append("--compile")
        if p.dry_run:
            args = [a for a in args if a != "--channels-last"]
        try:
            report = bench_step.main(args)
            ctx.record(run.label, {"run": run.__dict__, "setup": report["setup"], "env": report["env"],
                                   "results": [step_row(r) for r in report["results"]], "json": path})
        except Exception:
            ctx.error(f"bench_step {run.label} {'+'.join(run.precisions)}{' compile' if run.compile else ''}")


def step_row(r: dict) -> dict:
    """The figures of one bench_step result (one precision)."""
    total = sum(r["split_ms"].values()) or float("nan")
    keep = ("precision", "iterations", "iterations_per_second", "ms_per_iteration_median", "peak_memory_bytes",
            "peak_memory_kind", "peak_memory_reserved_bytes", "syncs_per_iteration", "network_ms", "method_ms",
            "other_ms", "final_loss", "split_ms")
    row = {k: r.get(k) for k in keep}
    row["method_share"] = 1.0 - r["network_ms"] / total  # everything but the network's forward and backward
    return row


def run(ctx: StepContext) -> None:
    """bench_step.py at paper size, fp32 and bf16, and the less-memory script."""
    _runs(ctx, ctx.plan.bench_runs)


def run_compile(ctx: StepContext) -> None:
    """bench_step.py with the student compiled (training.compile)."""
    _runs(ctx, ctx.plan.bench_compile_runs)
