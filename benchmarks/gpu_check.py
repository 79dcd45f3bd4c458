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
  6 eval_full_size      evaluation as evaluateSSL.py does it on the Cityscapes val size: 500 random 1024x2048
                        images, DeepLabv2 ResNet-101, 19 classes (target: under 60 s)
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
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make the repository root importable
    sys.path.insert(0, ROOT)

PYTHON = sys.executable
THIS = os.path.abspath(__file__)

# ------------------------------------------------------------------------------------------------- targets
BF16_SPEEDUP_TARGET = 1.8          # bf16 / fp32 iterations per second, v2 at paper size
METHOD_SHARE_TARGET = 0.10         # method parts / whole iteration
EVAL_SECONDS_TARGET = 60.0         # 500 images 1024x2048
MIOU_TOLERANCE = 0.001             # evaluateSSL.py on CUDA vs CPU
V100_MIB = 16160                   # a 16 GB V100's memory as nvidia-smi reports it
CONTEXT_MIB = 600                  # CUDA context, cuDNN/cuBLAS workspaces: outside PyTorch's allocator figures
DEFAULT_BUDGET_S = 465             # from this process's start; with the last kill's grace it stays under 8 minutes
DRY_RUN_LIMIT_S = 600             # per step in the dry run (a hang guard; no budget)
KILL_GRACE_S = 5                   # SIGTERM, then SIGKILL this much later (twice at most)
T_START = time.monotonic()

# ------------------------------------------------------------------------------------------------- the plan
CITY_V2 = "configs/configSSL_city_1_30_split0_COCO.json"      # DeepLabv2 COCO ResNet-101, B=5, 512x512
CITY_V3 = "configs/configSSL_city_1_30_split0_v3.json"        # DeepLabv3+ ResNet-101, B=7, 512x512
VOC_REDUCED = "configs/configSSL_pascal_1_50_split2_COCO_reduced.json"
DEMO = "configs/demo.json"


