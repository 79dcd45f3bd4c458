"""benchmarks/ssl_synthetic.py: a smoke run of the driver (3 arms x 3 iterations) and its bookkeeping."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from benchmarks import ssl_synthetic as bench
from utils.config import config_diff


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ssl_bench"))
    report = bench.main(["--smoke", "--out", out, "--jobs", "3"])
    return out, report


def test_smoke_outputs(smoke):
    out, report = smoke
    with open(os.path.join(out, "ssl_synthetic.json")) as f:
        stored = json.load(f)
    assert stored["mode"] == "smoke" and stored["iterations"] == 3
    assert sorted(r["arm"] for r in stored["runs"]) == sorted(bench.ARMS)
    for r in stored["runs"]:
        with open(os.path.join(r["run_dir"], "evaluation.json")) as f:
            assert json.load(f)["best_miou"] == pytest.approx(r["best_miou"])
        assert 0.0 <= r["best_miou"] <= 1.0
        assert not any(name.endswith(".pth") for name in os.listdir(r["run_dir"]))  # checkpoints removed
    # one summary row per arm (one label count), in points, with n = 1 seed
    assert [(s["arm"], s["labels"], s["n"]) for s in stored["summary"]] == [(a, 4, 1) for a in bench.ARMS]
    for s, r in zip(stored["summary"], stored["runs"]):
        assert s["mean"] == pytest.approx(100 * [x for x in stored["runs"] if x["arm"] == s["arm"]][0]["best_miou"])
    assert set(stored["target"]) >= {"full_minus_supervised", "met"}
    img = Image.open(os.path.join(out, "ssl_synthetic.png"))
    assert img.size == (640, 420) and img.format == "PNG"
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    for colour in bench.COLOURS.values():  # every arm is drawn
        assert (pixels == np.array(colour)).all(axis=1).any(), colour


def test_arms_differ_only_in_documented_keys(smoke):
    _, report = smoke
    cfgs = {}
    for r in report["runs"]:
        with open(os.path.join(r["run_dir"], "config.json")) as f:
            cfgs[r["arm"]] = json.load(f)
    ignore = ("utils.checkpoint_dir",)
    assert config_diff(cfgs["supervised"], cfgs["pseudo_classmix"], ignore=ignore) == \
        ["method.use_unlabeled: false -> true"]
    assert config_diff(cfgs["pseudo_classmix"], cfgs["full"], ignore=ignore) == \
        ["method.use_contrastive: false -> true"]
    assert report["arm_set_args"]["supervised"] == ["--set", "method.use_unlabeled=false",
                                                    "--set", "method.use_contrastive=false"]
    # the scaled run-length constants reached the runs: 3 iterations -> max(1, round(3 * 2000 / 150000)) = 1
    assert cfgs["full"]["method"]["ramp_up_iterations"] == 1
    assert cfgs["full"]["method"]["memory_start_offset"] == 1
    # the method constants are the released defaults (never tuned by the benchmark)
    m = cfgs["full"]["method"]
    assert (m["pseudo_label_power"], m["memory_confidence"], m["unlabeled_classmix_prob"], m["entropy_weight"],
            m["contrastive_weight"], m["labeled_classmix_prob"]) == (6, 0.95, 0.75, 0.01, None, None)


def test_scaled_run_length():
    # 300 / 150000 of the released 2000 / 1000 / 1000
    assert bench.scaled_run_length(300) == {"method.ramp_up_iterations": 4, "method.memory_start_offset": 2,
                                            "method.bn_refresh_iterations": 2}
    assert bench.scaled_run_length(150000) == bench.RELEASED_RUN_LENGTH


def test_plan_full_mode():
    runs = bench.plan("full", "/tmp/x")
    m = bench.MODES["full"]
    assert len(runs) == 3 * len(m["labels"]) * len(m["seeds"]) and len(m["labels"]) >= 2 and len(m["seeds"]) >= 2
    assert len({r["run_dir"] for r in runs}) == len(runs)
    assert all(r["run_dir"].startswith("/tmp/x/") for r in runs)


def test_summary_and_target():
    res = [{"arm": a, "labels": L, "seed": s, "best_miou": v}
           for a, L, s, v in [("supervised", 5, 1, 0.20), ("supervised", 5, 2, 0.22),
                              ("pseudo_classmix", 5, 1, 0.25), ("pseudo_classmix", 5, 2, 0.27),
                              ("full", 5, 1, 0.24), ("full", 5, 2, 0.25),
                              ("supervised", 20, 1, 0.40), ("pseudo_classmix", 20, 1, 0.41), ("full", 20, 1, 0.42)]]
    rows = bench.summarize(res)
    sup5 = [r for r in rows if r["arm"] == "supervised" and r["labels"] == 5][0]
    assert sup5["mean"] == pytest.approx(21.0) and sup5["std"] == pytest.approx(2 ** 0.5)  # stdev(20, 22)
    t = bench.target_check(rows)
    # full 24.5 - supervised 21 = 3.5 >= 3; full - pseudo 26 = -1.5, spread max(0.707, 1.414) = 1.414 -> worse
    assert t["labels"] == 5 and t["full_minus_supervised"] == pytest.approx(3.5)
    assert t["beats_supervised_by_3"] and not t["not_worse_than_pseudo_classmix"] and not t["met"]
