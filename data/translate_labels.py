#!/usr/bin/env python3
"""Convert GTA5's released label images to Cityscapes train ids (ignore 250), in place or to a new folder.

    python3 utils/translate_labels.py [--root ../data/GTA5] [--labels-dir DIR] [--out-dir DIR]
                                      [--split-mat split.mat] [--workers N]

(`utils/translate_labels.py` is the release's command, kept as a thin entry point; `python3 -m data.translate_labels`
is the same.)

The GTA5 ("Playing for Data") labels are PNGs in palette mode whose pixel indices are Cityscapes label ids
(0..33), with the Cityscapes colours as palette; some copies are saved as RGB colour images. Both become
single-channel 8-bit PNGs (mode "L") of the 19 train ids with 250 for everything not evaluated, the format
`data/gta5.py` reads. Conversion is one table lookup per image:
- palette mode: `ID_TO_TRAINID[indices]`; the indices must be label ids and the palette colours of the
  indices used must be the Cityscapes colours of those ids (otherwise the file is not a GTA5 label).
- RGB: each colour r*65536 + g*256 + b is looked up (np.searchsorted) among the Cityscapes colours. Colours
  shared by several ids resolve as follows: black (ids 0..4) -> 250; (153,153,153), shared by pole (id 17)
  and polegroup (id 18, not evaluated), -> pole 5, since the colour cannot tell them apart (the palette
  route keeps the distinction: polegroup -> 250). Any other colour makes the file malformed.
- mode "L" with every value in {0..18, 250}: already converted, left as is.
Everything else (mode L with other values, unknown colours, other modes, unreadable files) is reported by
name and not written; the exit code is then 1. Outputs are written atomically (temporary file, then
os.replace), so a second run finds every label already converted and changes nothing.

`--split-mat` first lays out `<root>/images/{train,val}` and `<root>/labels/{train,val}` from the flat
`<root>/images/*.png` and `<root>/labels/*.png` by moving files, using the dataset's split.mat (arrays
trainIds / valIds / testIds of 1-based image numbers; files are named %05d.png). Test files stay where they
are.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import stat
import sys
import tempfile

import numpy as np
from PIL import Image

from data.cityscapes_labels import ID_TO_TRAINID, IGNORE_LABEL, LABELS, NUM_CLASSES
from data.progress import progress
from utils.errors import UserError

NUM_IDS = 34  # Cityscapes label ids 0..33
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _encode(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 colours -> [...] uint32 codes r*65536 + g*256 + b."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _colour_table() -> tuple[np.ndarray, np.ndarray]:
    """Sorted colour codes of the Cityscapes palette and the train id of each (a shared colour keeps the
    evaluated class if one of its ids has a train id: (153,153,153) -> pole)."""
    table: dict[int, int] = {}
    for _, _, tid, colour in LABELS:
        code = int(_encode(np.array(colour, dtype=np.uint8)))
        new = IGNORE_LABEL if tid is None else tid
        old = table.get(code, IGNORE_LABEL)
        assert old == IGNORE_LABEL or new == IGNORE_LABEL or old == new, "two train ids share a colour"
        table[code] = new if old == IGNORE_LABEL else old
    keys = np.array(sorted(table), dtype=np.uint32)
    return keys, np.array([table[int(k)] for k in keys], dtype=np.uint8)


COLOUR_KEYS, COLOUR_TRAINIDS = _colour_table()
ID_COLOURS = np.zeros((NUM_IDS, 3), dtype=np.int64)  # [34, 3] Cityscapes colour of each label id
for _, _lid, _, _col in LABELS:
    ID_COLOURS[_lid] = _col
VALID_TRAINIDS = np.zeros(256, dtype=bool)
VALID_TRAINIDS[:NUM_CLASSES] = True
VALID_TRAINIDS[IGNORE_LABEL] = True


def _colour_to_trainid(rgb: np.ndarray) -> tuple[np.ndarray | None, str]:
    """[H,W,3] colours -> ([H,W] uint8 train ids, "") or (None, reason) if a colour is not Cityscapes'."""
    code = _encode(rgb)  # [H,W]
    pos = np.minimum(np.searchsorted(COLOUR_KEYS, code), len(COLOUR_KEYS) - 1)
    known = COLOUR_KEYS[pos] == code
    if not known.all():
        bad = np.unique(code[~known])
        shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in bad[:3].tolist())
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return None, (f"{int((~known).sum())} pixels have colours outside the Cityscapes palette: {shown}{more}")
    return COLOUR_TRAINIDS[pos], ""


def _ids_to_trainid(ids: np.ndarray) -> tuple[np.ndarray | None, str]:
    """[H,W] label ids -> ([H,W] uint8 train ids, "") or (None, reason) if a value is not an id 0..33."""
    if not np.issubdtype(ids.dtype, np.integer):
        return None, f"label ids must be integers, got {ids.dtype}"
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= NUM_IDS):
        return None, (f"values {int(ids.min())}..{int(ids.max())} are not all Cityscapes label ids "
                      f"(0..{NUM_IDS - 1})")
    return ID_TO_TRAINID[ids], ""


