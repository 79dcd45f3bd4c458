"""benchmarks/paired_stats.py and the study's comparisons (benchmarks/ssl_report.py): worked by hand on small tables."""
import math

import pytest

from benchmarks.paired_stats import describe, format_interval, paired_difference, t_quantile
from benchmarks.ssl_report import comparisons, target_met


def test_t_quantiles_from_the_table():
    # Student's t, two-sided 95 %: the printed table's values
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)


def test_paired_difference_by_hand():
    # arm a and arm b at seeds 1, 2, 3 (a seed 4 only in a: not paired, left out); differences b - a = 1, 2, 3
    a = {1: 50.0, 2: 60.0, 3: 55.0, 4: 70.0}
    b = {1: 51.0, 2: 62.0, 3: 58.0}
    c = paired_difference(a, b)
    assert c["seeds"] == [1, 2, 3] and c["differences"] == [1.0, 2.0, 3.0] and c["n"] == 3
    # mean 2; sample sd sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1; interval 2 +- 4.3027 * 1 / sqrt(3) = 2 +- 2.4842
    assert c["mean"] == pytest.approx(2.0) and c["std"] == pytest.approx(1.0)
    assert c["half_width"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert c["low"] == pytest.approx(-0.4842, abs=1e-4) and c["high"] == pytest.approx(4.4842, abs=1e-4)
    assert c["positive"] == 3
    assert format_interval(c) == "+2.00 [-0.48, +4.48]"
    # the unpaired view would see the arms' spreads (sd 5 and 5.57) instead of the differences' (1)
    assert describe([50.0, 60.0, 55.0])["std"] == pytest.approx(5.0)


def test_one_seed_has_no_interval_and_no_common_seed_no_comparison():
    c = paired_difference({1: 50.0}, {1: 53.5})
    assert c["mean"] == pytest.approx(3.5) and c["low"] is None and format_interval(c) == "+3.50 (one seed)"
    assert paired_difference({1: 50.0}, {2: 50.0}) is None


def _result(arm, seed, best, last=None):
    return {"arm": arm, "seed": seed, "best_miou": best / 100, "last_miou": (last or best) / 100}


def test_comparisons_and_targets_by_hand():
    # supervised 50, 52, 54; pseudo-labels + ClassMix 56, 57, 58; full 57, 58, 60 (seeds 1, 2, 3)
    results = [_result("supervised", s, v) for s, v in zip((1, 2, 3), (50, 52, 54))]
    results += [_result("pseudo_classmix", s, v) for s, v in zip((1, 2, 3), (56, 57, 58))]
    results += [_result("full", s, v) for s, v in zip((1, 2, 3), (57, 58, 60))]
    results += [_result("source_only", s, v) for s, v in zip((1, 2, 3), (40, 41, 42))]
    results += [_result("domain_adaptation", s, v) for s, v in zip((1, 2, 3), (41, 40.5, 45))]
    by = {c["name"]: c for c in comparisons(results)}
    assert "full_paper - full" not in by  # no full_paper runs: no comparison
    # full - supervised: 7, 6, 6 -> mean 6.333 >= 5: met
    fs = by["full - supervised"]
    assert fs["best"]["differences"] == pytest.approx([7, 6, 6]) and fs["met"] is True
    # full - pseudo_classmix: 1, 1, 2 -> mean 1.333, sd 0.5774, half 4.3027 * 0.5774 / sqrt(3) = 1.4343:
    # interval [-0.10, 2.77] contains 0: not met
    fp = by["full - pseudo_classmix"]
    assert fp["best"]["half_width"] == pytest.approx(4.3027 * math.sqrt(1 / 3) / math.sqrt(3), abs=1e-4)
    assert fp["best"]["low"] == pytest.approx(4 / 3 - 1.4343, abs=1e-3) and fp["met"] is False
    # domain adaptation - source only: +1, -0.5, +3: not positive at every seed
    assert by["domain_adaptation - source_only"]["best"]["positive"] == 2
    assert by["domain_adaptation - source_only"]["met"] is False
    # the interval target is met when the lower end is above 0; the DA target needs three positive seeds
    pair = {"target": "95 % interval above 0"}
    assert target_met(pair, {"low": 0.01}) is True and target_met(pair, {"low": None}) is False
    three = {"target": "positive at every seed (3)"}
    assert target_met(three, {"n": 3, "positive": 3}) and not target_met(three, {"n": 2, "positive": 2})
    assert target_met({"target": None}, {}) is None
