#!/usr/bin/env python3
"""Time each part of the method at the paper's Cityscapes DeepLabv2 sizes, beside the network itself.

Default sizes (one training iteration of configs/configSSL_city_*_COCO.json): 5 labeled crops and 2 unlabeled
images augmented twice (4 views) of 512x512 -> DeepLabv2 (COCO variant) features 65x65, so 9 x 65 x 65 = 38,025
feature vectors; 19 classes; a FULL memory bank of 256 vectors of size 256 per class; class sizes drawn from
approximate Cityscapes pixel frequencies (road, building and vegetation dominate; so does the padding of the
grouped selectors). Rows (milliseconds per call, median and minimum of --repeats calls after --warmup calls):

  contrastive_vectorised_{ones,mean}  utils.contrastive.contrastive_loss forward + backward on 38,025 vectors
                                      (memory weights "ones" = fidelity code, "mean" = fidelity paper)
  contrastive_reference_{ones,mean}   the per-class loop contrastive_loss_reference, same inputs
  heads                               projection + prediction heads forward + backward on the same vectors
                                      (2048 -> 256 -> 256), the step before the loss
  memory_add                          MemoryBank.add of the 5 labeled crops' vectors (5 x 65 x 65, all of them:
                                      an upper bound), quota 15 (1/30 split), keep "lowest"
  class_balancing                     ClassBalancing.update with full histories (5 labels + 2 pseudo-labels)
  augment_unlabeled                   ClassMix masks + mix + strong augmentation, twice, of the 2 unlabeled
                                      images (the 2x2 views), images + pseudo-labels + confidences
  augment_labeled                     weak augmentation of the 5 labeled crops (no ClassMix)
  confusion_matrix                    utils.metrics.confusion_matrix of one 1024x2048 prediction
  network_student_fwd_bwd             DeepLabv2 ResNet-(--depth) student: forward of the 5 labeled crops, forward
                                      of the 4 unlabeled views (features returned), one backward
  network_teacher_fwd                 the teacher's no-grad forwards: 2 unlabeled images (pseudo-labels) and the
                                      5 augmented labeled crops (memory update)

On CUDA every row also counts the host-device synchronisations of one call (torch.cuda.set_sync_debug_mode);
on CPU that column reads n/a. Random decisions (augmentations) are re-seeded per call from a counter, so every
run sees the same sequence of draws.

    python benchmarks/bench_components.py --device cuda --json results/components_cuda.json
    python benchmarks/bench_components.py --device cpu --skip-network
    python benchmarks/bench_components.py --device cpu --only network --depth 101 --net-crops 1 --net-repeats 1
    python benchmarks/bench_components.py --quick        # small sizes, seconds (tests)

JSON (--json PATH): {"benchmark": "components", "mode": "paper"|"quick", "env": {...}, "sizes": {...},
"results": [{"name", "what", "ms_median", "ms_min", "ms_all", "repeats", "syncs_per_call"}]}; syncs_per_call is
null on CPU.

--compare-reference (benchmarks/bench_compare.py) times the parts that have a per-class (or plain) reference next to
it, interleaved in one run (each round calls every variant once, so load on a shared machine falls on all alike):

  memory_update        MemoryBank.add (selector method of the device) | add_reference, the release's per-class
                       loop; 5 x 65 x 65 vectors into a full bank, quota 15, keep "lowest"
  class_balancing      ClassBalancing.update, full histories | the same update counting pixels with the previous
                       per-class compare-and-sum (_class_counts_reference)
  evaluation_argmax    engine.evaluation.predicted_class (max(dim=1).indices) | argmax(dim=1), 19 x 1024 x 2048
  evaluation_argmax_release  the same | the release's evaluateSSL.py path: np.argmax over the class axis of the
                       scores as a NumPy array
  contrastive_{ones,mean}  contrastive_loss forward + backward | contrastive_loss_reference (per-class loop)

Rows marked "(blocks)" / "(segments)" run the selector method that the device does not use by default, against
the same reference. Only these parts run (--only may name a subset: memory, balancing, argmax, contrastive).

    python benchmarks/bench_components.py --compare-reference --threads 1 [--json results/compare_cpu.json]

JSON with --compare-reference: "mode" gets the suffix "+compare"; each result also holds "reference" (the same
timing fields and syncs_per_call), "ratio_median" and "ratio_min" (this part's time / the reference's).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import (choose_device, count_syncs, cpu_threads, environment, format_table, time_call,
                               write_json)
from engine.entry import main_guard
from model.heads import class_selector, prediction_head, projection_head
from utils.augmentations import strong_augment, weak_augment
from utils.class_balancing import ClassBalancing
from utils.classmix import classmix_masks
from utils.contrastive import contrastive_loss, contrastive_loss_reference
from utils.errors import UserError
from utils.memory_bank import MemoryBank, per_class_quota
from utils.metrics import confusion_matrix

# Approximate share of each Cityscapes train id among the labeled pixels of the training set (road, sidewalk,
# building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck,
# bus, train, motorcycle, bicycle); only used to draw realistic class sizes.
CITYSCAPES_FREQUENCIES = (32.6, 5.4, 20.2, 0.58, 0.78, 1.09, 0.18, 0.49, 14.1, 1.03, 3.56, 1.08, 0.12, 6.19, 0.24,
                          0.21, 0.2, 0.09, 0.37)
IGNORE = 250
IGNORE_SHARE = 0.1  # about a tenth of Cityscapes pixels carry the ignore label

PARTS = ("contrastive", "heads", "memory", "balancing", "augment", "confusion", "network")
COMPARE_PARTS = ("memory", "balancing", "argmax", "contrastive")


@dataclass(frozen=True)
class Sizes:
    """The problem sizes of one training iteration."""

    classes: int = 19
    dim: int = 256                    # contrastive feature size (projection head output)
    feature_channels: int = 2048      # backbone features entering the projection head (DeepLabv2: layer4)
    memory_size: int = 256            # vectors per class, all filled
    labeled: int = 5                  # labeled crops B
    unlabeled_images: int = 2         # B // 2, each augmented twice
    crop: tuple[int, int] = (512, 512)
    labeled_samples: int = 100        # L (1/30 split): sets the memory quota and the class-balancing slots
    train_images: int = 2975
    eval_size: tuple[int, int] = (1024, 2048)
    depth: int = 101

    @property
    def feature_size(self) -> tuple[int, int]:
        """DeepLabv2 COCO variant (stride on the 1x1 conv, ceil-mode max-pool): 512 -> 65."""
        def f(n: int) -> int:
            n = (n - 1) // 2 + 1              # conv1, stride 2, padding 3
            n = -(-(n - 1) // 2) + 1          # max-pool 3x3, stride 2, padding 1, ceil_mode
            return (n - 1) // 2 + 1           # layer2, stride 2 (1x1 conv); layer3/4 dilated
        return f(self.crop[0]), f(self.crop[1])

    @property
    def views(self) -> int:
        return 2 * self.unlabeled_images

    @property
    def vectors(self) -> int:
        h, w = self.feature_size
        return (self.labeled + self.views) * h * w

    @property
    def memory_vectors(self) -> int:
        h, w = self.feature_size
        return self.labeled * h * w

    @property
    def quota(self) -> int:
        return per_class_quota("cityscapes", self.labeled, self.labeled_samples, self.classes)


PAPER = Sizes()
QUICK = Sizes(memory_size=32, labeled=2, unlabeled_images=1, crop=(65, 65), labeled_samples=8, train_images=40,
              eval_size=(128, 256), depth=18)


def class_probabilities(classes: int, device: torch.device) -> torch.Tensor:
    freq = torch.tensor(CITYSCAPES_FREQUENCIES, dtype=torch.float64)
    if classes != len(freq):  # another class count: a Zipf-like spread with the same skew
        freq = 1.0 / torch.arange(1, classes + 1, dtype=torch.float64)
    return (freq / freq.sum()).to(device)


def vector_labels(n: int, classes: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n] class ids drawn with the (approximate) Cityscapes frequencies."""
    p = class_probabilities(classes, torch.device("cpu"))
    return torch.multinomial(p.float(), n, replacement=True, generator=generator).to(device)