def _check_palette(img: Image.Image, ids: np.ndarray) -> str:
    """'' if the palette colour of every index used is the Cityscapes colour of that label id, else why not."""
    raw = img.getpalette() or []
    pal = np.zeros(256 * 3, dtype=np.int64)
    pal[:len(raw)] = raw[:256 * 3]
    pal = pal.reshape(256, 3)
    used = np.flatnonzero(np.bincount(ids.ravel(), minlength=NUM_IDS)[:NUM_IDS])
    wrong = used[(pal[used] != ID_COLOURS[used]).any(axis=1)]
    if wrong.size:
        k = int(wrong[0])
        return (f"palette index {k} has colour {tuple(pal[k].tolist())}, not the Cityscapes colour "
                f"{tuple(ID_COLOURS[k].tolist())} of label id {k}: not a GTA5/Cityscapes label-id image")
    return ""


def translate(img: Image.Image) -> tuple[str, np.ndarray | None, str]:
    """Classify and convert one label image.

    Returns (status, train ids [H,W] uint8 or None, reason) with status "converted", "already" (mode L
    train ids; the array is returned unchanged) or "malformed" (array None, reason says why).
    """
    if img.mode == "P":
        ids = np.asarray(img)
        out, why = _ids_to_trainid(ids)
        why = why or _check_palette(img, ids)
        return ("malformed", None, why) if why else ("converted", out, "")
    if img.mode == "RGB":
        out, why = _colour_to_trainid(np.asarray(img))
        return ("malformed", None, why) if out is None else ("converted", out, "")
    if img.mode == "L":
        arr = np.asarray(img)
        bad = np.flatnonzero(np.bincount(arr.ravel(), minlength=256) * ~VALID_TRAINIDS)
        if bad.size:
            return "malformed", None, (f"mode L but holds values {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}"
                                       f" that are not train ids (0..{NUM_CLASSES - 1}, {IGNORE_LABEL})")
        return "already", arr, ""
    return "malformed", None, (f"image mode {img.mode}; expected P (label ids with the Cityscapes palette), "
                               f"RGB (Cityscapes colours) or L (train ids)")


def convert_label(array_or_image: np.ndarray | Image.Image) -> np.ndarray | None:
    """Train ids [H,W] uint8 (ignore 250) of one GTA5 label, or None when it is malformed.

    A PIL image is handled by its mode (P, RGB, or already-converted L, see the module docstring). A numpy
    array [H,W,3] is read as RGB colours, [H,W] as Cityscapes label ids (palette indices, no palette check).
    """
    if isinstance(array_or_image, Image.Image):
        return translate(array_or_image)[1]
    arr = np.asarray(array_or_image)
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return _colour_to_trainid(arr)[0]
    if arr.ndim == 2:
        return _ids_to_trainid(arr)[0]
    return None


# ---------------------------------------------------------------------------------------------- files

