"""Checkpoints: atomic writes, safe loads.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the target,
so a run killed mid-save leaves the previous file intact. The file gets the permissions `torch.save(obj, path)`
would give it: those of the file it replaces, else 0666 less the user's umask (a colleague on a shared cluster
reads it as any other file the user writes). A second signal that stops the run at once during a save
(engine/graceful_stop.py) first removes the partial temporary file (`remove_partial_files`). Loads use
`weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
from typing import Any, BinaryIO, Callable

import torch

from utils.errors import UserError


_partial: set[str] = set()  # temporary files being written now (removed by a stop that cannot wait)


def remove_partial_files() -> None:
    """Remove the temporary file of a save in progress; for a process about to end at once (a second signal).
    Only os calls: safe inside a signal handler."""
    for tmp in list(_partial):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _partial.discard(tmp)


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to `path` atomically (temp file + fsync + os.replace), with torch.save's permissions."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temporary file `.tmp-<name>.<hex>` beside `path`, then fsync and os.replace: the file at
    `path` is never partial. A failure (or a stop) removes the temporary file; a full disk ends in a UserError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}.{secrets.token_hex(4)}")
    _partial.add(tmp)
    try:
        # 0o666 less the umask, as open() gives; the mode of the file replaced when there is one (as torch.save,
        # which truncates that file in place)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if os.path.exists(path):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _write_failure(e):
            raise UserError(_write_failed(path, e)) from None
        raise
    finally:
        _partial.discard(tmp)


def _write_failure(e: BaseException) -> bool:
    """An OSError, or torch's zip writer failing on a full disk ("unexpected pos ...", "file write failed")."""
    text = str(e)
    return isinstance(e, OSError) or isinstance(e, RuntimeError) and (
        "unexpected pos" in text or "write failed" in text or "PytorchStreamWriter" in text)


def _write_failed(path: str, e: BaseException) -> str:
    """The message of a checkpoint write that failed: which file, why, and that the previous file is intact."""
    try:
        free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20:.0f} MiB free there"
    except OSError:
        free = ""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return (f"cannot write {path} ({reason}{free}); the disk is probably full or the folder became unwritable. "
            f"Nothing was replaced: the previous {os.path.basename(path)}, if there was one, is intact. Free some "
            f"space, then run the same command again: it continues from the last latest.pth.")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with weights_only=True; a clear error for a missing or unreadable file."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file; give a .pth file in it (e.g. "
                        f"{os.path.join(path, 'best_model.pth')}, or its run state "
                        f"{os.path.join(path, 'latest.pth')}).")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, a pickle of code objects, not a torch file at all
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a checkpoint dict (found {type(obj).__name__}).")
    return obj


def model_state_from(ckpt: dict, path: str) -> dict:
    """The model weights of a checkpoint written by this project or by the original release."""
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise UserError(f"{path} holds no model weights (expected a 'model' entry; found {sorted(ckpt)[:8]}).")
