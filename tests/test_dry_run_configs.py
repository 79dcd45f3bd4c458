"""Every paper config passes --dry-run unchanged against dataset folders of the real layout and size."""
import glob
import os

import pytest
import torch

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


# The commands of the original release's README, word for word (its "Experiments" and "Evaluation" sections), run
# from a code folder next to ../data, as its README lays them out; the training ones with --dry-run.
RELEASE_TRAINING_COMMANDS = [
    "python3 trainSSL.py --config ./configs/configSSL_city_1_30_split0_COCO.json",
    "python3 trainSSL.py --config ./configs/configSSL_city_1_30_split0_v3.json",
    "python3 trainSSL.py --config ./configs/configSSL_pascal_1_50_split0_COCO.json",
    "python3 trainSSL_less_memory.py --config ./configs/configSSL_pascal_1_50_split2_COCO_reduced.json",
    "python3 trainSSL_domain_adaptation_targetCity.py --config ./configs/configSSL_city_1_30_split0_imagenet.json",
]
RELEASE_EVALUATION_COMMAND = "python3 evaluateSSL.py --model-path ../saved/DeepLab/best.pth"
SCRIPTS = {"trainSSL.py": trainSSL, "trainSSL_less_memory.py": trainSSL_less_memory,
           "trainSSL_domain_adaptation_targetCity.py": trainSSL_domain_adaptation_targetCity}


@pytest.fixture
def code_folder(roots, tmp_path, monkeypatch):
    """<tmp>/code (the working directory, with ./configs) next to <tmp>/data (the datasets: CityScapes, VOC2012,
    GTA5) and <tmp>/saved: the release README's layout."""
    os.symlink(os.path.dirname(roots["cityscapes"]), tmp_path / "data")
    (tmp_path / "code").mkdir()
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "code" / "configs")
    monkeypatch.chdir(tmp_path / "code")
    return tmp_path


@pytest.mark.filterwarnings("ignore:the VOC training list")
@pytest.mark.parametrize("command", RELEASE_TRAINING_COMMANDS, ids=lambda c: c.split()[-1].split("/")[-1])
def test_the_release_training_commands_run_as_typed(command, code_folder, capsys):
    """Each training command of the release's README, as typed (dry run on the CPU): the default ../data folders,
    the config relative to the code folder; and (once per script) the same with the release's short flag -c."""
    import shlex
    words = shlex.split(command)
    script = SCRIPTS[words[1]]
    script.main(words[2:] + ["--dry-run", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dry run: OK" in out
    assert f"config: {words[3]}\n" in out  # the release's config, found from the code folder
    assert ("2975 train" if "_city_" in words[3] else "10582 train") in out  # in ../data/CityScapes or ../data/VOC2012
    if command == next(c for c in RELEASE_TRAINING_COMMANDS if c.split()[1] == words[1]):
        script.main(["-c"] + words[3:] + ["--dry-run", "--device", "cpu"])
        assert "dry run: OK" in capsys.readouterr().out


def test_the_release_evaluation_command_runs_as_typed(code_folder, capsys):
    """`python3 evaluateSSL.py --model-path ../saved/DeepLab/best.pth` as typed, on a checkpoint of a synthetic-scenes
    run; the release's -m and --save-output-images (no folder: next to the checkpoint) give the same result."""
    import shlex

    import evaluateSSL
    from engine.config import load_config
    from model import build_model
    from tests.run_helpers import DEMO
    cfg = load_config(DEMO, ["version=2", "backbone.depth=18", "synthetic.num_val=2", "synthetic.image_size=40,60",
                             "backbone.width=64"])  # the checkpoint below holds a standard-width network
    torch.manual_seed(0)
    model = build_model("2", 8, cfg["training"]["pretraining"], 18, None, verbose=False)
    os.makedirs(code_folder / "saved" / "DeepLab")
    torch.save({"model": model.state_dict(), "config": cfg, "iteration": 7},
               str(code_folder / "saved" / "DeepLab" / "best.pth"))
    typed = evaluateSSL.main(shlex.split(RELEASE_EVALUATION_COMMAND)[2:])
    assert typed["iteration"] == 7 and 0 <= typed["miou"] <= 1
    assert os.path.isfile("../saved/DeepLab/best_evaluation.json")
    short = evaluateSSL.main(["-m", "../saved/DeepLab/best.pth", "--save-output-images"])
    assert short["miou"] == typed["miou"] and short["iou"] == typed["iou"]
    written = sorted(os.listdir("../saved/DeepLab/best_predictions"))
    assert written == ["summary.txt", "synthetic_1_00000.png", "synthetic_1_00000_overlay.jpg",
                       "synthetic_1_00001.png", "synthetic_1_00001_overlay.jpg"]
    capsys.readouterr()


def test_the_release_gpu_flag_means_cuda_n(monkeypatch, capsys):
    """evaluateSSL.py --gpu N (the release's flag) runs on cuda:N: the device passed on is cuda:N (with or without
    --device cuda); a second, other device or a negative index is refused by the parser; on a machine without CUDA
    it stops with the usual message."""
    import evaluateSSL
    from utils.errors import UserError
    for argv, device in ((["-m", "x.pth", "--gpu", "1"], "cuda:1"), (["-m", "x.pth", "--gpu", "0"], "cuda:0"),
                         (["-m", "x.pth", "--gpu", "2", "--device", "cuda"], "cuda:2"),
                         (["-m", "x.pth", "--gpu", "2", "--device", "cuda:2"], "cuda:2"),
                         (["-m", "x.pth"], "auto")):
        assert evaluateSSL.parse_args(argv).device == device
    for argv, message in ((["-m", "x.pth", "--gpu", "1", "--device", "cpu"], "--gpu 1 and --device cpu name two"),
                          (["-m", "x.pth", "--gpu", "-1"], "--gpu -1: give a GPU index")):
        with pytest.raises(SystemExit) as e:
            evaluateSSL.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is available"):
        evaluateSSL.main(["-m", "x.pth", "--gpu", "0"])