def label_maps(b: int, size: tuple[int, int], classes: int, generator: torch.Generator, device: torch.device,
               ignore_share: float = IGNORE_SHARE) -> torch.Tensor:
    """[b,H,W] int64 piecewise-constant label maps (32x32-pixel blocks, like segments), with the
    Cityscapes class frequencies and a share of ignore pixels."""
    h, w = size
    cells = (max(1, h // 32), max(1, w // 32))
    coarse = vector_labels(b * cells[0] * cells[1], classes, generator, torch.device("cpu")).view(b, 1, *cells)
    drop = torch.rand(coarse.shape, generator=generator) < ignore_share
    coarse = torch.where(drop, torch.full_like(coarse, IGNORE), coarse)
    maps = torch.nn.functional.interpolate(coarse.float(), size=size, mode="nearest").long()[:, 0]
    return maps.to(device)


def full_memory(s: Sizes, generator: torch.Generator, device: torch.device) -> MemoryBank:
    bank = MemoryBank(s.classes, size=s.memory_size, dim=s.dim, device=device)
    bank.load_state_dict({"memory": torch.randn(s.classes, s.memory_size, s.dim, generator=generator),
                          "counts": torch.full((s.classes,), s.memory_size, dtype=torch.int64)})
    return bank


def selectors(s: Sizes, device: torch.device) -> list[torch.nn.Module]:
    """C per-class selectors as the model builds them (model/heads.py), in train mode."""
    return [class_selector(s.dim).to(device).train() for _ in range(s.classes)]


def reseeding(fn: Callable[[], object], seed: int = 1234) -> Callable[[], object]:
    """fn with Python's and torch's RNG re-seeded from a call counter: the same sequence of random decisions
    (flip, scale, jitter, blur, ClassMix) on every run of the benchmark."""
    calls = [0]

    def wrapped():
        random.seed(seed + calls[0])
        torch.manual_seed(seed + calls[0])
        calls[0] += 1
        return fn()
    return wrapped


# ------------------------------------------------------------------------------------------------ the parts
def contrastive_cases(s: Sizes, device: torch.device, g: torch.Generator) -> dict[str, tuple[str, Callable]]:
    bank = full_memory(s, g, device)
    labels = vector_labels(s.vectors, s.classes, g, device)
    features = torch.randn(s.vectors, s.dim, generator=g).to(device).requires_grad_(True)
    feature_sel, memory_sel = selectors(s, device), selectors(s, device)
    params = [features] + [p for m in feature_sel + memory_sel for p in m.parameters()]

    def case(fn, mode):
        def call():
            for p in params:
                p.grad = None
            fn(features, labels, bank, feature_sel, memory_sel, s.classes, memory_weights=mode).backward()
        return call
    what = f"forward+backward, {s.vectors} vectors, {s.classes} classes x {s.memory_size} memory, D={s.dim}"
    return {f"contrastive_vectorised_{m}": (f"{what}, memory weights '{m}'", case(contrastive_loss, m))
            for m in ("ones", "mean")} | \
           {f"contrastive_reference_{m}": (f"per-class loop, {what}, memory weights '{m}'",
                                           case(contrastive_loss_reference, m)) for m in ("ones", "mean")}


def heads_case(s: Sizes, device: torch.device, g: torch.Generator) -> dict[str, tuple[str, Callable]]:
    proj = projection_head(s.feature_channels, s.dim).to(device).train()
    pred = prediction_head(s.dim).to(device).train()
    x = torch.randn(s.vectors, s.feature_channels, generator=g).to(device).requires_grad_(True)
    params = [x] + list(proj.parameters()) + list(pred.parameters())

    def call():
        for p in params:
            p.grad = None
        pred(proj(x)).sum().backward()
    return {"heads": (f"projection + prediction heads forward+backward, {s.vectors} vectors "
                      f"{s.feature_channels}->{s.dim}->{s.dim}", call)}


def memory_case(s: Sizes, device: torch.device, g: torch.Generator) -> dict[str, tuple[str, Callable]]:
    bank = full_memory(s, g, device)
    x = torch.randn(s.memory_vectors, s.dim, generator=g).to(device)
    labels = vector_labels(s.memory_vectors, s.classes, g, device)
    sel = selectors(s, device)
    quota = s.quota

    def call():
        with torch.no_grad():
            bank.add(x, labels, sel, quota=quota, keep="lowest")
    return {"memory_add": (f"MemoryBank.add of {s.memory_vectors} vectors into a full bank, quota {quota}", call)}


def filled_balancing(s: Sizes, device: torch.device, g: torch.Generator
                     ) -> tuple[ClassBalancing, torch.Tensor, torch.Tensor]:
    """A ClassBalancing with full random histories (every update computes the weights: median, square root, as
    after the first epoch), and one iteration's 5 labels and 2 pseudo-labels."""
    cb = ClassBalancing(s.classes, ClassBalancing.labeled_slots_for(s.labeled_samples, s.labeled),
                        ClassBalancing.unlabeled_slots_for(s.train_images, s.labeled_samples, s.labeled),
                        device=device)
    cb.load_state_dict({"labeled": torch.randint(0, 10 ** 6, tuple(cb.labeled.shape), generator=g),
                        "unlabeled": torch.randint(0, 10 ** 6, tuple(cb.unlabeled.shape), generator=g),
                        "labeled_count": cb.labeled_slots, "unlabeled_count": cb.unlabeled_slots})
    labels = label_maps(s.labeled, s.crop, s.classes, g, device)
    pseudo = vector_labels(s.unlabeled_images * s.crop[0] * s.crop[1], s.classes, g, device).view(
        s.unlabeled_images, *s.crop)
    return cb, labels, pseudo


def balancing_case(s: Sizes, device: torch.device, g: torch.Generator) -> dict[str, tuple[str, Callable]]:
    cb, labels, pseudo = filled_balancing(s, device, g)
    return {"class_balancing": (f"ClassBalancing.update, {s.labeled} labels + {s.unlabeled_images} pseudo-labels "
                                f"{s.crop[0]}x{s.crop[1]}, full histories", lambda: cb.update(labels, pseudo))}


def augment_cases(s: Sizes, device: torch.device, g: torch.Generator) -> dict[str, tuple[str, Callable]]:
    h, w = s.crop
    unlabeled = (torch.rand(s.unlabeled_images, 3, h, w, generator=g) * 255).to(device)
    pseudo = label_maps(s.unlabeled_images, s.crop, s.classes, g, device, ignore_share=0.0)
    confidence = torch.rand(s.unlabeled_images, h, w, generator=g).to(device)
    labeled = (torch.rand(s.labeled, 3, h, w, generator=g) * 255).to(device)
    labels = label_maps(s.labeled, s.crop, s.classes, g, device)

    def strong_views():  # utils/ssl_steps.augment_unlabeled with ClassMix on both views (after the ramp-up)
        views = []
        for _ in range(2):
            masks = classmix_masks(pseudo, IGNORE, drop_background=False)
            views.append(strong_augment(unlabeled, pseudo, confidence, ignore_label=IGNORE, channel_order="BGR",
                                        classmix_masks=masks))
        return [torch.cat(parts) for parts in zip(*views)]

    def weak():
        return weak_augment(labeled, labels, None, ignore_label=IGNORE, channel_order="BGR")
    return {"augment_unlabeled": (f"ClassMix masks + mix + strong augmentation, 2 views of {s.unlabeled_images} "
                                  f"images {h}x{w}", reseeding(strong_views)),
            "augment_labeled": (f"weak augmentation of {s.labeled} crops {h}x{w}", reseeding(weak))}


def confusion_case(s: Sizes, device: torch.device, g: torch.Generator) -> dict[str, tuple[str, Callable]]:
    label = label_maps(1, s.eval_size, s.classes, g, device)[0]
    pred = torch.randint(0, s.classes, s.eval_size, generator=g).to(device)
    return {"confusion_matrix": (f"confusion matrix of one {s.eval_size[0]}x{s.eval_size[1]} prediction, "
                                 f"{s.classes} classes", lambda: confusion_matrix(pred, label, s.classes))}


def network_cases(s: Sizes, device: torch.device, g: torch.Generator, net_crops: int | None
                  ) -> dict[str, tuple[str, Callable]]:
    from model import build_model
    from utils.ema import create_teacher

    student = build_model("2", s.classes, "COCO", depth=s.depth, pretrained=None, verbose=False).to(device).train()
    teacher = create_teacher(student)
    h, w = s.crop

    def images(n):
        return torch.randn(n, 3, h, w, generator=g).to(device) * 0.3

    if net_crops is None:
        student_batches, teacher_batches = [images(s.labeled), images(s.views)], \
            [images(s.unlabeled_images), images(s.labeled)]
        crops = f"{s.labeled} labeled + {s.views} unlabeled views"
        teacher_crops = f"{s.unlabeled_images} unlabeled + {s.labeled} labeled"
    else:
        student_batches = teacher_batches = [images(net_crops)]
        crops = teacher_crops = f"{net_crops} crop{'s' if net_crops > 1 else ''}"
    params = [p for p in student.parameters() if p.requires_grad]

    def student_step():
        for p in params:
            p.grad = None
        loss = 0.0
        for x in student_batches:  # two forwards (each with its own BatchNorm statistics), one backward
            logits, features = student(x, return_features=True)
            loss = loss + logits.float().mean() + features.float().mean()
        loss.backward()

    def teacher_step():
        with torch.no_grad():
            for x in teacher_batches:
                teacher(x, return_features=True)
    name = f"DeepLabv2 ResNet-{s.depth} (COCO variant)"
    return {"network_student_fwd_bwd": (f"{name} student forward+backward, {crops} {h}x{w}", student_step),
            "network_teacher_fwd": (f"{name} teacher forward (no grad), {teacher_crops} {h}x{w}", teacher_step)}


# --------------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per part (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, quick 1)")
    p.add_argument("--net-repeats", type=int, default=None,
                   help="timed calls of the network rows (default: --repeats on CUDA, 1 on CPU)")
    p.add_argument("--net-warmup", type=int, default=None,
                   help="untimed network calls first (default: --warmup on CUDA, 0 on CPU)")
    p.add_argument("--net-crops", type=int, default=None,
                   help="time the network on one batch of this many crops instead of the trainer's batches "
                        "(CPU memory: ResNet-101 at 9 x 512x512 needs tens of GB)")
    p.add_argument("--skip-network", action="store_true", help="leave out the network rows")
    p.add_argument("--only", default=None, help=f"comma-separated parts to run, of: {', '.join(PARTS)}")
    p.add_argument("--depth", type=int, default=None, help="backbone depth of the network rows (default 101)")
    p.add_argument("--crop", default=None, help="'H,W' crop size (default 512,512)")
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds on a CPU), for tests")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 gives steadier figures on a busy machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-reference", action="store_true",
                   help="time the memory update, class balancing, evaluation argmax and contrastive loss next to "
                        "their per-class references, interleaved in one run")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cpu_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    device = choose_device(args.device)
    sizes = QUICK if args.quick else PAPER
    if args.depth is not None:
        sizes = replace(sizes, depth=args.depth)
    if args.crop is not None:
        try:
            h, w = (int(v) for v in args.crop.split(","))
        except ValueError:
            raise UserError(f"--crop must be 'H,W', got {args.crop!r}") from None
        sizes = replace(sizes, crop=(h, w))
    known = COMPARE_PARTS if args.compare_reference else PARTS
    parts = known if args.only is None else tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [x for x in parts if x not in known]
    if unknown:
        mode = " with --compare-reference" if args.compare_reference else ""
        raise UserError(f"--only: unknown part {unknown[0]!r}{mode}; choose from {', '.join(known)}")
    if args.skip_network:
        parts = tuple(x for x in parts if x != "network")
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    on_cuda = device.type == "cuda"
    net_repeats = args.net_repeats or (repeats if on_cuda or args.quick else 1)
    net_warmup = args.net_warmup if args.net_warmup is not None else (warmup if on_cuda or args.quick else 0)

    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.compare_reference:
        return _compare(args, parts, sizes, device, g, repeats, warmup)
    builders = {"contrastive": contrastive_cases, "heads": heads_case, "memory": memory_case,
                "balancing": balancing_case, "augment": augment_cases, "confusion": confusion_case}
    results = []
    for part in parts:
        cases = network_cases(sizes, device, g, args.net_crops) if part == "network" else \
            builders[part](sizes, device, g)
        for name, (what, fn) in cases.items():
            n, w = (net_repeats, net_warmup) if part == "network" else (repeats, warmup)
            timing = time_call(fn, device, repeats=n, warmup=w)
            syncs = count_syncs(fn, device)
            results.append({"name": name, "what": what, **timing, "syncs_per_call": syncs})
            print(f"  {name}: {timing['ms_median']:.2f} ms", flush=True)
        del cases

    report = _report(args, sizes, device, results)
    rows = [(r["name"], r["ms_median"], r["ms_min"], r["repeats"], r["syncs_per_call"]) for r in results]
    print(format_table(rows, ["part", "ms (median)", "ms (min)", "calls", "syncs/call"]))
    return _write(args, report)


