"""Split files of today's papers read as they are (issue 30): `image mask` lines relative to the dataset root, on
small Cityscapes and Pascal VOC trees in their real layouts.

Expected labels come from the files the test writes, mapped by a table written out here (the official Cityscapes
train ids of the label ids the tree uses), not from the loader's lookup tables."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_data
from engine.config import resolve_config
from tests.fixtures_data import make_cityscapes_tree, make_voc_tree, save_png
from utils.errors import UserError

H, W = 32, 64
# label id -> train id of the ids in tests/fixtures_data.CITYSCAPES_IDS (cityscapesScripts' labels.py); others 255
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13}


def by_hand(label_ids: np.ndarray, ignore: int) -> torch.Tensor:
    out = np.full(label_ids.shape, ignore, dtype=np.int64)
    for label_id, train_id in TRAIN_IDS.items():
        out[label_ids == label_id] = train_id
    return torch.from_numpy(out)


def cfg(dataset: str, root: str, split_file: str | None, unlabeled_file: str | None = None, labeled: int = 3,
        crop: str = f"{H},{W}") -> dict:
    return resolve_config({
        "dataset": dataset, "version": "3", "ignore_label": 250 if dataset == "cityscapes" else 255,
        "training": {"batch_size": 4, "num_iterations": 1, "learning_rate": 0.1, "pretraining": "imagenet",
                     "data": {"labeled_samples": labeled, "input_size": crop, "root": root, "split_id_list": -1,
                              "split_file": split_file, "unlabeled_file": unlabeled_file}}})


def rgb(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).copy()).float()


def rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def peer_rel(path: str, root: str) -> str:
    """The path as the peers write it: relative to a root holding leftImg8bit/ and gtFine/ directly."""
    return rel(path, root).replace("leftImg8bit_trainvaltest/", "").replace("gtFine_trainvaltest/", "")


@pytest.fixture
def city(tmp_path):
    """Cityscapes tree in the download layout (*_trainvaltest folders), 6 train / 2 val frames; frames 0 and 3 also
    have cityscapesScripts' *_gtFine_labelTrainIds.png masks (train ids, 255 ignored)."""
    root = str(tmp_path / "CityScapes")
    files = make_cityscapes_tree(root, n_train=6, n_val=2, size=(H, W))
    for k in (0, 3):
        label = files["train"][k][1]
        train_ids = by_hand(np.asarray(Image.open(label)), 255).numpy()
        save_png(label.replace("_labelIds.png", "_labelTrainIds.png"), train_ids)
    return root, files


def line(image: str, label: str, root: str, train_ids: bool = True) -> str:
    mask = peer_rel(label, root)
    return f"{peer_rel(image, root)} {mask.replace('_labelIds', '_labelTrainIds') if train_ids else mask}\n"


def test_cityscapes_peer_split_labeled_masks_and_unlabeled_file(city, tmp_path):
    root, files = city
    train = files["train"]
    labeled = tmp_path / "labeled.txt"
    # frames 3 and 0 with their train-id masks, frame 5 with its label-id mask (mapped as usual)
    labeled.write_text(line(*train[3], root) + line(*train[0], root) + line(*train[5], root, train_ids=False))
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text(line(*train[1], root) + line(*train[4], root))
    os.remove(train[4][1])  # an unlabeled image needs no mask
    data = build_data(cfg("cityscapes", root, str(labeled), str(unlabeled)))
    assert data.labeled_idx == [0, 1, 2] and data.unlabeled_idx == [3, 4]
    assert data.train_names == [peer_rel(train[k][0], root) for k in (3, 0, 5, 1, 4)]
    assert data.train_names[0].startswith("leftImg8bit/train/")  # as the list writes it
    for index, k in enumerate((3, 0, 5)):  # crop = the whole image (v3: no resize)
        image, label, _ = data.train[(index, 7)]
        expected = by_hand(np.asarray(Image.open(train[k][1])), 250)  # from the label-id file, by the table above
        assert torch.equal(image, rgb(train[k][0])) and torch.equal(label, expected)
    assert data.train.labels[0].endswith("_gtFine_labelTrainIds.png")
    for index, k in ((3, 1), (4, 4)):
        image, label, _ = data.train[(index, 7)]
        assert torch.equal(image, rgb(train[k][0])) and bool((label == 250).all())


