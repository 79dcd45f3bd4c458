"""Images as viewers show them (data/pixels.py through data.common.read_image, the one reader of training,
evaluation and predict.py): EXIF orientation applied, 16-bit and other modes scaled by value range instead of clipped,
labels never rescaled, `--check-files` saying what it converted; folder datasets follow symlinked folders. (Issue 31,
wrong behaviours 5 and 6: 16-bit PNGs read saturated; EXIF orientation ignored.)"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import predict
from data import build_data
from data.common import read_image, read_label
from data.folder import walk_files
from data.pixels import grey_to_uint8
from data.synthetic import export_folder
from engine.config import load_config
from engine.run import Run
from utils.errors import UserError
from utils.variants import TRAIN_SSL

SIZE = (40, 60)
ORIENTATION = 0x0112


def save_with_orientation(path: str, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (Pillow mode I;16) holding 0..65535 reads as v * 255 / 65535 rounded, in all three channels
    (before: convert("RGB") clipped every value above 255 to white)."""
    values = np.linspace(0, 65535, 7 * 9).round().astype(np.uint16).reshape(7, 9)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # by hand: round half up
    got = read_image(str(tmp_path / "grey16.png"))
    assert got.shape == (7, 9, 3) and got.dtype == np.uint8
    assert np.array_equal(got, np.repeat(expected[:, :, None], 3, axis=2))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 50  # the range kept, not two levels


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [0, 100, 255], [0, 100, 255]),                          # within 0..255: kept
    ("I", [0, 257, 65535], [0, 1, 255]),                          # within 0..65535: as 16-bit
    ("I", [-10, 0, 10], [0, 128, 255]),                           # any other range: its min..max (0 -> 127.5 -> 128)
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),                        # within 0..1: times 255 (127.5 rounds to 128)
    ("F", [0.0, 100.0, 200.0], [0, 100, 200]),                    # within 0..255: kept
    ("F", [-1.0, 0.0, 3.0], [0, 64, 255]),                        # its min..max: 1/4 of 255 = 63.75 -> 64
    ("F", [float("nan"), 0.5, 1.0], [0, 128, 255]),               # NaN is 0
])
def test_32_bit_and_float_rules(mode, values, expected):
    got, _ = grey_to_uint8(np.array([values], dtype=np.float32 if mode == "F" else np.int32), mode)
    assert got.tolist() == [expected]


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (the camera held upright: shown turned 90 degrees clockwise) and 3 (upside down): the image reads
    as shown, whatever the stored pixels (before: the stored pixels, sideways)."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    save_with_orientation(str(tmp_path / "six.png"), stored, 6)
    save_with_orientation(str(tmp_path / "three.png"), stored, 3)
    assert np.array_equal(read_image(str(tmp_path / "six.png")), np.rot90(stored, k=-1))  # clockwise, by numpy
    assert np.array_equal(read_image(str(tmp_path / "three.png")), stored[::-1, ::-1])
    Image.fromarray(stored).save(tmp_path / "none.png")
    assert np.array_equal(read_image(str(tmp_path / "none.png")), stored)
    assert predict.read_image is read_image  # predict.py reads with the same function as the datasets


def test_labels_keep_their_values():
    """A 16-bit label keeps its class ids (never rescaled); one holding a value beyond 8 bits is refused."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        ids = np.array([[0, 1, 7], [250, 3, 2]], dtype=np.uint16)
        Image.fromarray(ids).save(os.path.join(d, "l.png"))
        assert read_label(os.path.join(d, "l.png")).tolist() == ids.tolist()
        Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(os.path.join(d, "big.png"))
        with pytest.raises(UserError, match="holds values outside 0..255"):
            read_label(os.path.join(d, "big.png"))


@pytest.fixture
def folder(tmp_path):
    root = str(tmp_path / "data")
    return root, export_folder(root, num_train=8, num_val=2, image_size=SIZE)


def test_a_folder_dataset_reads_converted_images_and_check_files_says_so(folder, tmp_path, capsys):
    """One validation image stored as 16-bit greyscale, one training image and its label stored sideways with EXIF
    orientation 8: the dataset items are the values a viewer shows, and --check-files reports both conversions."""
    root, config = folder
    val = os.path.join(root, "val", "images", "synthetic_1_00000.png")
    rgb = np.asarray(Image.open(val))
    grey = rgb[:, :, 1]
    Image.fromarray(grey.astype(np.uint16) * 257).save(val)  # exactly v * 257: reads back as v
    train_image = os.path.join(root, "train", "images", "synthetic_0_00001.png")
    train_label = os.path.join(root, "train", "labels", "synthetic_0_00001.png")
    upright, label = np.asarray(Image.open(train_image)), np.asarray(Image.open(train_label))
    save_with_orientation(train_image, np.rot90(upright, k=-1), 8)  # 8: shown turned 90 degrees anticlockwise
    Image.fromarray(label).save(train_label)  # the label drawn on the image as shown
    cfg = load_config(config, ["training.data.input_size=33,49", "training.data.labeled_samples=3"])
    data = build_data(cfg)
    image, _, _ = data.val[0]
    assert np.array_equal(image.numpy(), np.repeat(grey[None].astype(np.float32), 3, axis=0))  # RGB order (imagenet)
    assert np.array_equal(read_image(train_image), upright)
    argv = ["--config", config, "--device", "cpu", "--dry-run", "--check-files", "--set", "backbone.width=16",
            "--set", "training.data.input_size=33,49", "--set", "training.data.labeled_samples=4"]
    capsys.readouterr()
    Run(TRAIN_SSL, argv)
    assert ("--check-files: all 10 items (8 train, 2 val) read; 1 image converted from 16-bit, 1 image rotated by "
            "EXIF") in capsys.readouterr().out


def test_a_size_mismatch_from_exif_says_exif(folder):
    """A label drawn on the stored (sideways) pixels of an image whose EXIF orientation turns it: the folder dataset's
    check names the EXIF orientation as the cause (before: a size error that never said EXIF)."""
    root, config = folder
    image = os.path.join(root, "val", "images", "synthetic_1_00001.png")
    save_with_orientation(image, np.asarray(Image.open(image)), 6)  # the label keeps the stored 60x40
    cfg = load_config(config, ["training.data.input_size=33,49", "training.data.labeled_samples=3"])
    with pytest.raises(UserError) as e:
        build_data(cfg)
    assert "is 60x40 (WxH) but its image" in str(e.value) and "is 40x60" in str(e.value)
    assert "EXIF orientation (6: turned by 90 degrees)" in str(e.value)


def test_symlinked_folders_are_followed_and_loops_walked_once(tmp_path):
    """images/a/x.png, images/link -> a folder elsewhere holding two images, and images/a/loop -> images (a loop):
    all three images are found, each once, and the walk ends (before: the linked folder was skipped)."""
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (images / "a").mkdir(parents=True)
    elsewhere.mkdir()
    pixel = np.zeros((2, 2, 3), np.uint8)
    Image.fromarray(pixel).save(images / "a" / "x.png")
    for name in ("y.png", "z.png"):
        Image.fromarray(pixel).save(elsewhere / name)
    os.symlink(elsewhere, images / "link")
    os.symlink(images, images / "a" / "loop")
    assert sorted(walk_files(str(images))) == ["a/x", "link/y", "link/z"]
