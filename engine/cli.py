"""The command line of the training scripts (SPEC section 1) and the choice of the one device a run uses."""
from __future__ import annotations

import argparse

import torch

from engine import distributed as dist
from engine.fault_guard import RECOVERY_KEYS
from utils.errors import UserError


def build_arg_parser(description: str, gta5: bool = False, config_required: bool = True
                     ) -> argparse.ArgumentParser:
    """The flags every training script takes (SPEC section 1), with the original release's short forms -c and -r.
    `gta5`: the domain-adaptation script's --gta5-root. `config_required`: --config is required unless --resume
    names a checkpoint (its stored config is then used); `config_required_for` decides from the command line."""
    p = argparse.ArgumentParser(description=description)
    # The help texts are docs/configuration.md's flag table, word for word (tests/test_entry_points.py holds them).
    p.add_argument("-c", "--config", metavar="FILE", required=config_required,
                   help="JSON config (configs/); required unless --resume names a checkpoint, whose stored config "
                        "is then used")
    p.add_argument("--data-root", metavar="PATH",
                   help="dataset folder (default: training.data.root, else ../data/CityScapes, ../data/VOC2012)")
    if gta5:
        p.add_argument("--gta5-root", metavar="PATH", help="GTA5 folder (default: training.data.gta5_root, else "
                                                           "../data/GTA5); domain adaptation only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set training.batch_size=2 (repeatable; JSON values)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="training device (auto: CUDA when available; under torchrun each process takes "
                        "cuda:<LOCAL_RANK>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config and data folder, build model and optimiser, say whether the pretrained "
                        "weights are cached or will be downloaded (downloads nothing), print the plan, exit")
    p.add_argument("--check-files", action="store_true",
                   help="with --dry-run: also read every image and label once (progress shown) and list every bad file")
    p.add_argument("-r", "--resume", metavar="CHECKPOINT|auto",
                   help="continue a run from its latest.pth (auto: the run directory's latest.pth)")
    p.add_argument("--restart", action="store_true",
                   help="start afresh in a run directory that holds an earlier run: its files move into "
                        "replaced-<time>/ there (without this flag such a directory is resumed when it holds this run, "
                        "interrupted, and refused otherwise)")
    p.add_argument("--recover", action="store_true",
                   help=f"with --resume: let {' and '.join(RECOVERY_KEYS)} differ from the checkpoint's "
                        f"(after a divergence)")
    return p


def config_required_for(argv: list[str]) -> bool:
    """Whether this command line needs --config: yes, unless --resume names a checkpoint file (not `auto`)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-r", "--resume")
    known, _ = pre.parse_known_args(argv)
    return known.resume in (None, "auto")


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def choose_device(name: str) -> torch.device:
    """One device for the whole run: `auto`, `cpu`, `cuda` or `cuda:N` (anything else is refused by name)."""
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"--device {name} is not a device this project runs on; use {DEVICE_FORMS}.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
        if index and 0 < torch.cuda.device_count() <= int(index):
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}.")
        if dist.launched_by_torchrun():
            name = f"cuda:{dist.local_rank()}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
