#!/usr/bin/env python3
"""Evaluate a trained checkpoint on its dataset's validation split: per-class IoU and mIoU.

    python3 evaluateSSL.py --model-path ../saved/DeepLab/<config name>/best_model.pth [--save-output-images [DIR]]

Model kind, dataset, pretraining (channel order) and ignore label come from the config stored in the checkpoint,
which may be one written by this project or by the original release ({'model', 'config', 'optimizer',
'iteration'}). Prints per-class IoU (worst first) and mIoU, in percent, and writes them as JSON next to the
checkpoint (in the current folder when the checkpoint's folder cannot be written, and it says so first).

`--protocol whole` (default) is the paper's: one forward of each whole image. `--protocol sliding` runs windows of
the training crop size (a third overlapping) and sums their softmax over the overlaps. `--save-output-images`
writes, per image and under its relative path, `<name>.png` (the colour-coded prediction, a palette PNG whose
pixel values are the class indices) and `<name>_overlay.jpg` (the prediction blended over the image), plus
`summary.txt`. predict.py makes the same predictions for images without labels (engine/inference.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os

from data import build_data
from engine.evaluation import evaluate
from engine.inference import load_trained_model
from engine.rng import set_determinism
from engine.cli import choose_device
from engine.entry import main_guard
from engine.run_dir import check_writable
from utils.errors import UserError
from engine.visualize import palette_png, save_overlay


def build_parser() -> argparse.ArgumentParser:
    """The flags, with the original release's -m/--model-path, --gpu N and --save-output-images."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The help texts are docs/configuration.md's table, word for word (tests/test_entry_points.py holds them).
    p.add_argument("-m", "--model-path", required=True, metavar="CKPT",
                   help="checkpoint (.pth) written by training, of this project or of the original release")
    p.add_argument("--data-root", metavar="PATH", help="dataset folder (default: from the stored config)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the network runs (auto: CUDA when available)")
    p.add_argument("--gpu", type=int, metavar="N", help="the original release's flag: the same as --device cuda:N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the stored config (e.g. training.data.root=...)")
    p.add_argument("--save-output-images", nargs="?", const="", default=None, metavar="DIR",
                   help="write colour-coded predictions and overlays (default DIR: <checkpoint>_predictions/)")
    p.add_argument("--protocol", choices=("whole", "sliding"), default="whole", metavar="whole|sliding",
                   help="whole image (the paper's protocol, default) or crop-sized sliding windows")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.gpu is not None:  # the release's --gpu N: cuda:N
        if args.gpu < 0:
            p.error(f"--gpu {args.gpu}: give a GPU index 0, 1, ...")
        if args.device not in ("auto", "cuda", f"cuda:{args.gpu}"):
            p.error(f"--gpu {args.gpu} and --device {args.device} name two devices; give one of them")
        args.device = f"cuda:{args.gpu}"
    return args


def worst_first(iou: list[float], class_names: list[str]) -> tuple[list[tuple[str, float]], list[str]]:
    """Classes sorted by IoU, worst first, and the classes absent from labels and predictions (NaN IoU)."""
    present = sorted(((n, v) for n, v in zip(class_names, iou) if not math.isnan(v)), key=lambda nv: nv[1])
    return present, [n for n, v in zip(class_names, iou) if math.isnan(v)]


def format_summary(result: dict, class_names: list[str], images: int, protocol: str) -> str:
    """Per-class IoU sorted worst first, the absent classes, mIoU and mean loss."""
    ranked, absent = worst_first(result["iou"], class_names)
    width = max((len(n) for n in class_names), default=0)
    lines = [f"per-class IoU, worst first ({images} images, protocol {protocol}):"]
    lines += [f"  {name:<{width}}  {100 * value:6.2f}" for name, value in ranked]
    if absent:
        lines.append(f"  absent from labels and predictions (not in the mean): {', '.join(absent)}")
    lines.append(f"mIoU {100 * result['miou']:.2f}   mean CE loss {result['loss']:.4f}")
    return "\n".join(lines)