def _compare(args: argparse.Namespace, parts: tuple[str, ...], sizes: Sizes, device: torch.device,
             g: torch.Generator, repeats: int, warmup: int) -> dict:
    from benchmarks.bench_compare import run_comparisons  # it builds on this module's sizes and inputs
    results = run_comparisons(parts, sizes, device, g, repeats, warmup)
    report = _report(args, sizes, device, results, suffix="+compare")
    rows = [(r["name"], r["ms_median"], r["reference"]["ms_median"], r["ratio_median"], r["ms_min"],
             r["reference"]["ms_min"], r["repeats"], r["syncs_per_call"], r["reference"]["syncs_per_call"])
            for r in results]
    print(format_table(rows, ["part", "ms (median)", "reference ms (median)", "ratio", "ms (min)",
                              "reference ms (min)", "calls", "syncs/call", "reference syncs/call"]))
    print(f"torch threads {torch.get_num_threads()}; ratio = part / its reference (medians); interleaved rounds")
    return _write(args, report)


def _report(args: argparse.Namespace, sizes: Sizes, device: torch.device, results: list[dict],
            suffix: str = "") -> dict:
    return {"benchmark": "components", "mode": ("quick" if args.quick else "paper") + suffix,
            "env": environment(device),
            "sizes": {**asdict(sizes), "feature_size": list(sizes.feature_size), "vectors": sizes.vectors,
                      "memory_vectors": sizes.memory_vectors, "quota": sizes.quota, "net_crops": args.net_crops},
            "results": results}


def _write(args: argparse.Namespace, report: dict) -> dict:
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main_guard(main)
