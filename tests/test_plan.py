"""`--dry-run` (engine/plan.py): the plan printed line by line for tiny configs worked out by hand, and what it says
of the starting weights."""
from __future__ import annotations

import os


from engine.plan import pretrained_status, print_plan
from engine.run import Run
from tests.run_helpers import DEMO, argv_of, tiny_sets
from utils.variants import TRAIN_SSL


def test_dry_run_plan_lines(tmp_path, capsys):
    """--dry-run's plan, line by line, for the tiny config worked out by hand: 4 synthetic training images of which
    2 labeled, 2 validation images, 8 classes, DeepLabv2 on ResNet-18, one SGD group, an 8 x 256 memory."""
    import json as json_module
    run_dir = str(tmp_path / "run")
    run = Run(TRAIN_SSL, argv_of(tiny_sets(run_dir, 3)) + ["--dry-run"])  # prints the plan; again:
    capsys.readouterr()
    print_plan(run)
    lines = capsys.readouterr().out.splitlines()
    n_params = sum(p.numel() for p in run.student.parameters())
    n_tensors = len([p for p in run.student.parameters() if p.requires_grad])
    assert lines[0] == f"config: {DEMO}"
    config_end = lines.index("}")
    assert json_module.loads("\n".join(lines[1:config_end + 1])) == run.cfg
    assert lines[1] == "{" and lines[2].startswith('  "') and not lines[2].startswith('   ')  # indented by 2
    assert lines[config_end + 1:] == [
        "script: trainSSL; method constants: " + json_module.dumps(run.method),
        "fidelity 'code': Fidelity(v2_branches=2, memory_keep='lowest', memory_weights='release', "
        "da_source_schedule='last100_odd', entropy_mask_broadcast=True)",
        "data: synthetic, 4 train (2 labeled, 2 unlabeled), 2 val, 8 classes, crop (33, 49), channel order RGB",
        f"model: DeepLabv2 ResNet-18, {n_params / 1e6:.1f} M parameters, pretrained weights: none (random "
        "initialisation)",
        f"optimiser: SGD, one group of {n_tensors} trainable tensors at lr 0.01, momentum 0.9, weight decay 0.0005, "
        "Poly power 0.9",
        "memory: 8 x 256 vectors, quota 256 per class and update; class balancing: on",
        f"run directory: {run_dir}; device cpu",
        "dry run: OK",
    ]
    assert n_tensors > 100 and 1.0 < n_params / 1e6 < 3.0  # a quarter-width ResNet-18 with its DeepLabv2 head
    # what the plan reports is what the run holds
    (group,) = run.optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], len(group["params"])) == (0.01, 0.9, 0.0005,
                                                                                             n_tensors)
    assert run.base_lr == 0.01 and tuple(run.memory.memory.shape) == (8, 256, 256) and run.memory_quota == 256
    assert run.balancing is not None and run.class_weights.tolist() == [1.0] * 8
    assert run.student.layer5.branches == 2
    # and with the preset's classifier branches and the config's memory size, as a training run's
    paper = Run(TRAIN_SSL, argv_of(tiny_sets(run_dir, 3, fidelity="paper", **{"method.memory_size": 64}))
                + ["--dry-run"])
    assert paper.student.layer5.branches == 4 and paper.student.layer5.conv2d_list[0].weight.is_meta
    assert tuple(paper.memory.memory.shape) == (8, 64, 256)