@dataclass(frozen=True)
class BenchRun:
    """One bench_step.py invocation."""
    label: str
    config: str
    precisions: tuple[str, ...]
    script: str = "trainSSL"
    compile: bool = False
    sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Sizes of every step: the GPU run, or toy sizes for the CPU dry run."""
    dry_run: bool
    device: str
    demo_precisions: tuple[str, ...]
    demo_iterations: int
    demo_sets: tuple[str, ...]
    bench_runs: tuple[BenchRun, ...]
    bench_compile_runs: tuple[BenchRun, ...]
    bench_args: tuple[str, ...]
    components_args: tuple[str, ...]
    eval_images: int
    eval_size: tuple[int, int]
    eval_depth: int
    eval_chunk: int
    dist_iterations: int
    dist_sets: tuple[str, ...]
    child_steps: tuple[str, ...]          # Python steps run in a process of their own (with a time limit)


# the dry run's networks: ResNet-18 at a quarter of the standard width (random initialisation), 33x33 crops
TOY_NET = ("backbone.depth=18", "backbone.pretrained=none", "backbone.width=16", "training.data.input_size=33,33")
PY_STEP_NAMES = ("demo", "bench_step", "bench_components", "eval_full_size", "bench_step_compile")
DIST_ITERATIONS = 4


def plan_for(dry_run: bool) -> Plan:
    if not dry_run:
        return Plan(
            dry_run=False, device="cuda", demo_precisions=("fp32", "bf16"), demo_iterations=200, demo_sets=(),
            bench_runs=(BenchRun("v2 COCO B=5 512x512", CITY_V2, ("fp32", "bf16")),
                        BenchRun("v3+ B=7 512x512", CITY_V3, ("fp32", "bf16")),
                        BenchRun("less-memory VOC reduced", VOC_REDUCED, ("fp32", "bf16"),
                                 script="trainSSL_less_memory")),
            bench_compile_runs=(BenchRun("v2 COCO B=5 512x512", CITY_V2, ("bf16",), compile=True),
                                BenchRun("v3+ B=7 512x512", CITY_V3, ("bf16",), compile=True)),
            bench_args=("--iterations", "4", "--warmup", "2", "--channels-last"),
            components_args=(),
            eval_images=500, eval_size=(1024, 2048), eval_depth=101, eval_chunk=10,
            dist_iterations=DIST_ITERATIONS, dist_sets=(), child_steps=tuple(PY_STEP_NAMES))
    # The dry run leaves bf16 out (autocast to bf16 on a CPU without bf16 units is ~20x slower; tests/test_precision.py
    # runs it) and v3+ (batch >= 4): the steps loop over precisions and runs with the same code. Its Python steps run
    # in this process (no interpreter start-up each), except eval_full_size, which takes the GPU run's path (a child
    # process) beside the others.
    return Plan(
        dry_run=True, device="cpu", demo_precisions=("fp32",), demo_iterations=3,
        demo_sets=("version=2", "backbone.depth=18", "backbone.width=16", "training.batch_size=2",
                   "training.data.input_size=33,49", "training.data.labeled_samples=4", "synthetic.num_train=12",
                   "synthetic.num_val=3", "synthetic.image_size=40,60", "method.ramp_up_iterations=1",
                   "method.memory_start_offset=1", "method.memory_confidence=0.0", "method.bn_refresh_iterations=1",
                   "utils.val_per_iter=2", "utils.log_every=1"),
        bench_runs=(BenchRun("v2 toy", CITY_V2, ("fp32",), sets=TOY_NET + ("training.batch_size=2",)),
                    BenchRun("less-memory toy", VOC_REDUCED, ("fp32",), script="trainSSL_less_memory",
                             sets=TOY_NET + ("training.batch_size=2",))),
        bench_compile_runs=(BenchRun("v2 toy", CITY_V2, ("fp32",), compile=True,
                                     sets=TOY_NET + ("training.batch_size=2",)),),
        bench_args=("--iterations", "1", "--warmup", "0", "--threads", "1", "--compile-backend", "eager"),
        components_args=("--quick", "--repeats", "1", "--warmup", "0", "--threads", "1"),
        eval_images=3, eval_size=(64, 128), eval_depth=18, eval_chunk=2,
        dist_iterations=2, dist_sets=("training.data.input_size=33,49", "backbone.width=16"),
        child_steps=("eval_full_size",))


# ------------------------------------------------------------------------------------- records and processes
def tail(text: str, lines: int = 30, chars: int = 3000) -> str:
    """The last `lines` lines (at most `chars` characters) of a process's output: its error."""
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