def test_cityscapes_without_unlabeled_file_the_rest_of_the_training_list(city, tmp_path):
    root, files = city
    train = files["train"]
    labeled = tmp_path / "labeled.txt"
    labeled.write_text(line(*train[3], root) + line(*train[0], root))
    with pytest.warns(UserWarning, match="lists 2 labeled images; training.data.labeled_samples \\(3\\)"):
        data = build_data(cfg("cityscapes", root, str(labeled)))
    assert data.labeled_idx == [0, 1] and data.unlabeled_idx == [2, 3, 4, 5]
    assert data.train_names[2:] == [peer_rel(train[k][0], root) for k in (1, 2, 4, 5)]  # sorted training list
    assert data.train.labels[2:] == [None] * 4

    # frame 5 has no train-id mask: its label-id file is read instead, with a warning
    labeled.write_text(line(*train[5], root) + line(*train[0], root))
    with pytest.warns(UserWarning, match="1 mask\\(s\\) listed as \\*_labelTrainIds.png .* the \\*_labelIds.png files"):
        data = build_data(cfg("cityscapes", root, str(labeled), labeled=2))
    assert data.train.labels[0] == train[5][1]
    assert torch.equal(data.train[(0, 1)][1], by_hand(np.asarray(Image.open(train[5][1])), 250))


def test_cityscapes_every_missing_file_in_one_message(city, tmp_path):
    root, files = city
    train = files["train"]
    os.remove(train[2][1])  # frame 2: neither mask
    labeled = tmp_path / "labeled.txt"
    typo = peer_rel(train[0][0], root).replace("aachen_", "aachn_")
    labeled.write_text(f"{typo} {peer_rel(train[0][1], root)}\n" + line(*train[3], root) + line(*train[2], root))
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text(line(*train[1], root) + "# a comment\n\nleftImg8bit/train/bochum/gone_leftImg8bit.png x.png\n")
    with pytest.raises(UserError) as e:
        build_data(cfg("cityscapes", root, str(labeled), str(unlabeled)))
    msg = str(e.value)
    assert msg.startswith("3 files named by the split files are missing"), msg
    assert f"labeled.txt line 1: image {typo}" in msg
    ids = peer_rel(train[2][1], root)
    assert f"labeled.txt line 3: mask {ids.replace('_labelIds', '_labelTrainIds')} (nor {ids})" in msg
    assert "unlabeled.txt line 4: image leftImg8bit/train/bochum/gone_leftImg8bit.png" in msg
    assert "line 2" not in msg

    with pytest.raises(UserError, match="none of the 6 files named by the split files is in .*point --data-root"):
        build_data(cfg("cityscapes", str(tmp_path / "elsewhere"), str(labeled)))


def test_cityscapes_validation_images_and_repeats_refused_ids_lists_as_before(city, tmp_path):
    root, files = city
    train, val = files["train"], files["val"]
    labeled = tmp_path / "labeled.txt"
    labeled.write_text(line(*train[3], root) + f"{peer_rel(val[0][0], root)} {peer_rel(val[0][1], root)}\n")
    with pytest.raises(UserError, match="name 1 image\\(s\\) of the validation set"):
        build_data(cfg("cityscapes", root, str(labeled), labeled=2))
    labeled.write_text(line(*train[3], root) + line(*train[0], root))
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text(line(*train[0], root))
    with pytest.raises(UserError, match="1 image\\(s\\) are listed more than once"):
        build_data(cfg("cityscapes", root, str(labeled), str(unlabeled), labeled=2))
    # a list of ids (one column): selected among the standard training list, as before
    ids = tmp_path / "ids.txt"
    ids.write_text("zurich_000005_000024\naachen_000000_000019\n")
    data = build_data(cfg("cityscapes", root, str(ids), labeled=2))
    assert [data.train_names[i] for i in data.labeled_idx] == ["zurich/zurich_000005_000024_leftImg8bit.png",
                                                               "aachen/aachen_000000_000019_leftImg8bit.png"]
    assert len(data.unlabeled_idx) == 4 and None not in data.train.labels
    with pytest.raises(UserError, match="unlabeled_file goes with a training.data.split_file of `image mask` lines"):
        build_data(cfg("cityscapes", root, str(ids), str(unlabeled), labeled=2))


