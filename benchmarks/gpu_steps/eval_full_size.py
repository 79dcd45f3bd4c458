"""Step 6, eval_full_size: the evaluation as evaluateSSL.py runs it (whole image, fp32), DeepLabv2 COCO ResNet-101,
19 classes, on 500 Cityscapes-sized (1024x2048) image/label pairs read from PNG files on disk by the loader's
worker processes (the folder dataset, data/folder.py), so that decoding counts; target: under 60 s.

Writing 500 PNG files would take longer than the step's limit: `eval_files` distinct pairs are written (smooth
random images, which compress and decode like photographs rather than like noise; blocky random labels with 10 %
ignored) and a list file names them again and again, up to 500 items. The operating system's cache then holds
the files, as it would hold a validation split read at every evaluation. Evaluated in chunks; the step stops once
past the target (the figure is then a lower bound)."""
from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.gpu_steps.plan import EVAL_SECONDS_TARGET
from benchmarks.gpu_steps.processes import StepContext


def write_pairs(folder: str, n: int, size: tuple[int, int], num_classes: int, ignore_label: int) -> list[tuple]:
    """`n` PNG pairs under `folder` (images/, labels/): (image path, label path) of each."""
    from PIL import Image
    h, w = size
    rng = np.random.default_rng(0)
    pairs = []
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for k in range(n):
        coarse = rng.integers(0, 256, (max(h // 32, 1), max(w // 32, 1), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        blocks = rng.integers(0, num_classes, (max(h // 64, 1), max(w // 64, 1)), dtype=np.uint8)
        blocks[rng.random(blocks.shape) < 0.1] = ignore_label
        label = Image.fromarray(blocks).resize((w, h), Image.NEAREST)
        paths = (os.path.join(folder, "images", f"{k:03d}.png"), os.path.join(folder, "labels", f"{k:03d}.png"))
        image.save(paths[0])
        label.save(paths[1])
        pairs.append(paths)
    return pairs


def run(ctx: StepContext) -> None:
    import torch
    from torch.utils.data import Subset

    from benchmarks.common import synchronize
    from data.cityscapes_labels import CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, PALETTE
    from data.folder import FolderDataset
    from engine.cli import choose_device
    from engine.evaluation import evaluate
    from model import build_model
    from utils.augmentations import CITYSCAPES_MEAN_RGB
    p = ctx.plan
    device = choose_device(ctx.device)
    torch.backends.cudnn.benchmark = True  # as a training run sets it (one image size here)
    folder = os.path.join(ctx.work, "eval_files")
    t0 = time.perf_counter()
    pairs = write_pairs(folder, p.eval_files, p.eval_size, NUM_CLASSES, IGNORE_LABEL)
    listing = os.path.join(folder, "val.txt")
    with open(listing, "w") as f:
        f.writelines(f"{pairs[k % len(pairs)][0]} {pairs[k % len(pairs)][1]}\n" for k in range(p.eval_images))
    ctx.record("files", {"pairs_written": len(pairs), "seconds_to_write": time.perf_counter() - t0,
                         "bytes_per_pair": sum(os.path.getsize(x) for x in pairs[0])})
    dataset = FolderDataset(listing, None, "val", num_classes=NUM_CLASSES, class_names=CLASS_NAMES,
                            palette=PALETTE, train=False, crop_size=None, channel_order="BGR",
                            ignore_label=IGNORE_LABEL, check=False)
    model = build_model("2", NUM_CLASSES, "COCO", p.eval_depth, None, verbose=False).to(device)
    done, seconds, confusion = 0, 0.0, None
    while done < len(dataset) and seconds <= EVAL_SECONDS_TARGET:
        part = Subset(dataset, range(done, min(done + p.eval_chunk, len(dataset))))
        synchronize(device)
        t0 = time.perf_counter()
        result = evaluate(model, part, num_classes=NUM_CLASSES, ignore_label=IGNORE_LABEL,
                          mean_rgb=CITYSCAPES_MEAN_RGB, channel_order="BGR", device=device,
                          num_workers=p.eval_workers)
        synchronize(device)
        seconds += time.perf_counter() - t0
        done += len(part)
        confusion = result["confusion"] if confusion is None else confusion + result["confusion"]
        ctx.record("evaluation", {"images": done, "of": len(dataset), "size": list(p.eval_size),
                                  "depth": p.eval_depth, "workers": p.eval_workers, "read_from": "png files",
                                  "seconds": seconds, "seconds_per_image": seconds / done,
                                  "complete": done == len(dataset), "pixels_counted": int(confusion.sum())})