def write_json(path: str, obj) -> None:
    """Atomic write (a step killed mid-write leaves the previous record)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass
class Completed:
    returncode: int | None      # None: killed on its time limit
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


@dataclass
class Started:
    """A command running in its own process group, its output going to a log file."""
    proc: subprocess.Popen
    log_path: str
    t0: float


def start_command(cmd: list[str], log_path: str, env: dict | None = None) -> Started:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Started(proc, log_path, time.monotonic())


def wait_command(started: Started, timeout: float) -> Completed:
    """Wait until `timeout` seconds after the start; then the process group gets SIGTERM (torchrun stops its
    workers on it) and, KILL_GRACE_S later, SIGKILL."""
    p = started.proc
    try:
        code = p.wait(timeout=max(started.t0 + timeout - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        code = None
        terminate(p)
    except BaseException:  # Ctrl-C: the step's group is in its own session, so it would not get the SIGINT
        terminate(p)
        raise
    with open(started.log_path, errors="replace") as f:
        output = f.read()
    return Completed(code, output, time.monotonic() - started.t0)


def terminate(p: subprocess.Popen) -> None:
    """SIGTERM to the process group of p, SIGKILL KILL_GRACE_S later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], timeout: float, log_path: str, env: dict | None = None) -> Completed:
    """Run cmd in its own process group, stdout and stderr to log_path, killed past `timeout` seconds."""
    return wait_command(start_command(cmd, log_path, env), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StepContext:
    """What a Python step sees: the plan, its folder, and `record` to keep results as they come."""

    def __init__(self, name: str, plan: Plan, work: str):
        self.name, self.plan, self.work = name, plan, work
        self.device = plan.device
        self.path = os.path.join(work, "steps", f"{name}.json")
        self.data: dict = {}
        self.errors: list[str] = []
        write_json(self.path, {"data": self.data, "errors": self.errors, "done": False})

    def record(self, key: str, value) -> None:
        self.data[key] = value
        self._save()

    def error(self, what: str) -> None:
        """An action failed (with its traceback); the step goes on with the next action and ends failed."""
        self.errors.append(f"{what}:\n{tail(traceback.format_exc())}")
        print(f"[{self.name}] {what} failed:\n{traceback.format_exc()}", flush=True)
        self._save()
        release_device_memory()

    def finish(self) -> None:
        write_json(self.path, {"data": self.data, "errors": self.errors, "done": True})

    def _save(self) -> None:
        write_json(self.path, {"data": self.data, "errors": self.errors, "done": False})


def release_device_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- Python steps
def step_demo(ctx: StepContext) -> None:
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


def _bench_step_runs(ctx: StepContext, runs: tuple[BenchRun, ...]) -> None:
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
                                   "results": [_step_row(r) for r in report["results"]], "json": path})
        except Exception:
            ctx.error(f"bench_step {run.label} {'+'.join(run.precisions)}{' compile' if run.compile else ''}")


def _step_row(r: dict) -> dict:
    """The figures of one bench_step result (one precision)."""
    total = sum(r["split_ms"].values()) or float("nan")
    keep = ("precision", "iterations", "iterations_per_second", "ms_per_iteration_median", "peak_memory_bytes",
            "peak_memory_kind", "peak_memory_reserved_bytes", "syncs_per_iteration", "network_ms", "method_ms",
            "other_ms", "final_loss", "split_ms")
    row = {k: r.get(k) for k in keep}
    row["method_share"] = 1.0 - r["network_ms"] / total  # everything but the network's forward and backward
    return row


def step_bench_step(ctx: StepContext) -> None:
    """bench_step.py at paper size, fp32 and bf16, and the less-memory script."""
    _bench_step_runs(ctx, ctx.plan.bench_runs)


def step_bench_step_compile(ctx: StepContext) -> None:
    """bench_step.py with the student compiled (training.compile)."""
    _bench_step_runs(ctx, ctx.plan.bench_compile_runs)


def step_bench_components(ctx: StepContext) -> None:
    """bench_components.py on the device: each part, the vectorised form beside the per-class loop."""
    from benchmarks import bench_components
    path = os.path.join(ctx.work, "bench_components.json")
    # --compare-reference: every part that has a per-class reference, timed beside it in interleaved rounds
    args = ["--device", ctx.device, "--json", path, "--compare-reference", *ctx.plan.components_args]
    report = bench_components.main(args)
    keys = ("name", "what", "ms_median", "ms_min", "syncs_per_call", "reference", "ratio_median")
    ctx.record("components", {"mode": report["mode"], "env": report["env"], "json": path,
                              "results": [{k: r.get(k) for k in keys} for r in report["results"]]})


class RandomCityscapesVal:
    """`n` validation items of random tensors at Cityscapes size (image [3,H,W] float 0..255 on the CPU, label
    [H,W] int64 with ignore pixels), as data/cityscapes.py hands them to the evaluation; `distinct` different
    images reused, so that generating them does not dominate."""

    def __init__(self, n: int, size: tuple[int, int], num_classes: int, ignore_label: int, distinct: int = 4):
        import torch
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.items = []
        for k in range(min(distinct, n)):
            image = torch.rand(3, *size, generator=g) * 255
            label = torch.randint(0, num_classes, size, generator=g)
            label[torch.rand(size, generator=g) < 0.1] = ignore_label
            self.items.append((image, label))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        image, label = self.items[index % len(self.items)]
        return image, label, f"random_{index:04d}"


