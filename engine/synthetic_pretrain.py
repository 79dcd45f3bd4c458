"""`backbone.pretrained: "synthetic"`: a pretrained backbone made on this machine, where no ImageNet/COCO file can be
downloaded.

Every arm of the paper starts from the same pretrained weights. This module makes such a starting point without a
download: it trains the configured network (version, depth, width, channel order) fully supervised on synthetic
street scenes of style "c" (data/synthetic.py: unlike styles "a" and "b" in colours, textures and layout; same
classes), keeps only the backbone tensors (conv1, bn1, layer1..layer4: what an ImageNet file holds) and caches them
in torch hub's checkpoint folder, like a download:

- the name says what the file was built from, plus the first 8 hex digits of its SHA-256 as torch hub names its
  files: `synthetic-c-v3-resnet18-w32-RGB-seed0-it600-<sha256[:8]>.pth`;
- progress while it trains (a bar on a terminal, plain lines otherwise), then the path and its SHA-256;
- an OS file lock (`fcntl.flock` on `<stem>.lock` beside it; the kernel releases it when its process dies, so a
  killed build never leaves a stale lock): parallel runs build the file once, the others wait, then reuse it;
- the file is written under a temporary name and renamed into place: never a partial file, also on Ctrl-C;
- under torchrun rank 0 builds while the other processes wait (model/weights_download.py does the same).

The same seed on the same machine (and thread count) builds the same bytes: every random draw comes from the seed
(the caller's RNG states are left as they were), and the file is serialised from memory, so its name does not
enter it. The recipe (scenes, crops, batch, learning rate) is fixed below, as an ImageNet file's recipe is fixed;
`backbone.synthetic_iterations` and `backbone.synthetic_seed` choose the length and the seed.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data.common import channel_order_for
from engine.checkpoint import write_atomic
from model import build_model
from model.heads import BACKBONE_MODULES
from model.weights_download import _process_group
from utils.augmentations import normalize
from utils.errors import UserError

STYLE = "c"
# The recipe: style-"c" scenes of SCENE_SIZE, random crops of CROP with horizontal flips, batches of BATCH, SGD with a
# poly schedule, every parameter trained (the backbone's BatchNorm affine parameters too, as in an ImageNet file).
SCENES = 300
SCENE_SIZE = (80, 128)
CROP = (48, 64)
BATCH = 8
LR, MOMENTUM, WEIGHT_DECAY, POWER = 0.01, 0.9, 5e-4, 0.9
SEED_OFFSET = 3                 # the scenes' seed offset (training runs use 0, validation 1, the DA source 2)
MEAN_RGB = (127.5, 127.5, 127.5)
IGNORE = 250
# CPU throughput of the recipe's training iterations (forward + backward, ~3x the forward's FLOPs) on one thread of
# the 2-core development machine: the demo's backbone (width 32, 400 iterations, 5.8e12 FLOPs) took 80 CPU-seconds,
# 73e9 FLOP/s. --dry-run's time estimate divides the recipe's FLOPs by this rounded figure.
CPU_FLOPS_PER_SECOND = 70e9


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic backbone file is built from; its name says all of it."""

    version: str
    depth: int
    width: int
    pretraining: str            # "COCO" (BGR input, v2's COCO variant) or "imagenet" (RGB)
    seed: int
    iterations: int

    @property
    def channel_order(self) -> str:
        return channel_order_for(self.pretraining)

    @property
    def stem(self) -> str:
        return (f"synthetic-{STYLE}-v{self.version}-resnet{self.depth}-w{self.width}-{self.channel_order}"
                f"-seed{self.seed}-it{self.iterations}")

    def describe(self) -> str:
        net = "DeepLabv2" if self.version == "2" else "DeepLabv3+"
        return (f"{net} ResNet-{self.depth} width {self.width}, {self.channel_order} input, seed {self.seed}, "
                f"{self.iterations} iterations fully supervised on {SCENES} synthetic style-\"{STYLE}\" scenes")


