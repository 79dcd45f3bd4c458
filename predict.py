#!/usr/bin/env python3
"""Segment your own images with a trained checkpoint: colour-coded masks, class-id maps and overlays.

    python3 predict.py --model-path ../saved/DeepLab/<config name>/best_model.pth --input photos/ --out predictions/ [--overlay]

--input is one image, a folder (searched recursively for .png .jpg .jpeg .bmp .tif .tiff .webp, as the folder
dataset) or a text file listing image paths, one per line (relative to the list file). For every image, under
--out (keeping the folder structure of the input):
  <name>_color.png     the prediction in the dataset's colours (a palette PNG whose pixel values are the classes)
  <name>_classes.png   the class index of every pixel (8-bit greyscale: 0..C-1)
  <name>_overlay.jpg   with --overlay: the colours blended over the image
at the image's own size. The network, classes, palette and preprocessing (mean, channel order, the dataset's
evaluation resize) come from the checkpoint's stored config, and the prediction is evaluateSSL.py's
(engine/inference.py, engine/evaluation.segment). An image that cannot be read or predicted is named and skipped;
the exit status is 1 when any was.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.common import image_tensor, read_image
from data.folder import IMAGE_EXTENSIONS, read_list, walk_files
from utils.errors import UserError
from engine.inference import TrainedModel, load_trained_model, predict_classes
from engine.cli import choose_device
from engine.entry import main_guard
from engine.run_dir import check_writable
from engine.visualize import palette_png, save_overlay


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The help texts are docs/configuration.md's table, word for word (tests/test_entry_points.py holds them).
    p.add_argument("-m", "--model-path", required=True, metavar="CKPT",
                   help="checkpoint (.pth) written by training, of this project or of the original release")
    p.add_argument("--input", required=True, metavar="IMG|DIR|LIST",
                   help="one image; a folder, searched recursively; or a text file of image paths, one per line "
                        "(relative to the file)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; the input's sub-folders are kept")
    p.add_argument("--overlay", action="store_true",
                   help="also write the prediction blended over the image (<name>_overlay.jpg)")
    p.add_argument("--protocol", choices=("whole", "sliding"), default="whole", metavar="whole|sliding",
                   help="one forward of the whole image (default, as evaluateSSL.py), or windows of the training "
                        "crop size")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the network runs (auto: CUDA when available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the stored config")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def is_image_file(path: str) -> bool:
    """Whether Pillow recognises the file as an image (it reads the header only)."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return False


def is_text_file(path: str) -> bool:
    """Whether the file is UTF-8 text without NUL bytes (a list of paths), not some other binary file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def list_inputs(spec: str, out_dir: str | None = None) -> list[tuple[str, str]]:
    """(image path, output name without extension) of every input; output names keep the input's folders. A folder
    input leaves out the files under `out_dir` (earlier predictions, when the output folder is inside it)."""
    if os.path.isdir(spec):
        skip = os.path.join(os.path.abspath(out_dir), "") if out_dir else None
        found = {rel: path for rel, path in walk_files(spec, IMAGE_EXTENSIONS).items()
                 if skip is None or not os.path.abspath(path).startswith(skip)}
        if not found:
            raise UserError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {spec} (--input).")
        return [(path, rel) for rel, path in found.items()]
    if not os.path.isfile(spec):
        raise UserError(f"--input {spec} does not exist; give an image, a folder of images or a list file.")
    if os.path.splitext(spec)[1].lower() in IMAGE_EXTENSIONS or is_image_file(spec):
        return [(spec, os.path.splitext(os.path.basename(spec))[0])]  # e.g. x.gif: any image Pillow reads
    if not is_text_file(spec):
        raise UserError(f"--input {spec} is neither an image Pillow can read nor a text file of image paths; give "
                        f"an image, a folder of images or a list file.")
    paths = [row[0] for row in read_list(spec, 1, "--input")]
    if not paths:
        raise UserError(f"{spec} lists no images (--input).")
    base = os.path.dirname(os.path.abspath(spec))
    items, seen = [], {}
    for path in paths:
        rel = os.path.relpath(os.path.abspath(path), base)
        name = os.path.splitext(rel if not rel.startswith("..") else os.path.basename(path))[0].replace(os.sep, "/")
        if name in seen:
            raise UserError(f"{seen[name]} and {path} (listed in {spec}) would write the same outputs {name}_*; "
                            f"rename one of them.")
        seen[name] = path
        items.append((path, name))
    return items


def write_outputs(out_dir: str, name: str, image: np.ndarray, classes: np.ndarray, trained: TrainedModel,
                  with_overlay: bool) -> list[str]:
    """The colour mask, the class-id map and (optionally) the overlay of one image; returns the paths written."""
    stem = os.path.join(out_dir, *name.split("/"))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    palette = trained.info.palette
    paths = [stem + "_color.png", stem + "_classes.png"]
    palette_png(classes, palette).save(paths[0])
    Image.fromarray(classes).save(paths[1])  # 2-D uint8: mode L
    if with_overlay:
        paths.append(stem + "_overlay.jpg")
        save_overlay(paths[2], image_tensor(image, "RGB"), torch.from_numpy(classes), palette)
    return paths


def main(argv=None) -> dict:
    """Predict every input; returns {"written": [paths], "failed": [(image, reason)], "out": folder}."""
    args = parse_args(argv)
    if os.path.isdir(args.input) and os.path.realpath(args.input) == os.path.realpath(args.out):
        raise UserError(f"--out {args.out} is the --input folder itself: the predictions would lie among the images "
                        f"and be read as images by the next run. Give another folder, e.g. "
                        f"{args.input.rstrip('/')}_predictions (a folder inside --input is fine: it is skipped).")
    check_writable(args.out, "--out", "Give a folder you can write (it is created if missing).")
    items = list_inputs(args.input, args.out)
    device = choose_device(args.device)
    trained = load_trained_model(args.model_path, device, args.overrides)
    os.makedirs(args.out, exist_ok=True)
    written, failed = [], []
    bar = tqdm(items, unit="image", file=sys.stderr, dynamic_ncols=True, disable=None)
    for path, name in bar:
        try:
            image = read_image(path)  # [H,W,3] uint8 RGB, any size and format the folder dataset reads
            classes = predict_classes(trained, image, args.protocol)
        except (UserError, torch.OutOfMemoryError) as e:
            reason = str(e) if isinstance(e, UserError) else \
                f"out of memory on {device} for a {image.shape[1]}x{image.shape[0]} image; try --protocol sliding"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            failed.append((path, reason))
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
            continue
        written += write_outputs(args.out, name, image, classes, trained, args.overlay)
    bar.close()
    done = len(items) - len(failed)
    kinds = "colour masks, class-id maps" + (" and overlays" if args.overlay else "")
    print(f"wrote {kinds} of {done} image{'s' if done != 1 else ''} to {args.out}")
    if failed:
        print(f"{len(failed)} of {len(items)} images failed:\n" + "\n".join(f"  {p}: {r}" for p, r in failed),
              file=sys.stderr)
    return {"written": written, "failed": failed, "out": args.out}


def cli(argv=None) -> None:
    """The command: exit status 1 when any image failed."""
    if main(argv)["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main_guard(cli)
