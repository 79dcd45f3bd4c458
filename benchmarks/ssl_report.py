"""The study's results: per run, per arm, per paired comparison, the pre-registered targets, why (diagnostics per
arm), tables and plots, and a compact JSON."""
from __future__ import annotations

import json
import os
import statistics

from benchmarks.paired_stats import describe, format_interval, paired_difference
from benchmarks.ssl_diagnostics import summarize_run
from benchmarks.ssl_protocol import ARMS, COMPARISONS, LABELS, PAIRS, ROOT
from benchmarks.ssl_runner import RUN_TIME

LOSS_TERMS = ("loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l", "loss_contr_u")


def collect(run: dict) -> dict | None:
    """The run's results: best mIoU (evaluation.json), learning curve, last mIoU, timing and its diagnostics."""
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
    ramp = run["sets"].get("method.ramp_up_iterations", 0)
    return {**{k: run[k] for k in ("arm", "comparison", "seed", "script", "run_dir", "sets")},
            "iterations": run.get("iterations"),
            "wall_seconds": timing.get("wall_seconds") or ev.get("seconds"), "cpu_seconds": timing.get("cpu_seconds"),
            "cached": run.get("cached", True),
            "best_miou": float(ev["best_miou"]), "last_miou": curve[-1][1] if curve else None,
            "bn_refresh_miou": s["bn_refresh_miou"], "curve": curve,
            "diagnosed": bool(s.get("diagnostics")), "losses": s["losses"], "loss_share": loss_share(s["losses"], ramp),
            "memory_total": s["memory_total"], "memory_fill_final": s["memory_fill_final"],
            "class_iou_final": s["class_iou_final"], "diagnostics": s.get("diagnostics")}


def loss_share(losses: dict[str, list], after: int) -> dict[str, float] | None:
    """Each weighted loss term's share of their sum, averaged over the logged iterations after `after` (the ramp-up
    R: from there on every term of the arm is on)."""
    sums = {k: sum(v for i, v in series if i > after and v is not None) for k, series in losses.items()
            if k in LOSS_TERMS}
    total = sum(abs(v) for v in sums.values())
    return {k: abs(v) / total for k, v in sums.items()} if total > 0 else None


def _mean_dicts(dicts: list[dict | None]) -> dict | None:
    """Key-wise mean of dicts of numbers (None values skipped)."""
    dicts = [d for d in dicts if d]
    if not dicts:
        return None
    keys = list(dicts[0])
    out = {}
    for k in keys:
        vals = [d[k] for d in dicts if d.get(k) is not None]
        out[k] = statistics.fmean(vals) if vals else None
    return out


def summarize(results: list[dict]) -> list[dict]:
    """Per arm, in points: best mIoU (the scripts' figure: best evaluation, BatchNorm refresh included) and the last
    periodic evaluation (mean, sample standard deviation over seeds, min, max); and why, as means over seeds:
    memory vectors per class at the end, each loss term's share, the teacher's confident-and-correct share of
    labeled pixels per class (--diagnose), per-class IoU at the end; CPU seconds per run."""
    rows = []
    for arm, spec in ARMS.items():
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        best = describe([100 * r["best_miou"] for r in rs])
        last = [100 * r["last_miou"] for r in rs if r["last_miou"] is not None]
        diag = [r["diagnostics"] or {} for r in rs]
        rows.append({"arm": arm, "comparison": spec["comparison"], **best, "seeds": [r["seed"] for r in rs],
                     "last_mean": statistics.fmean(last) if last else None,
                     "last_std": statistics.stdev(last) if len(last) > 1 else 0.0,
                     "memory_fill": _mean_dicts([r["memory_fill_final"] for r in rs]),
                     "loss_share": _mean_dicts([r["loss_share"] for r in rs]),
                     "confident_correct": _mean_dicts([d.get("memory_candidates_per_class") for d in diag]),
                     "teacher_accuracy": _mean_last([d.get("teacher_accuracy") for d in diag]),
                     "teacher_confident_fraction": _mean_last([d.get("teacher_confident_fraction") for d in diag]),
                     "class_iou": _mean_dicts([r["class_iou_final"] for r in rs]),
                     "cpu_seconds_mean": _mean([r["cpu_seconds"] for r in rs]),
                     "wall_seconds_mean": _mean([r["wall_seconds"] for r in rs])})
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _mean_last(series: list) -> float | None:
    return _mean([s[-1][1] for s in series if s])


