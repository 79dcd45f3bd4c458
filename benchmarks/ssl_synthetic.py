#!/usr/bin/env python3
"""Does the method beat its baselines? Semi-supervised and domain-adaptation arms on the synthetic street scenes.

Five arms, each run at several seeds (the seed also draws the labeled subset) as a subprocess of a training script
in its own run directory under --out; arms of one comparison differ only in config keys:

  semi-supervised, trainSSL.py on style "a" scenes, ~1/10 of the training images labeled:
    supervised         --set method.use_unlabeled=false --set method.use_contrastive=false
    pseudo_classmix    --set method.use_unlabeled=true  --set method.use_contrastive=false
    full               --set method.use_unlabeled=true  --set method.use_contrastive=true
  domain adaptation, trainSSL_domain_adaptation_targetCity.py on style "b" scenes (the target, as Cityscapes) with
  the fully labeled style "a" scenes as source (as GTA5), source and target labeled batches alternating:
    source_only        --set method.use_unlabeled=false --set method.use_contrastive=false
    domain_adaptation  --set method.use_unlabeled=true  --set method.use_contrastive=true

With --diagnose every run goes through benchmarks/ssl_diagnostics.py, which adds measurements at each evaluation
(teacher accuracy on unlabeled crops, memory candidates, BatchNorm statistics) without changing training; they cost
~4.5 CPU-seconds per evaluation, so they are off by default. Output in --out: ssl_synthetic.json (per-run learning
curves, loss scales, memory fill, CPU and wall time, diagnostics, the table), ssl_synthetic.png (validation mIoU
against iteration, mean and min-max band over seeds, per arm) and ssl_synthetic_diagnostics.png.

The method's constants are the released ones. Run-length constants are scaled from the release's N = 150000:
ramp-up R and memory start offset by N/150000 (R/N = 2000/150000), BatchNorm refresh passes likewise. Runs are
2000 iterations, 10x the EMA teacher's averaging window at the released momentum 0.995 (~200 iterations).

    python benchmarks/ssl_synthetic.py            # everything: 3 arms x 3 seeds + the DA pair at seed 1, 2000 iterations
    python benchmarks/ssl_synthetic.py --quick    # one seed, 400 iterations per arm
    python benchmarks/ssl_synthetic.py --smoke    # 3 iterations per arm, tiny sizes (tests)
    python benchmarks/ssl_synthetic.py --report   # tables and plots from the runs already in --out
    python benchmarks/ssl_synthetic.py --diagnose # any mode, with the measurements of ssl_diagnostics.py
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.ssl_diagnostics import summarize_run  # noqa: E402
from engine.run_dir import run_files  # noqa: E402

BASE_CONFIG = os.path.join(ROOT, "benchmarks", "configs", "ssl_synthetic.json")
DEFAULT_OUT = os.path.join("benchmarks", "results", "ssl_synthetic")
RUNNER = os.path.join(ROOT, "benchmarks", "ssl_diagnostics.py")
DA_SCRIPT = "trainSSL_domain_adaptation_targetCity.py"

# The comparisons: a training script and the keys every arm of the comparison shares.
COMPARISONS: dict[str, dict] = {
    "semi_supervised": {"script": "trainSSL.py", "sets": {"synthetic.style": "a"}},
    "domain_adaptation": {"script": DA_SCRIPT,
                          "sets": {"synthetic.style": "b", "method.da_source_schedule": "alternate"}},
}
# The arms: their comparison and the only keys in which they differ from the other arms of it.
ARMS: dict[str, dict] = {
    "supervised": {"comparison": "semi_supervised",
                   "sets": {"method.use_unlabeled": False, "method.use_contrastive": False}},
    "pseudo_classmix": {"comparison": "semi_supervised",
                        "sets": {"method.use_unlabeled": True, "method.use_contrastive": False}},
    "full": {"comparison": "semi_supervised", "sets": {"method.use_unlabeled": True, "method.use_contrastive": True}},
    "source_only": {"comparison": "domain_adaptation",
                    "sets": {"method.use_unlabeled": False, "method.use_contrastive": False}},
    "domain_adaptation": {"comparison": "domain_adaptation",
                          "sets": {"method.use_unlabeled": True, "method.use_contrastive": True}},
}

# Released run-length constants (SCHEMA defaults, the release's N = 150000): scaled by N / 150000.
RELEASED_ITERATIONS = 150000
RELEASED_RUN_LENGTH = {"method.ramp_up_iterations": 2000, "method.memory_start_offset": 1000,
                       "method.bn_refresh_iterations": 1000}

# Modes: run length, seeds, evaluation interval and size overrides on the base config.
MODES: dict[str, dict] = {
    # "da_seeds": the seeds of the domain-adaptation comparison where fewer than "seeds" (one in "full": the
    # 75-minute budget on 2 cores holds 3 x 3 semi-supervised runs and one domain-adaptation pair;
    # --arms source_only domain_adaptation --seeds 2 3 runs more)
    "full": {"iterations": 2000, "seeds": [1, 2, 3], "da_seeds": [1], "val_every": 250, "sets": {}},
    "quick": {"iterations": 400, "seeds": [1], "val_every": 100, "sets": {}},
    "smoke": {"iterations": 3, "seeds": [1], "val_every": 2,
              "sets": {"synthetic.num_train": 12, "synthetic.num_val": 2, "synthetic.num_source": 8,
                       "synthetic.image_size": "40,64", "training.data.input_size": "32,48",
                       "training.data.labeled_samples": 4, "utils.curves": False}},
}

# Where the benchmark's config differs from the released method, and why (README and JSON).
DIFFERENCES_FROM_RELEASE = [
    "network DeepLabv3+ on ResNet-18 from random initialisation, batch 4 (the smallest v3+ batch), small crops of "
    "small scenes: CPU-sized (released: ImageNet/COCO-pretrained ResNet-50/101, 321x321 or 512x512 crops, batch 5 to 20)",
    "backbone.width 32: the ResNet-18 has half the standard channels in every layer (stem 32, layer4 256); ASPP "
    "and decoder keep the released 256 channels. Chosen for speed (a training iteration costs about half) and "
    "checked on the supervised arm alone before any method run",
    "learning rate 0.01 for training from scratch (released 2e-4, 4e-4 for the v3+ Cityscapes configs), chosen on "
    "the supervised arm alone: with one SGD group at the base lr it learned faster at 0.01 than at 0.002",
    "N = 2000 iterations (released 150000); ramp-up R, memory start offset and BatchNorm refresh passes scaled "
    "by N/150000 (2000 -> 27, 1000 -> 13, 1000 -> 13); evaluation every 250 iterations (released 1000)",
    "class balancing on (method.class_balancing true): the synthetic scenes stand in for Cityscapes, where the "
    "release balances classes",
    "domain adaptation: method.da_source_schedule \"alternate\" (source and target labeled batches alternate, as "
    "the paper describes); the release's code draws source batches only on odd iterations of the last 100, so "
    "its source would be used on 50 of 2000 iterations and source-only training would be target-only",
]


def scaled_run_length(iterations: int) -> dict[str, int]:
    """Ramp-up, memory start offset and BN refresh scaled proportionally to the run length (at least 1)."""
    return {k: max(1, round(v * iterations / RELEASED_ITERATIONS)) for k, v in RELEASED_RUN_LENGTH.items()}


def overrides(sets: dict[str, object]) -> list[str]:
    """KEY=VALUE strings (values as JSON, strings bare), as --set takes them."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sets.items()]


