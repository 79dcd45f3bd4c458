"""Step 4, bench_components: benchmarks/bench_components.py on the device, each part of the method timed beside its
per-class reference loop."""
from __future__ import annotations

import os

from benchmarks.gpu_steps.processes import StepContext


def run(ctx: StepContext) -> None:
    """bench_components.py on the device: each part, the vectorised form beside the per-class loop."""
    from benchmarks import bench_components
    path = os.path.join(ctx.work, "bench_components.json")
    # --compare-reference: every part that has a per-class reference, timed beside it in interleaved rounds
    args = ["--device", ctx.device, "--json", path, "--compare-reference", *ctx.plan.components_args]
    report = bench_components.main(args)
    keys = ("name", "what", "ms_median", "ms_min", "syncs_per_call", "reference", "ratio_median")
    ctx.record("components", {"mode": report["mode"], "env": report["env"], "json": path,
                              "results": [{k: r.get(k) for k in keys} for r in report["results"]]})
