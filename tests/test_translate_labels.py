"""utils/translate_labels.py: GTA5 palette / colour labels -> Cityscapes train ids (SPEC 6.3).

Expected train ids are written out by hand from the Cityscapes definition: road id 7 -> 0, car 26 -> 13,
unlabeled 0 -> 250, person 24 -> 11, bicycle 33 -> 18, pole 17 -> 5, polegroup 18 -> 250.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from data.translate_labels import convert_label, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Label ids of a 4x4 label and the train ids worked out by hand.
IDS = np.array([[7, 7, 26, 26],
                [0, 24, 33, 7],
                [26, 0, 24, 33],
                [7, 26, 0, 24]], dtype=np.uint8)
TRAIN = np.array([[0, 0, 13, 13],
                  [250, 11, 18, 0],
                  [13, 250, 11, 18],
                  [0, 13, 250, 11]], dtype=np.uint8)
# Cityscapes colours of the ids used, copied from the official label definition.
COLOURS = {0: (0, 0, 0), 7: (128, 64, 128), 17: (153, 153, 153), 18: (153, 153, 153), 24: (220, 20, 60),
           26: (0, 0, 142), 33: (119, 11, 32)}


def palette_image(ids: np.ndarray, colours=COLOURS) -> Image.Image:
    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    pal = [0] * 768
    for i, c in colours.items():
        pal[3 * i:3 * i + 3] = c
    img.putpalette(pal)
    return img


def rgb_image(ids: np.ndarray) -> Image.Image:
    rgb = np.zeros(ids.shape + (3,), dtype=np.uint8)
    for i, c in COLOURS.items():
        rgb[ids == i] = c
    return Image.fromarray(rgb)


def write_png(img: Image.Image, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_label(path) -> tuple[str, np.ndarray]:
    with Image.open(path) as img:
        return img.mode, np.asarray(img).copy()


# ------------------------------------------------------------------------------------------- arrays

def test_palette_label_converts_to_hand_computed_train_ids():
    img = palette_image(IDS)
    assert img.mode == "P" and np.array_equal(np.asarray(img), IDS)
    out = convert_label(img)
    assert out.dtype == np.uint8
    assert np.array_equal(out, TRAIN)
    assert np.array_equal(convert_label(IDS), TRAIN)  # a 2-D array is read as label ids


def test_rgb_label_converts_to_the_same_train_ids():
    img = rgb_image(IDS)
    assert img.mode == "RGB"
    assert np.array_equal(convert_label(img), TRAIN)
    assert np.array_equal(convert_label(np.asarray(img)), TRAIN)


def test_pole_and_polegroup():
    ids = np.array([[17, 18]], dtype=np.uint8)
    assert convert_label(palette_image(ids)).tolist() == [[5, 250]]  # ids keep polegroup apart
    assert convert_label(rgb_image(ids)).tolist() == [[5, 5]]  # the shared colour goes to pole
    # Every black id (0..4) and the not-evaluated colours map to ignore.
    rgb = np.array([[[0, 0, 0], [111, 74, 0], [250, 170, 160], [0, 0, 90]]], dtype=np.uint8)
    assert convert_label(rgb).tolist() == [[250, 250, 250, 250]]


def test_malformed_inputs_give_none():
    rgb = np.asarray(rgb_image(IDS)).copy()
    rgb[1, 2] = (128, 64, 129)  # one unknown colour
    assert convert_label(rgb) is None
    assert convert_label(Image.fromarray(rgb)) is None
    bad_ids = IDS.copy()
    bad_ids[0, 0] = 34  # not a label id
    assert convert_label(palette_image(bad_ids)) is None
    assert convert_label(bad_ids) is None
    wrong_palette = {**COLOURS, 26: (0, 0, 143)}  # index 26 coloured unlike car
    assert convert_label(palette_image(IDS, wrong_palette)) is None
    assert convert_label(Image.fromarray(np.zeros((2, 2, 4), np.uint8))) is None  # RGBA


def test_mode_l_train_ids_are_kept_and_other_values_rejected():
    l_img = Image.fromarray(TRAIN)
    assert l_img.mode == "L"
    assert np.array_equal(convert_label(l_img), TRAIN)
    ids_as_l = Image.fromarray(IDS)  # label ids 24, 26, 33 are not train ids
    assert convert_label(ids_as_l) is None


# ------------------------------------------------------------------------------------------- files

def make_tree(root):
    """labels/a.png (palette), labels/sub/b.png (RGB)."""
    write_png(palette_image(IDS), os.path.join(root, "labels", "a.png"))
    write_png(rgb_image(IDS.T.copy()), os.path.join(root, "labels", "sub", "b.png"))


def test_in_place_conversion_and_second_run_changes_nothing(tmp_path, capsys):
    root = str(tmp_path / "GTA5")
    make_tree(root)
    assert main(["--root", root, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "converted 2, already converted 0, malformed 0" in out
    a, b = os.path.join(root, "labels", "a.png"), os.path.join(root, "labels", "sub", "b.png")
    assert read_label(a)[0] == "L" and np.array_equal(read_label(a)[1], TRAIN)
    assert read_label(b)[0] == "L" and np.array_equal(read_label(b)[1], TRAIN.T)
    before = {p: read_bytes(p) for p in (a, b)}
    stamps = {p: os.stat(p).st_mtime_ns for p in (a, b)}

    assert main(["--root", root, "--workers", "1"]) == 0
    assert "converted 0, already converted 2, malformed 0" in capsys.readouterr().out
    assert {p: read_bytes(p) for p in (a, b)} == before
    assert {p: os.stat(p).st_mtime_ns for p in (a, b)} == stamps  # not even rewritten
    assert sorted(os.listdir(os.path.join(root, "labels"))) == ["a.png", "sub"]  # no temporary files left


def test_malformed_label_is_reported_and_good_ones_converted(tmp_path, capsys):
    root = str(tmp_path / "GTA5")
    make_tree(root)
    rgb = np.asarray(rgb_image(IDS)).copy()
    rgb[0, 0] = (1, 2, 3)
    bad = os.path.join(root, "labels", "bad.png")
    write_png(Image.fromarray(rgb), bad)
    junk = os.path.join(root, "labels", "junk.png")
    with open(junk, "wb") as f:
        f.write(b"not a png at all")
    bad_bytes, junk_bytes = read_bytes(bad), read_bytes(junk)

    assert main(["--root", root, "--workers", "2"]) == 1  # through the process pool
    cap = capsys.readouterr()
    assert "converted 2, already converted 0, malformed 2" in cap.out
    assert bad in cap.err and "(1, 2, 3)" in cap.err
    assert junk in cap.err
    assert read_bytes(bad) == bad_bytes and read_bytes(junk) == junk_bytes  # not written
    assert np.array_equal(read_label(os.path.join(root, "labels", "a.png"))[1], TRAIN)


def test_out_dir_leaves_source_untouched(tmp_path, capsys):
    root = str(tmp_path / "GTA5")
    make_tree(root)
    done = os.path.join(root, "labels", "done.png")
    write_png(Image.fromarray(TRAIN), done)  # already converted: copied as is
    src = {p: read_bytes(p) for p in (os.path.join(root, "labels", "a.png"),
                                      os.path.join(root, "labels", "sub", "b.png"), done)}
    out_dir = str(tmp_path / "converted")
    assert main(["--root", root, "--out-dir", out_dir, "--workers", "1"]) == 0
    assert "converted 2, already converted 1, malformed 0" in capsys.readouterr().out
    assert {p: read_bytes(p) for p in src} == src
    assert np.array_equal(read_label(os.path.join(out_dir, "a.png"))[1], TRAIN)
    assert np.array_equal(read_label(os.path.join(out_dir, "sub", "b.png"))[1], TRAIN.T)
    assert read_bytes(os.path.join(out_dir, "done.png")) == src[done]


def test_split_mat_layout(tmp_path, capsys):
    root = tmp_path / "GTA5"
    for i in range(1, 5):
        write_png(Image.fromarray(np.full((2, 3, 3), 10 * i, np.uint8)), str(root / "images" / f"{i:05d}.png"))
        write_png(palette_image(IDS), str(root / "labels" / f"{i:05d}.png"))
    mat = str(tmp_path / "split.mat")
    savemat(mat, {"trainIds": np.array([[1], [2]]), "valIds": np.array([[3]]), "testIds": np.array([[4]])})

    assert main(["--root", str(root), "--split-mat", mat, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    for kind in ("images", "labels"):
        assert sorted(os.listdir(root / kind / "train")) == ["00001.png", "00002.png"]
        assert sorted(os.listdir(root / kind / "val")) == ["00003.png"]
        assert sorted(os.listdir(root / kind)) == ["00004.png", "train", "val"]  # test left in place
    assert "2 test files left in place" in out
    assert np.array_equal(np.asarray(Image.open(root / "images" / "val" / "00003.png"))[0, 0], [30, 30, 30])
    assert np.array_equal(read_label(root / "labels" / "train" / "00002.png")[1], TRAIN)
    assert "converted 4, already converted 0, malformed 0" in out  # recursive: the test label too

    assert main(["--root", str(root), "--split-mat", mat, "--workers", "1"]) == 0  # re-run: nothing moves
    out = capsys.readouterr().out
    assert "moved 0 files" in out and "converted 0, already converted 4, malformed 0" in out


def test_split_mat_conflict_moves_nothing(tmp_path, capsys):
    root = tmp_path / "GTA5"
    for rel in ("images/00001.png", "images/train/00001.png", "labels/00001.png", "images/00002.png"):
        write_png(palette_image(IDS), str(root / rel))
    mat = str(tmp_path / "split.mat")
    savemat(mat, {"trainIds": np.array([1, 2]), "valIds": np.array([3]), "testIds": np.array([4])})
    assert main(["--root", str(root), "--split-mat", mat, "--workers", "1"]) == 2
    assert "both flat and in their train/val folder" in capsys.readouterr().err
    assert (root / "images" / "00002.png").exists() and (root / "labels" / "00001.png").exists()


def test_missing_labels_folder_is_a_user_error(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "labels folder not found" in capsys.readouterr().err


def test_runs_as_a_script_from_the_repo_root(tmp_path):
    root = str(tmp_path / "GTA5")
    make_tree(root)
    r = subprocess.run([sys.executable, "utils/translate_labels.py", "--root", root, "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "labels: 100% (2/2)" in r.stdout  # not a terminal: progress lines
    assert r.stdout.strip().splitlines()[-1] == "converted 2, already converted 0, malformed 0"
