"""Targets, config files and the sizes of every step of `make gpu-check`: the GPU run, or toy sizes for the CPU dry
run."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable

# ------------------------------------------------------------------------------------------------- targets
BF16_SPEEDUP_TARGET = 1.8          # bf16 / fp32 iterations per second, v2 at paper size
METHOD_SHARE_TARGET = 0.10         # method parts / whole iteration
EVAL_SECONDS_TARGET = 60.0         # 500 images 1024x2048 read from PNG files
MIOU_TOLERANCE = 0.001             # evaluateSSL.py on CUDA vs CPU
V100_MIB = 16160                   # a 16 GB V100's memory as nvidia-smi reports it
CONTEXT_MIB = 600                  # CUDA context, cuDNN/cuBLAS workspaces: outside PyTorch's allocator figures
DEFAULT_BUDGET_S = 465             # from this process's start; with the last kill's grace it stays under 8 minutes
DRY_RUN_LIMIT_S = 600             # per step in the dry run (a hang guard; no budget)
KILL_GRACE_S = 5                   # SIGTERM, then SIGKILL this much later (twice at most)

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
    eval_chunk: int                       # images per evaluate() call (the figure is recorded after each)
    eval_files: int                       # distinct PNG pairs written to disk (read again and again)
    eval_workers: int                     # loader processes that read and decode them
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
            eval_images=500, eval_size=(1024, 2048), eval_depth=101, eval_chunk=100, eval_files=20,
            eval_workers=min(8, os.cpu_count() or 1),
            dist_iterations=DIST_ITERATIONS, dist_sets=(), child_steps=tuple(PY_STEP_NAMES))
    # The dry run leaves bf16 out (autocast to bf16 on a CPU without bf16 units is ~20x slower; tests/test_precision.py
    # runs it) and v3+ (batch >= 4): the steps loop over precisions and runs with the same code. Its Python steps run
    # in this process (no interpreter start-up each), except eval_full_size, which takes the GPU run's path (a child
    # process) beside the others.
    return Plan(
        dry_run=True, device="cpu", demo_precisions=("fp32",), demo_iterations=3,
        demo_sets=("version=2", "backbone.depth=18", "backbone.width=16", "backbone.pretrained=none",
                   "training.batch_size=2",
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
        eval_images=3, eval_size=(64, 128), eval_depth=18, eval_chunk=2, eval_files=2, eval_workers=1,
        dist_iterations=2,
        dist_sets=("training.data.input_size=33,49", "backbone.width=16", "backbone.pretrained=none"),
        child_steps=("eval_full_size",))


