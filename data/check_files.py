"""`--dry-run --check-files`: read every image and label of the run's datasets once, and list every bad one.

Each item is read the way training and evaluation read it (`dataset[index]`: decode the image and the label, the
dataset's resize/crop, the label-value check), in threads (decoding releases the GIL), with progress shown. All
failures are collected, so one pass lists every unreadable or inconsistent file, not just the first. The summary
also says which images were converted on reading (16-bit and other modes, EXIF orientation: data/pixels.py).
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from torch.utils.data import Dataset

from data.pixels import CONVERSIONS, conversion_summary
from data.synthetic import SyntheticStreets
from utils.errors import UserError
from data.progress import progress


def _read(dataset: Dataset, index: int) -> str | None:
    """None if item `index` reads, else one line naming the file and the problem."""
    key = (index, 0) if getattr(dataset, "train", False) else index  # training items take (index, crop seed)
    try:
        if hasattr(dataset, "check_item"):  # the whole label, where a training read sees only its crop
            dataset.check_item(index)
        dataset[key]
    except UserError as e:
        return str(e)
    except Exception as e:  # anything else a broken file can raise while decoding
        name = dataset.names[index] if hasattr(dataset, "names") else index
        return f"{name}: {type(e).__name__}: {e}"
    return None


def check_files(datasets: dict[str, Dataset], threads: int | None = None) -> None:
    """Read every item of `datasets` ({what: dataset}); raise one UserError listing every bad item."""
    jobs = [(what, ds, k) for what, ds in datasets.items() if not isinstance(ds, SyntheticStreets)
            for k in range(len(ds))]
    if not jobs:
        print("--check-files: synthetic data, no files to read", flush=True)
        return
    threads = threads or min(8, os.cpu_count() or 1)
    problems = []
    before = Counter(CONVERSIONS)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(lambda job: _read(job[1], job[2]), jobs)
        for k, problem in enumerate(progress(results, len(jobs), "checking files")):
            if problem is not None:
                problems.append(f"[{jobs[k][0]}] {problem}")
    counts = ", ".join(f"{len(ds)} {what}" for what, ds in datasets.items() if not isinstance(ds, SyntheticStreets))
    if problems:
        raise UserError(f"--check-files: {len(problems)} of {len(jobs)} items ({counts}) cannot be used:\n  "
                        + "\n  ".join(problems))
    converted = conversion_summary(before, Counter(CONVERSIONS))  # e.g. "3 images converted from 16-bit"
    print(f"--check-files: all {len(jobs)} items ({counts}) read" + (f"; {converted}" if converted else ""), flush=True)
