"""Steps 5 and 5b, torchrun_nccl and torchrun_gloo: tests/dist_worker.py under torchrun with 2 processes on the one
GPU (NCCL; gloo on CUDA tensors when NCCL refused two ranks on one GPU), a few iterations with the rank-identical
state checked after every step (tests/dist_worker.py: rank_differences). The dry run: gloo on the CPU."""
from __future__ import annotations

import json
import os
import shutil

from benchmarks.gpu_steps.plan import DEMO, PYTHON, Plan
from benchmarks.gpu_steps.processes import Completed, free_port, tail


def command(plan: Plan, work: str, backend: str) -> tuple[list[str], dict]:
    out = os.path.join(work, f"torchrun_{backend}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    n = plan.dist_iterations
    sets = {"version": "2", "backbone.depth": 18, "training.batch_size": 2, "training.num_workers": 0,
            "training.num_iterations": n, "training.data.labeled_samples": 4, "synthetic.num_train": 12,
            "synthetic.num_val": 4, "synthetic.image_size": "40,60", "method.ramp_up_iterations": 1,
            "method.memory_start_offset": 1, "method.memory_confidence": 0.0, "method.bn_refresh_iterations": 1,
            "utils.val_per_iter": 2, "utils.save_checkpoint_every": 2, "utils.save_latest_every": 2,
            "utils.log_every": 1, "utils.tensorboard": False, "utils.checkpoint_dir": os.path.join(out, "run"),
            "utils.run_name": ""}
    args = ["--config", DEMO, "--device", plan.device]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    for s in plan.dist_sets:
        args += ["--set", s]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--max_restarts", "0", "--monitor_interval", "0.5",
           os.path.join("tests", "dist_worker.py"), *args]
    env = {"DW_OUT": out, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SSL_DIST_TIMEOUT_MIN": "2"}
    if plan.device == "cuda":
        env["DW_SHARE_DEVICE"] = "1"          # both ranks on cuda:0
        if backend == "gloo":
            env["DW_BACKEND"] = "gloo"        # gloo on CUDA tensors
    return cmd, env


def result(plan: Plan, work: str, backend: str, done: Completed) -> tuple[dict, str | None]:
    from tests.dist_worker import rank_differences
    out = os.path.join(work, f"torchrun_{backend}")
    records = []
    for rank in range(2):
        path = os.path.join(out, f"rank{rank}.jsonl")
        records.append([json.loads(line) for line in open(path)] if os.path.isfile(path) else [])
    problems = rank_differences(records, plan.dist_iterations)
    data = {"backend": backend, "device": plan.device, "iterations": plan.dist_iterations,
            "steps_recorded": [sum(r["kind"] == "step" for r in rank) for rank in records],
            "rank_identical": not problems, "problems": problems[:10]}
    if done.returncode != 0:
        return data, f"torchrun exit code {done.returncode}\n{tail(done.output)}"
    if problems:
        return data, "ranks differ:\n" + "\n".join(problems[:10])
    return data, None