class _Slice:
    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        return self.dataset[self.start + index]


def step_eval_full_size(ctx: StepContext) -> None:
    """engine.evaluation.evaluate as evaluateSSL.py calls it (whole image, fp32), DeepLabv2 COCO, 19 classes, on
    500 random 1024x2048 images, in chunks; stops once past the 60 s target (the figure is then a lower bound)."""
    import torch

    from benchmarks.common import synchronize
    from data.cityscapes_labels import NUM_CLASSES
    from model import build_model
    from utils.augmentations import CITYSCAPES_MEAN_RGB
    from engine.evaluation import evaluate
    from engine.cli import choose_device
    p = ctx.plan
    device = choose_device(ctx.device)
    model = build_model("2", NUM_CLASSES, "COCO", p.eval_depth, None, verbose=False).to(device)
    dataset = RandomCityscapesVal(p.eval_images, p.eval_size, NUM_CLASSES, 250)
    done, seconds, confusion = 0, 0.0, None
    while done < len(dataset) and seconds <= EVAL_SECONDS_TARGET:
        part = _Slice(dataset, done, min(done + p.eval_chunk, len(dataset)))
        synchronize(device)
        t0 = time.perf_counter()
        result = evaluate(model, part, num_classes=NUM_CLASSES, ignore_label=250, mean_rgb=CITYSCAPES_MEAN_RGB,
                          channel_order="BGR", device=device)
        synchronize(device)
        seconds += time.perf_counter() - t0
        done += len(part)
        confusion = result["confusion"] if confusion is None else confusion + result["confusion"]
        ctx.record("evaluation", {"images": done, "of": len(dataset), "size": list(p.eval_size),
                                  "depth": p.eval_depth, "seconds": seconds, "seconds_per_image": seconds / done,
                                  "complete": done == len(dataset), "pixels_counted": int(confusion.sum())})


PY_STEPS: dict[str, Callable[[StepContext], None]] = {
    "demo": step_demo, "bench_step": step_bench_step, "bench_step_compile": step_bench_step_compile,
    "bench_components": step_bench_components, "eval_full_size": step_eval_full_size,
}
assert set(PY_STEPS) == set(PY_STEP_NAMES)


# ------------------------------------------------------------------------------------------ command steps
def cuda_tests_command(plan: Plan, work: str) -> tuple[list[str], dict]:
    xml = os.path.join(work, "cuda_tests.xml")
    paths = sorted(glob.glob(os.path.join("tests", "test_cuda_*.py"))) if plan.dry_run else ["tests"]
    cmd = [PYTHON, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths]
    env = {"SSL_CUDA_TESTS_ON_CPU": "1", "OMP_NUM_THREADS": "1"} if plan.dry_run else {}
    return cmd, env


