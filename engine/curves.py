"""curves.png of a training run, for headless servers without TensorBoard: loss terms, learning rate, validation
mIoU and memory fill per class, read from the run's train_log.jsonl.

Drawn with matplotlib's Agg backend through its object interface (no pyplot, so no global backend is chosen for
the caller), written to a temporary file and renamed, so an image viewer never sees half a picture. The training
logger redraws it at evaluations and at the end (engine/logger.py); any run directory can be redrawn by hand:

    python3 -m utils.curves RUN_DIR      (or python3 -m engine.curves RUN_DIR)
"""
from __future__ import annotations

import json
import math
import os
import sys

LOG_NAME = "train_log.jsonl"
CURVES_NAME = "curves.png"


def read_log(path: str) -> list[dict]:
    """The rows of a train_log.jsonl; a {"kind": "resume", "iteration": s} row drops the earlier rows of iterations
    >= s (logged by the interrupted run after its last latest.pth), so each iteration appears once."""
    rows: list[dict] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if row.get("kind") == "resume":
                rows = [r for r in rows if r.get("iteration", -1) < row["iteration"]]
            else:
                rows.append(row)
    return rows


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def series(rows: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel: {line name: (iterations, values)}} for the panels "loss", "lr", "miou" (points) and "memory_fill"."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {"loss": {}, "lr": {}, "miou": {}, "memory_fill": {}}

    def add(panel: str, name: str, i: int, value) -> None:
        xs, ys = out[panel].setdefault(name, ([], []))
        xs.append(i)
        ys.append(_number(value))

    for row in rows:
        i, kind = row.get("iteration"), row.get("kind")
        if not isinstance(i, int):
            continue
        if kind == "train":
            for key, value in row.items():
                if key.startswith("loss"):
                    add("loss", key, i, value)
            if "lr" in row:
                add("lr", "learning rate", i, row["lr"])
        elif kind in ("val", "val_bn_refresh") and "miou" in row:
            add("miou", "validation" if kind == "val" else "after BatchNorm refresh", i, 100 * _number(row["miou"]))
        elif kind == "memory_fill" and isinstance(row.get("values"), dict):
            for name, value in row["values"].items():
                add("memory_fill", name, i, value)
    return out


def draw_curves(run_dir: str, out_path: str | None = None) -> str:
    """Draw <run_dir>/curves.png (or `out_path`) from <run_dir>/train_log.jsonl; returns the picture's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = series(read_log(os.path.join(run_dir, LOG_NAME)))
    out_path = out_path or os.path.join(run_dir, CURVES_NAME)
    fig = Figure(figsize=(12, 8), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    panels = [("loss", "training loss terms (mean per log interval)", "log"),
              ("lr", "learning rate", "linear"),
              ("miou", "validation mIoU (points)", "linear"),
              ("memory_fill", "memory bank: vectors per class", "linear")]
    for ax, (key, title, scale) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        lines = data[key]
        if not lines:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        for name, (xs, ys) in lines.items():
            style = {"color": "black", "linewidth": 2} if name == "loss" else {"linewidth": 1}
            marker = "o" if key == "miou" else None
            ax.plot(xs, ys, label=name, marker=marker, markersize=4, **style)
        if scale == "log" and any(y > 0 for _, ys in lines.values() for y in ys):
            ax.set_yscale("log", nonpositive="mask")  # terms differ by orders of magnitude; zeros are not drawn
        if len(lines) > 1:
            ax.legend(fontsize=7, ncol=2 if len(lines) > 8 else 1, loc="best")
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)), fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.92, wspace=0.18, hspace=0.22)
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    """`python3 -m engine.curves RUN_DIR` (or `-m utils.curves`): redraw RUN_DIR/curves.png."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python3 -m utils.curves RUN_DIR   (redraws RUN_DIR/curves.png from RUN_DIR/train_log.jsonl)",
              file=sys.stderr)
        return 1
    print(f"wrote {draw_curves(argv[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
