"""`"dataset": "folder"`: a user's images and labels from folders or list files, configured in JSON only.

The synthetic scenes written out as files (data.synthetic.export_folder) must give exactly the items of
`"dataset": "synthetic"`; broken datasets are refused at construction with the file named."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data import build_data
from data.folder import default_palette
from data.synthetic import CLASS_NAMES, PALETTE, export_folder
from engine.config import load_config, resolve_config
from utils.errors import UserError

SIZE = (40, 60)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic_folder"))
    config = export_folder(root, num_train=8, num_val=2, image_size=SIZE)
    return root, config


def folder_cfg(config: str, **folder) -> dict:
    cfg = load_config(config, ["training.data.input_size=33,49", "training.data.labeled_samples=3"])
    cfg["folder"].update(folder)
    return cfg


def synthetic_cfg(config: str) -> dict:
    raw = json.load(open(config))
    raw["dataset"] = "synthetic"
    del raw["folder"]
    raw["synthetic"] = {"num_train": 8, "num_val": 2, "image_size": f"{SIZE[0]},{SIZE[1]}"}
    return resolve_config(raw, "synthetic", ["training.data.input_size=33,49", "training.data.labeled_samples=3"])


def test_exported_files_and_config(exported):
    root, config = exported
    assert sorted(os.listdir(os.path.join(root, "train", "images"))) == [f"synthetic_0_{i:05d}.png" for i in range(8)]
    label = np.asarray(Image.open(os.path.join(root, "val", "labels", "synthetic_1_00001.png")))
    assert label.shape == SIZE and set(np.unique(label)) <= set(range(8)) | {250}
    cfg = json.load(open(config))
    assert cfg["dataset"] == "folder" and cfg["folder"]["class_names"] == CLASS_NAMES
    assert [tuple(c) for c in cfg["folder"]["palette"]] == PALETTE


def test_folder_items_equal_the_synthetic_dataset(exported):
    _, config = exported
    folder, synth = build_data(folder_cfg(config)), build_data(synthetic_cfg(config))
    assert folder.name == "folder" and folder.num_classes == 8 and folder.ignore_label == 250
    assert folder.class_names == CLASS_NAMES and folder.palette == PALETTE
    assert folder.mean_rgb == (127.5, 127.5, 127.5)
    assert (folder.labeled_idx, folder.unlabeled_idx) == (synth.labeled_idx, synth.unlabeled_idx)
    assert folder.train_names == [f"synthetic_0_{i:05d}.png" for i in range(8)]
    for key in ((0, 11), (5, 12345), (7, 3)):  # (index, seed): the seed alone draws the random crop
        img, lbl, index = folder.train[key]
        ref_img, ref_lbl, _ = synth.train[key]
        assert img.shape == (3, 33, 49) and index == key[0]
        assert img.equal(ref_img) and lbl.equal(ref_lbl)
    assert not folder.train[(0, 1)][0].equal(folder.train[(0, 2)][0])  # different seeds, different crops
    img, lbl, name = folder.val[1]
    ref_img, ref_lbl, _ = synth.val[1]
    assert name == "synthetic_1_00001.png" and img.equal(ref_img) and lbl.equal(ref_lbl)


def test_list_files_and_two_column_list(exported, tmp_path):
    root, config = exported
    names = [f"synthetic_0_{i:05d}.png" for i in range(8)]
    order = names[::-1]  # line k of one list is the label of line k of the other, whatever the order
    (tmp_path / "images.txt").write_text("# training images\n" + "".join(
        f"{os.path.join(root, 'train', 'images', n)}\n" for n in order))
    (tmp_path / "labels.txt").write_text("\n".join(os.path.join(root, "train", "labels", n) for n in order) + "\n\n")
    os.symlink(os.path.join(root, "train"), tmp_path / "train")
    (tmp_path / "pairs.txt").write_text("".join(f"train/images/{n} train/labels/{n}\n" for n in order))  # relative
    via_dirs = build_data(folder_cfg(config))
    for images, labels in ((str(tmp_path / "images.txt"), str(tmp_path / "labels.txt")),
                           (str(tmp_path / "pairs.txt"), None)):
        data = build_data(folder_cfg(config, train_images=images, train_labels=labels))
        assert len(data.train) == 8
        for k in range(8):
            ref = via_dirs.train[(7 - k, 99)]
            got = data.train[(k, 99)]
            assert got[0].equal(ref[0]) and got[1].equal(ref[1])
    assert data.train_names[0] == "train/images/synthetic_0_00007.png"


def broken_copy(root: str, tmp_path) -> str:
    """A copy of the exported training folders to damage."""
    dst = str(tmp_path / "copy")
    shutil.copytree(os.path.join(root, "train"), dst)
    return dst


def build_with_train(config: str, train_dir: str):
    return build_data(folder_cfg(config, train_images=os.path.join(train_dir, "images"),
                                 train_labels=os.path.join(train_dir, "labels")))


def test_missing_label_is_refused(exported, tmp_path):
    root, config = exported
    train = broken_copy(root, tmp_path)
    os.remove(os.path.join(train, "labels", "synthetic_0_00003.png"))
    with pytest.raises(UserError) as e:
        build_with_train(config, train)
    assert os.path.join(train, "images", "synthetic_0_00003.png") in str(e.value) and "no label" in str(e.value)


def test_label_value_out_of_range_is_refused(exported, tmp_path):
    root, config = exported
    train = broken_copy(root, tmp_path)
    path = os.path.join(train, "labels", "synthetic_0_00005.png")
    label = np.asarray(Image.open(path)).copy()
    label[3, 4] = 8  # classes are 0..7, ignore 250
    Image.fromarray(label).save(path)
    with pytest.raises(UserError) as e:
        build_with_train(config, train)
    assert path in str(e.value) and "[8]" in str(e.value)


def test_image_and_label_of_different_sizes_are_refused(exported, tmp_path):
    root, config = exported
    train = broken_copy(root, tmp_path)
    path = os.path.join(train, "labels", "synthetic_0_00002.png")
    Image.fromarray(np.zeros((SIZE[0], SIZE[1] - 1), dtype=np.uint8)).save(path)
    with pytest.raises(UserError) as e:
        build_with_train(config, train)
    msg = str(e.value)
    assert path in msg and os.path.join(train, "images", "synthetic_0_00002.png") in msg and "59x40" in msg


def test_every_bad_pair_is_listed_at_once(exported, tmp_path):
    """Two broken pairs (a value out of range, a size mismatch): one error names both, not the first alone."""
    root, config = exported
    train = broken_copy(root, tmp_path)
    bad_value = os.path.join(train, "labels", "synthetic_0_00001.png")
    label = np.asarray(Image.open(bad_value)).copy()
    label[0, 0] = 9
    Image.fromarray(label).save(bad_value)
    bad_size = os.path.join(train, "labels", "synthetic_0_00006.png")
    Image.fromarray(np.zeros((SIZE[0] - 1, SIZE[1]), dtype=np.uint8)).save(bad_size)
    with pytest.raises(UserError) as e:
        build_with_train(config, train)
    msg = str(e.value)
    assert "2 of 8 train pairs" in msg and bad_value in msg and "[9]" in msg and bad_size in msg, msg


def test_config_mistakes_are_refused(exported, tmp_path):
    root, config = exported
    with pytest.raises(UserError, match="folder.train_images"):
        build_data(folder_cfg(config, train_images=None))
    with pytest.raises(UserError, match="class_names has 8 names but folder.num_classes is 9"):
        build_data(folder_cfg(config, num_classes=9))
    with pytest.raises(UserError, match="palette must list 8 colours"):
        build_data(folder_cfg(config, palette=[[0, 0, 0]] * 7))
    cfg = folder_cfg(config)
    cfg["ignore_label"] = 3
    with pytest.raises(UserError, match="ignore_label 3 is one of the class indices 0..7"):
        build_data(cfg)
    images = tmp_path / "short.txt"
    images.write_text(os.path.join(root, "train", "images", "synthetic_0_00000.png") + "\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(os.path.join(root, "train", "labels", f"synthetic_0_{i:05d}.png") + "\n"
                              for i in range(8)))
    with pytest.raises(UserError, match="lists 1 images but .* lists 8 labels"):
        build_data(folder_cfg(config, train_images=str(images), train_labels=str(labels)))


def test_defaults_from_num_classes_only(exported):
    _, config = exported
    data = build_data(folder_cfg(config, class_names=None, palette=None, num_classes=8, mean=[10, 20, 30]))
    assert data.class_names == [f"class_{k}" for k in range(8)] and data.mean_rgb == (10.0, 20.0, 30.0)
    assert data.palette == default_palette(8) and len(set(data.palette)) == 8
    assert default_palette(3) == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]  # the VOC colour map
