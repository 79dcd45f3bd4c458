"""Progress and logs of a training run: a tqdm bar on a terminal, plain lines elsewhere, `train_log.jsonl`,
TensorBoard event files and `curves.png` (engine/curves.py), all in the run directory. Only the main process logs.

Iterations are numbered as the release's loop numbers them, 0 .. N-1: every line, train_log.jsonl row and
TensorBoard step written after iteration i carries i (docs/long-runs.md, "Iteration numbers").

The ETA counts training time only: the time between `evaluation_started` and `evaluation_finished` is left out,
so the estimate does not jump after each evaluation.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from engine.curves import draw_curves

CURVES_MIN_INTERVAL = 30.0  # seconds between redraws of curves.png at evaluations (always redrawn at close)


class TrainLogger:
    """Writes every logged row to train_log.jsonl, scalars and images to TensorBoard, and shows progress."""

    def __init__(self, run_dir: str, total: int, start: int, *, enabled: bool = True, tensorboard: bool = True,
                 curves: bool = True, stream=None):
        self.enabled = enabled
        self.curves = curves         # draw curves.png (config utils.curves)
        self.total, self.start = total, start
        self.stream = stream or sys.stdout
        self.t0 = time.time()
        self.run_dir = run_dir
        self.not_training = 0.0      # seconds spent in evaluations, left out of the ETA
        self._eval_t0: float | None = None
        self._curves_t = self.t0     # when curves.png was last drawn (a run's first seconds need no picture)
        self._curves_warned = False
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "train_log.jsonl"), "a")
        if start > 0:  # rows after this one supersede rows of the same iterations written before an interruption
            self.jsonl.write(json.dumps({"iteration": start, "kind": "resume"}) + "\n")
            self.jsonl.flush()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # on resume, TensorBoard drops the interrupted run's events from iteration `start` on (logged after
            # its last latest.pth), so every curve shows each iteration once
            self.tb = SummaryWriter(log_dir=run_dir, purge_step=start if start > 0 else None)
        if self.stream.isatty():
            from tqdm import tqdm
            # the bar's description names the last iteration done, as the other lines do ("iteration i/N", i from
            # 0, the release's loop index); its percentage and rate are those of the iterations done
            self.bar = tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True, unit="it",
                            desc=f"iteration {start - 1}/{total}: " if start else "",
                            bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def _eta(self, i: int) -> str:
        done = i + 1 - self.start
        if done <= 0:
            return "?"
        left = (time.time() - self.t0 - self.not_training) / done * (self.total - i - 1)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 3600:.0f}h"

    def scalars(self, i: int, values: dict[str, float], prefix: str = "train", print_line: bool = True) -> None:
        """One row of scalars at iteration i (already host floats)."""
        if not self.enabled:
            return
        row = {"iteration": i, "kind": prefix, "time": round(time.time() - self.t0, 3), **values}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, i)
        if not print_line:
            return
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        if self.bar is not None:
            self.bar.set_postfix_str(shown, refresh=False)
        else:
            print(f"[{prefix}] iteration {i}/{self.total} eta {self._eta(i)} {shown}", file=self.stream, flush=True)

    def vector(self, i: int, tag: str, values, names: list[str]) -> None:
        """A per-class quantity (class weights, memory fill, IoU) as one TensorBoard scalar per class, and one
        train_log.jsonl row {"iteration", "kind": tag, "values": {class: value or null}}."""
        if not self.enabled:
            return
        row = {name: (float(v) if math.isfinite(float(v)) else None) for name, v in zip(names, values)}
        self.jsonl.write(json.dumps({"iteration": i, "kind": tag, "values": row}) + "\n")
        self.jsonl.flush()
        if self.tb is None:
            return
        for name, value in zip(names, values):
            value = float(value)
            if math.isfinite(value):
                self.tb.add_scalar(f"{tag}/{name}", value, i)

    def images(self, i: int, tag: str, images: torch.Tensor) -> None:
        """uint8 or [0,1] float images [N,3,H,W] to TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_images(tag, images, i, dataformats="NCHW")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def evaluation_started(self) -> None:
        """Stop the ETA clock (evaluation is not training)."""
        self._eval_t0 = time.time()

    def evaluation_finished(self) -> None:
        """Redraw curves.png (at most every CURVES_MIN_INTERVAL seconds) and restart the ETA clock."""
        if not self.enabled:
            return
        if time.time() - self._curves_t >= CURVES_MIN_INTERVAL:
            self.draw_curves()
        if self._eval_t0 is not None:
            self.not_training += time.time() - self._eval_t0
            self._eval_t0 = None
        if self.bar is not None:
            self.bar.unpause()  # tqdm's rate and ETA leave out the time since its last update

    def draw_curves(self) -> None:
        """<run dir>/curves.png from train_log.jsonl; a failure is reported once and never stops training."""
        self._curves_t = time.time()
        if not self.curves:
            return
        try:
            draw_curves(self.run_dir)
        except Exception as e:  # a plotting problem must not end a long run
            if not self._curves_warned:
                self._curves_warned = True
                self.message(f"warning: could not draw curves.png ({type(e).__name__}: {e})")

    def advance(self, i: int) -> None:
        """Iteration i is done: the bar moves on and names it as every other line does."""
        if self.bar is not None:
            self.bar.set_description_str(f"iteration {i}/{self.total}: ", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.jsonl is not None and not self.jsonl.closed:
            self.draw_curves()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
