#!/usr/bin/env python3
"""Time whole training iterations of trainSSL.py for a config, on synthetic tensors (no dataset needed).

The iteration is trainSSL.train itself, run on a `engine.run.Run` whose networks, optimiser, memory bank
and class balancing are built as Run builds them (random initialisation, no pretrained weights read), whose
batch sources hand out fixed random batches at the config's crop and batch size, and whose loop covers the
chosen iteration indices. Nothing of the method is re-implemented here.

Set-up that makes a benchmark iteration cost what a real one after the ramp-up costs:
- iterations start at i = R + 1 (R = method.ramp_up_iterations): ClassMix on the unlabeled views, both
  contrastive terms, the memory update and the class-balancing weights are all active;
- the memory bank starts FULL (random vectors) and the class-balancing histories start full;
- the labels of the labeled batch are the teacher's own predictions on it, and method.memory_confidence is 0
  unless given with --set: an untrained teacher is never 95 % sure, while a trained one agrees with the labels
  on most pixels; so most labeled pixels enter the memory update (an upper bound of its cost).

Per precision (--precision fp32 bf16 fp16; fp16 only on CUDA): --warmup untimed iterations, then --iterations
timed ones (iterations/second, milliseconds per iteration), then as many instrumented ones that split the time
into parts (device synchronised at every part boundary, so their sum is a little above the plain timing):
network = student forward, teacher forward, backward (the backward also carries the method's own gradients);
method = augmentations, pseudo-labels, losses, memory update, contrastive heads and loss, class balancing, SGD
step, EMA; other = the rest of the loop (batches, loss sum, learning rate). Peak memory: CUDA
max_memory_allocated over warm-up + timed iterations; CPU the process's peak resident set size (lifetime).
On CUDA the host-device synchronisations of one iteration are counted (torch.cuda.set_sync_debug_mode).

    python benchmarks/bench_step.py --config configs/configSSL_city_1_30_split0_COCO.json --device cuda \\
        --precision fp32 bf16 fp16 --json results/step_city_cuda.json
    python benchmarks/bench_step.py --config configs/demo.json --device cpu --iterations 5
    python benchmarks/bench_step.py --script trainSSL_less_memory \
        --config configs/configSSL_pascal_1_50_split2_COCO_reduced.json --device cuda --precision fp32 bf16

--script trainSSL_less_memory times trainSSL_less_memory.train instead (alternating labeled-only and
unlabeled-only iterations: each timed iteration is one of them). --compile torch.compiles the student as
training.compile does (--compile-backend: inductor, or eager to check the tracing only).

JSON (--json PATH): {"benchmark": "step", "config", "overrides", "env", "setup": {...}, "results": [{"precision",
"iterations", "warmup", "ms_per_iteration_median", "ms_per_iteration_mean", "iterations_per_second",
"peak_memory_bytes", "peak_memory_kind", "peak_memory_reserved_bytes" (CUDA max_memory_reserved; null on CPU),
"syncs_per_iteration" (null on CPU), "final_loss", "loss_terms",
"vectors_per_call": {"memory add": mean vectors per MemoryBank.add, "contrastive loss": per loss call},
"split_ms": {part: ms per iteration}, "split_groups": {part: "network"|"method"|"other"}, "network_ms",
"method_ms", "other_ms"}]}.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import trainSSL
import trainSSL_less_memory
import utils.ssl_steps as step
import engine.run as training
from benchmarks.common import (choose_device, count_syncs, cpu_threads, environment, format_table, peak_memory,
                               reset_peak_memory, synchronize, write_json)
from data.common import channel_order_for
from model import build_model
from utils.augmentations import mean_for_dataset
from utils.class_balancing import ClassBalancing
from data.common import parse_size
from engine.batchnorm import BatchNormStatistics
from engine.config import fidelity, load_config
from engine.ddp_step import GradientPass
from utils.ema import create_teacher
from utils.errors import UserError
from engine.entry import main_guard
from utils.memory_bank import MemoryBank, per_class_quota
from engine.rng import seed_everything
from engine.run import Run
from utils.variants import LESS_MEMORY, TRAIN_SSL, Variant, resolve_method

# Training images per dataset (the class-balancing history length); synthetic: the config's num_train; folder:
# unknown without reading the folder, taken as 10 x labeled_samples.
TRAIN_IMAGES = {"cityscapes": 2975, "pascal_voc": 10582}

# Parts of the instrumented iteration: (name, group).
GROUPS = {
    "student forward": "network",
    "teacher forward": "network",
    "backward": "network",
    "pseudo-labels (softmax, max)": "method",
    "class balancing": "method",
    "augment labeled (weak, ClassMix)": "method",
    "augment unlabeled (ClassMix, strong x2)": "method",
    "normalise + upsample logits": "method",
    "supervised CE": "method",
    "pseudo-label CE + entropy": "method",
    "memory update (selection, projection)": "method",
    "memory add": "method",
    "contrastive heads + gather": "method",
    "contrastive loss": "method",
    "SGD step": "method",
    "EMA teacher": "method",
    "other": "other",
}


ROW_PARTS = ("memory add", "contrastive loss")

# --script: the training script's variant and loop
SCRIPTS = {"trainSSL": (TRAIN_SSL, trainSSL.train), "trainSSL_less_memory": (LESS_MEMORY, trainSSL_less_memory.train)}


# ------------------------------------------------------------------------------------------- the stand-in Run
class FixedBatches:
    """Batch source with the interface of data.sampler.InfiniteBatches (`next()`), cycling through fixed
    batches already on the device."""

    def __init__(self, batches: list[tuple]):
        self.batches, self.k = batches, 0

    def next(self) -> tuple:
        batch = self.batches[self.k % len(self.batches)]
        self.k += 1
        return batch


def dataset_info(cfg: dict) -> SimpleNamespace:
    """The dataset constants a Run reads (classes, ignore label, mean, channel order, training-set size),
    without reading any data."""
    name = cfg["dataset"]
    mean = mean_for_dataset(name)
    if name == "cityscapes":
        from data.cityscapes_labels import NUM_CLASSES as classes
    elif name == "pascal_voc":
        from data.voc import NUM_CLASSES as classes
    elif name == "synthetic":
        from data.synthetic import NUM_CLASSES as classes
    elif name == "folder":
        from data.folder import folder_classes
        classes, _, _, mean = folder_classes(cfg["folder"], cfg["ignore_label"])
    else:
        raise UserError(f"bench_step: dataset {name!r} is not supported")
    n_train = TRAIN_IMAGES.get(name) or (cfg["synthetic"]["num_train"] if name == "synthetic" else
                                         10 * cfg["training"]["data"]["labeled_samples"])
    return SimpleNamespace(name=name, num_classes=classes, ignore_label=cfg["ignore_label"], mean_rgb=tuple(mean),
                           channel_order=channel_order_for(cfg["training"]["pretraining"]), num_train=n_train)


def build_run(cfg: dict, device: torch.device, compile_student: bool = False, channels_last: bool = False,
              variant: Variant = TRAIN_SSL, compile_backend: str = "inductor") -> Run:
    """A Run (engine/run.py) with its methods intact, built like Run.__init__ builds its state but with no
    data, loaders, logger or run directory: random-init networks, full memory bank, full class-balancing
    histories, fixed random batches (labels = the teacher's predictions)."""
    run = object.__new__(Run)
    run.t_start = time.time()
    run.variant = variant
    run.args = SimpleNamespace(dry_run=False, resume=None, device=str(device))
    run.device = device
    run.cfg = cfg
    run.cfg_source = "<bench_step>"
    run.fidelity = fidelity(cfg)
    run.method = resolve_method(cfg, variant)
    run.run_dir = None
    run.num_iterations = cfg["training"]["num_iterations"]
    run.crop = parse_size(cfg["training"]["data"]["input_size"], "training.data.input_size")
    run.batch_size = cfg["training"]["batch_size"]
    seed_everything(cfg["seed"])

    info = dataset_info(cfg)
    run.data = info
    run.num_classes, run.ignore_label = info.num_classes, info.ignore_label
    run.drop_background = info.name == "pascal_voc"
    run.gta5 = run.gta5_batches = None

    t = cfg["training"]
    student = build_model(cfg["version"], run.num_classes, t["pretraining"], cfg["backbone"]["depth"], None,
                          v2_branches=run.fidelity.v2_branches, width=cfg["backbone"]["width"],
                          verbose=False).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    student.train()
    run.student_module = student
    run.student = torch.compile(student, backend=compile_backend) if compile_student else student
    run.teacher = create_teacher(student)
    run.labeler = run.teacher if t["use_teacher_train"] else run.student
    run.base_lr = t["learning_rate"]
    run.optimizer = torch.optim.SGD(student.optim_parameters(run.base_lr), lr=run.base_lr, momentum=t["momentum"],
                                    weight_decay=t["weight_decay"])
    run.precision = cfg["precision"]
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")

    m = run.method
    labeled_samples = t["data"]["labeled_samples"]
    g = torch.Generator().manual_seed(cfg["seed"])
    run.memory = MemoryBank(run.num_classes, size=m["memory_size"], dim=256, device=device)
    run.memory.load_state_dict({"memory": torch.randn(run.num_classes, m["memory_size"], 256, generator=g),
                                "counts": torch.full((run.num_classes,), m["memory_size"], dtype=torch.int64)})
    run.memory_quota = per_class_quota(info.name, run.batch_size, labeled_samples, run.num_classes)
    run.balancing = None
    if m["class_balancing"]:
        cb = ClassBalancing(run.num_classes, ClassBalancing.labeled_slots_for(labeled_samples, run.batch_size),
                            ClassBalancing.unlabeled_slots_for(info.num_train, labeled_samples, run.batch_size),
                            device=device)
        cb.load_state_dict({"labeled": torch.randint(0, 10 ** 6, tuple(cb.labeled.shape), generator=g),
                            "unlabeled": torch.randint(0, 10 ** 6, tuple(cb.unlabeled.shape), generator=g),
                            "labeled_count": cb.labeled_slots, "unlabeled_count": cb.unlabeled_slots})
        run.balancing = cb
    run.ones = torch.ones(run.num_classes, device=device)
    run.class_weights = run.ones
    run.gradient_pass = GradientPass(student, device)  # steps 6-10 as one forward (one process: not wrapped)
    run.statistics = BatchNormStatistics(lambda: (run.student_module, run.teacher))

    h, w = run.crop
    labeled_batches, unlabeled_batches = [], []
    for k in range(2):
        images = (torch.rand(run.batch_size, 3, h, w, generator=g) * 255).to(device)
        _, labels = step.pseudo_label(run.step_context(), images)  # the teacher's own prediction: it agrees with the labels
        labeled_batches.append((images, labels, torch.arange(run.batch_size)))
        unlabeled = (torch.rand(run.batch_size // 2, 3, h, w, generator=g) * 255).to(device)
        unlabeled_batches.append((unlabeled, torch.zeros_like(unlabeled[:, 0], dtype=torch.int64),
                                  torch.arange(run.batch_size // 2)))
    run.labeled, run.unlabeled = FixedBatches(labeled_batches), FixedBatches(unlabeled_batches)

    run.start_iteration = 0
    run.best_miou, run.since_best, run.best_result = -1.0, 0, None
    run._sums, run._count = {}, 0
    run.logger = SimpleNamespace(tb=None)
    return run


class LoopClock:
    """Stands in for Run.end_iteration / Run.finish: records the wall time of each iteration (device
    synchronised) and the last loss."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.loss: torch.Tensor | None = None
        self.terms: list[str] = []
        self.last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.last = time.perf_counter()

    def end_iteration(self, i: int, terms: dict[str, torch.Tensor]) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.times.append((now - self.last) * 1e3)
        self.last = now
        self.loss = terms["loss"].detach()
        self.terms = sorted(terms)


def run_iterations(run: Run, first: int, count: int, clock: LoopClock, train: Callable = trainSSL.train) -> None:
    """The training loop `train` (trainSSL.train by default) over iterations first .. first+count-1."""
    run.iterations = lambda: range(first, first + count)
    run.end_iteration = clock.end_iteration
    run.finish = lambda: None
    clock.start()
    train(run)


# ------------------------------------------------------------------------------------------ the split by parts
class PartTimer:
    """Exclusive wall time per part: a part nested in another (the teacher forward inside the memory update)
    is subtracted from the outer one. The device is synchronised at every boundary."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.totals: dict[str, float] = defaultdict(float)
        self.rows: dict[str, list[int]] = defaultdict(list)  # vectors per call of the parts that take [N, D]
        self.stack: list[list] = []  # [name, start of the current exclusive stretch]

    def start(self, name: str) -> None:
        synchronize(self.device)
        now = self.clock()
        if self.stack:
            outer = self.stack[-1]
            self.totals[outer[0]] += now - outer[1]
        self.stack.append([name, now])

    def stop(self) -> None:
        synchronize(self.device)
        now = self.clock()
        name, since = self.stack.pop()
        self.totals[name] += now - since
        if self.stack:
            self.stack[-1][1] = now

    def wrap(self, fn: Callable, name: str, count_rows: bool = False) -> Callable:
        def timed(*args, **kwargs):
            if count_rows:
                self.rows[name].append(int(args[0].shape[0]))
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()
        return timed


@contextmanager
def instrumented(run: Run, timer: PartTimer):
    """Wrap the trainer's step functions, the Run's methods and the networks' forwards with timers, for the
    duration of the block (module attributes and instance attributes restored afterwards)."""
    patches = [  # (owner, attribute, part); memory add and the contrastive loss also record their vector count
        (step, "pseudo_label", "pseudo-labels (softmax, max)"),
        (step, "augment_labeled", "augment labeled (weak, ClassMix)"),
        (step, "augment_unlabeled", "augment unlabeled (ClassMix, strong x2)"),
        (step, "forward_student", "normalise + upsample logits"),
        (step, "supervised_loss", "supervised CE"),
        (step, "unlabeled_losses", "pseudo-label CE + entropy"),
        (step, "update_memory", "memory update (selection, projection)"),
        (step, "contrastive_term", "contrastive heads + gather"),
        (step, "contrastive_loss", "contrastive loss"),
        (training, "update_teacher", "EMA teacher"),
        (run, "update_class_weights", "class balancing"),
        (run, "optimizer_step", "backward"),
        (run.memory, "add", "memory add"),
        (run.optimizer, "step", "SGD step"),
    ]
    saved = []  # (owner, attribute, value to restore or None: delete the instance attribute)
    for owner, attr, part in patches:
        own = isinstance(owner, ModuleType) or attr in vars(owner)
        saved.append((owner, attr, getattr(owner, attr) if own else None))
        setattr(owner, attr, timer.wrap(getattr(owner, attr), part, count_rows=part in ROW_PARTS))
    hooks = []
    nets = [(run.student, "student forward")]
    if run.labeler is not run.student:
        nets.append((run.labeler, "teacher forward"))
    for net, part in nets:
        hooks.append(net.register_forward_pre_hook(lambda *_, p=part: timer.start(p)))
        hooks.append(net.register_forward_hook(lambda *_, p=part: timer.stop()))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for owner, attr, original in reversed(saved):
            if original is None:
                delattr(owner, attr)  # back to the class's method
            else:
                setattr(owner, attr, original)


# ------------------------------------------------------------------------------------------------- benchmark
def bench_precision(cfg: dict, device: torch.device, args: argparse.Namespace) -> dict:
    variant, train = SCRIPTS[args.script]
    run = build_run(cfg, device, compile_student=args.compile, channels_last=args.channels_last, variant=variant,
                    compile_backend=args.compile_backend)
    first = run.method["ramp_up_iterations"] + 1
    total = args.warmup + 2 * args.iterations + 1
    run.num_iterations = max(run.num_iterations, first + total + 1)  # the poly schedule stays defined

    reset_peak_memory(device)
    warm = LoopClock(device)
    run_iterations(run, first, args.warmup, warm, train)
    clock = LoopClock(device)
    run_iterations(run, first + args.warmup, args.iterations, clock, train)
    peak = peak_memory(device)
    reserved = int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None
    loss = float(clock.loss) if clock.loss is not None else math.nan

    timer = PartTimer(device)
    split_clock = LoopClock(device)
    with instrumented(run, timer):
        run_iterations(run, first + args.warmup + args.iterations, args.iterations, split_clock, train)
    n = args.iterations
    split = {part: 1e3 * timer.totals.get(part, 0.0) / n for part in GROUPS if part != "other"}
    split["other"] = max(0.0, statistics.mean(split_clock.times) - sum(split.values()))
    # one more iteration under the sync counter; its clock does not synchronise (that would count as a sync)
    syncs = count_syncs(lambda: run_iterations(run, first + args.warmup + 2 * n, 1, LoopClock(torch.device("cpu")),
                                               train), device)

    ms = clock.times
    result = {
        "precision": cfg["precision"], "iterations": n, "warmup": args.warmup, "first_iteration": first,
        "ms_per_iteration_median": statistics.median(ms), "ms_per_iteration_mean": statistics.mean(ms),
        "ms_per_iteration_all": ms, "iterations_per_second": 1e3 * n / sum(ms),
        "peak_memory_bytes": peak["bytes"], "peak_memory_kind": peak["kind"], "peak_memory_reserved_bytes": reserved,
        "syncs_per_iteration": syncs,
        "final_loss": loss, "loss_terms": clock.terms,
        "vectors_per_call": {part: statistics.mean(timer.rows[part]) if timer.rows[part] else 0 for part in ROW_PARTS},
        "split_ms": split, "split_groups": dict(GROUPS),
        "split_iteration_ms_mean": statistics.mean(split_clock.times),
    }
    for group in ("network", "method", "other"):
        result[f"{group}_ms"] = sum(v for k, v in split.items() if GROUPS[k] == group)
    del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a training config (anything engine.config.load_config accepts)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), as in the training scripts")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--precision", nargs="+", default=None, choices=("fp32", "bf16", "fp16"),
                   help="one or more precisions to time (default: the config's)")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations (and as many instrumented)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--script", choices=tuple(SCRIPTS), default="trainSSL",
                   help="the training loop to time (default trainSSL; trainSSL_less_memory alternates steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (as training.compile)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile (default inductor; eager: tracing only)")
    p.add_argument("--channels-last", action="store_true", help="student and teacher in channels_last layout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cpu_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    if args.iterations < 1 or args.warmup < 0:
        raise UserError(f"--iterations must be >= 1 and --warmup >= 0, got {args.iterations}, {args.warmup}")
    device = choose_device(args.device)
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "method.memory_confidence" for o in overrides):
        overrides.append("method.memory_confidence=0.0")  # see the module docstring
    base = load_config(args.config, overrides)
    base["utils"]["log_images"] = 0  # no TensorBoard pictures (Run.remember_unlabeled keeps nothing)
    precisions = args.precision or [base["precision"]]
    if "fp16" in precisions and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA (float16 autocast with gradient scaling); on CPU use fp32 "
                        "or bf16.")
    results = []
    for precision in precisions:
        cfg = copy.deepcopy(base)
        cfg["precision"] = precision
        print(f"{precision}: building the networks, {args.warmup} warm-up + {args.iterations} timed + "
              f"{args.iterations} instrumented iterations ...", flush=True)
        results.append(bench_precision(cfg, device, args))

    t = base["training"]
    report = {
        "benchmark": "step", "config": args.config, "overrides": overrides, "env": environment(device),
        "setup": {"script": args.script, "dataset": base["dataset"], "version": base["version"],
                  "depth": base["backbone"]["depth"], "width": base["backbone"]["width"],
                  "pretraining": t["pretraining"], "batch_size": t["batch_size"],
                  "unlabeled_batch": t["batch_size"] // 2, "crop": t["data"]["input_size"],
                  "fidelity": base["fidelity"], "memory_size": base["method"]["memory_size"],
                  "memory_confidence": base["method"]["memory_confidence"], "compile": args.compile,
                  "compile_backend": args.compile_backend if args.compile else None,
                  "channels_last": args.channels_last, "memory_prefilled": True, "class_balancing_prefilled": True},
        "results": results,
    }
    print(format_table([(r["precision"], r["iterations_per_second"], r["ms_per_iteration_median"],
                         r["peak_memory_bytes"] / 2 ** 20, r["network_ms"], r["method_ms"], r["other_ms"],
                         r["syncs_per_iteration"]) for r in results],
                       ["precision", "it/s", "ms/it (median)", "peak MiB", "network ms", "method ms", "other ms",
                        "syncs/it"]))
    for r in results:
        total = sum(r["split_ms"].values()) or 1.0
        print(f"\nsplit per iteration ({r['precision']}, instrumented: {r['split_iteration_ms_mean']:.1f} ms/it)")
        print(format_table([(part, GROUPS[part], ms, 100 * ms / total) for part, ms in
                            sorted(r["split_ms"].items(), key=lambda kv: -kv[1])],
                           ["part", "group", "ms", "%"]))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main_guard(main)