def _atomic_target(path: str, mode_from: str):
    """A temporary file beside `path` (permissions copied from `mode_from`); returns (fd, temp path)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        mode = stat.S_IMODE(os.stat(mode_from).st_mode)
    except OSError:  # no file to copy from: the usual 0666 & ~umask instead of mkstemp's 0600
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    return fd, tmp


def save_label_atomic(train_ids: np.ndarray, path: str, mode_from: str | None = None) -> None:
    """Write [H,W] uint8 train ids as a mode-L PNG through a temporary file and os.replace."""
    fd, tmp = _atomic_target(path, mode_from or path)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(train_ids, dtype=np.uint8)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _copy_atomic(src: str, dst: str) -> None:
    fd, tmp = _atomic_target(dst, src)
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def process_file(task: tuple[str, str]) -> tuple[str, str, str]:
    """Convert label file `src` into `dst` (may be the same path). Returns (src, status, reason) with status
    "converted", "already", "malformed" or "error" (could not write)."""
    src, dst = task
    try:
        with Image.open(src) as img:
            img.load()
            status, out, why = translate(img)
    except READ_ERRORS as e:
        return src, "malformed", f"unreadable ({type(e).__name__}: {e})"
    if status == "malformed":
        return src, status, why
    try:
        if status == "converted":
            save_label_atomic(out, dst, mode_from=src)
        elif os.path.abspath(dst) != os.path.abspath(src):
            _copy_atomic(src, dst)
    except OSError as e:
        return src, "error", f"cannot write {dst} ({type(e).__name__}: {e})"
    return src, status, ""


def list_labels(labels_dir: str, exclude: str | None = None) -> list[str]:
    """Every *.png under `labels_dir` (recursively, sorted), skipping the folder `exclude`."""
    if not os.path.isdir(labels_dir):
        raise UserError(f"labels folder not found: {os.path.abspath(labels_dir)}. Pass --root (the GTA5 folder "
                        f"holding labels/) or --labels-dir.")
    skip = os.path.realpath(exclude) if exclude else None
    files = []
    for folder, dirs, names in os.walk(labels_dir):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip)
        files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(".png")]
    if not files:
        raise UserError(f"no *.png label files under {os.path.abspath(labels_dir)}.")
    return files


def _read_ids(mat: dict, key: str, path: str) -> np.ndarray:
    if key not in mat:
        raise UserError(f"{path} has no array '{key}'; expected GTA5's split.mat with trainIds, valIds, testIds.")
    ids = np.asarray(mat[key]).ravel()
    if ids.size and (not np.issubdtype(ids.dtype, np.number) or (ids != np.round(ids)).any() or ids.min() < 1):
        raise UserError(f"{path}: '{key}' must hold 1-based image numbers (positive integers).")
    return ids.astype(np.int64)


def layout_from_split_mat(root: str, mat_path: str) -> dict[str, int]:
    """Move flat `<root>/{images,labels}/%05d.png` into `train/` and `val/` subfolders by split.mat.

    Files already in place are left alone (re-running is harmless); test files stay in the flat folders.
    Nothing is moved when a file exists both flat and in its destination. Returns counts.
    """
    try:
        from scipy.io import loadmat
        mat = loadmat(mat_path)
    except FileNotFoundError:
        raise UserError(f"split file not found: {mat_path}") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read {mat_path} as a MATLAB .mat file ({type(e).__name__}: {e}).") from None
    train = _read_ids(mat, "trainIds", mat_path)
    val = _read_ids(mat, "valIds", mat_path)
    test = _read_ids(mat, "testIds", mat_path) if "testIds" in mat else np.zeros(0, np.int64)
    both = np.intersect1d(train, val)
    if both.size:
        raise UserError(f"{mat_path}: {both.size} image numbers are in both trainIds and valIds "
                        f"(first: {int(both[0])}).")
    moves, conflicts, missing = [], [], []
    in_place = 0
    for kind in ("images", "labels"):
        for split, ids in (("train", train), ("val", val)):
            for i in ids.tolist():
                name = f"{i:05d}.png"
                src = os.path.join(root, kind, name)
                dst = os.path.join(root, kind, split, name)
                if os.path.exists(dst):
                    in_place += 1
                    if os.path.exists(src):
                        conflicts.append(src)
                elif os.path.exists(src):
                    moves.append((src, dst))
                else:
                    missing.append(os.path.join(kind, name))
    if conflicts:
        raise UserError(f"{len(conflicts)} files exist both flat and in their train/val folder (first: "
                        f"{conflicts[0]}); remove the duplicates, then run again. Nothing was moved.")
    for kind in ("images", "labels"):
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, kind, split), exist_ok=True)
    for src, dst in moves:
        os.replace(src, dst)
    test_left = sum(os.path.exists(os.path.join(root, kind, f"{i:05d}.png"))
                    for kind in ("images", "labels") for i in test.tolist())
    print(f"split.mat: moved {len(moves)} files into {{images,labels}}/{{train,val}} "
          f"({train.size} train, {val.size} val ids), {in_place} already in place, "
          f"{test_left} test files left in place ({test.size} test ids)", flush=True)
    if missing:
        print(f"warning: {len(missing)} files of the train/val ids are missing (first: {missing[0]})",
              file=sys.stderr, flush=True)
    return {"moved": len(moves), "in_place": in_place, "test_left": test_left, "missing": len(missing)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../data/GTA5", help="GTA5 folder (default: ../data/GTA5)")
    p.add_argument("--labels-dir", default=None, help="labels to convert, recursively (default: <root>/labels)")
    p.add_argument("--out-dir", default=None, help="write converted labels here, mirroring the folder "
                                                   "structure (default: in place)")
    p.add_argument("--split-mat", default=None, help="GTA5 split.mat: first move flat images/labels into "
                                                     "train/ and val/ subfolders")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: min(4, CPUs))")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    if args.split_mat:
        layout_from_split_mat(args.root, args.split_mat)
    labels_dir = args.labels_dir or os.path.join(args.root, "labels")
    files = list_labels(labels_dir, exclude=args.out_dir)
    if args.out_dir:
        tasks = [(f, os.path.join(args.out_dir, os.path.relpath(f, labels_dir))) for f in files]
    else:
        tasks = [(f, f) for f in files]
    counts = {"converted": 0, "already": 0, "malformed": 0, "error": 0}
    problems: list[tuple[str, str, str]] = []
    workers = min(args.workers, len(tasks))
    if workers <= 1:
        results = map(process_file, tasks)
        pool = None
    else:
        pool = mp.Pool(workers)
        results = pool.imap_unordered(process_file, tasks, chunksize=max(1, min(32, len(tasks) // (8 * workers))))
    try:
        for src, status, why in progress(results, len(tasks), "labels"):
            counts[status] += 1
            if status in ("malformed", "error"):
                problems.append((src, status, why))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for src, status, why in sorted(problems):
        print(f"{'malformed label' if status == 'malformed' else 'error'}: {src}: {why}", file=sys.stderr)
    summary = (f"converted {counts['converted']}, already converted {counts['already']}, "
               f"malformed {counts['malformed']}")
    if counts["error"]:
        summary += f", write errors {counts['error']}"
    print(summary, flush=True)
    return 1 if counts["malformed"] or counts["error"] else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 malformed labels, 2 user error)."""
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
