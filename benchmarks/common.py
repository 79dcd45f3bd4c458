"""Shared helpers of the benchmarks: device choice, timing, host-sync counting, peak memory, JSON and tables.

Timing rule: every timed call is bracketed by a device synchronisation on CUDA (`torch.cuda.synchronize`), so
the wall clock measures the work itself and not only its launch; on CPU the clock alone is exact. Figures are
the median (and minimum) over `repeats` calls after `warmup` untimed calls.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from utils.errors import UserError

SYNC_WARNING = "synchroniz"  # torch.cuda.set_sync_debug_mode("warn"): "called a synchronizing CUDA operation"


def choose_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a device; a clear error when CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@contextmanager
def cpu_threads(n: int | None):
    """torch's CPU thread count set to n inside the block (None: unchanged), restored afterwards."""
    previous = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise UserError(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run `fn` warmup times untimed, then `repeats` times timed (device synchronised around each call).
    Returns {"ms_median", "ms_min", "ms_all", "repeats"}."""
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_all": times, "repeats": repeats}


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                     warmup: int = 1) -> dict[str, dict]:
    """Like time_call for several functions compared with each other: `warmup` untimed rounds, then `repeats`
    rounds each calling every function once, in turn. On a shared machine the load then falls on all of them
    alike, so their ratio holds even when the absolute figures drift. Returns {name: time_call's dict}."""
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"ms_median": statistics.median(t), "ms_min": min(t), "ms_all": t, "repeats": repeats}
            for name, t in times.items()}


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronisations made by one call of `fn` on CUDA, counted with
    torch.cuda.set_sync_debug_mode("warn") (it warns on every synchronising operation: .item(), boolean
    indexing, nonzero, torch.bincount's size read, blocking copies to the host). None on CPU, where there is
    no device to wait for."""
    if device.type != "cuda":
        return None
    synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    synchronize(device)
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; the CPU figure is the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak memory: CUDA -> torch.cuda.max_memory_allocated since the last reset (tensors only); CPU -> the
    process's peak resident set size (resource.getrusage, whole lifetime of the process)."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_memory_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    factor = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(rss_kib * factor), "kind": "cpu_peak_rss_process_lifetime"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What the figures were measured on."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        env["load_average_1min"] = os.getloadavg()[0]  # other work on the machine makes CPU figures noisy
    except OSError:
        pass
    return env


def write_json(path: str, obj: dict) -> None:
    """Write `obj` as indented JSON, creating the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain text table with columns padded to their widest cell (numbers right-aligned)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    numeric = [bool(rows) and all(_is_number(row[k]) or row[k] is None for row in rows) for k in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if numeric[k] else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths)))
    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(s.rstrip() for s in out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
