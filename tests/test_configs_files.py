"""The 55 paper configs of SPEC 2: names, format of the original release, and every value read off the name.

Expectations are derived here from each file name through a small table (SPEC 2), independently of however the
files were written.
"""
import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
NAME = re.compile(r"^configSSL_(city|pascal)_(1_\d+)_split([012])_(COCO|imagenet|v3)(_reduced)?\.json$")
# Configs of today's protocols (issue 30): the peers' split files, not paper configs (tests/test_peer_split_files.py)
MODERN = {"configSSL_city_1_16_unimatch_v3.json", "configSSL_pascal_92_unimatch_v3.json"}
ALL_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "configSSL_*.json")))
FILES = [f for f in ALL_FILES if os.path.basename(f) not in MODERN]

# dataset tag -> (dataset key, {fraction: L}, crop, seed, ignore label)
DATASETS = {
    "city": ("cityscapes", {"1_30": 100, "1_8": 372, "1_4": 744}, "512,512", 5555, 250),
    "pascal": ("pascal_voc", {"1_50": 212, "1_20": 530, "1_8": 1323}, "321,321", 7, 255),
}
# (dataset tag, model tag) -> (version, pretraining, batch size, learning rate)
MODELS = {
    ("city", "COCO"): ("2", "COCO", 5, 2e-4),
    ("city", "imagenet"): ("2", "imagenet", 5, 2e-4),
    ("city", "v3"): ("3", "imagenet", 7, 4e-4),
    ("pascal", "COCO"): ("2", "COCO", 14, 2e-4),
    ("pascal", "imagenet"): ("2", "imagenet", 14, 2e-4),
    ("pascal", "v3"): ("3", "imagenet", 20, 2e-4),
}

# The released format: exactly these keys, nothing else.
TOP_KEYS = {"model", "version", "dataset", "training", "seed", "ignore_label", "utils"}
TRAINING_KEYS = {"batch_size", "num_workers", "optimizer", "momentum", "num_iterations", "learning_rate",
                 "lr_schedule", "lr_schedule_power", "pretraining", "weight_decay", "use_teacher_train",
                 "save_teacher_test", "data"}
DATA_KEYS = {"split_id_list", "labeled_samples", "input_size"}
UTILS_KEYS = {"save_checkpoint_every", "checkpoint_dir", "val_per_iter", "save_best_model"}


def expected_from_name(name: str) -> dict:
    """The values SPEC 2 prescribes for the config called `name`."""
    m = NAME.match(name)
    assert m, f"{name} is not a paper config name"
    tag, frac, split, model, reduced = m.groups()
    dataset, fractions, crop, seed, ignore = DATASETS[tag]
    version, pretraining, batch, lr = MODELS[(tag, model)]
    if reduced:
        assert (tag, frac, split, model) == ("pascal", "1_50", "2", "COCO"), name
        batch, crop = 8, "256,256"
    return {"dataset": dataset, "version": version, "pretraining": pretraining, "batch_size": batch,
            "learning_rate": lr, "labeled_samples": fractions[frac], "split": int(split), "crop": crop,
            "seed": seed, "ignore_label": ignore}


def all_expected_names() -> set[str]:
    names = {"configSSL_pascal_1_50_split2_COCO_reduced.json"}
    for tag, (_, fractions, *_rest) in DATASETS.items():
        for frac in fractions:
            for split in range(3):
                for model in ("COCO", "imagenet", "v3"):
                    names.add(f"configSSL_{tag}_{frac}_split{split}_{model}.json")
    return names


def test_exactly_the_55_paper_configs():
    names = {os.path.basename(f) for f in FILES}
    assert len(FILES) == 55
    assert names == all_expected_names()
    assert {os.path.basename(f) for f in ALL_FILES} == all_expected_names() | MODERN  # and nothing else


def test_expected_from_name_examples():
    """Spot checks of the table itself against SPEC 2, written out by hand."""
    assert expected_from_name("configSSL_city_1_8_split1_v3.json") == {
        "dataset": "cityscapes", "version": "3", "pretraining": "imagenet", "batch_size": 7,
        "learning_rate": 4e-4, "labeled_samples": 372, "split": 1, "crop": "512,512", "seed": 5555,
        "ignore_label": 250}
    assert expected_from_name("configSSL_pascal_1_50_split2_COCO_reduced.json") == {
        "dataset": "pascal_voc", "version": "2", "pretraining": "COCO", "batch_size": 8,
        "learning_rate": 2e-4, "labeled_samples": 212, "split": 2, "crop": "256,256", "seed": 7,
        "ignore_label": 255}


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_values(path):
    with open(path) as f:
        text = f.read()
    cfg = json.loads(text)
    exp = expected_from_name(os.path.basename(path))

    # Format of the original release: no missing and no new keys.
    assert set(cfg) == TOP_KEYS
    assert set(cfg["training"]) == TRAINING_KEYS
    assert set(cfg["training"]["data"]) == DATA_KEYS
    assert set(cfg["utils"]) == UTILS_KEYS

    tr, data, ut = cfg["training"], cfg["training"]["data"], cfg["utils"]
    # Values that depend on the name.
    assert cfg["model"] == "DeepLab"
    assert cfg["dataset"] == exp["dataset"]
    assert cfg["version"] == exp["version"] and isinstance(cfg["version"], str)
    assert tr["pretraining"] == exp["pretraining"]
    assert tr["batch_size"] == exp["batch_size"] and type(tr["batch_size"]) is int
    assert tr["learning_rate"] == pytest.approx(exp["learning_rate"], rel=1e-12)
    assert data["labeled_samples"] == exp["labeled_samples"] and type(data["labeled_samples"]) is int
    assert data["split_id_list"] == exp["split"] and type(data["split_id_list"]) is int
    assert data["input_size"] == exp["crop"]
    assert cfg["seed"] == exp["seed"] and type(cfg["seed"]) is int
    assert cfg["ignore_label"] == exp["ignore_label"] and type(cfg["ignore_label"]) is int

    # Values shared by all paper configs.
    assert tr["num_iterations"] == 150000
    assert tr["optimizer"] == "SGD"
    assert tr["momentum"] == pytest.approx(0.9)
    assert tr["weight_decay"] == pytest.approx(5e-4)
    assert tr["lr_schedule"] == "Poly"
    assert tr["lr_schedule_power"] == pytest.approx(0.9)
    assert tr["num_workers"] == 3
    assert tr["use_teacher_train"] is True
    assert tr["save_teacher_test"] is False
    assert ut == {"save_checkpoint_every": 200000, "checkpoint_dir": "../saved/DeepLab", "val_per_iter": 1000,
                  "save_best_model": True}

    # Pretty-printed, 2-space indent, one key per line.
    assert text == json.dumps(cfg, indent=2) + "\n"