def cuda_tests_result(plan: Plan, work: str, done: Completed) -> tuple[dict, str | None]:
    """Counts from pytest's JUnit XML; the failure (None when all ran and passed)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    try:
        root = ET.parse(os.path.join(work, "cuda_tests.xml")).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                failing.append(f"{case.get('classname')}::{case.get('name')}: "
                               f"{(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else ''}")
    except (OSError, ET.ParseError):
        pass
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    data = {**counts, "failing": failing}
    if done.returncode != 0 or counts["passed"] == 0:
        why = "no cuda test ran" if counts["passed"] == 0 and done.returncode in (0, 5) else \
            f"pytest exit code {done.returncode}"
        return data, f"{why}\n{tail(done.output)}"
    return data, None


def torchrun_command(plan: Plan, work: str, backend: str) -> tuple[list[str], dict]:
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


def torchrun_result(plan: Plan, work: str, backend: str, done: Completed) -> tuple[dict, str | None]:
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
         "command", cuda_tests_command, cuda_tests_result),
    Step("demo", "demo config, 200 iterations fp32 and bf16; evaluateSSL.py on CUDA vs CPU", 75, "python"),
    Step("bench_step", "bench_step.py at paper size, fp32 and bf16 (v2, v3+, less-memory)", 90, "python"),
    Step("bench_components", "bench_components.py --device cuda (vectorised vs per-class loop)", 35, "python"),
    Step("torchrun_nccl", "torchrun, 2 processes on the one GPU, NCCL; rank-identical state", 30, "command",
         lambda plan, work: torchrun_command(plan, work, "nccl"),
         lambda plan, work, done: torchrun_result(plan, work, "nccl", done), _skip_nccl),
    Step("torchrun_gloo", "torchrun, 2 processes, gloo on CUDA tensors (when NCCL refused); rank-identical state",
         40, "command", lambda plan, work: torchrun_command(plan, work, "gloo"),
         lambda plan, work, done: torchrun_result(plan, work, "gloo", done), _skip_gloo),
    Step("eval_full_size", "evaluation of 500 images 1024x2048 (Cityscapes val size, random tensors)", 85, "python"),
    Step("bench_step_compile", "bench_step.py, bf16 + training.compile (v2, v3+)", None, "python"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


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


# ------------------------------------------------------------------------------------------------ the figures
def _figure(figure: str, value, unit: str, target: str, passed: bool | None, step: str) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "target": target,
            "result": "n/a" if passed is None or value is None else ("PASS" if passed else "FAIL"), "step": step}


def _rows(results: dict, step: str) -> list[tuple[str, dict, dict]]:
    """(run label, run info, result row) of every bench_step result of a step."""
    out = []
    for label, run in results.get(step, {}).get("data", {}).items():
        for row in run.get("results", []):
            out.append((label, run, row))
    return out


def _fits_v100(row: dict) -> tuple[float | None, bool | None]:
    """Peak memory in MiB as a V100 would need it: allocator's reserved peak (else allocated) + CUDA context."""
    if row.get("peak_memory_kind") != "cuda_max_memory_allocated":
        return None, None  # CPU figures say nothing about a GPU
    peak = row.get("peak_memory_reserved_bytes") or row["peak_memory_bytes"]
    mib = peak / 2 ** 20 + CONTEXT_MIB
    return round(mib), mib <= V100_MIB


# Every target's figure (name prefix), its target, and the step that measures it.
EXPECTED_FIGURES = (
    ("cuda tests", "all pass", "cuda_tests"),
    ("demo fp32 checkpoint: evaluateSSL.py", f"<= {MIOU_TOLERANCE}", "demo"),
    ("bf16 / fp32 iterations/s", f">= {BF16_SPEEDUP_TARGET}", "bench_step"),
    ("method parts share of an iteration", f"< {100 * METHOD_SHARE_TARGET:.0f} %", "bench_step"),
    ("peak memory (the target)", f"fits a V100 16 GB ({V100_MIB} MiB, {CONTEXT_MIB} MiB context included)",
     "bench_step"),
    ("evaluation of", f"< {EVAL_SECONDS_TARGET:.0f} s", "eval_full_size"),
    ("torchrun 2 processes", "identical", "torchrun_gloo"),
)