def output_stems(names: list) -> dict:
    """{validation item name: output path without extension, relative to the output folder}: the item's relative
    path (folders kept, so a/img.png and b/img.png both get theirs), '..' parts dropped, and a suffix _2, _3, ... on
    the rare name that still collides."""
    stems, taken = {}, set()
    for name in names:
        parts = [p for p in str(name).replace(os.sep, "/").split("/") if p not in ("", ".", "..")]
        stem = "/".join(parts[:-1] + [os.path.splitext(parts[-1])[0]]) if parts else "image"
        unique, k = stem, 1
        while unique in taken:
            k += 1
            unique = f"{stem}_{k}"
        taken.add(unique)
        stems[name] = unique
    return stems


def report_path(stem: str) -> str | None:
    """Where <checkpoint>_evaluation.json goes: beside the checkpoint; when that folder cannot be written (read-only),
    in the current folder as <checkpoint folder>_<checkpoint>_evaluation.json, and that is said before the
    evaluation; None when neither can be written."""
    beside = stem + "_evaluation.json"
    folder = os.path.basename(os.path.dirname(os.path.abspath(stem)))
    fallback = f"{folder}_{os.path.basename(beside)}" if folder else os.path.basename(beside)
    reasons = []
    for path in (beside, fallback):
        try:
            check_writable(os.path.dirname(os.path.abspath(path)), "the folder", "")
        except UserError as e:
            reasons.append(str(e).removesuffix("."))
            continue
        if reasons:
            print(f"note: {reasons[0]}; the report goes to {path} instead", flush=True)
        return path
    print(f"note: {'; '.join(reasons)}; {os.path.basename(beside)} will not be written", flush=True)
    return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = choose_device(args.device)
    stem = os.path.splitext(args.model_path)[0]
    out_dir = None
    if args.save_output_images is not None:  # checked before the (long) evaluation
        out_dir = args.save_output_images or stem + "_predictions"
        check_writable(out_dir, "--save-output-images", "Give a folder you can write (it is created if missing).")
    trained = load_trained_model(args.model_path, device, args.overrides)
    cfg, ckpt = trained.cfg, trained.checkpoint
    set_determinism(cfg["utils"]["deterministic"])  # cuDNN's benchmark, unless the run asked for determinism
    data = build_data(cfg, args.data_root, split=False)
    json_path = report_path(stem)

    on_prediction = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        stems = output_stems(list(data.val.names))

        def on_prediction(name, image, label, pred):
            base = os.path.join(out_dir, *stems[name].split("/"))
            os.makedirs(os.path.dirname(base), exist_ok=True)
            palette_png(pred.cpu().numpy(), data.palette).save(base + ".png")
            save_overlay(base + "_overlay.jpg", image, pred, data.palette, data.channel_order)

    result = evaluate(trained.model, data.val, num_classes=data.num_classes, ignore_label=data.ignore_label,
                      mean_rgb=data.mean_rgb, channel_order=data.channel_order, device=device,
                      protocol=args.protocol, window=trained.window, on_prediction=on_prediction,
                      num_workers=cfg["training"]["num_workers"])
    summary = format_summary(result, data.class_names, len(data.val), args.protocol)
    print(summary)
    report = {"checkpoint": os.path.abspath(args.model_path), "protocol": args.protocol, "miou": result["miou"],
              "loss": result["loss"], "iou": dict(zip(data.class_names, result["iou"])),
              "iou_worst_first": worst_first(result["iou"], data.class_names)[0],
              "iteration": ckpt.get("iteration")}
    if args.save_output_images is not None:
        with open(os.path.join(out_dir, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        print(f"wrote predictions and overlays of {len(data.val)} images to {out_dir}")
    if json_path is None:
        print(f"{os.path.basename(stem)}_evaluation.json not written (see the note above): the results are those "
              f"printed above.")
    else:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {json_path}")
    return report


if __name__ == "__main__":
    main_guard(main)
