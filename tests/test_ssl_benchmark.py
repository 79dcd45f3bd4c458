"""benchmarks/ssl_synthetic.py (the study: protocol, runner, report) and benchmarks/ssl_diagnostics.py: the smoke mode
end to end (6 arms x 3 iterations, in this process, from a tiny synthetic-pretrained backbone in a temporary
TORCH_HOME), one arm through a subprocess, the plan of the study, the run-length rule, and measurements that leave
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
from benchmarks import ssl_protocol as protocol
from benchmarks import ssl_report as report
from benchmarks import ssl_synthetic as bench
from benchmarks.ssl_runner import finished
from engine.config import config_diff


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A temporary TORCH_HOME for the module: the smoke runs build their tiny backbone there, never in the real
    cache."""
    home = str(tmp_path_factory.mktemp("torch_home"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", home)
        yield os.path.join(home, "hub", "checkpoints")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, hub):
    out = str(tmp_path_factory.mktemp("ssl_bench"))
    result = bench.main(["--smoke", "--in-process", "--diagnose", "--out", out])
    return out, result


def test_smoke_outputs(smoke, hub):
    out, result = smoke
    with open(os.path.join(out, "ssl_synthetic.json")) as f:
        text = f.read()
    stored = json.loads(text)
    assert len(text.splitlines()) < 80  # compact: one line per top-level key, per run, per comparison
    assert stored["mode"] == "smoke" and stored["iterations"] == 3 and stored["val_every"] == 2
    assert sorted(r["arm"] for r in stored["runs"]) == sorted(protocol.ARMS)
    # every arm started from the one backbone the study built first (a tiny one here, in the temporary TORCH_HOME)
    assert os.path.dirname(stored["backbone"]["path"]) == hub
    assert stored["backbone"]["spec"] == "synthetic-c-v3-resnet18-w8-RGB-seed0-it2"
    runs = {r["arm"]: r for r in result["runs"]}
    for r in result["runs"]:
        assert stored["backbone"]["path"] in open(os.path.join(r["run_dir"], "stdout.txt")).read()
        with open(os.path.join(r["run_dir"], "evaluation.json")) as f:
            assert json.load(f)["best_miou"] == pytest.approx(r["best_miou"])
        assert 0.0 <= r["best_miou"] <= 1.0
        assert not any(name.endswith(".pth") for name in os.listdir(r["run_dir"]))  # checkpoints removed
        # learning curve: the periodic evaluation at 2 and the final one at N = 3
        assert [it for it, _ in r["curve"]] == [2, 3] and r["last_miou"] == r["curve"][-1][1]
        d = r["diagnostics_final"]
        assert d["teacher_accuracy"][0] == 3 and 0.0 <= d["teacher_accuracy"][1] <= 1.0
        assert set(d["memory_fill_per_class"]) == set(d["memory_candidates_per_class"]) and \
            len(d["memory_fill_per_class"]) == 8
        assert r["cpu_seconds"] > 0 and r["diagnosed"]
        assert len(r["memory_fill_final"]) == len(r["class_iou_final"]) == 8  # per class at the end
    # the method arms carry their unlabeled terms, the baselines do not
    assert runs["full"]["loss_share"]["loss_pseudo"] >= 0 and "loss_pseudo" not in runs["supervised"]["loss_share"]
    assert "loss_pseudo" in runs["domain_adaptation"]["loss_share"]
    assert "loss_pseudo" not in runs["source_only"]["loss_share"]
    assert sum(runs["full"]["loss_share"].values()) == pytest.approx(1.0)
    # one summary row per arm, in points, n = 1 seed; the four comparisons of one seed each
    assert [(s["arm"], s["n"]) for s in stored["summary"]] == [(a, 1) for a in protocol.ARMS]
    for s in stored["summary"]:
        assert s["mean"] == pytest.approx(100 * runs[s["arm"]]["best_miou"])
    assert [c["name"] for c in stored["comparisons"]] == [p["name"] for p in protocol.PAIRS]
    full_sup = stored["comparisons"][0]["best"]
    assert full_sup["differences"] == [pytest.approx(100 * (runs["full"]["best_miou"] - runs["supervised"]["best_miou"]))]
    for name in ("ssl_study.png", "ssl_study_diagnostics.png"):
        img = Image.open(os.path.join(out, name))
        assert img.format == "PNG" and img.size[0] > 600
    # true times at the top: the training sessions' wall time and the runs' CPU seconds
    (session,) = stored["sessions"]
    assert stored["wall_seconds"] == session["wall_seconds"] > 0 and session["runs_trained"] == 6
    assert stored["diagnose"] and stored["cpu_seconds"] == pytest.approx(
        sum(r["cpu_seconds"] for r in stored["runs"]), abs=0.5)
    # --report rebuilds the same tables from the finished runs without training, and keeps the sessions' times
    again = bench.main(["--smoke", "--report", "--diagnose", "--out", out])
    assert [(s["arm"], s["mean"]) for s in again["summary"]] == [(s["arm"], s["mean"]) for s in stored["summary"]]
    assert again["sessions"] == stored["sessions"] and again["wall_seconds"] == stored["wall_seconds"]
    with open(os.path.join(out, "ssl_synthetic.json")) as f:
        text = f.read()
    assert json.loads(text) == json.loads(json.dumps(again))  # what --report returns is what it wrote
    # compact: lists of numbers on one line (no line holds a number alone), one key per line
    assert not [ln for ln in text.splitlines() if ln.strip().rstrip(",").replace(".", "").replace("-", "").isdigit()]


def test_arms_differ_only_in_documented_keys(smoke):
    _, result = smoke
    cfgs = {}
    for r in result["runs"]:
        with open(os.path.join(r["run_dir"], "config.json")) as f:
            cfgs[r["arm"]] = json.load(f)
    ignore = ("utils.checkpoint_dir",)
    assert config_diff(cfgs["supervised"], cfgs["pseudo_classmix"], ignore=ignore) == \
        ["method.use_unlabeled: false -> true"]
    assert config_diff(cfgs["pseudo_classmix"], cfgs["full"], ignore=ignore) == \
        ["method.use_contrastive: false -> true"]
    assert config_diff(cfgs["full"], cfgs["full_paper"], ignore=ignore) == ['fidelity: "code" -> "paper"']
    assert config_diff(cfgs["source_only"], cfgs["domain_adaptation"], ignore=ignore) == \
        ["method.use_contrastive: false -> true", "method.use_unlabeled: false -> true"]
    # the two comparisons differ in the target style and the domain-adaptation schedule only
    assert config_diff(cfgs["full"], cfgs["domain_adaptation"], ignore=ignore) == \
        ['method.da_source_schedule: null -> "alternate"', 'synthetic.style: "a" -> "b"']
    assert {r["script"] for r in result["runs"] if r["comparison"] == "domain_adaptation"} == \
        {"trainSSL_domain_adaptation_targetCity.py"}
    # every arm from the same synthetic-pretrained backbone
    assert {json.dumps(c["backbone"], sort_keys=True) for c in cfgs.values()} == {json.dumps(
        {"depth": 18, "width": 8, "pretrained": "synthetic", "synthetic_iterations": 2, "synthetic_seed": 0},
        sort_keys=True)}
    # the scaled run-length constants reached the runs: 3 iterations -> max(1, round(3 * 2000 / 150000)) = 1
    m = cfgs["full"]["method"]
    assert m["ramp_up_iterations"] == 1 and m["memory_start_offset"] == 1 and m["bn_refresh_iterations"] == 1
    # the method constants are the released defaults (never tuned by the study)
    assert (m["pseudo_label_power"], m["memory_confidence"], m["unlabeled_classmix_prob"], m["entropy_weight"],
            m["contrastive_weight"], m["labeled_classmix_prob"], m["memory_size"]) == \
        (6, 0.95, 0.75, 0.01, None, None, 256)


def test_one_arm_through_a_subprocess(tmp_path, hub):
    """Without --diagnose: the training script itself in a subprocess, its CPU time measured (os.wait4)."""
    result = bench.main(["--smoke", "--arms", "source_only", "--out", str(tmp_path)])
    (run,) = result["runs"]
    assert run["arm"] == "source_only" and not run["cached"] and run["wall_seconds"] > 0
    assert not os.path.exists(os.path.join(run["run_dir"], "diagnostics.jsonl")) and not run["diagnosed"]
    with open(os.path.join(run["run_dir"], "run_time.json")) as f:
        timing = json.load(f)
    # the child's own CPU time: more than this process spent meanwhile, less than wall time x threads (1) + slack
    assert 0.5 < timing["cpu_seconds"] == run["cpu_seconds"] <= 1.1 * timing["wall_seconds"] + 1
    assert result["cpu_seconds"] == run["cpu_seconds"] and result["sessions"][0]["load_samples"]
    with open(os.path.join(run["run_dir"], "config.json")) as f:
        assert json.load(f)["backbone"]["width"] == 8          # the smoke network reached the script
    assert "trainSSL_domain_adaptation_targetCity" in open(os.path.join(run["run_dir"], "stdout.txt")).read()
    again = bench.main(["--smoke", "--arms", "source_only", "--out", str(tmp_path)])  # finished: not rerun
    assert again["runs"][0]["cached"] and again["runs"][0]["best_miou"] == run["best_miou"]
    assert again["runs"][0]["cpu_seconds"] == run["cpu_seconds"]         # read back from run_time.json
    # asked for the measurements, the finished run without them counts as not finished (it is run again)
    (planned,) = protocol.plan({**protocol.mode_settings("smoke"), "sets": {}}, str(tmp_path), ["source_only"],
                               protocol.MODES["smoke"]["sets"])
    config = protocol.BASE_CONFIG
    assert finished(planned, config) and not finished(planned, config, diagnose=True)


def test_the_study_plan():
    # 1000 / 150000 of the released 2000 / 1000 / 1000
    assert protocol.scaled_run_length(1000) == {"method.ramp_up_iterations": 13, "method.memory_start_offset": 7,
                                                "method.bn_refresh_iterations": 7}
    assert protocol.scaled_run_length(150000) == protocol.RELEASED_RUN_LENGTH
    runs = protocol.plan(protocol.mode_settings("full", iterations=1000), "/tmp/x")
    # 4 semi-supervised arms x 5 seeds + the domain-adaptation pair x 3 seeds, each in its own directory
    assert len(runs) == 4 * 5 + 2 * 3 == len({r["run_dir"] for r in runs})
    da_arms = ("source_only", "domain_adaptation")
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in protocol.ARMS for s in (1, 2, 3, 4, 5)
                                                     if a not in da_arms or s <= 3}
    for r in runs:  # the DA pair adapts style a to style b with alternating source batches; the rest is style a
        da = r["arm"] in da_arms
        assert r["script"] == ("trainSSL_domain_adaptation_targetCity.py" if da else "trainSSL.py")
        assert r["sets"]["synthetic.style"] == ("b" if da else "a")
        assert r["sets"].get("method.da_source_schedule") == ("alternate" if da else None)
        assert r["sets"]["fidelity"] == ("paper" if r["arm"] == "full_paper" else "code")
        assert r["sets"]["utils.val_per_iter"] == 250 and r["run_dir"].endswith(f"_N1000_seed{r['seed']}")
    with open(protocol.BASE_CONFIG) as f:
        base = json.load(f)
    assert base["training"]["data"]["labeled_samples"] * 10 == base["synthetic"]["num_train"]  # 1/10 labeled
    assert base["training"]["data"]["split_id_list"] not in (0, 1, 2)  # the seed draws the labeled subset
    assert base["backbone"]["pretrained"] == "synthetic"                # every arm from the same backbone
    longer = protocol.plan(protocol.mode_settings("quick", iterations=600, seeds=[4, 5]), "/tmp/x", ["full"])
    assert [(r["seed"], r["sets"]["training.num_iterations"], r["sets"]["method.ramp_up_iterations"])
            for r in longer] == [(4, 600, 8), (5, 600, 8)]


