"""data/: folder layouts, label mapping, resizes and crops, channel order, splits, errors, synthetic scenes,
endless resumable batches, build_data."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import CITYSCAPES_MEAN_RGB, OTHER_MEAN_RGB, VOC_MEAN_RGB, build_data, build_gta5
from data.cityscapes import CityscapesDataset
from data.common import check_labels
from data.gta5 import GTA5Dataset
from data.sampler import InfiniteBatches, item_seed
from data.splits import make_split
from data.synthetic import NUM_CLASSES as SYN_CLASSES, SyntheticStreets
from data.voc import PALETTE as VOC_PALETTE, VOCDataset
from tests.fixtures_data import make_cityscapes_tree, make_gta5_tree, make_voc_tree, save_png
from utils.errors import UserError

H, W = 64, 128


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("city"))
    files = make_cityscapes_tree(root, n_train=4, n_val=2, size=(H, W))
    return root, files


def _resolved_cfg(dataset="synthetic", version="2", pretraining="imagenet", input_size="32,32", labeled=3,
                  split_id=0, seed=5555, ignore=250, root=None, split_file=None):
    return {"dataset": dataset, "version": version, "seed": seed, "ignore_label": ignore,
            "training": {"pretraining": pretraining,
                         "data": {"input_size": input_size, "labeled_samples": labeled, "split_id_list": split_id,
                                  "root": root, "split_file": split_file, "gta5_root": None}},
            "synthetic": {"num_train": 10, "num_val": 3, "image_size": "48,80"}}


# --------------------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = str(tmp_path)
    files = make_cityscapes_tree(root, 1, 1, size=(4, 8), with_trainvaltest=False)
    ids = np.array([[7, 26, 0, 34, 255, 8, 11, 33]] * 4, dtype=np.uint8)
    save_png(files["val"][0][1], ids)
    ds = CityscapesDataset(root, "val", version="3", channel_order="RGB")
    _, label, name = ds[0]
    # road 7 -> 0, car 26 -> 13, unlabeled 0 -> ignore, 34 (no such class) -> ignore, 255 -> ignore,
    # sidewalk 8 -> 1, building 11 -> 2, bicycle 33 -> 18
    assert label.dtype == torch.int64
    assert label[0].tolist() == [0, 13, 250, 250, 250, 1, 2, 18]
    assert name == "frankfurt/frankfurt_000000_000019_leftImg8bit.png"


def test_cityscapes_files_sorted_by_relative_path_in_both_layouts(tmp_path):
    for layout in (True, False):
        root = str(tmp_path / str(layout))
        make_cityscapes_tree(root, 5, 1, size=(4, 8), with_trainvaltest=layout)
        ds = CityscapesDataset(root, "train", crop_size=(2, 2))
        assert ds.names == sorted(ds.names)
        assert [n.split("/")[0] for n in ds.names] == ["aachen", "aachen", "bochum", "bochum", "zurich"]
        for image, label in zip(ds.images, ds.labels):
            assert os.path.basename(label) == os.path.basename(image).replace("_leftImg8bit", "_gtFine_labelIds")


def test_cityscapes_v2_train_is_half_size_then_crop(city):
    root, files = city
    ds = CityscapesDataset(root, "train", version="2", crop_size=(32, 32), channel_order="RGB")
    image, label, index = ds[(1, 1234)]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32) and index == 1
    assert image.dtype == torch.float32
    # Independent computation: Pillow half size (W/2, H/2) = (64, 32), then the released crop draws x then y.
    img = Image.open(files["train"][1][0]).convert("RGB")
    half = np.asarray(img.resize((W // 2, H // 2), Image.Resampling.BILINEAR))
    rng = random.Random(1234)
    x, y = rng.randint(0, W // 2 - 32), rng.randint(0, H // 2 - 32)
    assert y == 0
    expected = torch.from_numpy(half[y:y + 32, x:x + 32].transpose(2, 0, 1).copy()).float()
    assert torch.equal(image, expected)
    ids = np.asarray(Image.open(files["train"][1][1]).resize((W // 2, H // 2), Image.Resampling.NEAREST))
    # the fixture's label ids and their train ids by hand (road 7, sidewalk 8, building 11, pole 17, vegetation 21,
    # sky 23, person 24, car 26; unlabeled 0, ego vehicle 1 and the license plate's 255 are ignored)
    by_hand = np.full(256, 250, dtype=np.int64)
    by_hand[[7, 8, 11, 17, 21, 23, 24, 26]] = [0, 1, 2, 5, 8, 10, 11, 13]
    assert set(np.unique(ids)) <= {0, 1, 7, 8, 11, 17, 21, 23, 24, 26, 255}
    assert torch.equal(label, torch.from_numpy(by_hand[ids][y:y + 32, x:x + 32]))
    # same key -> same crop; a plain int key means seed = index
    assert torch.equal(ds[(1, 1234)][0], image)
    assert torch.equal(ds[1][0], ds[(1, 1)][0])


def test_cityscapes_table_is_the_official_one():
    """All 34 label ids against cityscapesScripts' own table (test-only dependency): the 19 train ids, names and
    colours; every id the official table leaves out of training (train id 255 or -1) maps to the ignore label."""
    from cityscapesscripts.helpers.labels import labels as official

    from data.cityscapes_labels import CLASS_NAMES, ID_TO_TRAINID, IGNORE_LABEL, LABELS, NUM_CLASSES, PALETTE

    official = [l for l in official if l.id >= 0]                    # the license plate has id -1
    assert [(name, lid) for name, lid, _, _ in LABELS] == [(l.name, l.id) for l in official]
    trained = sorted((l for l in official if 0 <= l.trainId < 255), key=lambda l: l.trainId)
    assert [l.trainId for l in trained] == list(range(19)) and NUM_CLASSES == 19
    for l in official:
        expected = l.trainId if 0 <= l.trainId < 255 else IGNORE_LABEL
        assert ID_TO_TRAINID[l.id] == expected, l.name
    assert set(np.unique(np.delete(ID_TO_TRAINID, [l.id for l in official]))) == {IGNORE_LABEL}
    assert CLASS_NAMES == [l.name for l in trained]
    assert [tuple(c) for c in PALETTE] == [tuple(l.color) for l in trained]
    assert [tuple(col) for _, _, _, col in LABELS] == [tuple(l.color) for l in official]


def test_cityscapes_v3_train_crops_at_full_resolution(city):
    root, files = city
    ds = CityscapesDataset(root, "train", version="3", crop_size=(32, 32), channel_order="RGB")
    image, label, _ = ds[(0, 99)]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    full = np.asarray(Image.open(files["train"][0][0]).convert("RGB"))
    rng = random.Random(99)
    x, y = rng.randint(0, W - 32), rng.randint(0, H - 32)
    assert torch.equal(image, torch.from_numpy(full[y:y + 32, x:x + 32].transpose(2, 0, 1).copy()).float())


def test_cityscapes_crop_larger_than_image_pads_with_zero_and_ignore(city):
    root, _ = city
    ds = CityscapesDataset(root, "train", version="2", crop_size=(40, 64), channel_order="RGB")
    image, label, _ = ds[(2, 5)]  # half size is 32x64: 8 padded rows at the bottom, no horizontal freedom
    assert image.shape == (3, 40, 64)
    assert (label[32:] == 250).all() and (image[:, 32:] == 0).all()
    assert (label[:32] != 250).any()


def test_cityscapes_val_sizes_v2_and_v3(city):
    root, _ = city
    image, label, name = CityscapesDataset(root, "val", version="2")[0]
    assert image.shape == (3, H // 2, W // 2) and label.shape == (H, W)
    assert name.startswith("frankfurt/")
    image, label, _ = CityscapesDataset(root, "val", version="3")[1]
    assert image.shape == (3, H, W) and label.shape == (H, W)


def test_channel_order_bgr_for_coco_rgb_for_imagenet(tmp_path):
    root = str(tmp_path)
    files = make_cityscapes_tree(root, 1, 1, size=(4, 8))
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[0, 0] = (10, 20, 30)
    save_png(files["val"][0][0], pixels)
    bgr = CityscapesDataset(root, "val", version="3", channel_order="BGR")[0][0]
    rgb = CityscapesDataset(root, "val", version="3", channel_order="RGB")[0][0]
    assert bgr[:, 0, 0].tolist() == [30.0, 20.0, 10.0]
    assert rgb[:, 0, 0].tolist() == [10.0, 20.0, 30.0]


def test_missing_cityscapes_folder_names_path_and_tree(tmp_path):
    root = str(tmp_path / "nowhere")
    with pytest.raises(UserError) as e:
        CityscapesDataset(root, "train", crop_size=(8, 8))
    msg = str(e.value)
    assert os.path.join(os.path.abspath(root), "leftImg8bit_trainvaltest", "leftImg8bit", "train") in msg
    assert os.path.join(os.path.abspath(root), "leftImg8bit", "train") in msg
    assert "gtFine_trainvaltest/" in msg and "_gtFine_labelIds.png" in msg and "`--" in msg  # the drawn tree


def test_missing_cityscapes_label_names_the_image(tmp_path):
    root = str(tmp_path)
    files = make_cityscapes_tree(root, 2, 1, size=(4, 8))
    os.remove(files["train"][1][1])
    with pytest.raises(UserError, match=os.path.basename(files["train"][1][0])):
        CityscapesDataset(root, "train", crop_size=(2, 2))


def test_unreadable_image_names_the_file(tmp_path):
    root = str(tmp_path)
    files = make_cityscapes_tree(root, 2, 1, size=(4, 8))
    with open(files["train"][0][0], "wb") as f:
        f.write(b"\x89PNG garbage, not an image" * 3)
    ds = CityscapesDataset(root, "train", crop_size=(2, 2))
    with pytest.raises(UserError, match="cannot read image file .*aachen_000000_000019_leftImg8bit.png"):
        ds[0]
    assert ds[1][0].shape == (3, 2, 2)  # the other file still loads


# ------------------------------------------------------------------------------------------------- VOC
def test_voc_train_list_excludes_val_and_pads_then_crops(tmp_path):
    root = str(tmp_path)
    ids = make_voc_tree(root, n_train=4, n_val=2, size=(20, 30))
    ds = VOCDataset(root, "train", crop_size=(32, 32), channel_order="RGB")
    assert ds.names == ids["train"] and not set(ds.names) & set(ids["val"])
    image, label, _ = ds[(0, 7)]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    # 20x30 padded right/bottom to 32x32: the only crop offset is (0, 0)
    raw = np.asarray(Image.open(os.path.join(root, "SegmentationClassAug", ids["train"][0] + ".png")))
    assert torch.equal(label[:20, :30], torch.from_numpy(raw.astype(np.int64)))
    assert (label[20:] == 255).all() and (label[:, 30:] == 255).all()
    assert (image[:, 20:] == 0).all() and (image[:, :, 30:] == 0).all()
    jpg = np.asarray(Image.open(os.path.join(root, "JPEGImages", ids["train"][0] + ".jpg")).convert("RGB"))
    assert torch.equal(image[:, :20, :30], torch.from_numpy(jpg.transpose(2, 0, 1).copy()).float())


def test_voc_crop_of_a_larger_image_is_random_and_seeded(tmp_path):
    root = str(tmp_path)
    make_voc_tree(root, n_train=2, n_val=1, size=(40, 60))
    ds = VOCDataset(root, "train", crop_size=(16, 16), channel_order="RGB")
    _, label, _ = ds[(1, 3)]
    raw = np.asarray(Image.open(ds.labels[1])).astype(np.int64)
    rng = random.Random(3)
    y, x = rng.randint(0, 40 - 16), rng.randint(0, 60 - 16)  # the released VOC crop draws the row offset first
    assert torch.equal(label, torch.from_numpy(raw[y:y + 16, x:x + 16]))


def test_voc_val_is_whole_image_and_fallback_warns(tmp_path):
    root = str(tmp_path)
    ids = make_voc_tree(root, n_train=3, n_val=2, size=(21, 33), aug=False)
    with pytest.warns(UserWarning, match="SegmentationClass"):
        ds = VOCDataset(root, "val")
    image, label, name = ds[1]
    assert image.shape == (3, 21, 33) and label.shape == (21, 33) and name == ids["val"][1]
    assert (label[0] == 255).all() and int(label[1:].max()) <= 20


def test_voc_train_list_file(tmp_path):
    root = str(tmp_path)
    ids = make_voc_tree(root, n_train=4, n_val=1, size=(8, 8))
    lst = tmp_path / "train_aug.txt"
    lst.write_text(f"/JPEGImages/{ids['train'][2]}.jpg /SegmentationClassAug/{ids['train'][2]}.png\n"
                   f"{ids['train'][0]}\n")
    assert VOCDataset(root, "train", crop_size=(4, 4), list_file=str(lst)).names == [ids["train"][2], ids["train"][0]]


def test_voc_list_names_a_missing_image_or_label(tmp_path):
    """A listed id without its JPEG or its label PNG stops with the path it expected (one folder listing each)."""
    from utils.errors import UserError
    root = str(tmp_path)
    ids = make_voc_tree(root, n_train=3, n_val=2, size=(8, 8))
    os.remove(os.path.join(root, "JPEGImages", ids["val"][1] + ".jpg"))
    with pytest.raises(UserError, match=f"JPEGImages/{ids['val'][1]}.jpg \\(id {ids['val'][1]} of the val split\\) "
                                        "not found"):
        VOCDataset(root, "val")
    os.remove(os.path.join(root, "SegmentationClassAug", ids["train"][0] + ".png"))
    lst = tmp_path / "train_aug.txt"
    lst.write_text(f"{ids['train'][1]}\n{ids['train'][0]}\n")
    with pytest.raises(UserError, match=f"has no label: expected .*SegmentationClassAug/{ids['train'][0]}.png"):
        VOCDataset(root, "train", crop_size=(4, 4), list_file=str(lst))
    lst.write_text(f"{ids['train'][1]}\n")
    assert VOCDataset(root, "train", crop_size=(4, 4), list_file=str(lst)).names == [ids["train"][1]]


def test_voc_label_out_of_range_raises(tmp_path):
    root = str(tmp_path)
    ids = make_voc_tree(root, n_train=2, n_val=1, size=(8, 8))
    bad = np.zeros((8, 8), dtype=np.uint8)
    bad[3, 3] = 30
    path = os.path.join(root, "SegmentationClassAug", ids["train"][0] + ".png")
    save_png(path, bad, palette=VOC_PALETTE)
    with pytest.raises(UserError, match=r"contains values \[30\]") as e:
        VOCDataset(root, "train", crop_size=(8, 8))[0]
    assert path in str(e.value)


# ------------------------------------------------------------------------------------------------ GTA5
def test_gta5_half_size_crop_and_out_of_range_label(tmp_path):
    root = str(tmp_path)
    files = make_gta5_tree(root, n_train=3, n_val=1, size=(H, W))
    ds = GTA5Dataset(root, "train", crop_size=(32, 48), channel_order="RGB")
    assert len(ds) == 3
    image, label, _ = ds[(2, 11)]
    assert image.shape == (3, 32, 48)
    raw = np.asarray(Image.open(files["train"][2][1]).resize((W // 2, H // 2), Image.Resampling.NEAREST))
    rng = random.Random(11)
    x, y = rng.randint(0, W // 2 - 48), rng.randint(0, 0)
    assert torch.equal(label, torch.from_numpy(raw[y:y + 32, x:x + 48].astype(np.int64)))
    save_png(files["train"][0][1], np.full((H, W), 40, dtype=np.uint8))
    with pytest.raises(UserError, match="40"):
        ds[0]
    with pytest.raises(UserError, match=os.path.join("empty", "images", "train")):
        GTA5Dataset(str(tmp_path / "empty"), "train", crop_size=(8, 8))


# ----------------------------------------------------------------------------------------------- splits
def test_fixed_splits_deterministic_disjoint_covering():
    a = make_split(100, 30, 0, seed=1)
    assert a == make_split(100, 30, 0, seed=2)  # fixed splits ignore the seed
    assert a[0] == np.random.RandomState(0).permutation(100)[:30].tolist()
    b = make_split(100, 30, 1, seed=1)
    assert a[0] != b[0]
    for labeled, unlabeled in (a, b):
        assert len(labeled) == 30 and len(unlabeled) == 70
        assert not set(labeled) & set(unlabeled) and set(labeled) | set(unlabeled) == set(range(100))
    r = make_split(100, 30, 7, seed=42)
    assert r == make_split(100, 30, 9, seed=42)  # any non-fixed id: the permutation of the seed
    assert r[0] == np.random.RandomState(42).permutation(100)[:30].tolist()
    assert r != make_split(100, 30, 7, seed=43)
    with pytest.raises(UserError, match="only 100"):
        make_split(100, 101, 0, seed=1)


def test_text_split_file_matches_stem_basename_relative_path(tmp_path):
    names = ["aachen/aachen_000000_000019_leftImg8bit.png", "bochum/bochum_000001_000020_leftImg8bit.png",
             "zurich/zurich_000002_000021_leftImg8bit.png", "zurich/zurich_000003_000022_leftImg8bit.png"]
    f = tmp_path / "labeled.txt"
    f.write_text("zurich/zurich_000003_000022_leftImg8bit.png\n"   # relative path
                 "aachen_000000_000019_leftImg8bit.png\n"           # basename
                 "\n"
                 "bochum_000001_000020\n")                          # stem without the Cityscapes suffix
    labeled, unlabeled = make_split(4, 3, 0, seed=0, names=names, split_file=str(f))
    assert labeled == [3, 0, 1] and unlabeled == [2]
    f.write_text("aachen_000000_000019\nmissing_id_1\nmissing_id_2\n")
    with pytest.raises(UserError, match="missing_id_1.*missing_id_2"):
        make_split(4, 3, 0, seed=0, names=names, split_file=str(f))


def test_pickle_split_of_the_release(tmp_path):
    f = tmp_path / "split_0.pkl"
    with open(f, "wb") as fh:
        pickle.dump(np.array([5, 2, 7, 0, 1, 3, 4, 6]), fh)
    with pytest.warns(UserWarning, match="original release"):
        labeled, unlabeled = make_split(9, 3, 0, seed=0, split_file=str(f))
    assert labeled == [5, 2, 7] and unlabeled == [0, 1, 3, 4, 6, 8]  # 8 was not in the file: unlabeled
    # a numpy 1.x pickle names numpy.core.multiarray (renamed numpy._core in numpy 2)
    old = pickle.dumps(np.array([4, 1, 0]), protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old
    f.write_bytes(old)
    with pytest.warns(UserWarning):
        assert make_split(5, 2, 0, seed=0, split_file=str(f)) == ([4, 1], [0, 2, 3])
    with open(f, "wb") as fh:
        pickle.dump({"not": "an array"}, fh)
    with pytest.raises(UserError, match="holds dict data .* expected a 1-D array of image indices"):
        make_split(9, 3, 0, seed=0, split_file=str(f))
    with open(f, "wb") as fh:  # a pickle that would call a function is refused, not run
        pickle.dump(os.getcwd, fh)
    with pytest.raises(UserError, match="refusing to load"):
        make_split(9, 3, 0, seed=0, split_file=str(f))


def synthetic_voc_ids(n: int = 10582) -> list[str]:
    """n made-up VOC-style ids in sorted order (the training list the release's VOC permutations index)."""
    return sorted(f"{2007 + k % 6}_{k:06d}" for k in range(n))


def test_voc_paper_split_0_names_the_release_images(monkeypatch):
    ids = synthetic_voc_ids()
    with pytest.warns(UserWarning, match="differs from the release's train_aug.txt"):
        labeled, unlabeled = make_split(len(ids), 212, 0, seed=7, names=ids, dataset="pascal_voc")
    # the first three indices of the release's splits/voc/split_0.pkl (issue 11): 9237, 2061, 3313
    assert [ids[k] for k in labeled[:3]] == [ids[9237], ids[2061], ids[3313]]
    assert len(labeled) == 212 and len(unlabeled) == 10582 - 212
    assert sorted(labeled + unlabeled) == list(range(10582))
    # the seed plays no part; split 1 is another published permutation
    with pytest.warns(UserWarning):
        assert make_split(len(ids), 212, 0, seed=8, names=ids, dataset="pascal_voc")[0] == labeled
        assert make_split(len(ids), 212, 1, seed=7, names=ids, dataset="pascal_voc")[0][:2] == [4993, 8195]
    # a training list with the release's fingerprint (here: pretend the made-up one is it) gives no warning
    import hashlib
    import warnings
    monkeypatch.setattr("data.splits.VOC_TRAIN_LIST_SHA256", hashlib.sha256("\n".join(ids).encode()).hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_split(len(ids), 212, 0, seed=7, names=ids, dataset="pascal_voc")[0] == labeled


def test_cityscapes_paper_splits_and_random_splits():
    # first indices of the release's splits/city/split_{0,1}.pkl, applied to the sorted list
    assert make_split(2975, 100, 0, seed=5555, dataset="cityscapes")[0][:3] == [1559, 1613, 1913]
    labeled, unlabeled = make_split(2975, 372, 1, seed=5555, dataset="cityscapes")
    assert labeled[:3] == [241, 1323, 548] and len(unlabeled) == 2975 - 372
    # any other split id: a permutation drawn from the seed (numpy's legacy generator)
    assert make_split(2975, 100, 3, seed=5555, dataset="cityscapes")[0] == \
        np.random.RandomState(5555).permutation(2975)[:100].tolist()
    # the published permutations cover the full datasets only
    with pytest.raises(UserError, match="permutation of 2975 training images, but this training set has 4"):
        make_split(4, 2, 0, seed=0, dataset="cityscapes")


def test_build_data_paper_split_needs_the_full_voc_list(tmp_path):
    voc = str(tmp_path / "voc")
    make_voc_tree(voc, 5, 2, size=(20, 24))
    with pytest.raises(UserError, match="10582 training images, but this training set has 5"):
        build_data(_resolved_cfg("pascal", ignore=255, labeled=2, input_size="16,16", split_id=2), data_root=voc)


# -------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_diverse():
    ds = SyntheticStreets(8, image_size=(64, 128), seed_offset=0, train=False)
    a, b = ds[3], ds[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 64, 128) and a[1].shape == (64, 128) and a[1].dtype == torch.int64
    assert not torch.equal(ds[4][0], a[0])
    assert not torch.equal(SyntheticStreets(8, (64, 128), seed_offset=1, train=False)[3][0], a[0])
    present = set()
    per_image = []
    for i in range(8):
        lbl = ds[i][1]
        vals = set(torch.unique(lbl).tolist())
        per_image.append(len(vals - {250}))
        present |= vals
    assert len(present - {250}) >= 7 and present <= set(range(SYN_CLASSES)) | {250}
    assert min(per_image) >= 5
    assert 0 <= float(a[0].min()) and float(a[0].max()) <= 255


def test_synthetic_colour_alone_is_ambiguous():
    """The best per-pixel colour rule (Bayes on a 8x8x8 colour histogram of the same pixels, an upper bound for
    colour alone at that quantisation) stays far from perfect: texture and shape are needed."""
    ds = SyntheticStreets(12, image_size=(64, 128), train=False)
    items = [ds[i] for i in range(12)]
    x = torch.cat([im.reshape(3, -1).T for im, _, _ in items]).long() // 32  # [N,3] colour bins
    y = torch.cat([lb.reshape(-1) for _, lb, _ in items])
    keep = y != 250
    code, y = (x[:, 0] * 64 + x[:, 1] * 8 + x[:, 2])[keep], y[keep]
    hist = torch.zeros(512, SYN_CLASSES).index_put_((code, y), torch.ones(len(y)), accumulate=True)
    pred = hist.argmax(1)[code]
    class_acc = torch.stack([(pred[y == c] == c).float().mean() for c in range(SYN_CLASSES)])
    assert float(class_acc.mean()) < 0.6
    assert float((pred == y).float().mean()) < 0.75


def test_synthetic_train_crops_and_channel_order():
    rgb = SyntheticStreets(4, (48, 80), train=True, crop_size=(32, 40), channel_order="RGB")
    bgr = SyntheticStreets(4, (48, 80), train=True, crop_size=(32, 40), channel_order="BGR")
    image, label, index = rgb[(2, 17)]
    assert image.shape == (3, 32, 40) and label.shape == (32, 40) and index == 2
    assert torch.equal(bgr[(2, 17)][0], image.flip(0))
    full_img, full_lbl = rgb.scene(2)
    rng = random.Random(17)
    x, y = rng.randint(0, 80 - 40), rng.randint(0, 48 - 32)
    assert torch.equal(label, torch.from_numpy(full_lbl[y:y + 32, x:x + 40].astype(np.int64)))


# -------------------------------------------------------------------------------------------- sampler
class KeyEcho(torch.utils.data.Dataset):
    """Returns its key as tensors and counts accesses."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        self.calls += 1
        index, seed = key
        return torch.tensor(index), torch.tensor(seed)


def test_infinite_batches_cover_each_epoch_and_restart():
    ds = KeyEcho(12)
    it = InfiniteBatches(ds, list(range(100, 110)), batch_size=4, seed=3)  # 10 items -> 2 full batches/epoch
    assert it.batches_per_epoch == 2
    before = torch.random.get_rng_state()
    batches = [it.next() for _ in range(6)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is not consumed
    assert all(b[0].shape == (4,) for b in batches)
    epochs = [torch.cat([batches[2 * e][0], batches[2 * e + 1][0]]).tolist() for e in range(3)]
    for e in epochs:
        assert len(set(e)) == 8 and set(e) <= set(range(100, 110))
    assert epochs[0] != epochs[1]
    assert it.state_dict() == {"epoch": 3, "consumed": 0}
    # item seeds follow (seed, epoch, position): first item of epoch 1 sits at position 0
    assert int(batches[2][1][0]) == item_seed(3, 1, 0)


def test_infinite_batches_resume_gives_the_same_batches_without_loading_skipped_ones():
    ref = InfiniteBatches(KeyEcho(30), list(range(30)), batch_size=4, seed=11)  # 7 batches per epoch
    stream = [ref.next() for _ in range(12)]
    for stop in (0, 3, 7, 9):
        a = InfiniteBatches(KeyEcho(30), list(range(30)), batch_size=4, seed=11)
        for _ in range(stop):
            a.next()
        state = a.state_dict()
        ds = KeyEcho(30)
        b = InfiniteBatches(ds, list(range(30)), batch_size=4, seed=11)
        b.load_state_dict(state)
        got = [b.next() for _ in range(12 - stop)]
        assert ds.calls == 4 * (12 - stop)
        for x, y in zip(got, stream[stop:]):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    mid = InfiniteBatches(KeyEcho(30), list(range(30)), batch_size=4, seed=11)
    mid.next()
    mid.load_state_dict({"epoch": 1, "consumed": 2})  # jump while an iterator is open
    assert torch.equal(mid.next()[0], stream[9][0])


def test_infinite_batches_shard_by_rank():
    shards = [InfiniteBatches(KeyEcho(16), list(range(16)), 2, seed=5, rank=r, world_size=2) for r in range(2)]
    got = [torch.cat([s.next()[0] for _ in range(4)]).tolist() for s in shards]
    assert not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) == set(range(16))


def test_infinite_batches_errors():
    with pytest.raises(UserError, match="cannot fill one batch"):
        InfiniteBatches(KeyEcho(3), [0, 1, 2], batch_size=4)
    empty = InfiniteBatches(KeyEcho(3), [], batch_size=4)
    with pytest.raises(UserError, match="empty"):
        empty.next()


def test_workers_do_not_change_the_data():
    ds = SyntheticStreets(6, (32, 48), train=True, crop_size=(24, 24))
    a = InfiniteBatches(ds, list(range(6)), batch_size=2, seed=9, num_workers=0)
    b = InfiniteBatches(ds, list(range(6)), batch_size=2, seed=9, num_workers=2)
    for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
        x, y = a.next(), b.next()
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    b.load_state_dict({"epoch": 0, "consumed": 1})  # persistent workers are reset at the new position
    a.load_state_dict({"epoch": 0, "consumed": 1})
    assert torch.equal(a.next()[0], b.next()[0])


# ------------------------------------------------------------------------------------------- build_data
def test_build_data_synthetic():
    d = build_data(_resolved_cfg())
    assert d.name == "synthetic" and d.num_classes == SYN_CLASSES == len(d.class_names) == len(d.palette)
    assert len(d.train) == 10 and len(d.val) == 3 and len(d.labeled_idx) == 3 and len(d.unlabeled_idx) == 7
    assert d.labeled_idx == np.random.RandomState(0).permutation(10)[:3].tolist()
    assert d.mean_rgb == OTHER_MEAN_RGB and d.channel_order == "RGB" and d.ignore_label == 250
    assert d.train[(0, 1)][0].shape == (3, 32, 32) and d.val[0][0].shape == (3, 48, 80)
    assert not np.array_equal(d.val[0][1].numpy(), d.train.scene(0)[1])  # validation scenes are other scenes
    assert len(d.train_names) == 10


def test_build_data_cityscapes_and_voc(city, tmp_path):
    root, _ = city
    # split ids 0/1/2 select the release's published splits of the full datasets: a tiny tree takes a random one
    d = build_data(_resolved_cfg("cityscapes", pretraining="COCO", labeled=2, split_id=-1), data_root=root)
    assert d.name == "cityscapes" and d.num_classes == 19 and d.channel_order == "BGR"
    assert d.mean_rgb == CITYSCAPES_MEAN_RGB and len(d.train) == 4 and len(d.val) == 2
    assert d.val[0][0].shape == (3, H // 2, W // 2)  # version 2
    assert d.train_names[0] == "aachen/aachen_000000_000019_leftImg8bit.png"
    d3 = build_data(_resolved_cfg("cityscapes", version="3", root=root, labeled=2, split_id=-1))
    assert d3.val[0][0].shape == (3, H, W)
    voc = str(tmp_path / "voc")
    make_voc_tree(voc, 5, 2, size=(20, 24))
    v = build_data(_resolved_cfg("pascal", ignore=255, labeled=2, input_size="16,16", split_id=-1), data_root=voc)
    assert v.name == "pascal_voc" and v.num_classes == 21 and v.mean_rgb == VOC_MEAN_RGB
    assert v.palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)] and v.class_names[15] == "person"


def test_build_data_default_root_is_relative_to_cwd(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.chdir(code)
    with pytest.raises(UserError, match=str(tmp_path / "data" / "CityScapes")):
        build_data(_resolved_cfg("cityscapes"))


def test_build_gta5(tmp_path):
    make_gta5_tree(str(tmp_path), 2, 1, size=(32, 64))
    ds = build_gta5(_resolved_cfg("cityscapes", pretraining="COCO", input_size="8,16"), str(tmp_path))
    image, label, _ = ds[(0, 0)]
    # the train split only is the extra labeled source (the release's gtaLoader reads images/train)
    assert len(ds) == 2 and image.shape == (3, 8, 16) and ds.channel_order == "BGR"
    assert all(os.sep + os.path.join("images", "train") + os.sep in path for path in ds.images)


def test_gta5_images_in_sub_folders_of_the_split_are_found(tmp_path):
    """images/train is searched recursively, as the release's loader globs it: frames in sub-folders (one per
    downloaded part) are found, each with the label at the same relative path under labels/train, in one order
    (by relative path); a frame whose label is missing there is named."""
    files = make_gta5_tree(str(tmp_path), 2, 1, size=(32, 64))
    rng = np.random.default_rng(1)
    for part, name in (("part2", "00101.png"), ("part2/deeper", "00102.png")):
        save_png(str(tmp_path / "images" / "train" / part / name), rng.integers(0, 256, (32, 64, 3)))
        save_png(str(tmp_path / "labels" / "train" / part / name), rng.integers(0, 19, (32, 64)))
    ds = build_gta5(_resolved_cfg("cityscapes", pretraining="COCO", input_size="8,16"), str(tmp_path))
    assert ds.names == ["00001.png", "00002.png", "part2/00101.png", "part2/deeper/00102.png"]
    assert ds.images[:2] == [f[0] for f in files["train"]] and ds.labels[:2] == [f[1] for f in files["train"]]
    assert ds.images[3] == str(tmp_path / "images" / "train" / "part2" / "deeper" / "00102.png")
    assert ds.labels[3] == str(tmp_path / "labels" / "train" / "part2" / "deeper" / "00102.png")
    assert ds[(3, 0)][0].shape == (3, 8, 16)
    os.remove(tmp_path / "labels" / "train" / "part2" / "00101.png")
    with pytest.raises(UserError, match=r"GTA5 image .*part2.00101\.png has no label: expected .*labels.train.part2"):
        build_gta5(_resolved_cfg("cityscapes", pretraining="COCO", input_size="8,16"), str(tmp_path))


def test_check_labels_accepts_train_ids_and_ignore():
    check_labels(torch.tensor([[0, 18, 250]]), 19, 250, "a.png")


def test_check_labels_names_file_and_values():
    labels = torch.tensor([[0, 26, 33, 250, 26, -1]])
    with pytest.raises(UserError) as err:
        check_labels(labels, 19, 250, "aachen_000000_gtFine_labelIds.png")
    msg = str(err.value)
    assert "aachen_000000_gtFine_labelIds.png" in msg
    assert "[-1, 26, 33]" in msg
    assert "250" in msg