def figures(results: dict, plan: Plan) -> list[dict]:
    """Every measured figure with its target (PASS/FAIL), from the step records."""
    figs = []
    tests = results.get("cuda_tests", {})
    d = tests.get("data") or {}
    if d:
        figs.append(_figure("cuda tests passed / failed+errors / skipped",
                            f"{d.get('passed', 0)} / {d.get('failures', 0) + d.get('errors', 0)} / "
                            f"{d.get('skipped', 0)}", "", "all pass",
                            tests.get("status") == "ok", "cuda_tests"))
    demo = results.get("demo", {}).get("data", {})
    for precision in ("fp32", "bf16"):
        train = demo.get(f"train_{precision}")
        if train:
            figs.append(_figure(f"demo {precision}: best mIoU after {train['iterations']} iterations",
                                round(train["best_miou"], 4), "", "", None, "demo"))
        ev = demo.get(f"evaluate_{precision}")
        if ev:
            figs.append(_figure(f"demo {precision} checkpoint: evaluateSSL.py mIoU difference, {ev['device']} vs cpu",
                                round(ev["abs_difference"], 6), "", f"<= {MIOU_TOLERANCE}",
                                ev["abs_difference"] <= MIOU_TOLERANCE, "demo"))
    rows = _rows(results, "bench_step") + _rows(results, "bench_step_compile")
    v2 = plan.bench_runs[0].label
    by_precision = {row["precision"]: row for label, _, row in _rows(results, "bench_step") if label == v2}
    if "fp32" in by_precision and "bf16" in by_precision:
        ratio = by_precision["bf16"]["iterations_per_second"] / by_precision["fp32"]["iterations_per_second"]
        figs.append(_figure(f"bf16 / fp32 iterations/s, {v2}", round(ratio, 2), "x", f">= {BF16_SPEEDUP_TARGET}",
                            ratio >= BF16_SPEEDUP_TARGET, "bench_step"))
    for label, run, row in rows:
        tag = f"{label} {row['precision']}{' compile' if run['setup'].get('compile') else ''}"
        if run["setup"].get("script") == "trainSSL":
            share = row["method_share"]
            figs.append(_figure(f"method parts share of an iteration, {tag}", round(100 * share, 1), "%",
                                f"< {100 * METHOD_SHARE_TARGET:.0f} %", share < METHOD_SHARE_TARGET,
                                "bench_step"))
        if not run["setup"].get("compile"):
            mib, fits = _fits_v100(row)
            is_target = label == v2 and row["precision"] == "fp32"
            figs.append(_figure(f"peak memory{' (the target)' if is_target else ''}, {tag}"
                                f"{' (trainSSL_less_memory.py)' if run['setup'].get('script') != 'trainSSL' else ''}",
                                mib if mib is not None else round(row["peak_memory_bytes"] / 2 ** 20),
                                "MiB" if mib is not None else "MiB (CPU process RSS)",
                                f"fits a V100 16 GB ({V100_MIB} MiB, {CONTEXT_MIB} MiB context included)",
                                fits, "bench_step"))
    ev = results.get("eval_full_size", {}).get("data", {}).get("evaluation")
    if ev:
        done = "" if ev["complete"] else f" (stopped after {ev['images']} of {ev['of']} images)"
        figs.append(_figure(f"evaluation of {ev['of']} images {ev['size'][0]}x{ev['size'][1]}{done}",
                            round(ev["seconds"], 1), "s", f"< {EVAL_SECONDS_TARGET:.0f} s",
                            ev["complete"] and ev["seconds"] < EVAL_SECONDS_TARGET, "eval_full_size"))
    for name in ("torchrun_nccl", "torchrun_gloo"):
        r = results.get(name, {})
        if name == "torchrun_nccl" and r.get("status") != "ok" and \
                results.get("torchrun_gloo", {}).get("status") not in (None, "skipped"):
            continue  # NCCL refused two ranks on one GPU: gloo stands in (the NCCL step keeps NCCL's error)
        if r.get("status") in ("ok", "failed", "timed out") and r.get("data"):
            d = r["data"]
            value = "timed out" if r["status"] == "timed out" else \
                ("yes" if d["rank_identical"] else f"no ({r['status']})" if any(d["steps_recorded"]) else "did not run")
            figs.append(_figure(f"torchrun 2 processes ({d['backend']} on {d['device']}): rank-identical state "
                                f"after {d['iterations']} iterations", value, "", "identical", r["status"] == "ok",
                                name))
    for prefix, target, step in EXPECTED_FIGURES:  # a target that a failed or skipped step left unmeasured
        if not any(f["figure"].startswith(prefix) for f in figs):
            status = results.get(step, {}).get("status", "not run")
            why = f"{step}: {status}" if status != "ok" else f"not in this run's plan of {step}"
            figs.append(_figure(prefix, f"not measured ({why})", "", target, None, step))
    return figs


