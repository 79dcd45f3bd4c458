"""A fully supervised run (every training image labeled, none unlabeled: the paper's upper bound) finishes: its final
BatchNorm refresh draws labeled batches, and it writes evaluation.json; the end of every run prints the memory fill
per class."""
import json
import os

import trainSSL
from engine import batchnorm
from tests.run_helpers import argv_of, single_thread, tiny_sets


def test_every_image_labeled_run_finishes_with_its_evaluation(tmp_path, capsys, monkeypatch):
    drawn = []
    refresh = batchnorm.refresh

    def counting_refresh(run, model, passes):  # which sampler the refresh draws from, and how often
        for name in ("labeled", "unlabeled"):
            sampler = getattr(run, name)
            sampler.next = (lambda nxt, n: lambda: drawn.append(n) or nxt())(sampler.next, name)
        return refresh(run, model, passes)

    monkeypatch.setattr(batchnorm, "refresh", counting_refresh)
    sets = tiny_sets(str(tmp_path), 2, **{"training.data.labeled_samples": 4,  # all 4 training images
                                          "method.use_unlabeled": False, "method.use_contrastive": False,
                                          "method.bn_refresh_iterations": 3, "utils.log_every": 1})
    with single_thread():
        trainSSL.main(argv_of(sets))
    out = capsys.readouterr().out
    assert "4 labeled / 0 unlabeled" in out
    assert "BatchNorm refresh: no unlabeled images (every training image is labeled)" in out
    assert drawn == ["labeled"] * 3                         # the 3 refresh passes, from the labeled images
    report = json.load(open(os.path.join(tmp_path, "evaluation.json")))
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "train_log.jsonl"))]
    assert report["iterations"] == 2 and any(r["kind"] == "val_bn_refresh" for r in rows)
    assert "memory bank at the end: not used (method.use_contrastive false)" in out


def test_the_end_of_a_run_prints_the_memory_fill_per_class(tmp_path, capsys):
    # memory from iteration 0 on (R - offset < 0), any confidence: the labeled pixels the teacher gets right enter
    sets = tiny_sets(str(tmp_path), 2, **{"method.ramp_up_iterations": 1, "method.memory_start_offset": 2,
                                          "method.memory_confidence": 0.0})
    with single_thread():
        trainSSL.main(argv_of(sets))
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("memory bank at the end"))
    fill = [r for r in map(json.loads, open(os.path.join(tmp_path, "train_log.jsonl")))
            if r["kind"] == "memory_fill"][-1]["values"]    # the last logged fill: after the last iteration
    names = ["road", "sidewalk", "building", "pole", "vegetation", "sky", "person", "car"]
    assert line == "memory bank at the end, vectors per class (of 256): " + ", ".join(
        f"{n} {int(fill[n])}" for n in names)
    assert sum(fill.values()) > 0
