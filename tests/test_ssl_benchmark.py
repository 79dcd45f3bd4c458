"""benchmarks/ssl_synthetic.py and benchmarks/ssl_diagnostics.py: the smoke mode end to end (5 arms x 3
iterations, in this process), one arm through a subprocess, the bookkeeping, and measurements that leave
training unchanged."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import trainSSL
from tests.run_helpers import TINY_WIDTH
from benchmarks import ssl_diagnostics as diag
from benchmarks import ssl_synthetic as bench
from engine.config import config_diff


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ssl_bench"))
    report = bench.main(["--smoke", "--in-process", "--diagnose", "--out", out])
    return out, report


def test_smoke_outputs(smoke):
    out, report = smoke
    with open(os.path.join(out, "ssl_synthetic.json")) as f:
        stored = json.load(f)
    assert stored["mode"] == "smoke" and stored["iterations"] == 3 and stored["val_every"] == 2
    assert sorted(r["arm"] for r in stored["runs"]) == sorted(bench.ARMS)
    for r in stored["runs"]:
        with open(os.path.join(r["run_dir"], "evaluation.json")) as f:
            assert json.load(f)["best_miou"] == pytest.approx(r["best_miou"])
        assert 0.0 <= r["best_miou"] <= 1.0
        assert not any(name.endswith(".pth") for name in os.listdir(r["run_dir"]))  # checkpoints removed
        # learning curve: the periodic evaluation at 2 and the final one at N = 3
        assert [it for it, _ in r["curve"]] == [2, 3] and r["last_miou"] == r["curve"][-1][1]
        d = r["diagnostics"]
        assert [it for it, _ in d["teacher_accuracy"]] == [2, 3]
        assert all(0.0 <= v <= 1.0 for _, v in d["teacher_accuracy"] + d["val_miou_bn_reestimated"])
        assert set(d["memory_fill_per_class"]) == set(d["memory_candidates_per_class"]) and \
            len(d["memory_fill_per_class"]) == 8
        assert r["cpu_seconds"] > 0 and "loss_sup" in r["losses"] and r["diagnosed"]
    # the method arms log their unlabeled terms, the baselines do not
    by_arm = {r["arm"]: r for r in stored["runs"]}
    assert "loss_pseudo" in by_arm["full"]["losses"] and "loss_pseudo" not in by_arm["supervised"]["losses"]
    assert "loss_pseudo" in by_arm["domain_adaptation"]["losses"]
    assert "loss_pseudo" not in by_arm["source_only"]["losses"]
    # one summary row per arm, in points, n = 1 seed
    assert [(s["arm"], s["n"]) for s in stored["summary"]] == [(a, 1) for a in bench.ARMS]
    for s in stored["summary"]:
        assert s["mean"] == pytest.approx(100 * by_arm[s["arm"]]["best_miou"])
    assert set(stored["target"]) == {"semi_supervised", "domain_adaptation", "met"}
    for name in ("ssl_synthetic.png", "ssl_synthetic_diagnostics.png"):
        img = Image.open(os.path.join(out, name))
        assert img.format == "PNG" and img.size[0] > 600
    assert stored["diagnose"] and stored["cpu_seconds_total"] == pytest.approx(
        sum(r["cpu_seconds"] for r in stored["runs"]), abs=0.5)
    # --report rebuilds the same table from the finished runs without training
    again = bench.main(["--smoke", "--report", "--diagnose", "--out", out])
    assert [(s["arm"], s["mean"]) for s in again["summary"]] == [(s["arm"], s["mean"]) for s in stored["summary"]]
    # ... and keeps the wall time of the invocation that trained them
    assert stored["training_session"]["runs_trained_now"] == len(stored["runs"]) == 5
    assert again["invocation"]["runs_trained_now"] == 0 and again["training_session"] == stored["training_session"]
    # the top level states the training's times, not the report's
    assert again["runs_trained_now"] == 5 and again["elapsed_seconds"] == stored["elapsed_seconds"] > 0
    assert again["elapsed_seconds"] > again["invocation"]["elapsed_seconds"] and "load_average_at_end" not in again
    with open(os.path.join(out, "ssl_synthetic.json")) as f:
        text = f.read()
    assert json.loads(text) == json.loads(json.dumps(again))
    # compact: lists of numbers on one line (no line holds a number alone), one key per line
    assert not [ln for ln in text.splitlines() if ln.strip().rstrip(",").replace(".", "").replace("-", "").isdigit()]
    assert len(text.splitlines()) < 400
    for r in stored["runs"]:  # per class at the end: memory vectors and IoU (8 classes)
        assert len(r["memory_fill_final"]) == len(r["class_iou_final"]) == 8


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
    assert config_diff(cfgs["source_only"], cfgs["domain_adaptation"], ignore=ignore) == \
        ["method.use_contrastive: false -> true", "method.use_unlabeled: false -> true"]
    # the two comparisons differ in the target style and the domain-adaptation schedule only
    assert config_diff(cfgs["full"], cfgs["domain_adaptation"], ignore=ignore) == \
        ['method.da_source_schedule: null -> "alternate"', 'synthetic.style: "a" -> "b"']
    assert {r["script"] for r in report["runs"] if r["comparison"] == "domain_adaptation"} == \
        {"trainSSL_domain_adaptation_targetCity.py"}
    # the scaled run-length constants reached the runs: 3 iterations -> max(1, round(3 * 2000 / 150000)) = 1
    m = cfgs["full"]["method"]
    assert m["ramp_up_iterations"] == 1 and m["memory_start_offset"] == 1 and m["bn_refresh_iterations"] == 1
    # the method constants are the released defaults (never tuned by the benchmark)
    assert (m["pseudo_label_power"], m["memory_confidence"], m["unlabeled_classmix_prob"], m["entropy_weight"],
            m["contrastive_weight"], m["labeled_classmix_prob"], m["memory_size"]) == \
        (6, 0.95, 0.75, 0.01, None, None, 256)


def test_one_arm_through_a_subprocess(tmp_path):
    """Without --diagnose: the training script itself in a subprocess, its CPU time measured (os.wait4)."""
    report = bench.main(["--smoke", "--arms", "source_only", "--out", str(tmp_path)])
    (run,) = report["runs"]
    assert run["arm"] == "source_only" and not run["cached"] and run["seconds"] > 0
    assert not os.path.exists(os.path.join(run["run_dir"], "diagnostics.jsonl")) and not run["diagnosed"]
    with open(os.path.join(run["run_dir"], "run_time.json")) as f:
        timing = json.load(f)
    # the child's own CPU time: more than this process spent meanwhile, less than wall time x threads (1) + slack
    assert 0.5 < timing["cpu_seconds"] == run["cpu_seconds"] <= 1.1 * timing["wall_seconds"] + 1
    assert report["cpu_seconds_total"] == run["cpu_seconds"] and report["load_samples"]
    with open(os.path.join(run["run_dir"], "config.json")) as f:
        assert json.load(f)["backbone"]["width"] == 32          # the benchmark's network reached the script
    assert "trainSSL_domain_adaptation_targetCity" in open(os.path.join(run["run_dir"], "stdout.txt")).read()
    again = bench.main(["--smoke", "--arms", "source_only", "--out", str(tmp_path)])  # finished: not rerun
    assert again["runs"][0]["cached"] and again["runs"][0]["best_miou"] == run["best_miou"]
    assert again["runs"][0]["cpu_seconds"] == run["cpu_seconds"]         # read back from run_time.json
    # asked for the measurements, the finished run without them counts as not finished (it is run again)
    (planned,) = bench.plan("smoke", str(tmp_path), ["source_only"])
    config = bench.BASE_CONFIG
    assert bench.finished(planned, config) and not bench.finished(planned, config, diagnose=True)


def test_scaled_run_length_and_full_plan():
    # 2000 / 150000 of the released 2000 / 1000 / 1000
    assert bench.scaled_run_length(2000) == {"method.ramp_up_iterations": 27, "method.memory_start_offset": 13,
                                             "method.bn_refresh_iterations": 13}
    assert bench.scaled_run_length(150000) == bench.RELEASED_RUN_LENGTH
    m = bench.MODES["full"]
    assert m["iterations"] >= 10 * 200 and len(set(m["seeds"])) == 3  # 10x the teacher's ~200-iteration window
    runs = bench.plan("full", "/tmp/x")
    assert len(runs) == 3 * 3 + 2 and len({r["run_dir"] for r in runs}) == 11
    da_arms = ("source_only", "domain_adaptation")
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in bench.ARMS for s in (1, 2, 3)
                                                     if a not in da_arms or s == 1}
    for r in runs:  # the DA pair adapts style a to style b with alternating source batches; the rest is style a
        da = r["arm"] in ("source_only", "domain_adaptation")
        assert r["script"] == ("trainSSL_domain_adaptation_targetCity.py" if da else "trainSSL.py")
        assert r["sets"]["synthetic.style"] == ("b" if da else "a")
        assert r["sets"].get("method.da_source_schedule") == ("alternate" if da else None)
    with open(bench.BASE_CONFIG) as f:
        base = json.load(f)
    assert base["training"]["data"]["labeled_samples"] * 10 == base["synthetic"]["num_train"]  # 1/10 labeled
    assert base["training"]["data"]["split_id_list"] not in (0, 1, 2)  # the seed draws the labeled subset
    longer = bench.plan(bench.mode_settings("quick", iterations=600, seeds=[4, 5]), "/tmp/x", ["full"])
    assert [(r["seed"], r["sets"]["training.num_iterations"], r["sets"]["method.ramp_up_iterations"])
            for r in longer] == [(4, 600, 8), (5, 600, 8)]


def test_summary_and_targets():
    def res(arm, seed, best):
        return {"arm": arm, "seed": seed, "best_miou": best, "last_miou": best - 0.01}

    def rows_for(full):
        return bench.summarize(
            [res("supervised", 1, 0.50), res("supervised", 2, 0.52), res("supervised", 3, 0.54),
             res("pseudo_classmix", 1, 0.55), res("pseudo_classmix", 2, 0.56), res("pseudo_classmix", 3, 0.57)]
            + [res("full", k + 1, v) for k, v in enumerate(full)]
            + [res("source_only", 1, 0.30), res("domain_adaptation", 1, 0.35)])
    rows = rows_for([0.565, 0.585, 0.605])
    sup = rows[0]
    assert sup["arm"] == "supervised" and sup["mean"] == pytest.approx(52.0) and sup["std"] == pytest.approx(2.0)
    assert sup["last_mean"] == pytest.approx(51.0)
    t = bench.target_check(rows)
    s = t["semi_supervised"]
    # full 58.5 - supervised 52 = 6.5 >= 5; full - pseudo 56 = 2.5 > max(std 2, std 1) = 2
    assert s["full_minus_supervised"] == pytest.approx(6.5) and s["beats_supervised_by_5"]
    assert s["full_minus_pseudo_classmix"] == pytest.approx(2.5) and s["seed_std"] == pytest.approx(2.0)
    assert s["beats_pseudo_classmix_by_one_std"] and s["met"]
    assert t["domain_adaptation"]["domain_adaptation_minus_source_only"] == pytest.approx(5.0)
    assert t["domain_adaptation"]["met"] and t["met"]
    # full 57.5: 5.5 above supervised, but only 1.5 above pseudo-labels + ClassMix (< seed std 2): missed
    t = bench.target_check(rows_for([0.555, 0.575, 0.595]))
    assert t["semi_supervised"]["beats_supervised_by_5"] and not t["semi_supervised"]["met"] and not t["met"]
    assert "MISSED" in bench.format_targets(t) and "| full |" in bench.format_table(rows)


def test_score_by_hand():
    """Teacher scores on a hand-made case: 2 images of 1x2 pixels, 2 classes, one ignored pixel."""
    probs = torch.tensor([[[[0.99, 0.6]], [[0.01, 0.4]]],          # image 0: class 0 (p .99), class 0 (p .6)
                          [[[0.2, 0.5]], [[0.8, 0.5]]]])           # image 1: class 1 (p .8), tie -> class 0 (p .5)
    labels = torch.tensor([[[0, 1]], [[1, 250]]])
    fake = SimpleNamespace(method={"memory_confidence": 0.95, "pseudo_label_power": 2}, num_classes=2)
    s = diag.DiagnosedRun._score(fake, probs, labels)
    # valid pixels: (0.99 right), (0.6 wrong), (0.8 right)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["mean_confidence"] == pytest.approx((0.99 + 0.6 + 0.8) / 3)
    assert s["confident_fraction"] == pytest.approx(1 / 3) and s["confident_accuracy"] == pytest.approx(1.0)
    w = [0.99 ** 2, 0.6 ** 2, 0.8 ** 2]
    assert s["mean_weight"] == pytest.approx(sum(w) / 3)
    assert s["weighted_accuracy"] == pytest.approx((w[0] + w[2]) / sum(w))
    # IoU class 0: 1 / (1 + 1 false positive) = 0.5; class 1: 1 / (2 labeled) = 0.5
    assert s["miou"] == pytest.approx(0.5)


def _tiny_args(run_dir: str) -> list[str]:
    sets = {"backbone.width": TINY_WIDTH, "synthetic.num_train": 10, "synthetic.num_val": 2, "synthetic.image_size": "40,64",
            "training.data.input_size": "32,48", "training.data.labeled_samples": 4, "training.num_iterations": 4,
            "utils.val_per_iter": 2, "utils.log_every": 1, "utils.curves": False, "method.ramp_up_iterations": 1,
            "method.memory_start_offset": 1, "method.memory_confidence": 0.0, "method.bn_refresh_iterations": 1,
            "utils.checkpoint_dir": run_dir, "utils.run_name": ""}
    return ["--config", bench.BASE_CONFIG, "--device", "cpu"] + bench.set_args(sets)


def test_measurements_leave_training_unchanged(tmp_path):
    """The same run with and without the measurements (after iteration 2 and at the end) logs identical losses,
    memory fill and results: they change no RNG state, BatchNorm buffer, mode or weight."""
    torch.set_num_threads(1)
    plain = trainSSL.main(_tiny_args(str(tmp_path / "plain")))
    measured = diag.run_script("trainSSL.py", _tiny_args(str(tmp_path / "measured")))
    assert trainSSL.Run is diag.Run  # the script's Run is restored afterwards
    rows = {k: diag.read_jsonl(str(tmp_path / k / "train_log.jsonl")) for k in ("plain", "measured")}
    for a, b in zip(rows["plain"], rows["measured"]):
        a, b = dict(a), dict(b)
        a.pop("time", None), b.pop("time", None)
        assert a == b
    assert len(rows["plain"]) == len(rows["measured"]) and any("loss_contr_u" in r for r in rows["plain"])
    assert measured["miou"] == plain["miou"]
    d = diag.read_jsonl(str(tmp_path / "measured" / "diagnostics.jsonl"))
    assert [r["iteration"] for r in d] == [2, 4]
    assert not os.path.exists(tmp_path / "plain" / "diagnostics.jsonl")
    # with memory_confidence 0 every correctly predicted labeled pixel is a candidate; the bank fills
    assert sum(d[-1]["memory_fill"].values()) > 0 and d[-1]["bn"]["layers"]


def test_a_failed_run_is_reported_after_the_others(tmp_path):
    # 2 training images cannot hold 4 labeled ones: both runs fail at set-up; the report names them, then exits
    with pytest.raises(SystemExit, match="2 run"):
        bench.main(["--smoke", "--in-process", "--arms", "supervised", "full", "--set", "synthetic.num_train=2",
                    "--out", str(tmp_path)])
    with open(tmp_path / "ssl_synthetic.json") as f:
        stored = json.load(f)
    assert sorted(r["arm"] for r in stored["failed"]) == ["full", "supervised"] and stored["runs"] == []
    assert "labeled" in stored["failed"][0]["error"]
    with pytest.raises(SystemExit, match="arms set this key"):
        bench.main(["--smoke", "--set", "method.use_contrastive=false", "--out", str(tmp_path)])
