#!/usr/bin/env python3
"""Semi-supervised benchmark on the synthetic street scenes, small enough for a CPU.

Trains the same small network (DeepLabv2, ResNet-18, random init) with few labeled and many unlabeled images
under three arms that differ only by config keys:

  supervised       labeled data only: --set method.use_unlabeled=false --set method.use_contrastive=false
  pseudo_classmix  + pseudo-labels, ClassMix, entropy: --set method.use_unlabeled=true --set method.use_contrastive=false
  full             + memory bank and contrastive terms (the paper): --set method.use_unlabeled=true
                     --set method.use_contrastive=true

at two label counts and several seeds (the seed also draws the labeled subset), each as a subprocess of
trainSSL.py in its own run directory under --out, and reports mean and spread of the best mIoU per arm as a
table (stdout, ssl_synthetic.json) and a plot (ssl_synthetic.png, drawn with matplotlib).

The method's constants are the released ones; only the run-length constants are scaled proportionally to the
number of iterations N (released: N=150000, ramp-up R=2000, memory start offset 1000, BatchNorm refresh 1000).

    python benchmarks/ssl_synthetic.py            # the full benchmark (~33 min on 2 shared CPU cores)
    python benchmarks/ssl_synthetic.py --quick    # one seed, shorter runs (< 5 min)
    python benchmarks/ssl_synthetic.py --smoke    # a few iterations per arm (tests)
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "benchmarks", "configs", "ssl_synthetic.json")
DEFAULT_OUT = os.path.join("benchmarks", "results", "ssl_synthetic")

# The arms: the only keys in which their configs differ.
ARMS: dict[str, dict[str, object]] = {
    "supervised": {"method.use_unlabeled": False, "method.use_contrastive": False},
    "pseudo_classmix": {"method.use_unlabeled": True, "method.use_contrastive": False},
    "full": {"method.use_unlabeled": True, "method.use_contrastive": True},
}
ARM_KEYS = sorted({k for sets in ARMS.values() for k in sets})

# Released run-length constants (configs/configSSL_*.json and the SCHEMA defaults): scaled by N / 150000.
RELEASED_ITERATIONS = 150000
RELEASED_RUN_LENGTH = {"method.ramp_up_iterations": 2000, "method.memory_start_offset": 1000,
                       "method.bn_refresh_iterations": 1000}

# Modes: run length, label counts, seeds and size overrides on the base config.
MODES: dict[str, dict] = {
    "full": {"iterations": 300, "labels": [5, 20], "seeds": [1, 2], "val_every": 50, "sets": {}},
    "quick": {"iterations": 60, "labels": [5, 20], "seeds": [1], "val_every": 30, "sets": {}},
    "smoke": {"iterations": 3, "labels": [4], "seeds": [1], "val_every": 2,
              "sets": {"synthetic.num_train": 12, "synthetic.num_val": 2, "synthetic.image_size": "40,64",
                       "training.data.input_size": "32,48", "training.batch_size": 2}},
}


def scaled_run_length(iterations: int) -> dict[str, int]:
    """Ramp-up, memory start offset and BN refresh scaled proportionally to the run length (at least 1)."""
    return {k: max(1, round(v * iterations / RELEASED_ITERATIONS)) for k, v in RELEASED_RUN_LENGTH.items()}


def set_args(sets: dict[str, object]) -> list[str]:
    """--set KEY=VALUE arguments (values as JSON, strings bare)."""
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return out


def plan(mode: str, out: str) -> list[dict]:
    """Every run of the mode: arm, label count, seed, run dir and the full --set overrides."""
    m = MODES[mode]
    common = {**m["sets"], "training.num_iterations": m["iterations"], "utils.val_per_iter": m["val_every"],
              **scaled_run_length(m["iterations"])}
    runs = []
    for labels in m["labels"]:
        for seed in m["seeds"]:
            for arm, arm_sets in ARMS.items():
                run_dir = os.path.join(out, f"L{labels}_seed{seed}_{arm}")
                sets = {**common, "training.data.labeled_samples": labels, "seed": seed, **arm_sets,
                        "utils.checkpoint_dir": run_dir}
                runs.append({"arm": arm, "labels": labels, "seed": seed, "run_dir": run_dir, "sets": sets})
    return runs


def command(run: dict, config: str, device: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "trainSSL.py"), "--config", config, "--device", device] + \
        set_args(run["sets"])


def _done(run: dict) -> float | None:
    """best mIoU of a finished run whose stored config matches the planned overrides, else None."""
    ev, cf_path = os.path.join(run["run_dir"], "evaluation.json"), os.path.join(run["run_dir"], "config.json")
    if not (os.path.isfile(ev) and os.path.isfile(cf_path)):
        return None
    with open(cf_path) as f:
        cfg = json.load(f)
    for key, value in run["sets"].items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            return None
    with open(ev) as f:
        return float(json.load(f)["best_miou"])


def execute(run: dict, config: str, device: str, threads: int, keep_checkpoints: bool) -> dict:
    """Run one training subprocess (its output in run_dir/stdout.txt); returns the run with its result."""
    cached = _done(run)
    if cached is not None:
        return {**run, "best_miou": cached, "seconds": None, "cached": True}
    os.makedirs(run["run_dir"], exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(os.path.join(run["run_dir"], "stdout.txt"), "w") as log:
        rc = subprocess.run(command(run, config, device), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    if rc != 0:
        tail = open(os.path.join(run["run_dir"], "stdout.txt")).read()[-2000:]
        raise RuntimeError(f"run {run['run_dir']} failed (exit {rc}):\n{tail}")
    if not keep_checkpoints:  # ~50-150 MB each; the benchmark needs only evaluation.json and the logs
        for path in glob.glob(os.path.join(run["run_dir"], "*.pth")):
            os.remove(path)
    with open(os.path.join(run["run_dir"], "evaluation.json")) as f:
        best = float(json.load(f)["best_miou"])
    return {**run, "best_miou": best, "seconds": round(seconds, 1), "cached": False}


def summarize(results: list[dict]) -> list[dict]:
    """Mean, sample standard deviation, min and max of best mIoU (in points) per (arm, label count)."""
    rows = []
    labels = sorted({r["labels"] for r in results})
    for arm in ARMS:
        for L in labels:
            vals = [100 * r["best_miou"] for r in results if r["arm"] == arm and r["labels"] == L]
            if not vals:
                continue
            rows.append({"arm": arm, "labels": L, "n": len(vals), "mean": statistics.fmean(vals),
                         "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals),
                         "values": vals})
    return rows


def target_check(rows: list[dict]) -> dict:
    """The issue's target at the smaller label count: full - supervised >= 3 points (seed means), and full not
    below pseudo_classmix by more than the larger of the two seed standard deviations."""
    L = min(r["labels"] for r in rows)
    by = {r["arm"]: r for r in rows if r["labels"] == L}
    if not all(a in by for a in ARMS):
        return {}
    gain = by["full"]["mean"] - by["supervised"]["mean"]
    vs_b = by["full"]["mean"] - by["pseudo_classmix"]["mean"]
    spread = max(by["full"]["std"], by["pseudo_classmix"]["std"])
    return {"labels": L, "full_minus_supervised": gain, "full_minus_pseudo_classmix": vs_b, "spread": spread,
            "beats_supervised_by_3": gain >= 3.0, "not_worse_than_pseudo_classmix": vs_b >= -spread,
            "met": gain >= 3.0 and vs_b >= -spread}


def format_table(rows: list[dict]) -> str:
    lines = ["| arm | labeled images | mIoU mean ± std (points) | min – max | seeds |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['labels']} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{r['min']:.2f} – {r['max']:.2f} | {r['n']} |")
    return "\n".join(lines)


def arm_documentation() -> str:
    return "\n".join(f"  {arm:16s} " + " ".join(shlex.quote(a) for a in set_args(sets)) for arm, sets in ARMS.items())


COLOURS = {"supervised": (200, 60, 50), "pseudo_classmix": (40, 120, 200), "full": (40, 160, 70)}


def draw_plot(rows: list[dict], path: str, title: str) -> None:
    """mIoU (mean, with min-max bars over seeds) against labeled images, one line per arm (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = sorted({r["labels"] for r in rows})
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    for j, arm in enumerate(arms):
        pts = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["labels"])
        dx = (j - (len(arms) - 1) / 2) * 0.04  # a small offset so that the bars do not overlap
        xs = [labels.index(r["labels"]) + dx for r in pts]
        means = [r["mean"] for r in pts]
        bars = [[r["mean"] - r["min"] for r in pts], [r["max"] - r["mean"] for r in pts]]
        ax.errorbar(xs, means, yerr=bars, color="#%02x%02x%02x" % COLOURS[arm], marker="o", markersize=7,
                    capsize=4, linewidth=2, label=arm)
    ax.set_xticks(range(len(labels)), [str(L) for L in labels])
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel("labeled images")
    ax.set_ylabel("mIoU (points)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="dot: mean; bar: min-max", title_fontsize=8, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


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


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="one seed, 60 iterations per run (< 5 min on 2 cores)")
    g.add_argument("--smoke", action="store_true", help="3 iterations, one seed, one label count (tests)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--config", default=BASE_CONFIG, help="base trainSSL config the arms override")
    p.add_argument("--device", default="cpu", help="device for trainSSL.py (default cpu)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' .pth files")
    p.add_argument("--plan", action="store_true", help="print the runs' commands and exit")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_arg_parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = os.path.abspath(args.out)
    runs = plan(mode, out)
    m = MODES[mode]
    print(f"ssl_synthetic benchmark, mode {mode}: {len(runs)} runs ({len(ARMS)} arms x labels {m['labels']} x "
          f"seeds {m['seeds']}), {m['iterations']} iterations each, base config {os.path.relpath(args.config, ROOT)}")
    print(f"run-length constants scaled by N/{RELEASED_ITERATIONS} = {m['iterations']}/{RELEASED_ITERATIONS}: "
          + ", ".join(f"{k}={v} (released {RELEASED_RUN_LENGTH[k]})" for k, v in scaled_run_length(m['iterations']).items()))
    print("arms (the only config keys in which they differ):\n" + arm_documentation(), flush=True)
    if args.plan:
        for r in runs:
            print(" ".join(shlex.quote(a) for a in command(r, args.config, args.device)))
        return {}
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    info = machine()
    results = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # slowest arms first (full, then pseudo_classmix), so that the last runs of the pool are short ones
        order = sorted(runs, key=lambda r: -list(ARMS).index(r["arm"]))
        futures = [pool.submit(execute, r, args.config, args.device, args.threads, args.keep_checkpoints)
                   for r in order]
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.append(r)
            took = "cached" if r["cached"] else f"{r['seconds']:.0f} s"
            print(f"  {r['arm']:16s} L={r['labels']:<3d} seed={r['seed']}: mIoU {100 * r['best_miou']:.2f} ({took}; "
                  f"{len(results)}/{len(runs)} done, {time.time() - t0:.0f} s elapsed)", flush=True)
    results.sort(key=lambda r: (r["labels"], r["seed"], list(ARMS).index(r["arm"])))
    rows = summarize(results)
    target = target_check(rows)
    elapsed = time.time() - t0
    table = format_table(rows)
    print("\n" + table)
    if target:
        print(f"\nat {target['labels']} labeled images: full - supervised = {target['full_minus_supervised']:+.2f} "
              f"points (target >= +3: {'met' if target['beats_supervised_by_3'] else 'MISSED'}); full - "
              f"pseudo_classmix = {target['full_minus_pseudo_classmix']:+.2f} (seed spread {target['spread']:.2f}: "
              f"{'within' if target['not_worse_than_pseudo_classmix'] else 'WORSE beyond'} the spread)")
    print(f"total {elapsed / 60:.1f} min")
    png = os.path.join(out, "ssl_synthetic.png")
    draw_plot(rows, png, f"synthetic streets, {m['iterations']} iterations, best val mIoU over "
                         f"{len(m['seeds'])} seed(s)")
    report = {
        "mode": mode, "iterations": m["iterations"], "labels": m["labels"], "seeds": m["seeds"],
        "base_config": os.path.relpath(args.config, ROOT),
        "common_sets": {k: v for k, v in runs[0]["sets"].items()
                        if k not in ARM_KEYS and k not in ("training.data.labeled_samples", "seed",
                                                           "utils.checkpoint_dir")},
        "arms": ARMS, "arm_set_args": {a: set_args(s) for a, s in ARMS.items()},
        "run_length_scaling": {"released_iterations": RELEASED_ITERATIONS, "released": RELEASED_RUN_LENGTH,
                               "scaled": scaled_run_length(m["iterations"])},
        "runs": [{k: r[k] for k in ("arm", "labels", "seed", "run_dir", "best_miou", "seconds", "cached", "sets")}
                 for r in results],
        "summary": rows, "target": target, "machine": info, "jobs": args.jobs, "threads": args.threads,
        "elapsed_seconds": round(elapsed, 1), "plot": png,
    }
    with open(os.path.join(out, "ssl_synthetic.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(out, 'ssl_synthetic.json')} and {png}")
    return report


if __name__ == "__main__":
    main()
