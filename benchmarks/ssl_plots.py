"""The study's plots: per-seed results with paired lines, paired differences with their 95 % t-intervals against the
targets, learning curves; and the diagnostics of why (teacher, memory, loss scales, BatchNorm)."""
from __future__ import annotations

import statistics

from benchmarks.ssl_protocol import ARMS, LABELS

COLOURS = {"supervised": "#c83c32", "pseudo_classmix": "#2878c8", "full": "#28a046", "full_paper": "#e08a1e",
           "source_only": "#8c6d31", "domain_adaptation": "#7b3fa0"}
TARGET_LINES = {"full - supervised": 5.0, "full - pseudo_classmix": 0.0, "full_paper - full": 0.0,
                "domain_adaptation - source_only": 0.0}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _mean_band(results: list[dict], arm: str, get) -> tuple[list, list, list, list] | None:
    """Iterations present in every seed's series, with mean, min and max over seeds."""
    series = [dict((int(i), v) for i, v in get(r) or [] if v is not None) for r in results if r["arm"] == arm]
    series = [s for s in series if s]
    if not series:
        return None
    its = sorted(set.intersection(*(set(s) for s in series)))
    vals = [[s[i] for s in series] for i in its]
    return its, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def draw_study(results: list[dict], comps: list[dict], path: str, title: str) -> None:
    """Three panels: best mIoU per seed and arm (a seed's arms joined by a line); the paired differences with their
    95 % t-intervals and the targets; validation mIoU against iteration (mean over seeds, min-max band)."""
    plt = _pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1.2, 1.0, 1.2]})
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    x = {a: k for k, a in enumerate(arms)}
    seeds = sorted({r["seed"] for r in results})
    for seed in seeds:
        for comp in ("semi_supervised", "domain_adaptation"):
            pts = sorted((x[r["arm"]], 100 * r["best_miou"]) for r in results
                         if r["seed"] == seed and r["comparison"] == comp)
            if len(pts) > 1:
                a1.plot(*zip(*pts), "-", color="0.75", lw=0.8, zorder=1)
    for arm in arms:
        vals = [100 * r["best_miou"] for r in results if r["arm"] == arm]
        a1.scatter([x[arm]] * len(vals), vals, color=COLOURS[arm], s=22, zorder=2)
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        a1.errorbar(x[arm] + 0.18, mean, yerr=sd, fmt="D", color=COLOURS[arm], ms=6, capsize=4, zorder=3)
    a1.set_xticks(range(len(arms)), [LABELS[a].replace(", fidelity", ",\nfidelity").replace(" + ", " +\n")
                                     .replace(" (DA)", "\n(DA)").replace("domain adaptation", "domain\nadaptation")
                                     for a in arms], fontsize=7.5)
    a1.set_ylabel("best validation mIoU (points)")
    a1.set_title("per seed (grey: one seed's arms) and mean ± std", fontsize=10)
    a1.grid(alpha=0.3, axis="y")

    for k, c in enumerate(comps):
        b = c["best"]
        lo, hi = (b["low"], b["high"]) if b["low"] is not None else (b["mean"], b["mean"])
        a2.plot([lo, hi], [k, k], "-", color="k", lw=2)
        a2.plot(b["mean"], k, "o", color=COLOURS[c["b"]], ms=8)
        a2.scatter(b["differences"], [k + 0.15] * len(b["differences"]), color="0.5", s=10)
        target = TARGET_LINES.get(c["name"])
        if c["target"] and target:
            a2.plot([target, target], [k - 0.35, k + 0.35], "--", color="r", lw=1.2)
    a2.axvline(0, color="0.3", lw=0.8)
    a2.set_yticks(range(len(comps)), [c["name"].replace(" - ", " −\n") for c in comps], fontsize=8)
    a2.invert_yaxis()
    a2.set_xlabel("paired difference of best mIoU (points)")
    a2.set_title("mean, 95 % t-interval, seeds (grey); red: the +5 target", fontsize=10)
    a2.grid(alpha=0.3, axis="x")

    for arm in arms:
        mb = _mean_band(results, arm, lambda r: r["curve"])
        if mb is None:
            continue
        its, mean, lo, hi = mb
        style = "--" if ARMS[arm]["comparison"] == "domain_adaptation" else "-"
        a3.plot(its, [100 * v for v in mean], style, marker="o", color=COLOURS[arm], ms=3, label=LABELS[arm])
        a3.fill_between(its, [100 * v for v in lo], [100 * v for v in hi], color=COLOURS[arm], alpha=0.12, lw=0)
    a3.set_xlabel("iteration")
    a3.set_ylabel("validation mIoU (points)")
    a3.set_title("learning curves: mean over seeds, min-max band (dashed: DA, style b)", fontsize=10)
    a3.grid(alpha=0.3)
    a3.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Does the memory bank help? Synthetic streets, every arm from the same synthetic-pretrained "
                 f"backbone; {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_diagnostics(results: list[dict], path: str) -> None:
    """Why an arm wins or loses: teacher accuracy and confident fraction on unlabeled crops, memory fill, loss
    scales, BatchNorm mismatch and the mIoU after re-estimating it (means over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    diag = lambda key: (lambda r: (r["diagnostics"] or {}).get(key))  # noqa: E731
    panels = [
        (axes[0][0], "teacher pixel accuracy on unlabeled crops", diag("teacher_accuracy"), 100.0, "%"),
        (axes[0][1], "teacher pixels above memory_confidence 0.95", diag("teacher_confident_fraction"), 100.0, "%"),
        (axes[0][2], "memory bank: vectors in all classes", lambda r: r["memory_total"], 1.0, "vectors"),
        (axes[1][1], "val mIoU, BatchNorm statistics re-estimated", diag("val_miou_bn_reestimated"), 100.0, "points"),
        (axes[1][2], "BatchNorm at evaluation: mean |Δmean|/std", diag("bn_mean_shift"), 1.0, ""),
    ]
    for ax, title, get, scale, unit in panels:
        for arm in ARMS:
            mb = _mean_band(results, arm, get)
            if mb is None:
                continue
            its, mean, _, _ = mb
            ax.plot(its, [scale * v for v in mean], "o-", ms=2.5, color=COLOURS[arm], label=LABELS[arm])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no measurements: run with --diagnose", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
    if axes[0][0].lines:
        axes[0][0].legend(fontsize=7)
    ax = axes[1][0]  # loss scales of the method arms (first seed)
    styles = {"loss_sup": "-", "loss_pseudo": "--", "loss_entropy": ":", "loss_contr_l": "-.",
              "loss_contr_u": (0, (1, 3))}
    for arm in ("full", "full_paper", "domain_adaptation"):
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        for key, series in rs[0]["losses"].items():
            pts = [(i, v) for i, v in series if v is not None and v > 0]
            if pts:
                ax.plot(*zip(*pts), linestyle=styles.get(key, "-"), color=COLOURS[arm], lw=1,
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