# ------------------------------------------------------------------------------------------------ the report
def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _md(text) -> str:
    """A table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """The Markdown report: targets, steps, bench_step and bench_components tables."""
    env = report["env"]
    lines = []
    if report["dry_run"]:
        lines += ["**DRY RUN on the CPU at toy sizes: these are not GPU figures.**", ""]
    lines += [f"GPU check of {report['started']}: {env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, "
              f"CUDA {env.get('cuda')}; {report['wall_s']:.0f} s in all"
              + (f" (limit {report['budget_s']:.0f} s)." if report["budget_s"] else "."), "",
              "| figure | measured | target | result |", "|---|---:|---|:---:|"]
    for f in report["figures"]:
        value = f"{_cell(f['value'])} {f['unit']}".strip()
        lines.append(f"| {_md(f['figure'])} | {_md(value)} | {_md(f['target'] or '—')} | {f['result']} |")
    lines += ["", "| step | status | seconds | limit |", "|---|---|---:|---:|"]
    for s in report["steps"]:
        status = s["status"] + (f" ({s['note']})" if s.get("note") else "")
        if s.get("error"):
            first = next((line for line in reversed(s["error"].splitlines()) if line.strip()), "")
            status += f": {first.strip()[:160]}"
        lines.append(f"| {s['name']} | {_md(status)} | {s['seconds']:.0f} | {s['limit_s']:.0f} |")
    rows = _rows(report["results"], "bench_step") + _rows(report["results"], "bench_step_compile")
    if rows:
        lines += ["", "bench_step.py (peak: PyTorch allocator, allocated / reserved; method: everything but the "
                  "network's forward and backward):", "",
                  "| run | precision | it/s | ms/it | peak MiB | network ms | method ms | method % | syncs/it |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, run, row in rows:
            reserved = row.get("peak_memory_reserved_bytes")
            peak = f"{row['peak_memory_bytes'] / 2 ** 20:.0f}" + \
                (f" / {reserved / 2 ** 20:.0f}" if reserved is not None else "")
            tag = f"{row['precision']}{' + compile' if run['setup'].get('compile') else ''}"
            lines.append(f"| {label} | {tag} | {_cell(row['iterations_per_second'])} | "
                         f"{_cell(row['ms_per_iteration_median'])} | {peak} | {_cell(row['network_ms'])} | "
                         f"{_cell(row['method_ms'])} | {100 * row['method_share']:.1f} | "
                         f"{_cell(row['syncs_per_iteration'])} |")
    comp = report["results"].get("bench_components", {}).get("data", {}).get("components")
    if comp:
        by_name = {r["name"]: r for r in comp["results"]}
        lines += ["", f"bench_components.py ({comp['mode']} sizes; loop = the per-class reference):", "",
                  "| part | ms | syncs/call | per-class loop ms | loop / vectorised |", "|---|---:|---:|---:|---:|"]
        for r in comp["results"]:
            if "reference" in r["name"]:
                continue
            ref = r.get("reference")                  # --compare-reference rows carry their reference's timing
            if ref is None and "vectorised" in r["name"]:
                ref = by_name.get(r["name"].replace("vectorised", "reference"))
            ref = ref or by_name.get(f"{r['name']}_reference")
            speedup = ref["ms_median"] / r["ms_median"] if ref and r["ms_median"] else None
            lines.append(f"| {r['name']} | {_cell(r['ms_median'])} | {_cell(r['syncs_per_call'])} | "
                         f"{_cell(ref['ms_median']) if ref else '—'} | {_cell(speedup) if speedup else '—'} |")
    return "\n".join(lines) + "\n"


def environment(plan: Plan) -> dict:
    """torch, CUDA, and the GPU as nvidia-smi names it (the parent does not start a CUDA context)."""
    import platform

    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": plan.device, "gpu": None}
    if plan.device == "cuda" and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            env["gpu"] = out.strip().splitlines()[0] if out.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


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
