"""What a new user and a hostile environment get wrong (issue 31), each answered by one message that names the thing
and the fix instead of a traceback or a silent wrong result: the config values checked at load (every range, NaN and
infinity, the ignore label against every dataset's classes, wrong behaviours 4 and 8), the run directory that
cannot be written (also in --dry-run), the device, the checkpoint given as a folder, output folders, a full disk, and
a data set too small for its batches. One table of cases; each row is (what, how it is provoked, what the message
says)."""
from __future__ import annotations

import errno
import os
import tempfile

import pytest
import torch

import evaluateSSL
import predict
from engine.checkpoint import save_atomic
from engine.cli import choose_device
from engine.run import Run
from tests.run_helpers import DEMO, ROOT, argv_of, tiny_sets
from utils.errors import UserError
from utils.variants import DOMAIN_ADAPTATION, TRAIN_SSL

CITY = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_COCO.json")
VOC = os.path.join(ROOT, "configs", "configSSL_pascal_1_50_split0_COCO.json")

# (the key set on the tiny synthetic run, the value, what the message must say). Every one stops at load, before any
# data or network is built.
CONFIG_CASES = [
    ("training.learning_rate", -0.01, "'training.learning_rate' is -0.01; it must be > 0: a positive learning rate"),
    ("training.learning_rate", "NaN", "'training.learning_rate' is NaN; give a finite number."),
    ("method.entropy_weight", "Infinity", "'method.entropy_weight' is Infinity; give a finite number."),
    ("training.weight_decay", -0.0005, "'training.weight_decay' is -0.0005; it must be >= 0"),
    ("training.momentum", -0.9, "'training.momentum' is -0.9; it must be in [0, 1): SGD momentum"),
    ("training.momentum", 1.0, "'training.momentum' is 1.0; it must be in [0, 1)"),
    ("seed", -1, "'seed' is -1; it must be in [0, 4294967295]"),
    ("seed", 2 ** 32, "'seed' is 4294967296; it must be in [0, 4294967295]"),
    ("training.num_workers", -1, "'training.num_workers' is -1; it must be >= 0"),
    ("method.unlabeled_classmix_prob", 1.5, "'method.unlabeled_classmix_prob' is 1.5; it must be in [0, 1]"),
    ("method.memory_confidence", -0.1, "'method.memory_confidence' is -0.1; it must be in [0, 1]"),
    ("training.data.input_size", "1,1", "'training.data.input_size' is \"1,1\"; training crops must be at least 12,12"),
    ("utils.checkpoint_dir", "", "'utils.checkpoint_dir' is empty; name the folder of the runs"),
    ("utils.run_name", "../elsewhere", "'utils.run_name' is \"../elsewhere\"; give a name"),
    # wrong behaviour 8: no validation image (before: trained logging "mIoU nan", then a TypeError at the end)
    ("synthetic.num_val", 0, "'synthetic.num_val' is 0; it must be >= 1: at least 1 image: without validation"),
    # wrong behaviour 4: an ignore label that is a class id (before: that class ignored in training, still scored)
    ("ignore_label", 0, "'ignore_label' is 0, one of the 8 class ids 0..7 of the synthetic dataset"),
    ("ignore_label", 3, "'ignore_label' is 3, one of the 8 class ids 0..7 of the synthetic dataset"),
    ("ignore_label", 256, "'ignore_label' is 256; it must be in [0, 255]"),
]


@pytest.mark.parametrize("key, value, expected", CONFIG_CASES, ids=[f"{k}={v}" for k, v, _ in CONFIG_CASES])
def test_config_values_are_checked_at_load(tmp_path, monkeypatch, key, value, expected):
    def nothing_built(*args, **kwargs):
        raise AssertionError("data built before the config was checked")

    monkeypatch.setattr("engine.run.build_data", nothing_built)
    with pytest.raises(UserError) as e:
        Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 2, **{key: value})) + ["--dry-run"])
    assert expected in str(e.value) and "config key" in str(e.value)


@pytest.mark.parametrize("config, ignore, classes", [(CITY, 0, "19 class ids 0..18 of the cityscapes"),
                                                     (CITY, 3, "19 class ids 0..18 of the cityscapes"),
                                                     (VOC, 0, "21 class ids 0..20 of the pascal_voc")])
def test_an_ignore_label_inside_the_classes_is_refused_for_every_dataset(tmp_path, config, ignore, classes):
    """Cityscapes and Pascal VOC too (the folder dataset already refused it): before, road (0) ignored in training
    was still scored."""
    argv = ["--config", config, "--dry-run", "--set", f"ignore_label={ignore}",
            "--set", f"utils.checkpoint_dir={tmp_path}"]
    with pytest.raises(UserError, match=f"'ignore_label' is {ignore}, one of the {classes} dataset: that class would "
                                        f"be left out of training but still scored"):
        Run(TRAIN_SSL, argv)