@pytest.mark.filterwarnings("ignore:.*SegmentationClassAug not found")  # the tree has the fine labels only
def test_voc_peer_split_fine_masks_and_unlabeled_images_without_masks(tmp_path):
    """A tree with SegmentationClass only (the 1,464 fine labels): labeled lines name those masks; unlabeled lines
    name images whose masks do not exist; the release's leading-slash form is relative to the root too."""
    root = str(tmp_path / "VOC2012")
    ids = make_voc_tree(root, n_train=5, n_val=2, size=(H, W), aug=False)
    t = ids["train"]
    os.remove(os.path.join(root, "SegmentationClass", t[4] + ".png"))
    labeled = tmp_path / "labeled.txt"
    labeled.write_text(f"JPEGImages/{t[2]}.jpg SegmentationClass/{t[2]}.png\n"
                       f"/JPEGImages/{t[0]}.jpg /SegmentationClass/{t[0]}.png\n")
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text(f"JPEGImages/{t[4]}.jpg SegmentationClass/{t[4]}.png\nJPEGImages/{t[1]}.jpg\n")
    data = build_data(cfg("pascal_voc", root, str(labeled), str(unlabeled), labeled=2))
    assert data.labeled_idx == [0, 1] and data.unlabeled_idx == [2, 3]
    assert data.train_names == [f"JPEGImages/{i}.jpg" for i in (t[2], t[0], t[4], t[1])]
    for index, i in enumerate((t[2], t[0])):
        image, label, _ = data.train[(index, 3)]
        mask = np.asarray(Image.open(os.path.join(root, "SegmentationClass", i + ".png")))  # palette indices
        assert torch.equal(image, rgb(os.path.join(root, "JPEGImages", i + ".jpg")))
        assert torch.equal(label, torch.from_numpy(mask.astype(np.int64)))
    for index, i in ((2, t[4]), (3, t[1])):
        image, label, _ = data.train[(index, 3)]
        assert torch.equal(image, rgb(os.path.join(root, "JPEGImages", i + ".jpg"))) and bool((label == 255).all())


def test_voc_masks_listed_in_segmentation_class_read_from_the_augmented_folder(tmp_path):
    root = str(tmp_path / "VOC2012")
    ids = make_voc_tree(root, n_train=4, n_val=2, size=(H, W), aug=True)  # SegmentationClassAug only
    t = ids["train"]
    labeled = tmp_path / "labeled.txt"
    labeled.write_text(f"JPEGImages/{t[3]}.jpg SegmentationClass/{t[3]}.png\n")
    with pytest.warns(UserWarning, match="1 mask\\(s\\) listed as SegmentationClass .* the SegmentationClassAug "
                                         "files"):
        data = build_data(cfg("pascal_voc", root, str(labeled), labeled=1))
    assert data.train.labels[0] == os.path.join(root, "SegmentationClassAug", t[3] + ".png")
    assert data.labeled_idx == [0] and data.unlabeled_idx == [1, 2, 3]  # the rest of the training list
    assert data.train_names[1:] == [f"JPEGImages/{i}.jpg" for i in t[:3]]
    mask = np.asarray(Image.open(data.train.labels[0]))
    assert torch.equal(data.train[(0, 3)][1], torch.from_numpy(mask.astype(np.int64)))
