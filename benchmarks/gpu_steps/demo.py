"""Step 2, demo: configs/demo.json on the device in fp32 and bf16 (200 iterations; the dry run: 3 in fp32), then
evaluateSSL.py of each best_model.pth on the device and on the CPU (mIoU equal within 0.001)."""
from __future__ import annotations

import os
import shutil
import time

from benchmarks.gpu_steps.plan import DEMO
from benchmarks.gpu_steps.processes import StepContext


def run(ctx: StepContext) -> None:
    """configs/demo.json on the device in fp32 and bf16; evaluateSSL.py of each best model on device and CPU."""
    import evaluateSSL
    import trainSSL
    p = ctx.plan
    for precision in p.demo_precisions:
        run_dir = os.path.join(ctx.work, f"demo_{precision}")
        shutil.rmtree(run_dir, ignore_errors=True)
        sets = [f"training.num_iterations={p.demo_iterations}", f"precision={precision}",
                f"utils.checkpoint_dir={run_dir}", "utils.run_name=", "utils.tensorboard=false", *p.demo_sets]
        try:
            t0 = time.monotonic()
            best = trainSSL.main(["--config", DEMO, "--device", ctx.device, *[a for s in sets for a in ("--set", s)]])
            seconds = time.monotonic() - t0
            ctx.record(f"train_{precision}", {"iterations": p.demo_iterations, "seconds": seconds,
                                              "iterations_per_second_with_evaluations": p.demo_iterations / seconds,
                                              "best_miou": best["miou"]})
        except Exception:
            ctx.error(f"training {precision}")
            continue
        checkpoint = os.path.join(run_dir, "best_model.pth")
        try:
            reports = {}
            for device in (ctx.device, "cpu"):
                t0 = time.monotonic()
                report = evaluateSSL.main(["--model-path", checkpoint, "--device", device])
                reports[device] = (report["miou"], time.monotonic() - t0)
            (dev_miou, dev_s), (cpu_miou, cpu_s) = reports[ctx.device], reports["cpu"]
            ctx.record(f"evaluate_{precision}", {"checkpoint": checkpoint, "device": ctx.device,
                                                 "miou_device": dev_miou, "miou_cpu": cpu_miou,
                                                 "abs_difference": abs(dev_miou - cpu_miou),
                                                 "seconds_device": dev_s, "seconds_cpu": cpu_s})
        except Exception:
            ctx.error(f"evaluating the {precision} checkpoint")
