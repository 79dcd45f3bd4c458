"""Statistics of the study: per arm mean ± sample standard deviation over seeds, and per comparison the mean paired
difference with its 95 % t-interval.

Paired: the two arms of a comparison ran at the same seeds, and a seed fixes the labeled subset (and every other
random draw of the data), so the difference is taken seed by seed, d_s = b_s − a_s, and the interval is
mean(d) ± t_{0.975, n−1} · sd(d) / √n with the sample standard deviation sd (n − 1 in the denominator). Pairing
removes the part of the seed-to-seed spread that the arms share (an easy labeled subset is easy for both).
"""
from __future__ import annotations

import math
import statistics

from scipy import stats as scipy_stats


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (t_quantile(0.975, 2) = 4.3027)."""
    return float(scipy_stats.t.ppf(p, df))


def describe(values: list[float]) -> dict:
    """n, mean, sample standard deviation (0 for one value), min, max and the values."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": list(values)}


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> dict | None:
    """b − a over the seeds both hold (seed -> value): the per-seed differences, their mean, sample standard
    deviation, the t-interval of the mean at `confidence`, and how many differences are positive. None when no
    seed is shared; with one seed the interval is unbounded (None)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [b[s] - a[s] for s in seeds]
    n = len(d)
    mean = statistics.fmean(d)
    out = {"seeds": seeds, "differences": d, "n": n, "mean": mean, "std": None, "t": None, "half_width": None,
           "low": None, "high": None, "positive": sum(x > 0 for x in d), "confidence": confidence}
    if n > 1:
        sd = statistics.stdev(d)
        t = t_quantile(0.5 + confidence / 2, n - 1)
        half = t * sd / math.sqrt(n)
        out.update(std=sd, t=t, half_width=half, low=mean - half, high=mean + half)
    return out


def format_interval(c: dict | None, unit: str = "") -> str:
    """'+2.00 [−2.97, +6.97]' (mean and interval) or the mean alone when there is no interval."""
    if c is None:
        return "n/a"
    if c["low"] is None:
        return f"{c['mean']:+.2f}{unit} (one seed)"
    return f"{c['mean']:+.2f}{unit} [{c['low']:+.2f}, {c['high']:+.2f}]"
