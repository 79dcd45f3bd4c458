"""`folder.unlabeled_images` (issue 30): training images without masks form the unlabeled set of a folder dataset.

The exported synthetic scenes give the labeled pairs; a few other scenes written as images only (in nested
folders, no label anywhere) are the unlabeled images. Items of those images must be the image files themselves
with every pixel ignored; the split rule chooses among the pairs only; --check-files names an unreadable unlabeled
image; a run draws its unlabeled batches (and the BatchNorm refresh) from them."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import trainSSL
from data import build_data
from data.splits import make_split
from data.synthetic import SyntheticStreets, export_folder
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.entry import main_guard
from engine.run import Run
from tests.run_helpers import argv_of, single_thread, tiny_sets
from utils.errors import UserError

SIZE = (40, 60)
UNLABELED = ("city/a.png", "city/deeper/b.png", "c.png")  # relative paths under the unlabeled folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root, config, unlabeled folder, paths of its images): 8 labeled pairs, 2 validation pairs, 3 images
    without labels (other scenes: seed offset 5)."""
    root = str(tmp_path_factory.mktemp("unlabeled_folder"))
    config = export_folder(root, num_train=8, num_val=2, image_size=SIZE)
    scenes = SyntheticStreets(len(UNLABELED), SIZE, seed_offset=5, train=False)
    folder = os.path.join(root, "unlabeled")
    paths = []
    for k, rel in enumerate(UNLABELED):
        path = os.path.join(folder, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(scenes.scene(k)[0]).save(path)
        paths.append(path)
    return root, config, folder, paths


def cfg_of(config: str, labeled: int, unlabeled: str | None, crop: str = "33,49", **folder) -> dict:
    cfg = load_config(config, [f"training.data.input_size={crop}", f"training.data.labeled_samples={labeled}"])
    cfg["folder"].update(folder, unlabeled_images=unlabeled)
    return cfg


def test_unlabeled_items_are_the_images_with_every_pixel_ignored(tree):
    root, config, folder, paths = tree
    data = build_data(cfg_of(config, 8, folder, crop=f"{SIZE[0]},{SIZE[1]}"))
    # walk order: sorted folders, then files; the pairs first
    order = [paths[2], paths[0], paths[1]]  # c.png, city/a.png, city/deeper/b.png
    assert len(data.train) == 11 and data.train_names[8:] == ["c.png", "city/a.png", "city/deeper/b.png"]
    assert sorted(data.labeled_idx) == list(range(8)) and data.unlabeled_idx == [8, 9, 10]
    for k, path in enumerate(order):
        image, label, index = data.train[(8 + k, 123)]  # crop = the whole image: the file's pixels
        expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).copy()).float()
        assert index == 8 + k and torch.equal(image, expected)
        assert label.shape == SIZE and bool((label == 250).all())
    # the pairs are the items they were without unlabeled images
    alone = build_data(cfg_of(config, 8, None, crop=f"{SIZE[0]},{SIZE[1]}"))
    for k in range(8):
        assert all(torch.equal(a, b) for a, b in zip(data.train[(k, 5)][:2], alone.train[(k, 5)][:2]))


def test_split_rule_chooses_among_the_pairs_and_the_rest_joins_the_unlabeled_set(tree):
    root, config, folder, _ = tree
    data = build_data(cfg_of(config, 3, folder))
    labeled, rest = make_split(8, 3, 0, seed=data_seed(config))  # the usual rule over the 8 pairs
    assert data.labeled_idx == labeled and data.unlabeled_idx == rest + [8, 9, 10]
    without = build_data(cfg_of(config, 3, None))
    assert without.labeled_idx == labeled and without.unlabeled_idx == rest  # as before issue 30

    with pytest.raises(UserError, match="labeled_samples is 9 but the folder dataset has 8 labeled pairs .* 3 "
                                        "images without labels.*at most 8"):
        build_data(cfg_of(config, 9, folder))


def data_seed(config: str) -> int:
    return json.load(open(config))["seed"]


