"""Every paper config passes --dry-run unchanged against dataset folders of the real layout and size."""
import glob
import os

import pytest

import trainSSL
import trainSSL_domain_adaptation_targetCity
import trainSSL_less_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODERN = ("configSSL_city_1_16_unimatch_v3.json", "configSSL_pascal_92_unimatch_v3.json")  # the peers' split files
CONFIGS = [c for c in sorted(glob.glob(os.path.join(ROOT, "configs", "configSSL_*.json")))
           if os.path.basename(c) not in MODERN]


def touch(path: str) -> None:
    open(path, "w").close()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Empty files with the real names and counts: 2975/500 Cityscapes, 10582/1449 VOC, a few GTA5 (5 train)."""
    base = tmp_path_factory.mktemp("datasets")
    city = base / "CityScapes"
    for split, n, town in (("train", 2975, "aachen"), ("val", 500, "frankfurt")):
        img = city / "leftImg8bit_trainvaltest" / "leftImg8bit" / split / town
        lab = city / "gtFine_trainvaltest" / "gtFine" / split / town
        img.mkdir(parents=True)
        lab.mkdir(parents=True)
        for k in range(n):
            touch(str(img / f"{town}_{k:06d}_000019_leftImg8bit.png"))
            touch(str(lab / f"{town}_{k:06d}_000019_gtFine_labelIds.png"))
    voc = base / "VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    ids = [f"2008_{k:06d}" for k in range(10582 + 1449)]
    for i in ids:
        touch(str(voc / "JPEGImages" / f"{i}.jpg"))
        touch(str(voc / "SegmentationClassAug" / f"{i}.png"))
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[10582:]) + "\n")
    gta = base / "GTA5"
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            (gta / kind / split).mkdir(parents=True)
            for k in range(5 if split == "train" else 2):
                touch(str(gta / kind / split / f"{k:05d}.png"))
    return {"cityscapes": str(city), "pascal": str(voc), "gta5": str(gta)}


def test_there_are_55_paper_configs():
    assert len(CONFIGS) == 55


@pytest.mark.filterwarnings("ignore:the VOC training list")  # made-up VOC ids: not the release's train_aug.txt
@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_dry_run(config, roots, capsys):
    root = roots["cityscapes"] if "_city_" in config else roots["pascal"]
    trainSSL.main(["--config", config, "--data-root", root, "--dry-run", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dry run: OK" in out
    labeled = int(__import__("json").load(open(config))["training"]["data"]["labeled_samples"])
    total = 2975 if "_city_" in config else 10582
    assert f"{total} train ({labeled} labeled, {total - labeled} unlabeled)" in out


@pytest.mark.filterwarnings("ignore:the VOC training list")
def test_dry_run_other_scripts(roots, capsys):
    trainSSL_less_memory.main(["--config", os.path.join(ROOT, "configs/configSSL_pascal_1_50_split2_COCO_reduced.json"),
                               "--data-root", roots["pascal"], "--dry-run", "--device", "cpu"])
    assert "dry run: OK" in capsys.readouterr().out
    trainSSL_domain_adaptation_targetCity.main([
        "--config", os.path.join(ROOT, "configs/configSSL_city_1_30_split0_imagenet.json"),
        "--data-root", roots["cityscapes"], "--gta5-root", roots["gta5"], "--dry-run", "--device", "cpu"])
    out = capsys.readouterr().out
    # GTA5's train split only (5 of the 7 images), as the release's loader
    assert "dry run: OK" in out and "GTA5: 5 images" in out
    # the config leaves the method constants null; the script's own values are the ones it runs with
    (line,) = [ln for ln in out.splitlines() if ln.startswith("script: trainSSL_domain_adaptation_targetCity; ")]
    method = __import__("json").loads(line.split("method constants: ", 1)[1])
    assert (method["contrastive_weight"], method["labeled_classmix_prob"]) == (0.2, 0.25)


def test_dry_run_modern_protocols(roots, tmp_path, capsys):
    """The two configs of today's protocols read the peers' `image mask` lists as they are: Cityscapes 1/16 (186
    labeled lines naming gtFine_labelTrainIds masks, which this tree lacks: its labelIds files are read) and VOC 92
    (labeled masks listed in SegmentationClass, which this tree lacks: SegmentationClassAug's are read); the
    unlabeled lists give the rest of the training images; DeepLabv3+ ResNet-101."""
    city = os.path.join(roots["cityscapes"], "leftImg8bit_trainvaltest", "leftImg8bit", "train", "aachen")
    frames = sorted(f[: -len("_leftImg8bit.png")] for f in os.listdir(city))
    lines = [f"leftImg8bit/train/aachen/{f}_leftImg8bit.png gtFine/train/aachen/{f}_gtFine_labelTrainIds.png\n"
             for f in frames]
    (tmp_path / "city_l.txt").write_text("".join(lines[:186]))
    (tmp_path / "city_u.txt").write_text("".join(lines[186:]))
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(roots["pascal"], "SegmentationClassAug")))
    val = set(open(os.path.join(roots["pascal"], "ImageSets/Segmentation/val.txt")).read().split())
    train = [i for i in ids if i not in val]
    (tmp_path / "voc_l.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in train[:92]))
    (tmp_path / "voc_u.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in train[92:]))
    for config, root, tag, labeled, total in ((MODERN[0], roots["cityscapes"], "city", 186, 2975),
                                              (MODERN[1], roots["pascal"], "voc", 92, 10582)):
        with pytest.warns(UserWarning, match="are read instead"):
            trainSSL.main(["--config", os.path.join(ROOT, "configs", config), "--data-root", root, "--dry-run",
                           "--device", "cpu", "--set", f"training.data.split_file={tmp_path / (tag + '_l.txt')}",
                           "--set", f"training.data.unlabeled_file={tmp_path / (tag + '_u.txt')}"])
        out = capsys.readouterr().out
        assert "dry run: OK" in out and f"{total} train ({labeled} labeled, {total - labeled} unlabeled)" in out
        assert "DeepLabv3+ ResNet-101" in out
