"""Config loading: released files load unchanged, defaults resolve, mistakes are named."""
import json

import pytest

from engine.config import FIDELITY_PRESETS, config_diff, fidelity, load_config, resolve_config, schema_rows
from utils.errors import UserError

RELEASED = {
    "model": "DeepLab", "version": "2", "dataset": "pascal",
    "training": {"batch_size": 14, "num_workers": 3, "optimizer": "SGD", "momentum": 0.9,
                 "num_iterations": 150000, "learning_rate": 2e-4, "lr_schedule": "Poly", "lr_schedule_power": 0.9,
                 "pretraining": "COCO", "weight_decay": 5e-4, "use_teacher_train": True, "save_teacher_test": False,
                 "data": {"split_id_list": 0, "labeled_samples": 212, "input_size": "321,321"}},
    "seed": 7, "ignore_label": 255,
    "utils": {"save_checkpoint_every": 200000, "checkpoint_dir": "../saved/DeepLab", "val_per_iter": 1000,
              "save_best_model": True},
}


def write(tmp_path, cfg):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_released_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, RELEASED))
    assert cfg["dataset"] == "pascal_voc"  # alias
    assert cfg["fidelity"] == "code" and cfg["precision"] == "fp32"
    assert cfg["method"]["ramp_up_iterations"] == 2000 and cfg["method"]["memory_size"] == 256
    assert cfg["method"]["contrastive_weight"] is None  # the script decides (0.1 / 0.2)
    assert cfg["training"]["data"]["labeled_samples"] == 212
    # the release's behaviours (SPEC section 8) by default, the paper's on request, written out by hand
    f = fidelity(cfg)
    assert (f.v2_branches, f.memory_keep, f.memory_weights, f.da_source_schedule, f.entropy_mask_broadcast) == \
        (2, "lowest", "release", "last100_odd", True)
    f = fidelity(resolve_config(RELEASED, overrides=["fidelity=paper"]))
    assert (f.v2_branches, f.memory_keep, f.memory_weights, f.da_source_schedule, f.entropy_mask_broadcast) == \
        (4, "highest", "mean", "alternate", False)
    assert set(FIDELITY_PRESETS) == {"code", "paper"}


def test_unknown_key_names_key_and_file(tmp_path):
    bad = json.loads(json.dumps(RELEASED))
    bad["training"]["bach_size"] = 3
    path = write(tmp_path, bad)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert "training.bach_size" in str(e.value) and path in str(e.value)


def test_wrong_type_and_bad_choice(tmp_path):
    bad = json.loads(json.dumps(RELEASED))
    bad["training"]["batch_size"] = "14"
    with pytest.raises(UserError, match="training.batch_size.*integer"):
        load_config(write(tmp_path, bad))
    bad = json.loads(json.dumps(RELEASED))
    bad["training"]["use_teacher_train"] = 1
    with pytest.raises(UserError, match="use_teacher_train"):
        load_config(write(tmp_path, bad))
    bad = json.loads(json.dumps(RELEASED))
    bad["fidelity"] = "exact"
    with pytest.raises(UserError, match="fidelity.*code"):
        load_config(write(tmp_path, bad))
    bad = json.loads(json.dumps(RELEASED))
    bad["training"]["data"]["input_size"] = "321x321"
    with pytest.raises(UserError, match="input_size"):
        load_config(write(tmp_path, bad))


def test_int_accepted_for_float_but_not_bool():
    cfg = resolve_config({**RELEASED, "training": {**RELEASED["training"], "learning_rate": 1}})
    assert cfg["training"]["learning_rate"] == 1.0 and isinstance(cfg["training"]["learning_rate"], float)


def test_overrides_parse_json_and_refuse_unknown(tmp_path):
    path = write(tmp_path, RELEASED)
    cfg = load_config(path, ["training.batch_size=2", "fidelity=paper", "utils.checkpoint_dir=/tmp/x",
                             "method.contrastive_weight=0.5"])
    assert cfg["training"]["batch_size"] == 2 and cfg["fidelity"] == "paper"
    assert cfg["utils"]["checkpoint_dir"] == "/tmp/x" and cfg["method"]["contrastive_weight"] == 0.5
    assert load_config(path, ["version=3"])["version"] == "3"  # a string key takes the text as written
    with pytest.raises(UserError, match="training.batchsize"):
        load_config(path, ["training.batchsize=2"])
    with pytest.raises(UserError, match="key=value"):
        load_config(path, ["training.batch_size"])


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.json"))
    p = tmp_path / "broken.json"
    p.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(str(p))


def test_config_diff_lists_keys():
    a = resolve_config(RELEASED)
    b = resolve_config(RELEASED, overrides=["training.batch_size=8", "utils.log_every=5"])
    assert config_diff(a, b, ignore=("utils.log_every",)) == ["training.batch_size: 14 -> 8"]


def test_schema_rows_cover_every_key():
    keys = {k for k, _, _ in schema_rows()}
    assert {"training.batch_size", "method.memory_size", "utils.save_latest_every", "fidelity"} <= keys