def read_only(monkeypatch, folder: str) -> None:
    """`folder` behaves as on a read-only file system (a file cannot be created there), whoever runs the test."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(folder):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def dry(tmp_path, **sets):
    return lambda: Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 2, **sets)) + ["--dry-run"])


def full_disk(tmp_path, monkeypatch):
    """A checkpoint write that meets a full disk the way torch's zip writer does (measured on a 64 KiB tmpfs:
    "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") over an existing latest.pth."""
    path = tmp_path / "latest.pth"
    torch.save({"iteration": 1}, path)

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save)
    return lambda: save_atomic({"iteration": 2}, str(path))


def rough_cases(tmp_path, monkeypatch):
    """(what, a call that must raise UserError, substrings of its message)."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "photos").mkdir()
    ro = tmp_path / "read_only"
    ro.mkdir()
    read_only(monkeypatch, str(ro))
    return [
        ("--device tpu", lambda: choose_device("tpu"),
         ["--device tpu is not a device this project runs on; use auto, cpu, cuda or cuda:N."]),
        ("--device foo", lambda: choose_device("foo"), ["--device foo is not a device"]),
        ("--device cpu:1", lambda: choose_device("cpu:1"), ["--device cpu:1 is not a device"]),
        ("checkpoint_dir is a file (--dry-run)", dry(tmp_path, **{"utils.checkpoint_dir": str(tmp_path / "a_file")}),
         [f"the run directory {tmp_path / 'a_file'} is a file, not a folder.", "--set utils.checkpoint_dir=PATH"]),
        ("a parent is a file (--dry-run)", dry(tmp_path, **{"utils.checkpoint_dir": str(tmp_path / "a_file" / "x")}),
         [f"cannot create the run directory {tmp_path / 'a_file' / 'x'}: {tmp_path / 'a_file'} is a file"]),
        ("read-only checkpoint_dir (--dry-run)", dry(tmp_path, **{"utils.checkpoint_dir": str(ro)}),
         [f"cannot write the run directory {ro}: Read-only file system."]),
        ("read-only parent (--dry-run)", dry(tmp_path, **{"utils.checkpoint_dir": str(ro / "new")}),
         [f"cannot write {ro}, where the run directory {ro / 'new'} would be made: Read-only file system."]),
        ("--resume a folder", lambda: Run(TRAIN_SSL, argv_of(tiny_sets(str(tmp_path / "run"), 2))
                                          + ["--resume", str(tmp_path)]),
         [f"--resume {tmp_path} is a folder; give its run state ({tmp_path / 'latest.pth'})"]),
        ("--model-path a folder", lambda: evaluateSSL.main(["--model-path", str(tmp_path), "--device", "cpu"]),
         [f"{tmp_path} is a folder, not a checkpoint file; give a .pth file in it"]),
        ("--save-output-images an existing file",
         lambda: evaluateSSL.main(["--model-path", "x.pth", "--save-output-images", str(tmp_path / "a_file")]),
         [f"--save-output-images {tmp_path / 'a_file'} is a file, not a folder. Give a folder you can write"]),
        ("predict.py --out equal to --input",
         lambda: predict.main(["--model-path", "x.pth", "--input", str(tmp_path / "photos"),
                               "--out", str(tmp_path / "photos") + "/"]),
         [f"--out {tmp_path / 'photos'}/ is the --input folder itself", f"{tmp_path / 'photos'}_predictions"]),
        ("a full disk", full_disk(tmp_path, monkeypatch),
         [f"cannot write {tmp_path / 'latest.pth'} (RuntimeError: [enforce fail at inline_container.cc:672] . "
          f"unexpected pos 576 vs 534; ", "MiB free there); the disk is probably full",
          "the previous latest.pth, if there was one, is intact"]),
        ("domain adaptation with one source image",
         lambda: Run(DOMAIN_ADAPTATION, argv_of(tiny_sets(str(tmp_path / "da"), 2, **{"synthetic.num_source": 1}))),
         ["1 source images cannot fill one batch of 2; use more images (synthetic.num_source, or the GTA5 folder)"]),
    ]


def test_rough_edges_end_in_one_message(tmp_path, monkeypatch):
    for what, call, expected in rough_cases(tmp_path, monkeypatch):
        with pytest.raises(UserError) as e:
            call()
        for text in expected:
            assert text in str(e.value), (what, text, str(e.value))
    # the full disk left the previous latest.pth as it was, and no temporary file
    assert torch.load(tmp_path / "latest.pth", weights_only=True) == {"iteration": 1}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_eval_batch_size_is_removed_with_a_message_but_old_checkpoints_load(tmp_path):
    """utils.eval_batch_size never had an effect (evaluation goes one whole image at a time), so it is removed: a
    config file or --set naming it stops with one message naming the key and the fix; a config stored in a checkpoint
    of an earlier version, which holds it, still resolves (resume, evaluation) with the key dropped."""
    import json

    from engine.config import load_config, resolve_config
    config = tmp_path / "old.json"
    raw = json.load(open(DEMO))
    raw["utils"]["eval_batch_size"] = 8
    config.write_text(json.dumps(raw))
    with pytest.raises(UserError) as e:
        load_config(str(config))
    assert "'utils.eval_batch_size' was removed" in str(e.value) and "delete the key" in str(e.value)
    assert str(config) in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(DEMO, ["utils.eval_batch_size=4"])
    assert "--set utils.eval_batch_size=4" in str(e.value) and "was removed" in str(e.value)
    stored = resolve_config(raw, "old.pth (stored config)", stored=True)
    assert "eval_batch_size" not in stored["utils"] and stored == load_config(DEMO)
    assert raw["utils"]["eval_batch_size"] == 8           # the checkpoint's own dict is left as it was


def test_a_validation_set_without_a_labeled_pixel_stops_the_evaluation(tmp_path):
    """Wrong behaviour 8, the evaluation's side: a validation set whose labels are all the ignore label (e.g. a
    dataset folder's) stops the evaluation with a message (before: mIoU nan at every evaluation, then a TypeError)."""
    from engine.evaluation import evaluate

    class AllIgnored(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16), torch.full((16, 16), 250, dtype=torch.int64), f"img{i}"

    model = torch.nn.Conv2d(3, 4, 1)
    with pytest.raises(UserError, match=r"the validation set \(2 images\) has no pixel labeled other than the ignore "
                                        r"label 250: there is nothing to score"):
        evaluate(model, AllIgnored(), num_classes=4, ignore_label=250, mean_rgb=(0, 0, 0), channel_order="RGB",
                 device=torch.device("cpu"))