def set_args(sets: dict[str, object]) -> list[str]:
    """--set KEY=VALUE arguments."""
    return [a for o in overrides(sets) for a in ("--set", o)]


def mode_settings(mode: str, iterations: int | None = None, seeds: list[int] | None = None,
                  val_every: int | None = None) -> dict:
    """The mode's settings with command-line replacements (run length, seeds, evaluation interval)."""
    m = dict(MODES[mode])
    if iterations is not None:
        m["iterations"] = iterations
    if seeds:
        m["seeds"] = list(seeds)
        m.pop("da_seeds", None)
    if val_every is not None:
        m["val_every"] = val_every
    return m


def arm_keys() -> set[str]:
    """Keys the comparisons and arms set (a common --set may not change them)."""
    return {k for spec in list(ARMS.values()) + list(COMPARISONS.values()) for k in spec["sets"]} | {"seed"}


def plan(mode: str | dict, out: str, arms: list[str] | None = None, extra: dict | None = None) -> list[dict]:
    """Every run of the mode (a MODES name or settings): arm, seed, script, run dir and the full --set overrides;
    `extra`: keys set for every run (e.g. another learning rate), after the mode's."""
    m = MODES[mode] if isinstance(mode, str) else mode
    clash = sorted(set(extra or {}) & arm_keys())
    if clash:
        raise SystemExit(f"--set {clash[0]}: the arms set this key themselves")
    common = {**m["sets"], "training.num_iterations": m["iterations"], "utils.val_per_iter": m["val_every"],
              **scaled_run_length(m["iterations"]), **(extra or {})}
    runs = []
    for seed in m["seeds"]:
        for arm, spec in ARMS.items():
            if arms and arm not in arms:
                continue
            if spec["comparison"] == "domain_adaptation" and seed not in m.get("da_seeds", m["seeds"]):
                continue
            comparison = COMPARISONS[spec["comparison"]]
            run_dir = os.path.join(out, f"{arm}_seed{seed}")
            sets = {**common, **comparison["sets"], "seed": seed, **spec["sets"], "utils.checkpoint_dir": run_dir,
                    "utils.run_name": ""}  # the run directory is run_dir itself
            runs.append({"arm": arm, "comparison": spec["comparison"], "seed": seed, "script": comparison["script"],
                         "run_dir": run_dir, "sets": sets})
    return runs