def test_dry_run_names_the_starting_weights(tmp_path, monkeypatch):
    """The plan's "pretrained weights:" for each backbone.pretrained: default (not cached / cached), a file that
    exists, a missing one, and COCO weights that do not exist for this network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))             # torch hub: $TORCH_HOME/hub
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # torchvision's ResNet-18 file
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    weights = tmp_path / "mine.pth"
    weights.write_bytes(b"")

    def status(**sets) -> str:
        base = tiny_sets(str(tmp_path / "run"), 3, **{"backbone.width": 64, "training.pretraining": "imagenet"})
        run = Run(TRAIN_SSL, argv_of({**base, **sets}) + ["--dry-run"])
        return pretrained_status(run.cfg, run.student.depth)

    assert status(**{"backbone.pretrained": "default"}) == (
        f"{cached} not cached yet: training will download {url} there first (nothing downloaded in a dry run)")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert status(**{"backbone.pretrained": "default"}) == f"{cached} (cached; not loaded in a dry run)"
    assert status(**{"backbone.pretrained": str(weights)}) == f"{weights} (found; not loaded in a dry run)"
    missing = str(tmp_path / "nowhere.pth")
    assert status(**{"backbone.pretrained": missing}) == (
        f"{missing} MISSING (backbone.pretrained: give an existing file, \"default\", \"synthetic\" or \"none\")")
    assert status(**{"backbone.pretrained": "none"}) == "none (random initialisation)"
    coco = status(**{"backbone.pretrained": "default", "training.pretraining": "COCO"})
    assert coco.startswith("unavailable: there are no default COCO weights for DeepLabv2 with ResNet-18 ")


def test_dry_run_plan_of_domain_adaptation_v3(tmp_path, capsys):
    """The other branches of the plan: DeepLabv3+ (ResNet-101 for domain adaptation with v3) on half-size Cityscapes
    with full-size final evaluations, the GTA5 source counted, class balancing off."""
    from tests.fixtures_data import make_cityscapes_tree, make_gta5_tree
    from utils.variants import DOMAIN_ADAPTATION
    city, gta5 = str(tmp_path / "CityScapes"), str(tmp_path / "GTA5")
    make_cityscapes_tree(city, n_train=6, n_val=1, size=(64, 96), seed=5)
    make_gta5_tree(gta5, n_train=4, n_val=1, size=(64, 96), seed=6)
    sets = {"training.data.input_size": "32,48", "training.data.labeled_samples": 4, "training.batch_size": 4,
            "training.data.split_id_list": 7, "training.num_workers": 1, "method.class_balancing": False,
            "utils.checkpoint_dir": str(tmp_path / "run"), "utils.tensorboard": False}
    config = os.path.join(os.path.dirname(DEMO), "configSSL_city_1_30_split0_v3.json")
    argv = argv_of(sets, config=config) + ["--data-root", city, "--gta5-root", gta5, "--dry-run"]
    run = Run(DOMAIN_ADAPTATION, argv)
    lines = capsys.readouterr().out.splitlines()
    # the periodic evaluations read half-size images, the final ones full-size; the GTA5 batches: B, seed + 2
    assert tuple(run.val_set[0][0].shape[-2:]) == (32, 48) and tuple(run.final_val_set[0][0].shape[-2:]) == (64, 96)
    assert len(run.gta5) == 4 and not run.drop_background
    gta5 = run.gta5_batches.sampler
    assert (gta5.seed, gta5.batch_size, gta5.indices) == (run.cfg["seed"] + 2, 4, [0, 1, 2, 3])
    assert run.gta5_batches.loader.dataset is run.gta5 and run.gta5_batches.loader.num_workers == 1
    Run(DOMAIN_ADAPTATION, argv + ["--check-files"])  # reads every file, the GTA5 source's too
    assert "--check-files: all 11 items (6 train, 1 val, 4 GTA5) read" in capsys.readouterr().out
    run = Run(DOMAIN_ADAPTATION, argv + ["--set", "version=2"])  # v2: the data's own v2 size, no forced half size
    assert "half-size" not in capsys.readouterr().out and not run.half_size and run.final_val_set is run.val_set
    # trainSSL.py reads Cityscapes at full size; its final evaluations use the same set
    run = Run(TRAIN_SSL, argv[:-3] + ["--dry-run"])  # without --gta5-root, a flag of domain adaptation only
    assert "half-size" not in capsys.readouterr().out
    assert tuple(run.val_set[0][0].shape[-2:]) == (64, 96) and run.final_val_set is run.val_set
    assert run.gta5 is None and run.gta5_batches is None
    data = [ln for ln in lines if ln.startswith("data: ")]
    assert data == ["data: cityscapes, 6 train (4 labeled, 2 unlabeled), 1 val, 19 classes, crop (32, 48) of "
                    "half-size images (full-size final evaluations), channel order RGB; GTA5: 4 images"]
    (model,) = [ln for ln in lines if ln.startswith("model: ")]
    assert model.startswith("model: DeepLabv3+ ResNet-101, ")
    (memory,) = [ln for ln in lines if ln.startswith("memory: ")]
    assert memory.endswith("; class balancing: off") and lines[-1] == "dry run: OK"