def test_list_file_relative_paths_and_pair_images_left_out(tree, tmp_path):
    root, config, folder, paths = tree
    pair_image = os.path.join(root, "train", "images", "synthetic_0_00002.png")
    listing = tmp_path / "unlabeled.txt"
    rel = os.path.relpath(paths[1], tmp_path)
    listing.write_text(f"# images nobody labeled\n{paths[0]}\n\n{rel} a_mask_column_is_ignored.png\n{pair_image}\n")
    data = build_data(cfg_of(config, 8, str(listing)))
    assert len(data.train) == 10 and data.unlabeled_idx == [8, 9]  # the pair's image is labeled, not repeated
    assert data.train.image_paths[8:] == [paths[0], os.path.join(str(tmp_path), rel)]

    listing.write_text(f"{paths[0]}\n{tmp_path / 'gone.png'}\n{tmp_path / 'lost.png'}\n")
    with pytest.raises(UserError) as e:
        build_data(cfg_of(config, 8, str(listing)))
    assert "2 of the 3 images listed" in str(e.value) and "gone.png" in str(e.value) and "lost.png" in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        build_data(cfg_of(config, 8, str(tmp_path / "nowhere")))


def test_relative_to_data_root_and_unlabeled_file_refused_for_folders(tree):
    root, config, folder, _ = tree
    cfg = cfg_of(config, 8, "unlabeled")
    cfg["training"]["data"]["root"] = root
    assert len(build_data(cfg).unlabeled_idx) == 3
    cfg["training"]["data"]["unlabeled_file"] = "x.txt"
    with pytest.raises(UserError, match="folder.unlabeled_images"):
        build_data(cfg)


def tiny_argv(config: str, run_dir: str, folder: str, iterations: int, **extra) -> list[str]:
    sets = tiny_sets(run_dir, iterations, **{"training.data.labeled_samples": 8, "folder.unlabeled_images": folder,
                                             **extra})
    return argv_of(sets, config=config)


def test_check_files_names_an_unreadable_unlabeled_image(tree, tmp_path, capsys):
    root, config, _, paths = tree
    folder = str(tmp_path / "unlabeled")
    os.makedirs(folder)
    good = os.path.join(folder, "good.png")
    bad = os.path.join(folder, "bad.png")
    Image.open(paths[0]).save(good)
    open(bad, "wb").write(b"\x89PNG but not really")
    argv = tiny_argv(config, str(tmp_path / "run"), folder, 1) + ["--dry-run", "--check-files"]
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: trainSSL.main(argv))
    assert e.value.code == 2
    captured = capsys.readouterr()
    # building the data does not read unlabeled images (the plan is printed); the file check does
    assert "10 train (8 labeled, 2 unlabeled)" in captured.out and "dry run: OK" in captured.out
    err = captured.err
    assert "1 of 12 items (10 train, 2 val)" in err and bad in err and good not in err, err


def test_run_draws_unlabeled_batches_from_the_images_without_labels(tree, tmp_path, capsys):
    """Three iterations and a BatchNorm refresh of two batches: every unlabeled batch, in training and in the
    refresh, holds images of the unlabeled folder only (indices 8..10, all 8 pairs being labeled);
    train_split.txt lists the labeled pairs. A bad unlabeled image met mid-run stops the run like a bad labeled one."""
    root, config, folder, paths = tree
    run_dir = str(tmp_path / "run")
    drawn: list[int] = []
    with single_thread():
        run = Run(trainSSL.TRAIN_SSL, tiny_argv(config, run_dir, folder, 3, **{"method.bn_refresh_iterations": 2}))
        draw = run.unlabeled.next

        def recorded():
            batch = draw()
            drawn.extend(int(i) for i in batch[2])
            return batch

        run.unlabeled.next = recorded
        trainSSL.train(run)
    assert len(drawn) == 3 + 2 and set(drawn) <= {8, 9, 10}, drawn
    names = open(os.path.join(run_dir, "train_split.txt")).read().split()
    assert sorted(names) == [f"synthetic_0_{i:05d}.png" for i in range(8)]

    # the unlabeled image of iteration 1 turns unreadable: met while prefetching after iteration 0
    copy = str(tmp_path / "unlabeled_copy")
    shutil.copytree(folder, copy)
    argv = tiny_argv(config, str(tmp_path / "run_bad"), copy, 3)
    plan = Run(trainSSL.TRAIN_SSL, argv + ["--dry-run"])
    (first,), (second,) = plan.unlabeled.sampler.epoch_batches(0)[:2]
    bad = plan.data.train.image_paths[second[0]]
    assert second[0] != first[0] and bad.startswith(copy)
    open(bad, "wb").write(b"not an image")
    capsys.readouterr()
    with single_thread(), pytest.raises(SystemExit) as e:
        main_guard(lambda: trainSSL.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and bad in err and "latest.pth" in err and "--resume auto" in err, err
    assert load_checkpoint(os.path.join(str(tmp_path / "run_bad"), "latest.pth"))["iteration"] == 1