def command(run: dict, config: str, device: str, diagnose: bool = False) -> list[str]:
    """The run's command line: the training script itself, or through ssl_diagnostics.py with `diagnose`."""
    script = [RUNNER, run["script"]] if diagnose else [os.path.join(ROOT, run["script"])]
    return [sys.executable] + script + ["--config", config, "--device", device] + set_args(run["sets"])


def _stored_config_matches(run: dict, config: str) -> bool:
    path = os.path.join(run["run_dir"], "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        stored = json.load(f)
    from engine.config import config_diff, load_config
    planned = load_config(config, overrides(run["sets"]))
    return not config_diff(stored, planned, ignore=("utils.checkpoint_dir",))


def finished(run: dict, config: str, diagnose: bool = False) -> bool:
    """Whether the run directory holds a finished run of exactly this config (with its measurements when
    `diagnose`)."""
    d = run["run_dir"]
    return (os.path.isfile(os.path.join(d, "evaluation.json")) and _stored_config_matches(run, config)
            and (not diagnose or os.path.isfile(os.path.join(d, "diagnostics.jsonl"))))


def run_in_process(run: dict, config: str, device: str, threads: int, diagnose: bool = False) -> int:
    """The run in this process (no interpreter start-up and imports per run: the smoke test); returns 0."""
    import contextlib
    import importlib

    import torch

    from benchmarks.ssl_diagnostics import run_script
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    argv = command(run, config, device)[2:]
    try:
        with open(os.path.join(run["run_dir"], "stdout.txt"), "w") as log, contextlib.redirect_stdout(log):
            if diagnose:
                run_script(run["script"], argv)
            else:
                importlib.import_module(os.path.splitext(run["script"])[0]).main(argv)
    finally:
        torch.set_num_threads(previous)
    return 0


def run_subprocess(cmd: list[str], env: dict, log_path: str) -> tuple[int, float | None]:
    """Run `cmd` with its output in `log_path`; (exit code, CPU seconds user + system of the process and its
    children, None where os.wait4 is missing)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if not hasattr(os, "wait4"):
            return proc.wait(), None
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        return proc.returncode, usage.ru_utime + usage.ru_stime


RUN_TIME = "run_time.json"  # in each run directory: wall and CPU seconds of the run, as this script measured them


def execute(run: dict, config: str, device: str, threads: int, keep_checkpoints: bool,
            in_process: bool = False, diagnose: bool = False) -> dict:
    """Run one training subprocess (its output in run_dir/stdout.txt) unless already finished; `in_process`: call
    the script in this process instead. Wall and CPU seconds go to run_dir/run_time.json."""
    if finished(run, config, diagnose):
        return {**run, "seconds": None, "cached": True}
    os.makedirs(run["run_dir"], exist_ok=True)
    stale = [os.path.join(run["run_dir"], n) for n in run_files(run["run_dir"]) + ["diagnostics.jsonl", RUN_TIME]]
    for path in stale:  # of another config or interrupted: a run starts only in a directory without them
        if os.path.isfile(path):
            os.remove(path)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0, cpu0 = time.time(), time.process_time()
    if in_process:
        rc = run_in_process(run, config, device, threads, diagnose)
        cpu = time.process_time() - cpu0
    else:
        rc, cpu = run_subprocess(command(run, config, device, diagnose), env,
                                 os.path.join(run["run_dir"], "stdout.txt"))
    seconds = time.time() - t0
    if rc != 0:
        with open(os.path.join(run["run_dir"], "stdout.txt")) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"run {run['run_dir']} failed (exit {rc}):\n{tail}")
    if not keep_checkpoints:  # tens of MB each; the benchmark needs only the logs and evaluation.json
        for path in glob.glob(os.path.join(run["run_dir"], "*.pth")):
            os.remove(path)
    timing = {"wall_seconds": round(seconds, 1), "cpu_seconds": None if cpu is None else round(cpu, 1),
              "threads": threads, "in_process": in_process, "diagnose": diagnose,
              "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    with open(os.path.join(run["run_dir"], RUN_TIME), "w") as f:
        json.dump(timing, f)
    return {**run, "seconds": round(seconds, 1), "cached": False}


def collect(run: dict) -> dict | None:
    """The run's results: best mIoU (evaluation.json), learning curve, last mIoU and its diagnostics."""
    path = os.path.join(run["run_dir"], "evaluation.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        ev = json.load(f)
    s = summarize_run(run["run_dir"])
    curve = s["curve"]
    timing = {}
    if os.path.isfile(os.path.join(run["run_dir"], RUN_TIME)):
        with open(os.path.join(run["run_dir"], RUN_TIME)) as f:
            timing = json.load(f)
    return {**{k: run[k] for k in ("arm", "comparison", "seed", "script", "run_dir", "sets")},
            "seconds": run.get("seconds") or timing.get("wall_seconds") or ev.get("seconds"),
            "cached": run.get("cached", True),
            "best_miou": float(ev["best_miou"]), "last_miou": curve[-1][1] if curve else None,
            "bn_refresh_miou": s["bn_refresh_miou"], "curve": curve,
            "cpu_seconds": timing.get("cpu_seconds") or (s.get("diagnostics") or {}).get("cpu_seconds"),
            "diagnosed": bool(s.get("diagnostics")),
            "losses": s["losses"], "memory_total": s["memory_total"], "memory_fill_final": s["memory_fill_final"],
            "class_iou_final": s["class_iou_final"], "diagnostics": s.get("diagnostics")}


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "values": values}


def summarize(results: list[dict]) -> list[dict]:
    """Per arm: best mIoU (the scripts' figure: best evaluation, BatchNorm refresh included) and the last periodic
    evaluation, in points: mean, sample standard deviation over seeds, min, max."""
    rows = []
    for arm, spec in ARMS.items():
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        best = _stats([100 * r["best_miou"] for r in rs])
        last = [100 * r["last_miou"] for r in rs if r["last_miou"] is not None]
        rows.append({"arm": arm, "comparison": spec["comparison"], **best,
                     "last_mean": statistics.fmean(last) if last else None,
                     "last_std": statistics.stdev(last) if len(last) > 1 else 0.0})
    return rows


def target_check(rows: list[dict]) -> dict:
    """The issue's targets on seed means: full >= supervised + 5 points; full above pseudo_classmix by more than
    one seed standard deviation (the larger of the two arms'); domain adaptation above source-only."""
    by = {r["arm"]: r for r in rows}
    out: dict = {}
    if all(a in by for a in ("supervised", "pseudo_classmix", "full")):
        gain = by["full"]["mean"] - by["supervised"]["mean"]
        vs_pc = by["full"]["mean"] - by["pseudo_classmix"]["mean"]
        std = max(by["full"]["std"], by["pseudo_classmix"]["std"])
        out["semi_supervised"] = {"full_minus_supervised": gain, "full_minus_pseudo_classmix": vs_pc,
                                  "seed_std": std, "beats_supervised_by_5": gain >= 5.0,
                                  "beats_pseudo_classmix_by_one_std": vs_pc > std,
                                  "met": gain >= 5.0 and vs_pc > std}
    if all(a in by for a in ("source_only", "domain_adaptation")):
        gain = by["domain_adaptation"]["mean"] - by["source_only"]["mean"]
        out["domain_adaptation"] = {"domain_adaptation_minus_source_only": gain, "met": gain > 0}
    if out:
        out["met"] = all(v["met"] for v in out.values() if isinstance(v, dict))
    return out


def format_table(rows: list[dict]) -> str:
    lines = ["| arm | script, style | best mIoU mean ± std | min – max | last evaluation mean ± std | seeds |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        c = COMPARISONS[r["comparison"]]
        where = f"{c['script']}, style {c['sets']['synthetic.style']}"
        def pm(mean: float, std: float) -> str:  # no spread from a single seed
            return f"{mean:.2f} ± {std:.2f}" if r["n"] > 1 else f"{mean:.2f}"
        last = pm(r["last_mean"], r["last_std"]) if r["last_mean"] is not None else "n/a"
        lines.append(f"| {r['arm']} | {where} | {pm(r['mean'], r['std'])} | {r['min']:.2f} – {r['max']:.2f} "
                     f"| {last} | {r['n']} |")
    return "\n".join(lines)


def format_targets(target: dict) -> str:
    lines = []
    s = target.get("semi_supervised")
    if s:
        lines.append(f"full - supervised = {s['full_minus_supervised']:+.2f} points (target >= +5: "
                     f"{'met' if s['beats_supervised_by_5'] else 'MISSED'}); full - pseudo_classmix = "
                     f"{s['full_minus_pseudo_classmix']:+.2f} (target > seed std {s['seed_std']:.2f}: "
                     f"{'met' if s['beats_pseudo_classmix_by_one_std'] else 'MISSED'})")
    d = target.get("domain_adaptation")
    if d:
        lines.append(f"domain_adaptation - source_only = {d['domain_adaptation_minus_source_only']:+.2f} points "
                     f"(target > 0: {'met' if d['met'] else 'MISSED'})")
    return "\n".join(lines)


def arm_documentation() -> str:
    lines = []
    for name, c in COMPARISONS.items():
        lines.append(f"  {name}: {c['script']} " + " ".join(shlex.quote(a) for a in set_args(c["sets"])))
        for arm, spec in ARMS.items():
            if spec["comparison"] == name:
                lines.append(f"    {arm:18s} " + " ".join(shlex.quote(a) for a in set_args(spec["sets"])))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
COLOURS = {"supervised": "#c83c32", "pseudo_classmix": "#2878c8", "full": "#28a046", "source_only": "#8c6d31",
           "domain_adaptation": "#7b3fa0"}


def _mean_band(results: list[dict], arm: str, get) -> tuple[list, list, list, list] | None:
    """Iterations present in every seed's series, with mean, min and max over seeds."""
    series = [dict((int(i), v) for i, v in get(r) or [] if v is not None) for r in results if r["arm"] == arm]
    series = [s for s in series if s]
    if not series:
        return None
    its = sorted(set.intersection(*(set(s) for s in series)))
    vals = [[s[i] for s in series] for i in its]
    return its, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def draw_curves(results: list[dict], path: str, title: str) -> None:
    """Validation mIoU against iteration: per arm the mean over seeds and the min-max band; one panel per
    comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = [c for c in COMPARISONS if any(r["comparison"] == c for r in results)]
    fig, axes = plt.subplots(1, len(comparisons), figsize=(6.2 * len(comparisons), 4.4), squeeze=False)
    for ax, comp in zip(axes[0], comparisons):
        for arm, spec in ARMS.items():
            if spec["comparison"] != comp:
                continue
            mb = _mean_band(results, arm, lambda r: r["curve"])
            if mb is None:
                continue
            its, mean, lo, hi = mb
            n = len({r["seed"] for r in results if r["arm"] == arm})
            ax.plot(its, [100 * v for v in mean], "o-", color=COLOURS[arm], ms=3, label=f"{arm} (n={n})")
            ax.fill_between(its, [100 * v for v in lo], [100 * v for v in hi], color=COLOURS[arm], alpha=0.18,
                            linewidth=0)
        c = COMPARISONS[comp]
        ax.set_title(f"{comp.replace('_', ' ')}: {c['script']}, style {c['sets']['synthetic.style']}", fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation mIoU (points)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title + "; line: mean over seeds, band: min-max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_diagnostics(results: list[dict], path: str) -> None:
    """Why an arm wins or loses: teacher accuracy and confident fraction on unlabeled crops, memory fill, loss
    scales, BatchNorm mismatch and the mIoU it costs (means over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [
        (axes[0][0], "teacher pixel accuracy on unlabeled crops (--diagnose)", lambda r: (r["diagnostics"] or {}).get(
            "teacher_accuracy"), 100.0, "%"),
        (axes[0][1], "teacher pixels above memory_confidence (--diagnose)", lambda r: (r["diagnostics"] or {}).get(
            "teacher_confident_fraction"), 100.0, "%"),
        (axes[0][2], "memory bank: vectors in all classes", lambda r: r["memory_total"], 1.0, "vectors"),
        (axes[1][1], "val mIoU, BatchNorm statistics re-estimated (--diagnose)", lambda r: (r["diagnostics"] or {}).get(
            "val_miou_bn_reestimated"), 100.0, "points"),
        (axes[1][2], "BatchNorm at evaluation: mean |Δmean|/std (--diagnose)", lambda r: (r["diagnostics"] or {}).get(
            "bn_mean_shift"), 1.0, ""),
    ]
    for ax, title, get, scale, unit in panels:
        for arm in ARMS:
            mb = _mean_band(results, arm, get)
            if mb is None:
                continue
            its, mean, _, _ = mb
            ax.plot(its, [scale * v for v in mean], "o-", ms=2.5, color=COLOURS[arm], label=arm)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no measurements: run with --diagnose", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
    if axes[0][2].lines:
        axes[0][2].legend(fontsize=7)
    ax = axes[1][0]  # loss scales of the two method arms (first seed)
    styles = {"loss_sup": "-", "loss_pseudo": "--", "loss_entropy": ":", "loss_contr_l": "-.",
              "loss_contr_u": (0, (1, 3))}
    for arm in ("full", "domain_adaptation"):
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        for key, series in rs[0]["losses"].items():
            pts = [(i, v) for i, v in series if v is not None and v > 0]
            if pts:
                ax.plot(*zip(*pts), linestyle=styles.get(key, "-"), marker=".", ms=3, color=COLOURS[arm], lw=1,
                        label=f"{arm} {key}")
    ax.set_yscale("log")
    ax.set_title("loss scales (weighted terms), first seed", fontsize=9)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shown(path: str) -> str:
    """A path relative to the repository when inside it (the JSON is committed under docs/)."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def _shown_run(run: dict) -> dict:
    sets = {**run["sets"], "utils.checkpoint_dir": _shown(run["sets"]["utils.checkpoint_dir"])}
    return {**run, "run_dir": _shown(run["run_dir"]), "sets": sets}


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        info["cpu"] = platform.processor()
    return info


SESSION_KEYS = ("elapsed_seconds", "runs_trained_now", "jobs", "threads", "machine", "load_samples")


def training_session(previous_json: str, report: dict) -> dict | None:
    """Wall time, machine and load of the invocation that trained the runs: this one's when it trained any,
    else the one recorded in the previous ssl_synthetic.json (so --report keeps the measured wall time)."""
    if report["runs_trained_now"]:
        return {k: report[k] for k in SESSION_KEYS}
    if os.path.isfile(previous_json):
        with open(previous_json) as f:
            return json.load(f).get("training_session")
    return None


def with_session_times(report: dict) -> dict:
    """The report with its top-level times those of the training: every invocation records its own under
    "invocation"; one that trained nothing (--report) takes elapsed_seconds, runs_trained_now, jobs, threads,
    machine and load_samples from the training session, so that the top level states how long the runs took."""
    session = report.get("training_session")
    own = ("elapsed_seconds", "runs_trained_now", "jobs", "threads", "load_samples", "load_average_at_end")
    report = dict(report, invocation={k: report[k] for k in own})
    if session and not report["runs_trained_now"]:
        report.update({k: session[k] for k in SESSION_KEYS})
        report.pop("load_average_at_end")  # this invocation's, not the training's: kept under "invocation"
    return report


def compact_json(obj, indent: int = 1, level: int = 0) -> str:
    """JSON with one key per line, but every list of numbers (learning curves, load samples) and every object of
    plain values (per-class values, config keys) on one line, instead of one number per line."""
    pad, end = " " * (indent * (level + 1)), " " * (indent * level)
    if isinstance(obj, dict) and obj and any(isinstance(v, (dict, list)) for v in obj.values()):
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {compact_json(v, indent, level + 1)}"
                                   for k, v in obj.items()) + "\n" + end + "}"
    if isinstance(obj, list) and (any(isinstance(v, dict) for v in obj) or  # objects, or long texts: one per line
                                  any(isinstance(v, str) for v in obj) and len(json.dumps(obj)) > 120):
        return "[\n" + ",\n".join(pad + compact_json(v, indent, level + 1) for v in obj) + "\n" + end + "]"
    return json.dumps(obj)


class LoadSampler:
    """The 1-minute load average every `every` seconds while the runs train ([elapsed seconds, load] pairs): how
    busy the machine was, to read the wall time by."""

    def __init__(self, t0: float, every: float = 60.0):
        self.t0, self.every, self.samples = t0, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        if hasattr(os, "getloadavg"):
            self.samples.append([round(time.time() - self.t0), round(os.getloadavg()[0], 2)])

    def _loop(self) -> None:
        self._sample()
        while not self._stop.wait(self.every):
            self._sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._sample()

    def values(self) -> list[float]:
        return [v for _, v in self.samples]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="one seed, 400 iterations per arm")
    g.add_argument("--smoke", action="store_true", help="3 iterations per arm, tiny sizes (tests)")
    p.add_argument("--report", action="store_true",
                   help="no training: tables and plots from the finished runs already in --out")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="only these arms (default all)")
    p.add_argument("--iterations", type=int, help="replace the mode's run length N (R etc. are scaled to it)")
    p.add_argument("--seeds", type=int, nargs="+", help="replace the mode's seeds")
    p.add_argument("--val-every", type=int, help="replace the mode's evaluation interval")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config key for every run (repeatable), e.g. --set training.learning_rate=0.01")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--config", default=BASE_CONFIG, help="base config the arms override")
    p.add_argument("--device", default="cpu", help="device for the training scripts (default cpu)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' .pth files")
    p.add_argument("--diagnose", action="store_true",
                   help="run every script through benchmarks/ssl_diagnostics.py: teacher accuracy, memory candidates "
                        "and BatchNorm statistics at each evaluation (~4.5 CPU-seconds each)")
    p.add_argument("--in-process", action="store_true",
                   help="run the arms one after another in this process instead of as subprocesses (tests)")
    p.add_argument("--plan", action="store_true", help="print the runs' commands and exit")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_arg_parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = os.path.abspath(args.out)
    config = os.path.abspath(args.config)
    m = mode_settings(mode, args.iterations, args.seeds, args.val_every)
    from engine.config import parse_override
    extra = {".".join(k): v for k, v in map(parse_override, args.overrides)}
    runs = plan(m, out, args.arms, extra)
    arms = sorted({r["arm"] for r in runs}, key=list(ARMS).index)
    print(f"ssl_synthetic benchmark, mode {mode}: {len(runs)} runs ({len(arms)} arms x seeds {m['seeds']}"
          + (f", the domain-adaptation pair at seeds {m['da_seeds']}" if "da_seeds" in m else "") + "), "
          f"{m['iterations']} iterations each, base config {os.path.relpath(config, ROOT)}")
    print(f"run-length constants scaled by N/{RELEASED_ITERATIONS} = {m['iterations']}/{RELEASED_ITERATIONS}: "
          + ", ".join(f"{k}={v} (released {RELEASED_RUN_LENGTH[k]})"
                      for k, v in scaled_run_length(m["iterations"]).items()))
    print("arms (the only config keys in which they differ):\n" + arm_documentation(), flush=True)
    if args.plan:
        for r in runs:
            print(" ".join(shlex.quote(a) for a in command(r, config, args.device, args.diagnose)))
        return {}
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    info = machine()
    done: list[dict] = []
    failed: list[dict] = []
    load = LoadSampler(t0)
    if args.report:
        done = [r for r in runs if finished(r, config, args.diagnose)]
        print(f"--report: {len(done)} of {len(runs)} runs finished in {out}")
    else:
        load.start()
        with cf.ThreadPoolExecutor(max_workers=1 if args.in_process else max(1, args.jobs)) as pool:
            # slowest arms first, so that the last runs of the pool are short ones
            cost = {"full": 0, "domain_adaptation": 1, "pseudo_classmix": 2, "supervised": 3, "source_only": 4}
            order = sorted(runs, key=lambda r: (cost[r["arm"]], r["seed"]))
            futures = {pool.submit(execute, r, config, args.device, args.threads, args.keep_checkpoints,
                                   args.in_process, args.diagnose): r for r in order}
            for fut in cf.as_completed(futures):
                try:
                    r = fut.result()
                except Exception as e:  # the other runs go on; the failure is reported at the end
                    r = futures[fut]
                    failed.append({"arm": r["arm"], "seed": r["seed"], "run_dir": _shown(r["run_dir"]),
                                   "error": f"{type(e).__name__}: {e}"[-3000:]})
                    print(f"  {r['arm']:18s} seed={r['seed']}: FAILED ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})", flush=True)
                    continue
                done.append(r)
                c = collect(r)
                took = "cached" if r["cached"] else f"{r['seconds']:.0f} s" + (
                    f", {c['cpu_seconds']:.0f} CPU-s" if c.get("cpu_seconds") is not None else "")
                print(f"  {r['arm']:18s} seed={r['seed']}: best mIoU {100 * c['best_miou']:.2f} ({took}; "
                      f"{len(done)}/{len(runs)} done, {time.time() - t0:.0f} s elapsed)", flush=True)
    load.stop()
    results = [c for c in (collect(r) for r in done) if c is not None]
    results.sort(key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    rows = summarize(results)
    target = target_check(rows)
    elapsed = time.time() - t0
    ran = [r for r in results if not r["cached"]]
    cpu_total = sum(r["cpu_seconds"] or 0.0 for r in results)
    if rows:
        print("\n" + format_table(rows))
    if target:
        print("\n" + format_targets(target))
    print(f"total {elapsed / 60:.1f} min wall ({len(ran)} runs trained now); CPU time of all {len(results)} runs "
          f"{cpu_total:.0f} s = {cpu_total / 60:.1f} CPU-min" + (
              f"; load average 1 min: {min(load.values()):.1f}-{max(load.values()):.1f}" if load.values() else ""))
    png = os.path.join(out, "ssl_synthetic.png")
    diag_png = os.path.join(out, "ssl_synthetic_diagnostics.png")
    if results:
        draw_curves(results, png, f"synthetic streets, {m['iterations']} iterations, {len(m['seeds'])} seed(s)")
        draw_diagnostics(results, diag_png)
    report = {
        "mode": mode, "iterations": m["iterations"], "seeds": m["seeds"], "val_every": m["val_every"],
        "base_config": os.path.relpath(config, ROOT),
        "common_sets": {k: v for k, v in (runs[0]["sets"].items() if runs else [])
                        if k not in arm_keys() and k != "utils.checkpoint_dir"},
        "comparisons": COMPARISONS, "arms": ARMS,
        "arm_set_args": {a: set_args(s["sets"]) for a, s in ARMS.items()},
        "run_length_scaling": {"released_iterations": RELEASED_ITERATIONS, "released": RELEASED_RUN_LENGTH,
                               "scaled": scaled_run_length(m["iterations"])},
        "differences_from_release": DIFFERENCES_FROM_RELEASE,
        "runs": [_shown_run(r) for r in results], "failed": failed,
        "summary": rows, "target": target, "machine": info, "jobs": args.jobs,
        "threads": args.threads, "diagnose": args.diagnose, "elapsed_seconds": round(elapsed, 1),
        "runs_trained_now": len(ran), "cpu_seconds_total": round(cpu_total, 1),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "load_samples": load.samples, "plots": [_shown(png), _shown(diag_png)],
        "training_session": None,
    }
    report["training_session"] = training_session(os.path.join(out, "ssl_synthetic.json"), report)
    report = with_session_times(report)
    with open(os.path.join(out, "ssl_synthetic.json"), "w") as f:
        f.write(compact_json(report) + "\n")
    print(f"wrote {os.path.join(out, 'ssl_synthetic.json')}, {png} and {diag_png}")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; their output is in <run dir>/stdout.txt: "
                         + ", ".join(f["run_dir"] for f in failed))
    return report


if __name__ == "__main__":
    main()
