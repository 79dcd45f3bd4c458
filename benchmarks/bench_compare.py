"""bench_components.py --compare-reference: each part of the method timed next to its reference (the per-class loop
or the form it replaced), interleaved in one run; see bench_components.py's docstring for the rows and the JSON."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch

import utils.class_balancing as class_balancing
from benchmarks.bench_components import Sizes, filled_balancing, full_memory, selectors, vector_labels
from benchmarks.common import count_syncs, time_interleaved
from engine.evaluation import predicted_class
from utils.class_balancing import ClassBalancing
from utils.contrastive import contrastive_loss, contrastive_loss_reference
from utils.selectors import selector_method


@dataclass
class Comparison:
    """One part timed as used (`fn`), as its reference (`reference`), and with the other selector method."""

    name: str
    what: str
    fn: Callable[[], object]
    reference: Callable[[], object]
    other: tuple[str, Callable[[], object]] | None = None   # (method name, call)


def other_method(device: torch.device) -> str:
    return "blocks" if selector_method("auto", device) == "segments" else "segments"


def memory_compare(s: Sizes, device: torch.device, g: torch.Generator) -> list[Comparison]:
    bank = full_memory(s, g, device)
    banks = [copy.deepcopy(bank) for _ in range(3)]     # full banks stay full, so each call does the same work
    x = torch.randn(s.memory_vectors, s.dim, generator=g).to(device)
    labels = vector_labels(s.memory_vectors, s.classes, g, device)
    sel = selectors(s, device)
    quota, other = s.quota, other_method(device)

    def add(b, **kw):
        def call():
            with torch.no_grad():
                b.add(x, labels, sel, quota=quota, keep="lowest", **kw)
        return call

    def reference():
        banks[1].add_reference(x, labels, sel, quota=quota, keep="lowest")
    return [Comparison("memory_update", f"MemoryBank.add of {s.memory_vectors} vectors into a full bank, quota "
                       f"{quota} | add_reference (per-class loop)", add(banks[0]), reference,
                       (other, add(banks[2], selector_method=other)))]


def balancing_compare(s: Sizes, device: torch.device, g: torch.Generator) -> list[Comparison]:
    cb, labels, pseudo = filled_balancing(s, device, g)
    cb_ref = ClassBalancing(s.classes, cb.labeled_slots, cb.unlabeled_slots, device=device)
    cb_ref.load_state_dict(cb.state_dict())

    def reference():  # today's update with the compare-and-sum counting it replaced
        with mock.patch.object(class_balancing, "_class_counts", class_balancing._class_counts_reference):
            cb_ref.update(labels, pseudo)
    return [Comparison("class_balancing", f"ClassBalancing.update, {s.labeled} labels + {s.unlabeled_images} "
                       f"pseudo-labels {s.crop[0]}x{s.crop[1]}, full histories | with the [C,N] compare-and-sum",
                       lambda: cb.update(labels, pseudo), reference)]


def argmax_compare(s: Sizes, device: torch.device, g: torch.Generator) -> list[Comparison]:
    scores = torch.randn(1, s.classes, *s.eval_size, generator=g).to(device)
    def release():  # the release's evaluateSSL.py: the scores to NumPy, np.argmax over the class axis, as int
        return np.asarray(np.argmax(scores[0].cpu().numpy(), axis=0), dtype=np.int64)
    size = f"{s.classes}x{s.eval_size[0]}x{s.eval_size[1]}"
    return [Comparison("evaluation_argmax", f"predicted class of {size} scores: max(dim=1).indices | argmax(dim=1)",
                       lambda: predicted_class(scores), lambda: scores.argmax(dim=1)),
            Comparison("evaluation_argmax_release", f"predicted class of {size} scores: max(dim=1).indices | the "
                       f"release's np.argmax(scores[0].cpu().numpy(), axis=0)", lambda: predicted_class(scores),
                       release)]


def contrastive_compare(s: Sizes, device: torch.device, g: torch.Generator) -> list[Comparison]:
    bank = full_memory(s, g, device)
    labels = vector_labels(s.vectors, s.classes, g, device)
    features = torch.randn(s.vectors, s.dim, generator=g).to(device).requires_grad_(True)
    feature_sel, memory_sel = selectors(s, device), selectors(s, device)
    params = [features] + [p for m in feature_sel + memory_sel for p in m.parameters()]
    other = other_method(device)

    def case(fn, mode, **kw):
        def call():
            for p in params:
                p.grad = None
            fn(features, labels, bank, feature_sel, memory_sel, s.classes, memory_weights=mode, **kw).backward()
        return call
    what = f"forward+backward, {s.vectors} vectors, {s.classes} classes x {s.memory_size} memory, D={s.dim}"
    return [Comparison(f"contrastive_{m}", f"{what}, memory weights '{m}' | per-class loop",
                       case(contrastive_loss, m), case(contrastive_loss_reference, m),
                       (other, case(contrastive_loss, m, selector_method=other))) for m in ("ones", "mean")]


def run_comparisons(parts: tuple[str, ...], sizes: Sizes, device: torch.device, g: torch.Generator, repeats: int,
                    warmup: int) -> list[dict]:
    builders = {"memory": memory_compare, "balancing": balancing_compare, "argmax": argmax_compare,
                "contrastive": contrastive_compare}
    results = []
    for part in parts:
        for cmp in builders[part](sizes, device, g):
            fns = {"fn": cmp.fn, "reference": cmp.reference} | ({"other": cmp.other[1]} if cmp.other else {})
            timing = time_interleaved(fns, device, repeats=repeats, warmup=warmup)
            ref = {**timing["reference"], "syncs_per_call": count_syncs(cmp.reference, device)}
            rows = [(cmp.name, cmp.what, "fn")] + ([(f"{cmp.name} ({cmp.other[0]})",
                                                      f"{cmp.what}; selector method {cmp.other[0]}", "other")]
                                                    if cmp.other else [])
            for name, what, key in rows:
                t = timing[key]
                results.append({"name": name, "what": what, **t, "syncs_per_call": count_syncs(fns[key], device),
                                "reference": ref, "ratio_median": t["ms_median"] / ref["ms_median"],
                                "ratio_min": t["ms_min"] / ref["ms_min"]})
                print(f"  {name}: {t['ms_median']:.2f} ms, reference {ref['ms_median']:.2f} ms", flush=True)
    return results
