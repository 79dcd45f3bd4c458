"""trainSSL.py end to end on a tiny Cityscapes tree, then evaluateSSL.py on its checkpoint."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluateSSL
import trainSSL
from data.cityscapes import list_cityscapes
from tests.fixtures_data import make_cityscapes_tree
from tests.run_helpers import TINY_WIDTH
from engine.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_imagenet.json")


def tiny_overrides(run_dir: str, iterations: int = 12) -> list[str]:
    """The paper config with its constants scaled to a few iterations on a CPU."""
    sets = {
        "backbone.depth": 18, "backbone.pretrained": "none", "backbone.width": TINY_WIDTH,
        "training.batch_size": 2, "training.num_workers": 0, "training.num_iterations": iterations,
        "training.learning_rate": 0.001, "training.data.labeled_samples": 4, "training.data.input_size": "33,49",
        "method.ramp_up_iterations": 4, "method.memory_start_offset": 2, "method.memory_confidence": 0.0,
        "method.bn_refresh_iterations": 2,
        "training.data.split_id_list": -1,  # split 0 is the release's split of all 2975 images
        "utils.checkpoint_dir": run_dir, "utils.run_name": "", "utils.val_per_iter": 5,
        "utils.save_checkpoint_every": 5,
        "utils.save_latest_every": 5, "utils.log_every": 1, "utils.curves": False,
    }
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


@pytest.fixture(scope="module")
def city_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("CityScapes"))
    make_cityscapes_tree(root, n_train=10, n_val=2, size=(70, 100))
    return root


@pytest.fixture(scope="module")
def trained(city_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    result = trainSSL.main(["--config", CONFIG, "--data-root", city_root, "--device", "cpu"] + tiny_overrides(run_dir))
    return run_dir, result


def test_every_phase_ran(trained):
    run_dir, result = trained
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    train_rows = {r["iteration"]: r for r in rows if r["kind"] == "train"}
    assert sorted(train_rows) == list(range(12))
    R = 4
    for i, row in train_rows.items():
        has_contrastive = "loss_contr_l" in row and "loss_contr_u" in row
        assert has_contrastive == (i > R), i
        if i > R + 1:  # the memory holds vectors from earlier iterations by then
            assert row["loss_contr_l"] > 0 and row["loss_contr_u"] > 0, row
        if i <= R + 1:
            # later the class-balancing weights take over; on this tiny tree more than half of the 19 classes are
            # never seen, so the released median rule gives the seen classes weight 0 (faithfully)
            assert row["loss_sup"] > 0 and row["loss_pseudo"] > 0
    assert {r["kind"] for r in rows} >= {"val", "val_bn_refresh"}
    latest = load_checkpoint(os.path.join(run_dir, "latest.pth"))
    assert latest["iteration"] == 12
    counts = latest["memory"]["counts"]
    assert counts.sum() > 0 and counts.max() <= 256
    for name in ("best_model.pth", "checkpoint-iter12.pth", "latest.pth", "config.json", "train_split.txt",
                 "evaluation.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert not any(n.startswith("checkpoint-iter5") for n in os.listdir(run_dir))  # replaced by iter10
    assert os.path.isfile(os.path.join(run_dir, "checkpoint-iter10.pth"))
    report = json.load(open(os.path.join(run_dir, "evaluation.json")))
    # the best of the run's evaluations (periodic, final, after the BatchNorm refresh), as logged
    evaluated = [r["miou"] for r in rows if r["kind"] in ("val", "val_bn_refresh")]
    assert len(report["iou"]) == 19 and report["best_miou"] == pytest.approx(max(evaluated), rel=1e-12)
    assert len(open(os.path.join(run_dir, "train_split.txt")).read().split()) == 4


def test_memory_holds_only_classes_seen_in_labeled_images(trained, city_root):
    """The memory is filled from labeled pixels whose label the teacher predicts: its classes are among those
    of the labeled images' labels (train ids by hand: the fixture writes road 7 -> 0, sidewalk 8 -> 1, building
    11 -> 2, pole 17 -> 5, vegetation 21 -> 8, sky 23 -> 10, person 24 -> 11, car 26 -> 13), never one of the
    other 11 train ids, which an untrained network predicts as readily."""
    run_dir, _ = trained
    counts = load_checkpoint(os.path.join(run_dir, "latest.pth"))["memory"]["counts"]
    labeled = open(os.path.join(run_dir, "train_split.txt")).read().split()
    names, _, label_paths = list_cityscapes(city_root, "train")
    assert len(labeled) == 4 and set(labeled) <= set(names)
    ids = set()
    for name, path in zip(names, label_paths):
        if name in labeled:
            ids |= set(np.unique(np.asarray(Image.open(path))).tolist())
    by_hand = {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13}
    in_labels = {by_hand[i] for i in ids if i in by_hand}
    assert ids <= {0, 1, 255} | set(by_hand) and in_labels
    in_memory = {c for c in range(19) if counts[c] > 0}
    assert in_memory and in_memory <= in_labels, (in_memory, in_labels)
    assert counts.shape == (19,) and int(counts.max()) <= 256


def test_evaluate_checkpoint(trained, city_root, tmp_path, capsys):
    run_dir, _ = trained
    ckpt = os.path.join(run_dir, "best_model.pth")
    report = evaluateSSL.main(["--model-path", ckpt, "--data-root", city_root, "--device", "cpu",
                               "--save-output-images", str(tmp_path / "pred")])
    out = capsys.readouterr().out
    assert "mIoU" in out and "road" in out
    saved = json.load(open(os.path.join(run_dir, "best_model_evaluation.json")))
    assert saved["miou"] == pytest.approx(report["miou"]) and len(saved["iou"]) == 19
    # under each image's relative path (<city>/<name>.png), so images of the same name in two folders both get theirs
    assert len([n for _, _, files in os.walk(tmp_path / "pred") for n in files if n.endswith(".png")]) >= 2


def test_released_checkpoint_format_evaluates(trained, city_root, tmp_path):
    """A checkpoint of the original release: {'model', 'config', 'optimizer', 'iteration'} with its plain config."""
    run_dir, _ = trained
    ours = load_checkpoint(os.path.join(run_dir, "best_model.pth"))
    released_cfg = json.load(open(CONFIG))
    released_cfg["training"]["data"]["input_size"] = "33,49"
    # the release had only ResNet-101 (no backbone keys); our tiny model needs them
    released_cfg["backbone"] = {"depth": 18, "width": TINY_WIDTH, "pretrained": "none"}
    path = str(tmp_path / "released.pth")
    torch.save({"model": ours["model"], "config": released_cfg, "optimizer": {}, "iteration": 7}, path)
    report = evaluateSSL.main(["--model-path", path, "--data-root", city_root, "--device", "cpu"])
    # the same weights as best_model.pth: the mIoU the run measured for them
    assert report["miou"] == pytest.approx(ours["miou"], rel=1e-9) and report["iteration"] == 7


def test_missing_dataset_stops_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        from engine.entry import main_guard
        main_guard(lambda: trainSSL.main(["--config", CONFIG, "--data-root", str(tmp_path / "nowhere"),
                                          "--device", "cpu"] + tiny_overrides(str(run_dir))))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "leftImg8bit" in err and "Traceback" not in err
    assert os.listdir(run_dir) == ["keep.txt"] and (run_dir / "keep.txt").read_text() == "precious"