def spec_of(cfg: dict, depth: int) -> SyntheticSpec:
    """The spec of a resolved config (depth: the backbone depth the run uses)."""
    b = cfg["backbone"]
    return SyntheticSpec(str(cfg["version"]), int(depth), int(b["width"]), cfg["training"]["pretraining"],
                         int(b["synthetic_seed"]), int(b["synthetic_iterations"]))


def cache_folder() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def cached_file(spec: SyntheticSpec, folder: str | None = None) -> str | None:
    """The cached file of `spec` (`<stem>-<8 hex>.pth`), or None."""
    pattern = os.path.join(glob.escape(folder or cache_folder()), spec.stem + "-" + "[0-9a-f]" * 8 + ".pth")
    found = sorted(glob.glob(pattern))
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------- training
def _batches(spec: SyntheticSpec, device: torch.device):
    """Endless (images [B,3,h,w] normalised, labels [B,h,w]) batches of the recipe, from the seed alone."""
    from data.synthetic import SyntheticStreets
    data = SyntheticStreets(SCENES, SCENE_SIZE, seed_offset=SEED_OFFSET, train=True, crop_size=CROP,
                            channel_order=spec.channel_order, ignore_label=IGNORE, style=STYLE)
    rng = np.random.default_rng([spec.seed, 424243])
    while True:
        order = rng.permutation(SCENES)
        for k in range(0, SCENES - BATCH + 1, BATCH):
            items = [data[(int(i), int(rng.integers(2 ** 31)))] for i in order[k:k + BATCH]]
            images = torch.stack([it[0] for it in items])
            labels = torch.stack([it[1] for it in items])
            flip = torch.from_numpy(rng.random(BATCH) < 0.5)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
            yield (normalize(images, MEAN_RGB, spec.channel_order).to(device), labels.to(device))


def _progress(total: int, desc: str):
    """A tqdm bar on a terminal, else a callback printing one plain line per 10 %."""
    if sys.stdout.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="it")
        return bar.update, bar.close
    count = {"done": 0, "shown": 0}

    def update(n: int = 1) -> None:
        count["done"] += n
        decile = count["done"] * 10 // max(total, 1)
        if decile > count["shown"]:
            count["shown"] = decile
            print(f"{desc}: {decile * 10}% ({count['done']}/{total} iterations)", flush=True)
    return update, lambda: None


def train_backbone(spec: SyntheticSpec, device: torch.device | str = "cpu", progress: bool = True
                   ) -> dict[str, torch.Tensor]:
    """Train the spec's network fully supervised on style-"c" scenes; its backbone tensors (CPU, contiguous).
    The caller's RNG states are restored afterwards."""
    from data.synthetic import NUM_CLASSES
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        model = build_model(spec.version, NUM_CLASSES, spec.pretraining, spec.depth, None, width=spec.width,
                            verbose=False).to(device).train()
        for p in model.parameters():        # BatchNorm affine parameters too (frozen when fine-tuning, as released)
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        update, close = _progress(spec.iterations, "building the synthetic backbone") if progress else (
            lambda n=1: None, lambda: None)
        batches = _batches(spec, device)
        try:
            for i in range(spec.iterations):
                for group in optimizer.param_groups:
                    group["lr"] = LR * (1 - i / spec.iterations) ** POWER
                images, labels = next(batches)
                logits = F.interpolate(model(images), size=CROP, mode="bilinear", align_corners=True)
                loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
                if not torch.isfinite(loss):
                    raise UserError(f"building the synthetic backbone {spec.stem}: the loss became {float(loss)} "
                                    f"at iteration {i}; nothing was written.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                update(1)
        finally:
            close()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
            if k.split(".")[0] in BACKBONE_MODULES}


