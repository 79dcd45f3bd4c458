#!/usr/bin/env python3
"""A training script run with measurements at every evaluation: why an arm does or does not beat its baseline.

    python benchmarks/ssl_diagnostics.py trainSSL.py --config CONFIG [--set KEY=VALUE ...]
    python benchmarks/ssl_diagnostics.py --summary RUN_DIR [RUN_DIR ...]

The first form runs the script (trainSSL.py, trainSSL_less_memory.py or trainSSL_domain_adaptation_targetCity.py)
exactly as its own command line would, with its `Run` replaced by `DiagnosedRun`, which appends one row to
<run dir>/diagnostics.jsonl after each periodic and final evaluation:

- "teacher": the pseudo-labeler as the method uses it (the EMA teacher in train mode, as released, on batches of
  B/2 unlabeled crops) on a fixed probe set of unlabeled training crops, scored against their true labels:
  pixel accuracy, mIoU, mean confidence, the fraction of pixels above `method.memory_confidence` and their
  accuracy, the mean pseudo-label weight confidence^power and the weight-averaged accuracy;
- "student": the same for the student in eval mode (the model that is evaluated);
- "memory_candidates": per class, the fraction of labeled probe pixels the teacher (train mode, batches of B)
  predicts correctly with confidence above `memory_confidence`: the pixels that could enter the memory bank;
- "memory_fill": the memory bank's vectors per class;
- "bn": BatchNorm statistics at evaluation: per layer, how far the running statistics the student uses are from
  the statistics of the validation images reaching that layer (mean over channels of |Δmean|/running std, and of
  |log(var_val / running var)|), summarised over layers; and the validation mIoU after the statistics are
  re-estimated on the probe crops (train-mode passes, cumulative average: what the BatchNorm refresh does);
- "cpu_seconds" (process CPU time) and "wall_seconds" since the run started, and the CPU seconds of this
  evaluation and of these measurements.

Training is unchanged: every measurement works under torch.no_grad; BatchNorm buffers, momenta and train/eval modes it
changes are restored afterwards, and so are the RNG states (tests/test_ssl_benchmark.py compares the
training logs with and without the measurements). The loss scales and memory fill over time are in the run's
train_log.jsonl; `summarize_run` reads both files.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine import distributed as dist  # noqa: E402
from utils.augmentations import normalize  # noqa: E402
from engine.curves import read_log  # noqa: E402
from engine.evaluation import evaluate  # noqa: E402
from utils.metrics import class_iou, confusion_matrix, mean_iou  # noqa: E402
from utils.ssl_steps import upsample  # noqa: E402
from engine.entry import main_guard  # noqa: E402
from engine.run import Run  # noqa: E402

SCRIPTS = ("trainSSL.py", "trainSSL_less_memory.py", "trainSSL_domain_adaptation_targetCity.py")
PROBE_SEED = 424242       # crop seeds of the probe items: (index, PROBE_SEED + index)
PROBE_UNLABELED = 32      # unlabeled probe crops (teacher accuracy, BN re-estimation)
PROBE_LABELED = 16        # labeled probe crops (memory candidates); at most the labeled subset


class DiagnosedRun(Run):
    """`Run` plus measurements after every evaluation of the student on the validation set (diagnostics.jsonl)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.dry_run:
            return
        self.diagnostics_path = os.path.join(self.run_dir, "diagnostics.jsonl")
        self.probe_unlabeled = self._probe_items(self.data.unlabeled_idx[:PROBE_UNLABELED])
        self.probe_labeled = self._probe_items(self.data.labeled_idx[:PROBE_LABELED])

    def _probe_items(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Training crops (the training crop size, fixed crop seeds) and their true labels, on the device."""
        if not indices:
            return None
        items = [self.data.train[(k, PROBE_SEED + k)] for k in indices]
        images = torch.stack([it[0] for it in items]).to(self.device)
        labels = torch.stack([it[1] for it in items]).to(self.device)
        return images, labels

    def evaluate(self, model: torch.nn.Module, i: int, tag: str = "val") -> dict:
        cpu0 = time.process_time()
        result = super().evaluate(model, i, tag)
        if tag == "val":
            cpu1 = time.process_time()
            row = self.measure(i, result)
            row["evaluation_cpu_seconds"] = round(cpu1 - cpu0, 3)
            row["diagnostics_cpu_seconds"] = round(time.process_time() - cpu1, 3)
            if dist.is_main():
                with open(self.diagnostics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        return result

    # ------------------------------------------------------------------------------------------ measurements
    def measure(self, i: int, result: dict) -> dict:
        """Every measurement of one row; RNG states are restored afterwards, networks are left as they were."""
        states = (random.getstate(), np.random.get_state())
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            row = {"iteration": i, "val_miou": result["miou"],
                   "cpu_seconds": round(time.process_time(), 2), "wall_seconds": round(time.time() - self.t_start, 2),
                   "memory_fill": dict(zip(self.data.class_names, self.memory.counts.tolist()))}
            if self.probe_unlabeled is not None:
                row["teacher"] = self._score_labeler(*self.probe_unlabeled)
                row["student"] = self._score_student(*self.probe_unlabeled)
            if self.probe_labeled is not None:
                row["memory_candidates"] = self._memory_candidates(*self.probe_labeled)
            row["bn"] = self._batchnorm_statistics()
        random.setstate(states[0])
        np.random.set_state(states[1])
        return row

    def _logits(self, net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = net(normalize(images, self.data.mean_rgb, self.data.channel_order))
        return upsample(logits, tuple(images.shape[2:]))

    def _labeler_mode(self, net: torch.nn.Module) -> None:
        """The mode the method uses the pseudo-labeler in: the EMA teacher in train mode (as released), the student
        in eval mode."""
        net.train(net is not self.student_module)

    def _score_labeler(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        net = self.labeler
        b = max(2, self.batch_size // 2)  # the unlabeled batch size of training (BatchNorm in train mode)
        with restored(net):
            self._labeler_mode(net)
            probs = [torch.softmax(self._logits(net, images[k:k + b]), dim=1) for k in range(0, len(images), b)
                     if len(images[k:k + b]) >= 2]
        n = sum(p.shape[0] for p in probs)
        return self._score(torch.cat(probs), labels[:n]) if probs else {}

    def _score_student(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        model = self.student_module
        was_training = model.training
        model.eval()
        try:
            probs = torch.softmax(self._logits(model, images), dim=1)
        finally:
            model.train(was_training)
        return self._score(probs, labels)

    def _score(self, probs: torch.Tensor, labels: torch.Tensor) -> dict:
        """Accuracy and confidence of predictions probs [N,C,H,W] against labels [N,H,W]."""
        m = self.method
        confidence, prediction = probs.max(dim=1)
        valid = (labels >= 0) & (labels < self.num_classes)
        n = valid.sum().clamp_min(1)
        correct = (prediction == labels) & valid
        confident = (confidence > m["memory_confidence"]) & valid
        weight = confidence.float() ** m["pseudo_label_power"] * valid
        iou = class_iou(confusion_matrix(prediction, labels, self.num_classes))
        return {"accuracy": float(correct.sum() / n), "miou": mean_iou(iou),
                "mean_confidence": float((confidence * valid).sum() / n),
                "confident_fraction": float(confident.sum() / n),
                "confident_accuracy": float((correct & confident).sum() / confident.sum().clamp_min(1)),
                "mean_weight": float(weight.sum() / n),
                "weighted_accuracy": float((weight * correct).sum() / weight.sum().clamp_min(1e-12))}

    def _memory_candidates(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Per class: fraction of labeled pixels predicted correctly above memory_confidence (teacher, train mode,
        batches of B as in the memory update)."""
        net = self.labeler
        b = self.batch_size
        hits = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
        totals = torch.zeros_like(hits)
        with restored(net):
            self._labeler_mode(net)
            for k in range(0, len(images), b):
                x, y = images[k:k + b], labels[k:k + b]
                if len(x) < 2:
                    continue
                confidence, prediction = torch.softmax(self._logits(net, x), dim=1).max(dim=1)
                valid = (y >= 0) & (y < self.num_classes)
                good = (prediction == y) & (confidence > self.method["memory_confidence"]) & valid
                cls = y.clamp(0, self.num_classes - 1)
                totals += torch.bincount(cls[valid], minlength=self.num_classes).double()
                hits += torch.bincount(cls[good], minlength=self.num_classes).double()
        frac = torch.where(totals > 0, hits / totals.clamp_min(1), torch.full_like(hits, math.nan))
        return {name: (None if math.isnan(v) else round(v, 4)) for name, v in zip(self.data.class_names, frac.tolist())}

    def _batchnorm_statistics(self) -> dict:
        """Running vs validation statistics of every BatchNorm layer of the student (eval mode), and the validation
        mIoU after re-estimating the statistics on the unlabeled probe crops."""
        model = self.student_module
        layers = {name: mod for name, mod in model.named_modules()
                  if isinstance(mod, _BatchNorm) and mod.running_mean is not None}
        sums: dict[str, list] = {}

        def hook(name):
            def fn(module, inputs, output):
                x = inputs[0].detach().double()
                dims = [d for d in range(x.dim()) if d != 1]
                s = sums.setdefault(name, [0.0, 0.0, 0])
                s[0] = s[0] + x.sum(dim=dims)
                s[1] = s[1] + (x * x).sum(dim=dims)
                s[2] += x.numel() // x.shape[1]
            return fn

        handles = [mod.register_forward_hook(hook(name)) for name, mod in layers.items()]
        was_training = model.training
        model.eval()
        try:
            for index in range(len(self.data.val)):
                image = self.data.val[index][0].unsqueeze(0).to(self.device)
                self._logits(model, image)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        per_layer = {}
        for name, (s, ss, n) in sums.items():
            mod = layers[name]
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0)
            rm, rv = mod.running_mean.double(), mod.running_var.double()
            shift = ((mean - rm).abs() / (rv + mod.eps).sqrt()).mean()
            log_ratio = ((var + mod.eps) / (rv + mod.eps)).log().abs().mean()
            per_layer[name] = [round(float(shift), 4), round(float(log_ratio), 4)]
        out = {"layers": per_layer}
        if per_layer:
            shifts = [v[0] for v in per_layer.values()]
            ratios = [v[1] for v in per_layer.values()]
            worst = max(per_layer, key=lambda k: per_layer[k][0])
            out.update(mean_shift=sum(shifts) / len(shifts), mean_log_var_ratio=sum(ratios) / len(ratios),
                       worst_layer=worst, worst_shift=per_layer[worst][0])
        if self.probe_unlabeled is not None:
            out["val_miou_reestimated"] = self._reestimated_miou(self.probe_unlabeled[0])
        return out

    def _reestimated_miou(self, images: torch.Tensor) -> float:
        model = self.student_module
        with restored(model):
            for mod in model.modules():
                if isinstance(mod, _BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None  # cumulative average over the passes
            model.train()
            b = max(2, self.batch_size)
            for k in range(0, len(images), b):
                if len(images[k:k + b]) >= 2:
                    self._logits(model, images[k:k + b])
            d = self.data
            return evaluate(model, d.val, num_classes=self.num_classes, ignore_label=self.ignore_label,
                            mean_rgb=d.mean_rgb, channel_order=d.channel_order, device=self.device,
                            autocast=self.autocast)["miou"]


@contextmanager
def restored(model: torch.nn.Module):
    """Inside: change the model's buffers (BatchNorm statistics), BatchNorm momenta and train/eval modes freely;
    afterwards they are as before (parameters must not be changed inside)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training, getattr(m, "momentum", None)) for m in model.modules()]
    try:
        yield model
    finally:
        for b, saved in buffers:
            b.copy_(saved)
        for m, training, momentum in modes:
            m.training = training
            if isinstance(m, _BatchNorm):
                m.momentum = momentum


# ------------------------------------------------------------------------------------------------- reading
def read_jsonl(path: str) -> list[dict]:
    """Rows of a train_log.jsonl or diagnostics.jsonl (engine.curves.read_log: resume markers applied); [] when the
    file is missing."""
    return read_log(path) if os.path.isfile(path) else []


LOSS_KEYS = ("loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u")


def summarize_run(run_dir: str) -> dict:
    """Time series of one run: validation mIoU (curve), loss scales and memory fill (train_log.jsonl) and the
    measurements of diagnostics.jsonl (when the run was made by this script)."""
    log = read_jsonl(os.path.join(run_dir, "train_log.jsonl"))
    diag = read_jsonl(os.path.join(run_dir, "diagnostics.jsonl"))
    curve = [[r["iteration"], r["miou"]] for r in log if r.get("kind") == "val"]
    refreshed = [r["miou"] for r in log if r.get("kind") == "val_bn_refresh"]
    losses = {k: [[r["iteration"], r[k]] for r in log if r.get("kind") == "train" and k in r] for k in LOSS_KEYS}
    memory = [[r["iteration"], sum(v for v in r["values"].values() if v is not None)]
              for r in log if r.get("kind") == "memory_fill"]
    fills = [r["values"] for r in log if r.get("kind") == "memory_fill"]
    ious = [r["values"] for r in log if r.get("kind") in ("val_iou", "val_bn_refresh_iou")]
    out = {"curve": curve, "bn_refresh_miou": refreshed[-1] if refreshed else None,
           "losses": {k: v for k, v in losses.items() if v}, "memory_total": memory,
           "memory_fill_final": fills[-1] if fills else None,   # vectors per class at the end of the run
           "class_iou_final": ious[-1] if ious else None}       # per-class IoU of the last evaluation
    if diag:
        def series(get):
            return [[r["iteration"], get(r)] for r in diag if get(r) is not None]
        out["diagnostics"] = {
            "teacher_accuracy": series(lambda r: r.get("teacher", {}).get("accuracy")),
            "teacher_confident_fraction": series(lambda r: r.get("teacher", {}).get("confident_fraction")),
            "teacher_confident_accuracy": series(lambda r: r.get("teacher", {}).get("confident_accuracy")),
            "teacher_mean_weight": series(lambda r: r.get("teacher", {}).get("mean_weight")),
            "student_accuracy": series(lambda r: r.get("student", {}).get("accuracy")),
            "bn_mean_shift": series(lambda r: r.get("bn", {}).get("mean_shift")),
            "bn_mean_log_var_ratio": series(lambda r: r.get("bn", {}).get("mean_log_var_ratio")),
            "val_miou_bn_reestimated": series(lambda r: r.get("bn", {}).get("val_miou_reestimated")),
            "memory_fill_per_class": diag[-1].get("memory_fill"),
            "memory_candidates_per_class": diag[-1].get("memory_candidates"),
            "cpu_seconds": diag[-1].get("cpu_seconds"),
        }
    return out


def format_summary(run_dir: str, s: dict) -> str:
    """A few lines a person can read: the curve, the teacher, the memory, the loss scales, BatchNorm."""
    def pts(series, scale=100.0, fmt="{:.1f}"):
        return "  ".join(f"{it}:{fmt.format(scale * v)}" for it, v in series)
    lines = [f"{run_dir}", f"  val mIoU            {pts(s['curve'])}"
             + (f"  (BN refresh {100 * s['bn_refresh_miou']:.1f})" if s.get("bn_refresh_miou") is not None else "")]
    d = s.get("diagnostics")
    if d:
        lines += [f"  teacher accuracy    {pts(d['teacher_accuracy'])}",
                  f"  teacher conf>thr    {pts(d['teacher_confident_fraction'])}",
                  f"  teacher p^6 weight  {pts(d['teacher_mean_weight'], 1.0, '{:.3f}')}",
                  f"  student accuracy    {pts(d['student_accuracy'])}",
                  f"  val mIoU, BN re-est {pts(d['val_miou_bn_reestimated'])}",
                  f"  BN |dmean|/std      {pts(d['bn_mean_shift'], 1.0, '{:.2f}')}",
                  f"  memory fill (last)  {d['memory_fill_per_class']}",
                  f"  memory candidates   {d['memory_candidates_per_class']}"]
    for k, v in s["losses"].items():
        step = max(1, len(v) // 8)
        lines.append(f"  {k:18s}  " + "  ".join(f"{it}:{x:.3g}" for it, x in v[::step]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ commands
def run_script(script: str, argv: list[str]) -> dict | None:
    """Run one training script's main() with DiagnosedRun in place of Run."""
    name = os.path.basename(script)
    if name not in SCRIPTS:
        raise SystemExit(f"unknown training script {script!r}; choose one of {', '.join(SCRIPTS)}")
    module = importlib.import_module(os.path.splitext(name)[0])
    plain = module.Run
    module.Run = DiagnosedRun  # the script builds its Run by this name; restored for later callers in this process
    try:
        return module.main(argv)
    finally:
        module.Run = plain


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--summary":
        p = argparse.ArgumentParser(description="print what runs' logs and diagnostics show")
        p.add_argument("--summary", nargs="+", metavar="RUN_DIR", required=True)
        for run_dir in p.parse_args(argv).summary:
            print(format_summary(run_dir, summarize_run(run_dir)))
        return
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__.split("\n\n")[1])
    main_guard(lambda: run_script(argv[0], argv[1:]))


if __name__ == "__main__":
    main()
