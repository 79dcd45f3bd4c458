"""Few-class tasks (issue 30): a binary folder dataset runs every part of the method.

Bright objects (class 1) on a dark textured ground (class 0), the top rows ignored: a tiny defect-detection-like
task written as a folder dataset. The method's constants are shrunk so that within six iterations every part acts:
the memory is filled from iteration 0 (teacher predictions of labeled pixels), the contrastive terms with the
selectors from iteration 2, ClassMix on the unlabeled views after the ramp-up, the class-balancing weights once its
histories are full (iteration 1 on: one labeled and two unlabeled slots). An untrained EMA teacher predicts one
class everywhere for many iterations (measured: the memory then holds one class only), so the run starts from the
weights of a short supervised run on the same data, as a run fine-tuned from trained weights would."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import trainSSL
from engine.checkpoint import load_checkpoint, model_state_from
from engine.run import Run
from model.checkpoint_io import load_state_strict
from tests.run_helpers import DEMO, argv_of, single_thread, tiny_sets

SIZE = (40, 60)
IGNORE = 250


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[H,W,3] image and [H,W] label: dark noise (0), three bright boxes (1), the top two rows ignored."""
    h, w = SIZE
    image = rng.integers(0, 90, (h, w, 3))
    label = np.zeros((h, w), np.uint8)
    for _ in range(3):
        y, x, bh, bw = rng.integers(0, h - 12), rng.integers(0, w - 16), rng.integers(8, 14), rng.integers(10, 18)
        image[y:y + bh, x:x + bw] = rng.integers(150, 256, (min(bh, h - y), min(bw, w - x), 3))
        label[y:y + bh, x:x + bw] = 1
    label[:2] = IGNORE
    return image.astype(np.uint8), label


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> str:
    """The config of a two-class folder dataset (4 training, 2 validation pairs)."""
    root = str(tmp_path_factory.mktemp("binary"))
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 2)):
        for kind in ("images", "labels"):
            os.makedirs(os.path.join(root, split, kind))
        for i in range(n):
            image, label = scene(rng)
            Image.fromarray(image).save(os.path.join(root, split, "images", f"{i}.png"))
            Image.fromarray(label).save(os.path.join(root, split, "labels", f"{i}.png"))
    cfg = json.load(open(DEMO))
    cfg.pop("synthetic", None)
    cfg.update(dataset="folder", ignore_label=IGNORE, folder={
        "train_images": "train/images", "train_labels": "train/labels", "val_images": "val/images",
        "val_labels": "val/labels", "class_names": ["ground", "object"]})
    cfg["training"]["data"]["root"] = root
    config = os.path.join(root, "config.json")
    json.dump(cfg, open(config, "w"))
    return config


def test_binary_run_uses_every_part_of_the_method(binary, tmp_path, capsys):
    warm_dir = str(tmp_path / "warm")
    warm = tiny_sets(warm_dir, 15, **{"training.learning_rate": 0.05, "method.use_unlabeled": False,
                                      "method.use_contrastive": False, "seed": 1})
    run_dir = str(tmp_path / "run")
    sets = tiny_sets(run_dir, 6, **{
        "training.learning_rate": 0.05, "seed": 1, "method.ramp_up_iterations": 1, "method.memory_start_offset": 1,
        "method.memory_confidence": 0.0, "method.class_balancing": True, "method.bn_refresh_iterations": 1})
    with single_thread():
        trainSSL.main(argv_of(warm, config=binary))
        run = Run(trainSSL.TRAIN_SSL, argv_of(sets, config=binary))
        path = os.path.join(warm_dir, "checkpoint-iter15.pth")
        load_state_strict(run.student_module, model_state_from(load_checkpoint(path), path), path)
        run._new_teacher()  # the EMA teacher starts as a copy of the student, as in every run
        capsys.readouterr()
        trainSSL.train(run)
    assert run.num_classes == 2 and run.data.class_names == ["ground", "object"]
    counts = run.memory.counts.tolist()
    assert len(counts) == 2 and min(counts) > 0, counts  # vectors of both classes
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    train = {r["iteration"]: r for r in rows if r["kind"] == "train"}
    assert sorted(train) == list(range(6))
    assert all("loss_contr_l" not in train[i] for i in (0, 1))
    assert all(train[i]["loss_contr_l"] > 0 and train[i]["loss_contr_u"] > 0 for i in range(2, 6)), train
    weights = {r["iteration"]: list(r["values"].values()) for r in rows if r["kind"] == "class_weights"}
    assert weights[0] == [1.0, 1.0] and all(weights[i] != [1.0, 1.0] for i in range(2, 6)), weights
    fill = {r["iteration"]: r["values"] for r in rows if r["kind"] == "memory_fill"}
    assert set(fill[5]) == {"ground", "object"}
    out = capsys.readouterr().out
    table = [ln.split() for ln in out.splitlines() if ln.startswith("class ")]
    assert [t[:3] for t in table] == [["class", "0", "ground"], ["class", "1", "object"]], out
    assert any(ln.startswith("mIoU ") for ln in out.splitlines()), out