def serialise(state: dict[str, torch.Tensor]) -> bytes:
    """torch.save into memory: the bytes do not depend on the file's name."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- cache, lock
@contextmanager
def file_lock(path: str, what: str):
    """An exclusive OS lock on `path` (created when missing), waiting with a message when another process holds it.
    The kernel drops the lock with its process, so a killed holder never leaves a stale one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (parallel first runs may each build the same file)
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building {what} (lock {path})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(spec: SyntheticSpec, device: torch.device | str = "cpu", folder: str | None = None,
          progress: bool = True) -> str:
    """The cached file of `spec`, built first when missing (under the lock); returns its path."""
    folder = folder or cache_folder()
    found = cached_file(spec, folder)
    if found:
        return found
    os.makedirs(folder, exist_ok=True)
    with file_lock(os.path.join(folder, spec.stem + ".lock"), spec.stem):
        found = cached_file(spec, folder)  # built by the process that held the lock
        if found:
            print(f"backbone.pretrained \"synthetic\": {found} was built by another process; using it", flush=True)
            return found
        for stale in glob.glob(os.path.join(glob.escape(folder), ".tmp-" + glob.escape(spec.stem) + "-*.pth.*")):
            os.remove(stale)  # write_atomic's temporary file, left by a process killed while writing (SIGKILL)
        estimate = estimate_seconds(spec)
        print(f"backbone.pretrained \"synthetic\": building {spec.stem} in {folder} ({spec.describe()}; about "
              f"{_duration(estimate)} on one CPU core)", flush=True)
        t0 = time.time()
        data = serialise(train_backbone(spec, device, progress))
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(folder, f"{spec.stem}-{digest[:8]}.pth")
        write_atomic(path, lambda f: f.write(data))
        print(f"built {path} in {time.time() - t0:.0f} s\nSHA-256 {digest}", flush=True)
        return path


def resolve(cfg: dict, depth: int, device: torch.device | str = "cpu") -> str:
    """The path of the config's synthetic backbone, built when missing. Under torchrun rank 0 builds while the
    others wait; a process that still does not see the file afterwards (another machine's file system) builds its
    own copy (the lock keeps processes of one machine from building it twice)."""
    spec = spec_of(cfg, depth)
    from torch import distributed as torch_dist
    rank, several = _process_group()
    missing = [cached_file(spec) is None]
    if several:
        torch_dist.broadcast_object_list(missing, src=0)  # rank 0's answer on every rank
    if not missing[0]:
        return cached_file(spec) or build(spec, device, progress=False)
    path = build(spec, device) if rank == 0 else None
    if several:
        torch_dist.barrier()
    if rank != 0:
        path = cached_file(spec) or build(spec, device, progress=False)
    return path


# ------------------------------------------------------------------------------------------------ dry run
def training_flops(spec: SyntheticSpec) -> float:
    """FLOPs of the recipe: 3x the forward pass of a batch (forward + backward) x iterations, counted on the meta
    device (nothing allocated)."""
    from torch.utils.flop_counter import FlopCounterMode
    from data.synthetic import NUM_CLASSES
    with torch.device("meta"):
        model = build_model(spec.version, NUM_CLASSES, spec.pretraining, spec.depth, None, width=spec.width,
                            verbose=False).train()
        x = torch.empty(BATCH, 3, *CROP)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return 3.0 * counter.get_total_flops() * spec.iterations


def estimate_seconds(spec: SyntheticSpec) -> float:
    return training_flops(spec) / CPU_FLOPS_PER_SECOND


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def status(cfg: dict, depth: int) -> str:
    """One line for --dry-run: the cached file, or what will be built and about how long it takes."""
    spec = spec_of(cfg, depth)
    found = cached_file(spec)
    if found:
        return f"\"synthetic\": {found} (cached; not loaded in a dry run)"
    return (f"\"synthetic\": not cached yet; training will first build {spec.stem}-<sha256>.pth in {cache_folder()} "
            f"({spec.describe()}; about {_duration(estimate_seconds(spec))} on one CPU core; nothing built in a "
            f"dry run)")