def test_the_run_length_rule():
    rule = {**protocol.RUN_LENGTH_RULE, "start": 250, "cap": 1000, "min_gain_points": 1.0}
    assert protocol.rule_decision(250, 0.99, rule)[0] == 250      # doubling 250 gained less than a point: 250
    assert protocol.rule_decision(250, 1.0, rule) == (None, "")   # a point or more: double
    assert protocol.rule_decision(500, 0.2, rule)[0] == 500
    assert protocol.rule_decision(500, 3.0, rule)[0] == 1000      # 1000 is the cap: taken without measuring 2000
    assert "cap reached" in protocol.rule_decision(500, 3.0, rule)[1]
    # the pre-registered rule and the run length it fixed (docs/benchmarks.md, "Study protocol")
    assert protocol.RUN_LENGTH_RULE["seeds"] == [1, 2] and protocol.RUN_LENGTH_RULE["arm"] == "supervised"


def test_summary_in_points_by_hand():
    def res(arm, seed, best):
        return {"arm": arm, "seed": seed, "best_miou": best, "last_miou": best - 0.01, "memory_fill_final": None,
                "loss_share": None, "diagnostics": None, "class_iou_final": None, "cpu_seconds": 60.0,
                "wall_seconds": 100.0}
    rows = report.summarize([res("supervised", 1, 0.50), res("supervised", 2, 0.52), res("supervised", 3, 0.54),
                             res("full", 1, 0.565)])
    sup, full = rows
    assert sup["arm"] == "supervised" and sup["mean"] == pytest.approx(52.0) and sup["std"] == pytest.approx(2.0)
    assert sup["last_mean"] == pytest.approx(51.0) and sup["min"] == pytest.approx(50.0) and sup["n"] == 3
    assert full["n"] == 1 and full["std"] == 0.0
    table = report.format_table(rows)
    assert "| supervised only | trainSSL.py, style a | 52.00 ± 2.00 | 50.00 – 54.00 | 51.00 ± 2.00 | 3 | 1.0 |" in table
    assert "| 56.50 |" in table  # one seed: no spread shown
    assert report.loss_share({"loss_sup": [[1, 9.0], [5, 3.0]], "loss_pseudo": [[5, 1.0]]}, after=2) == \
        {"loss_sup": 0.75, "loss_pseudo": 0.25}  # after R = 2: iteration 5 only


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
    sets = {"backbone.width": TINY_WIDTH, "backbone.pretrained": "none", "synthetic.num_train": 10,
            "synthetic.num_val": 2, "synthetic.image_size": "40,64",
            "training.data.input_size": "32,48", "training.data.labeled_samples": 4, "training.num_iterations": 4,
            "utils.val_per_iter": 2, "utils.log_every": 1, "utils.curves": False, "method.ramp_up_iterations": 1,
            "method.memory_start_offset": 1, "method.memory_confidence": 0.0, "method.bn_refresh_iterations": 1,
            "utils.checkpoint_dir": run_dir, "utils.run_name": ""}
    return ["--config", protocol.BASE_CONFIG, "--device", "cpu"] + protocol.set_args(sets)


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


def test_a_failed_run_is_reported_after_the_others(tmp_path, hub):
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