def comparisons(results: list[dict]) -> list[dict]:
    """Per pre-registered pair: the mean paired difference of best mIoU (and of the last evaluation) in points, its
    95 % t-interval, and whether its target is met."""
    out = []
    for p in PAIRS:
        best = {a: {r["seed"]: 100 * r["best_miou"] for r in results if r["arm"] == a} for a in (p["a"], p["b"])}
        last = {a: {r["seed"]: 100 * r["last_miou"] for r in results if r["arm"] == a and r["last_miou"] is not None}
                for a in (p["a"], p["b"])}
        c = paired_difference(best[p["a"]], best[p["b"]])
        if c is None:
            continue
        out.append({**p, "best": c, "last": paired_difference(last[p["a"]], last[p["b"]]), "met": target_met(p, c)})
    return out


def target_met(pair: dict, c: dict) -> bool | None:
    """The pair's pre-registered target on the paired differences of best mIoU; None when it has none."""
    target = pair["target"]
    if target is None:
        return None
    if target.startswith("mean >= +5"):
        return c["mean"] >= 5.0
    if target.startswith("95 % interval above 0"):
        return c["low"] is not None and c["low"] > 0
    if target.startswith("positive at every seed"):
        return c["n"] >= 3 and c["positive"] == c["n"]
    raise ValueError(target)


# ------------------------------------------------------------------------------------------------- tables
def format_table(rows: list[dict]) -> str:
    lines = ["| arm | script, style | best mIoU, mean ± std | min – max | last evaluation, mean ± std | seeds | "
             "CPU-min per run |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = COMPARISONS[r["comparison"]]
        where = f"{c['script']}, style {c['sets']['synthetic.style']}"

        def pm(mean: float, std: float) -> str:  # no spread from a single seed
            return f"{mean:.2f} ± {std:.2f}" if r["n"] > 1 else f"{mean:.2f}"
        last = pm(r["last_mean"], r["last_std"]) if r["last_mean"] is not None else "n/a"
        cpu = f"{r['cpu_seconds_mean'] / 60:.1f}" if r["cpu_seconds_mean"] else "n/a"
        lines.append(f"| {LABELS[r['arm']]} | {where} | {pm(r['mean'], r['std'])} | {r['min']:.2f} – {r['max']:.2f} "
                     f"| {last} | {r['n']} | {cpu} |")
    return "\n".join(lines)


def format_comparisons(comps: list[dict]) -> str:
    lines = ["| comparison (b − a) | seeds | best mIoU: mean difference [95 % t-interval] | per seed | "
             "last evaluation | target | met |", "|---|---:|---:|---|---:|---|---|"]
    for c in comps:
        b = c["best"]
        per_seed = ", ".join(f"{d:+.2f}" for d in b["differences"])
        met = {True: "**met**", False: "**not met**", None: "—"}[c["met"]]
        lines.append(f"| {c['name']} | {b['n']} | {format_interval(b)} | {per_seed} | {format_interval(c['last'])} "
                     f"| {c['target'] or 'none (reported)'} | {met} |")
    return "\n".join(lines)


def format_why(rows: list[dict], class_names: list[str]) -> str:
    """Per arm (means over seeds): memory vectors per class at the end, the teacher's confident-and-correct share of
    labeled pixels per class, each loss term's share."""
    head = "| arm | what | " + " | ".join(class_names) + " |"
    lines = [head, "|---|---|" + "---:|" * len(class_names)]
    for r in rows:
        if r["memory_fill"] and any(r["memory_fill"].values()):
            lines.append(f"| {LABELS[r['arm']]} | memory vectors at the end (of 256) | "
                         + " | ".join(f"{r['memory_fill'].get(k, 0):.0f}" for k in class_names) + " |")
        if r["confident_correct"]:
            lines.append(f"| {LABELS[r['arm']]} | teacher correct and above 0.95, % of labeled pixels | "
                         + " | ".join(_pct(r["confident_correct"].get(k)) for k in class_names) + " |")
    shares = ["", "| arm | " + " | ".join(LOSS_TERMS) + " |", "|---|" + "---:|" * len(LOSS_TERMS)]
    for r in rows:
        if r["loss_share"]:
            shares.append(f"| {LABELS[r['arm']]} | " + " | ".join(_pct(r["loss_share"].get(k)) for k in LOSS_TERMS)
                          + " |")
    return "\n".join(lines + shares)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def format_targets(comps: list[dict]) -> str:
    lines = []
    for c in comps:
        if c["target"] is None:
            continue
        lines.append(f"{c['name']}: {format_interval(c['best'])} points; target {c['target']}: "
                     f"{'met' if c['met'] else 'NOT MET'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- JSON
def compact_json(obj: dict) -> str:
    """One top-level key per line; lists of dicts one element per line; everything else on one line."""
    def one(v) -> str:
        return json.dumps(v, separators=(", ", ": "))
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f" {json.dumps(k)}: [\n" + ",\n".join("  " + one(x) for x in v) + "\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {one(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def shown_path(path: str) -> str:
    """A path relative to the repository when inside it (the JSON is committed under docs/)."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel
