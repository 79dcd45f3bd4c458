"""Synthetic scenes in two styles, and domain adaptation from style "a" (as GTA5) to style "b" (as Cityscapes):
data/synthetic.py styles, data.build_source, the config keys synthetic.style / synthetic.num_source /
method.da_source_schedule, and the domain-adaptation script's run set-up on synthetic data."""
import hashlib

import numpy as np
import pytest

import trainSSL_domain_adaptation_targetCity as da_script
from data import build_data, build_source
from data.gta5 import GTA5Dataset
from data.synthetic import NUM_CLASSES, SKY, SyntheticStreets
from engine.config import FIDELITY_PRESETS, fidelity, resolve_config
from utils.errors import UserError
from engine.run import Run
from utils.variants import DOMAIN_ADAPTATION


def _hash(style=None) -> str:
    """sha256 of the images and labels of 13 scenes at three sizes, seed offsets and ignore labels."""
    h = hashlib.sha256()
    for size, offset, n, ignore in [((96, 160), 0, 6, 250), ((48, 80), 1, 4, 255), ((37, 61), 7, 3, 250)]:
        kw = {} if style is None else {"style": style}
        ds = SyntheticStreets(n, size, seed_offset=offset, train=False, ignore_label=ignore, **kw)
        for i in range(n):
            image, label = ds.scene(i)
            h.update(image.tobytes())
            h.update(label.tobytes())
    return h.hexdigest()


def test_style_a_is_the_original_generator_bit_for_bit():
    # computed with data/synthetic.py before styles existed (commit 5020a03)
    original = "eebefc1eeed71df89fa72a390425150f5b138be2371126f4f16f9ceaca721fe5"
    assert _hash() == original and _hash("a") == original
    assert SyntheticStreets(3, (48, 80), train=False).names[2] == "synthetic_0_00002"


def _scenes(style, n=16, size=(64, 112), offset=0):
    ds = SyntheticStreets(n, size, seed_offset=offset, train=False, style=style)
    images, labels = zip(*(ds.scene(i) for i in range(n)))
    return np.stack(images).astype(np.float64), np.stack(labels)


def test_style_b_same_classes_other_look():
    img_a, lbl_a = _scenes("a")
    img_b, lbl_b = _scenes("b")
    # same label semantics: the same class ids occur (every class, plus the ignored clutter), similar layout
    classes_a, classes_b = set(np.unique(lbl_a).tolist()), set(np.unique(lbl_b).tolist())
    assert classes_a == classes_b == set(range(NUM_CLASSES)) | {250}
    assert (lbl_b[:, 0] == SKY).mean() > 0.9  # the sky is still the top band
    # other look: per-class mean colours differ clearly (sky at dusk, autumn vegetation, darker roads ...)
    far = 0
    for c in range(NUM_CLASSES):
        mean_a = img_a[lbl_a == c].mean(0)
        mean_b = img_b[lbl_b == c].mean(0)
        far += np.abs(mean_a - mean_b).max() > 20
    assert far >= 5, far
    sky_a, sky_b = img_a[lbl_a == SKY].mean(0), img_b[lbl_b == SKY].mean(0)
    assert sky_a[2] > sky_a[0] and sky_b[0] > sky_b[2]  # blue sky in "a", warm dusk sky in "b"
    # other proportions: a lower horizon in "b" (more ground), taller cars relative to their width
    assert (lbl_b == SKY).mean() < (lbl_a == SKY).mean() - 0.04
    # the images are not re-coloured copies: the layouts differ
    assert (lbl_a != lbl_b).mean() > 0.2


def test_style_b_deterministic_and_seeded_apart_from_a():
    a = SyntheticStreets(4, (48, 80), seed_offset=3, train=False, style="b")
    b = SyntheticStreets(4, (48, 80), seed_offset=3, train=False, style="b")
    for i in range(4):
        assert all(np.array_equal(x, y) for x, y in zip(a.scene(i), b.scene(i)))
    assert not np.array_equal(a.scene(0)[0], a.scene(1)[0])
    assert a.names[1] == "synthetic-b_3_00001"
    with pytest.raises(UserError, match="synthetic.style"):
        SyntheticStreets(2, (32, 32), train=False, style="d")


def test_style_c_a_third_look_same_classes():
    """Style "c" (the synthetic backbone's pretraining scenes): the same classes, a look unlike "a" and "b" in
    colours (a dark night sky), layout (a lower horizon, narrower roads) and textures, and its own scenes."""
    img_a, lbl_a = _scenes("a")
    img_b, lbl_b = _scenes("b")
    img_c, lbl_c = _scenes("c")
    assert set(np.unique(lbl_c).tolist()) == set(range(NUM_CLASSES)) | {250}
    assert (lbl_c[:, 0] == SKY).mean() > 0.9  # the sky is still the top band
    for img, lbl in ((img_a, lbl_a), (img_b, lbl_b)):
        far = sum(np.abs(img[lbl == c].mean(0) - img_c[lbl_c == c].mean(0)).max() > 20 for c in range(NUM_CLASSES))
        assert far >= 5, far
        assert (lbl != lbl_c).mean() > 0.2  # other layouts, not re-coloured copies
    sky = [img[lbl == SKY].mean() for img, lbl in ((img_a, lbl_a), (img_b, lbl_b), (img_c, lbl_c))]
    assert sky[2] < 80 < min(sky[:2])  # a night sky: darker than both day skies (58 against 141 and 158)
    # a lower horizon than both: more sky rows; a narrower road than "b"
    assert (lbl_c == SKY).mean() > (lbl_a == SKY).mean() and (lbl_c == SKY).mean() > (lbl_b == SKY).mean()
    from data.synthetic import ROAD
    assert (lbl_c == ROAD).mean() < (lbl_b == ROAD).mean()
    again = SyntheticStreets(2, (48, 80), seed_offset=0, train=False, style="c")
    assert np.array_equal(again.scene(1)[0], SyntheticStreets(2, (48, 80), train=False, style="c").scene(1)[0])
    assert again.names[1] == "synthetic-c_0_00001"
    # its own scenes: seeded by (offset, index, 13), neither style "a"'s (offset, index) nor "b"'s (offset, index, 11)
    from data.synthetic import render_scene
    own = render_scene(np.random.default_rng([0, 1, 13]), 48, 80, style="c")
    assert all(np.array_equal(x, y) for x, y in zip(own, again.scene(1)))


def _cfg(**sets):
    raw = {"dataset": "synthetic", "version": "3", "backbone": {"depth": 18, "pretrained": "none"},
           "training": {"batch_size": 4, "num_iterations": 10, "learning_rate": 0.01, "pretraining": "imagenet",
                        "data": {"labeled_samples": 3, "input_size": "24,40", "split_id_list": -1}},
           "synthetic": {"num_train": 10, "num_val": 2, "image_size": "40,64", "num_source": 5}}
    return resolve_config(raw, "test", [f"{k}={v}" for k, v in sets.items()])


def test_build_data_and_source_for_synthetic_domain_adaptation():
    cfg = _cfg(**{"synthetic.style": "b"})
    d = build_data(cfg)
    assert d.train.style == "b" and d.val.style == "b" and d.val.seed_offset == 1
    src = build_source(cfg)
    assert isinstance(src, SyntheticStreets) and src.style == "a" and len(src) == 5 and src.train
    assert src.seed_offset == 2  # its own scenes, neither the target's training nor its validation scenes
    image, label, index = src[(4, 9)]
    assert image.shape == (3, 24, 40) and label.shape == (24, 40) and index == 4
    full = SyntheticStreets(5, (40, 64), seed_offset=2, train=False, style="a").scene(4)[1]
    assert any(np.array_equal(label.numpy(), full[y:y + 24, x:x + 40])
               for y in range(17) for x in range(25))  # a crop of source scene 4
    assert build_source(_cfg()).style == "b"  # a style "a" target adapts from style "b"


def test_build_source_cityscapes_is_gta5_and_others_refused(tmp_path):
    from tests.fixtures_data import make_gta5_tree
    make_gta5_tree(str(tmp_path), n_train=2, n_val=1, size=(40, 60), seed=0)
    cfg = _cfg()
    cfg["dataset"] = "cityscapes"
    assert isinstance(build_source(cfg, str(tmp_path)), GTA5Dataset)
    cfg["dataset"] = "pascal_voc"
    with pytest.raises(UserError, match="configSSL_city"):
        build_source(cfg)


def test_config_keys():
    assert _cfg()["synthetic"]["style"] == "a" and _cfg()["method"]["da_source_schedule"] is None
    with pytest.raises(UserError, match="synthetic.style"):
        _cfg(**{"synthetic.style": "d"})
    assert _cfg(**{"synthetic.style": "c"})["synthetic"]["style"] == "c"
    with pytest.raises(UserError, match="da_source_schedule"):
        _cfg(**{"method.da_source_schedule": "sometimes"})
    # the schedule key replaces only the preset's schedule; null keeps the preset
    assert fidelity(_cfg()) == FIDELITY_PRESETS["code"]
    f = fidelity(_cfg(**{"method.da_source_schedule": "alternate"}))
    assert f.da_source_schedule == "alternate" and f.memory_keep == "lowest" and f.memory_weights == "release"
    paper = _cfg(**{"fidelity": "paper", "method.da_source_schedule": "last100_odd"})
    assert fidelity(paper).da_source_schedule == "last100_odd" and fidelity(paper).memory_keep == "highest"


def test_domain_adaptation_run_on_synthetic_scenes(tmp_path, capsys):
    """The DA script's Run on a synthetic config: style "b" target, style "a" source, the configured network
    and crop (no GTA5 folder needed), and the schedule from method.da_source_schedule."""
    import json
    cfg_path = tmp_path / "cfg.json"
    raw = {"dataset": "synthetic", "version": "3", "backbone": {"depth": 18, "pretrained": "none"},
           "training": {"batch_size": 4, "num_workers": 0, "num_iterations": 10, "learning_rate": 0.01,
                        "pretraining": "imagenet",
                        "data": {"labeled_samples": 4, "input_size": "24,40", "split_id_list": -1}},
           "synthetic": {"num_train": 10, "num_val": 2, "image_size": "40,64", "num_source": 5, "style": "b"},
           "method": {"da_source_schedule": "alternate"},
           "utils": {"checkpoint_dir": str(tmp_path / "run")}}
    cfg_path.write_text(json.dumps(raw))
    run = Run(DOMAIN_ADAPTATION, ["--config", str(cfg_path), "--device", "cpu", "--dry-run"])
    assert run.data.train.style == "b" and run.gta5.style == "a" and len(run.gta5) == 5
    assert run.student.depth == 18 and run.crop == (24, 40) and run.gta5.crop_size == (24, 40)
    assert run.fidelity.da_source_schedule == "alternate"
    assert [da_script.uses_gta5_batch(i, 200, run.fidelity.da_source_schedule) for i in range(4)] == \
        [True, False, True, False]
    assert "dry run: OK" in capsys.readouterr().out


def test_scenes_rendered_once_and_read_only(monkeypatch):
    import data.synthetic as synthetic
    calls = []
    render = synthetic.render_scene
    monkeypatch.setattr(synthetic, "render_scene", lambda *a, **k: calls.append(1) or render(*a, **k))
    ds = SyntheticStreets(3, (40, 64), train=True, crop_size=(24, 40), style="b")
    first = ds.scene(1)
    assert ds[(1, 5)][1].shape == (24, 40) and ds[(1, 6)][0].shape == (3, 24, 40)
    assert len(calls) == 1 and ds.scene(1)[0] is first[0]  # one render, kept
    with pytest.raises(ValueError):
        first[0][0, 0, 0] = 1  # the kept arrays cannot be changed by a caller
    fresh = SyntheticStreets(3, (40, 64), train=False, style="b").scene(1)
    assert np.array_equal(fresh[0], first[0]) and np.array_equal(fresh[1], first[1])
    monkeypatch.setattr(synthetic, "CACHE_BYTES", 3 * 40 * 64 * 4 - 1)  # a set too large to keep
    big = SyntheticStreets(3, (40, 64), train=False)
    big.scene(0), big.scene(0)
    assert len(calls) == 4 and big._cache is None
