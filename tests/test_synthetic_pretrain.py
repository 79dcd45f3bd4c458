"""backbone.pretrained "synthetic" (engine/synthetic_pretrain.py): built once into torch hub's checkpoint folder and
reused, the same bytes from the same seed, a lock that makes a second builder wait, nothing partial left by an
interrupted build, --dry-run's line. Every test uses a temporary TORCH_HOME and a tiny network (width 8, a few
iterations), never the real cache."""
import fcntl
import glob
import hashlib
import os
import re
import threading

import pytest
import torch

import trainSSL
from engine import synthetic_pretrain as sp
from engine.config import load_config
from model import build_model
from tests.run_helpers import DEMO, argv_of, single_thread, tiny_sets

TINY = sp.SyntheticSpec(version="2", depth=18, width=8, pretraining="imagenet", seed=3, iterations=2)
NAME = re.compile(r"^synthetic-c-v2-resnet18-w8-RGB-seed3-it2-([0-9a-f]{8})\.pth$")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A temporary TORCH_HOME; its checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _cfg(**sets):
    base = {"version": "2", "backbone.depth": 18, "backbone.width": 8, "backbone.pretrained": "synthetic",
            "backbone.synthetic_iterations": 2, "backbone.synthetic_seed": 3}
    return load_config(DEMO, [f"{k}={v}" for k, v in {**base, **sets}.items()])


def test_built_once_named_by_its_recipe_and_hash_then_reused(hub, monkeypatch, capsys):
    calls = []
    train = sp.train_backbone
    monkeypatch.setattr(sp, "train_backbone", lambda *a, **k: calls.append(1) or train(*a, **k))
    rng = torch.get_rng_state()
    with single_thread():
        path = sp.resolve(_cfg(), 18)
    assert torch.equal(torch.get_rng_state(), rng)           # the caller's random stream is untouched
    assert os.path.dirname(path) == str(hub) and NAME.match(os.path.basename(path))
    data = open(path, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    assert NAME.match(os.path.basename(path)).group(1) == digest[:8]  # torch hub's convention: a SHA-256 prefix
    out = capsys.readouterr().out
    assert f"SHA-256 {digest}" in out and "building the synthetic backbone: 100% (2/2 iterations)" in out
    assert sorted(os.listdir(hub)) == [os.path.basename(path), "synthetic-c-v2-resnet18-w8-RGB-seed3-it2.lock"]
    # only the backbone (what an ImageNet file holds), every tensor of it, and all of them fit a model of width 8
    state = torch.load(path, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    model = build_model("2", 8, "imagenet", 18, path, width=8, verbose=False)
    assert model.pretrained_report.loaded == len(state) == 120 and not model.pretrained_report.skipped
    # the second time: found, not trained again
    assert sp.resolve(_cfg(), 18) == path and len(calls) == 1
    # another recipe (iterations) is another file
    assert sp.cached_file(sp.spec_of(_cfg(**{"backbone.synthetic_iterations": 3}), 18)) is None


def test_the_same_seed_builds_the_same_bytes_another_seed_others(tmp_path):
    with single_thread():
        first = sp.build(TINY, folder=str(tmp_path / "one"), progress=False)
        second = sp.build(TINY, folder=str(tmp_path / "two"), progress=False)
        other = sp.build(sp.SyntheticSpec("2", 18, 8, "imagenet", 4, 2), folder=str(tmp_path / "three"),
                         progress=False)
    assert os.path.basename(first) == os.path.basename(second)
    assert open(first, "rb").read() == open(second, "rb").read()
    assert open(first, "rb").read() != open(other, "rb").read()


def test_a_second_builder_waits_on_the_lock_then_reuses_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    lock = folder / f"{TINY.stem}.lock"
    built_by_other = folder / f"{TINY.stem}-0123abcd.pth"
    waiting = threading.Event()
    said = []

    def fake_print(*args, **kwargs):
        said.append(" ".join(map(str, args)))
        if "waiting for another process" in said[-1]:
            waiting.set()

    monkeypatch.setattr(sp, "print", fake_print, raising=False)
    monkeypatch.setattr(sp, "train_backbone", lambda *a, **k: pytest.fail("the waiting process must not train"))
    result = []
    with open(lock, "a") as held:                       # another process's build holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: result.append(sp.build(TINY, folder=str(folder))))
        thread.start()
        assert waiting.wait(60), said                   # it says so and blocks
        assert thread.is_alive() and not result
        built_by_other.write_bytes(b"weights")          # the other process finishes its file, then unlocks
        fcntl.flock(held, fcntl.LOCK_UN)
    thread.join(60)
    assert result == [str(built_by_other)]
    assert any("was built by another process" in s for s in said)


@pytest.mark.parametrize("where", ["training", "writing"])
def test_an_interrupted_build_leaves_no_file(tmp_path, monkeypatch, where):
    folder = tmp_path / "hub"
    if where == "training":
        monkeypatch.setattr(sp, "train_backbone", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:  # Ctrl-C after the bytes went to the temporary file, before the rename
        monkeypatch.setattr(sp, "train_backbone", lambda *a, **k: {"conv1.weight": torch.ones(2, 3, 7, 7)})
        monkeypatch.setattr(sp.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        sp.build(TINY, folder=str(folder), progress=False)
    assert sorted(os.listdir(folder)) == [f"{TINY.stem}.lock"]  # no .pth, no temporary file
    assert sp.cached_file(TINY, str(folder)) is None


def test_a_partial_file_of_a_killed_build_is_removed_by_the_next(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / f".tmp-{TINY.stem}-0123abcd.pth.4242beef").write_bytes(b"half")   # SIGKILL: no clean-up ran
    monkeypatch.setattr(sp, "train_backbone", lambda *a, **k: {"conv1.weight": torch.ones(2, 3, 7, 7)})
    path = sp.build(TINY, folder=str(folder), progress=False)
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(path), f"{TINY.stem}.lock"])


def test_dry_run_says_whether_it_is_cached_or_will_be_built(hub, tmp_path, capsys):
    sets = tiny_sets(str(tmp_path / "run"), 1, **{"backbone.pretrained": "synthetic", "backbone.width": 8,
                                                   "backbone.synthetic_iterations": 2, "backbone.synthetic_seed": 3})
    trainSSL.main(argv_of(sets) + ["--dry-run"])
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("model:"))
    assert "not cached yet; training will first build synthetic-c-v2-resnet18-w8-RGB-seed3-it2-<sha256>.pth" in line
    assert re.search(r"about \d+ s on one CPU core", line) and str(hub) in line
    assert not glob.glob(str(hub / "*.pth"))         # a dry run builds nothing
    with single_thread():
        path = sp.resolve(load_config(DEMO, argv_of(sets)[5::2]), 18)
    trainSSL.main(argv_of(sets) + ["--dry-run"])
    assert f"\"synthetic\": {path} (cached; not loaded in a dry run)" in capsys.readouterr().out


def test_time_estimate_grows_with_the_recipe():
    # FLOPs counted on the meta device: twice the iterations, twice the time; a wider network, more
    small = sp.estimate_seconds(TINY)
    assert sp.estimate_seconds(sp.SyntheticSpec("2", 18, 8, "imagenet", 3, 4)) == pytest.approx(2 * small)
    assert sp.estimate_seconds(sp.SyntheticSpec("2", 18, 16, "imagenet", 3, 2)) > 2 * small
