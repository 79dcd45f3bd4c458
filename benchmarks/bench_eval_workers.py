#!/usr/bin/env python3
"""Evaluation with the images read in the main process against read by loader workers (engine/evaluation.py).

    python3 benchmarks/bench_eval_workers.py                       # 50 PNG pairs 1024x2048, 0 vs 2 workers
    python3 benchmarks/bench_eval_workers.py --files 4 --size 64,128 --workers 0 1   # seconds (the test)

Writes `--files` image/label pairs as PNG files (smooth random images, blocky labels with 10 % ignored: they
compress and decode like photographs rather than like noise), lists them in a folder-dataset list file, and
evaluates them (engine.evaluation.evaluate, the function of training and evaluateSSL.py) once per `--workers`
value, in interleaved rounds, with two networks:
- "decode": a 1x1 convolution, which costs next to nothing — a stand-in for a GPU fast enough that reading and
  decoding the files is what it waits for;
- "network": DeepLabv2 on a ResNet-18 of `--width` (a CPU-sized network: its forward dominates on a CPU).
Reports the median seconds of each and the ratio to 0 workers, and the machine's load average around the run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import cpu_threads, environment, format_table, write_json  # noqa: E402
from benchmarks.gpu_steps.eval_full_size import write_pairs  # noqa: E402
from data.cityscapes_labels import CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, PALETTE  # noqa: E402
from data.common import parse_size  # noqa: E402
from data.folder import FolderDataset  # noqa: E402
from engine.evaluation import evaluate  # noqa: E402
from model import build_model  # noqa: E402
from utils.augmentations import CITYSCAPES_MEAN_RGB  # noqa: E402


def networks(width: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"decode": torch.nn.Conv2d(3, NUM_CLASSES, 1),
            "network": build_model("2", NUM_CLASSES, "COCO", 18, None, width=width, verbose=False)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--files", type=int, default=50, help="PNG pairs written and evaluated")
    p.add_argument("--size", default="1024,2048", help="H,W of the images")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to compare")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is reported)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width of the 'network' case")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    size = parse_size(args.size, "--size")
    folder = args.dir or tempfile.mkdtemp(prefix="bench_eval_workers_")
    t0 = time.perf_counter()
    pairs = write_pairs(folder, args.files, size, NUM_CLASSES, IGNORE_LABEL)
    written_s = time.perf_counter() - t0
    listing = os.path.join(folder, "val.txt")
    with open(listing, "w") as f:
        f.writelines(f"{image} {label}\n" for image, label in pairs)
    dataset = FolderDataset(listing, None, "val", num_classes=NUM_CLASSES, class_names=CLASS_NAMES,
                            palette=PALETTE, train=False, crop_size=None, channel_order="BGR",
                            ignore_label=IGNORE_LABEL, check=False)
    device = torch.device("cpu")
    load_before = os.getloadavg()
    seconds: dict[tuple[str, int], list[float]] = {}
    results: dict[str, dict] = {}
    with cpu_threads(args.threads):
        for name, model in networks(args.width).items():
            for _ in range(args.rounds):
                for workers in args.workers:
                    t0 = time.perf_counter()
                    result = evaluate(model, dataset, num_classes=NUM_CLASSES, ignore_label=IGNORE_LABEL,
                                      mean_rgb=CITYSCAPES_MEAN_RGB, channel_order="BGR", device=device,
                                      num_workers=workers)
                    seconds.setdefault((name, workers), []).append(time.perf_counter() - t0)
                    results.setdefault(name, {}).setdefault(workers, result["confusion"])
            first = results[name][args.workers[0]]
            assert all(torch.equal(first, c) for c in results[name].values()), "results differ between workers"
    rows, report = [], {"files": args.files, "size": list(size), "rounds": args.rounds, "threads": args.threads,
                        "seconds_to_write": written_s, "bytes_per_pair": sum(os.path.getsize(x) for x in pairs[0]),
                        "load_average_before": load_before, "load_average_after": os.getloadavg(),
                        "env": environment(device), "results": []}
    for (name, workers), times in seconds.items():
        median = statistics.median(times)
        base = statistics.median(seconds[(name, args.workers[0])])
        row = {"case": name, "workers": workers, "seconds_median": median, "seconds": times,
               "ratio_to_first": median / base, "images_per_second": args.files / median}
        report["results"].append(row)
        rows.append([name, workers, round(median, 2), round(row["images_per_second"], 2),
                     round(row["ratio_to_first"], 2)])
    print(format_table(rows, ["case", "workers", "seconds", "images/s", f"time / {args.workers[0]} workers"]))
    print(f"{args.files} pairs {size[0]}x{size[1]} ({report['bytes_per_pair'] / 2 ** 20:.1f} MiB each); load average "
          f"before {load_before[0]:.2f}, after {report['load_average_after'][0]:.2f}")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
