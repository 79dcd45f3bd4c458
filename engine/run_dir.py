"""The run directory: which folder a run writes, whether it can be written, who holds it, and what an earlier run
left in it.

- Which folder: `<utils.checkpoint_dir>/<utils.run_name>`; `run_name` null (the default) is the config file's name
  without `.json`, so the paper configs, which all name `../saved/DeepLab`, each get their own folder
  (`../saved/DeepLab/configSSL_city_1_30_split0_COCO/`); `""` makes `checkpoint_dir` itself the run directory. A
  run resumed from a `latest.pth` stays in that file's folder.
- Writable: the folder (or the nearest existing folder above it) must accept a file; checked by writing one, also
  by `--dry-run`, so a read-only, file-typed or unwritable place is named before anything runs.
- Held: a run that writes the folder holds `run.lock` in it with an OS lock (`fcntl.flock`), released by the OS
  when the process ends however it ends, so a killed run leaves no stale lock. The file records the holder (host,
  pid, command, start time); a second run into the folder stops at once and names it. Under torchrun rank 0 holds
  it. Within one process the lock is re-entrant (a process runs one training at a time; tests run several).
- Left behind: `existing_run` reports the files of an earlier run; `--restart` moves them into
  `replaced-<time>/` inside the folder (nothing is deleted).
"""
from __future__ import annotations

import atexit
import fnmatch
import json
import os
import shlex
import socket
import sys
import tempfile
import time

from utils.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the rest works)
    fcntl = None

LOCK_NAME = "run.lock"
# What a run (and evaluateSSL.py on its checkpoints) writes into its directory; --restart moves these, nothing else.
RUN_FILES = ("config.json", "train_split.txt", "train_log.jsonl", "latest.pth", "best_model.pth", "checkpoint-iter*",
             "evaluation.json", "curves.png", "events.out.tfevents.*", "best_model_*", "latest_*", ".tmp-*")
_held: dict[str, int] = {}  # real path of a lock file -> the open descriptor holding it in this process


def run_directory(cfg: dict, config_path: str | None) -> str:
    """`<utils.checkpoint_dir>/<utils.run_name>`, run_name null: the config file's name without .json (no config
    file: checkpoint_dir itself)."""
    u = cfg["utils"]
    name = u["run_name"]
    if name is None:
        name = os.path.splitext(os.path.basename(config_path))[0] if config_path else ""
    return os.path.join(u["checkpoint_dir"], name) if name else u["checkpoint_dir"]


def check_writable(run_dir: str, what: str = "the run directory", fix: str | None = None) -> None:
    """Raise UserError when the folder `run_dir` cannot be created or written (it is a file, a parent is a file, the
    place is read-only or full); writes and removes one small file to find out. `what` names it in the message,
    `fix` says what to do (None: the config keys of the run directory; "": nothing)."""
    path = os.path.abspath(run_dir)
    if fix is None:
        fix = ("Choose a folder you can write: --set utils.checkpoint_dir=PATH (the runs' folder) or "
               "--set utils.run_name=NAME.")
    fix = f" {fix}" if fix else ""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {run_dir} is a file, not a folder.{fix}")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot create {what} {run_dir}: {probe} is a file, not a folder.{fix}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = f"{what} {run_dir}" if probe == path else f"{probe}, where {what} {run_dir} would be made"
        raise UserError(f"cannot write {where}: {e.strerror or e}.{fix}") from None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}, command: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet" if not text.strip() else text.strip()


def _read(fd: int) -> str:
    return os.pread(fd, 65536, 0).decode(errors="replace")


def _in_use(run_dir: str, path: str, fd: int) -> UserError:
    return UserError(f"the run directory {run_dir} is in use by another run: {_holder(_read(fd))}. Two runs must not "
                     f"write one directory; wait for that run to end, or give this one its own directory "
                     f"(--set utils.run_name=NAME). ({path} names the holder.)")


def check_not_held(run_dir: str) -> None:
    """Stop at once (UserError naming the holder) when another process holds `run_dir`; creates nothing."""
    path = os.path.join(run_dir, LOCK_NAME)
    if fcntl is None or os.path.realpath(path) in _held or not os.path.isfile(path):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, path, fd) from None
    except OSError:  # a file system without locks: acquire() says so
        pass
    finally:
        os.close(fd)  # ends the shared lock too


def acquire(run_dir: str) -> None:
    """Hold `run_dir/run.lock` for this process (see the module docstring); UserError naming the holder when another
    process holds it. A lock file left by a process that ended (killed) is taken over, and that is said."""
    if fcntl is None:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    key = os.path.realpath(path)
    fd = _held.get(key)
    while fd is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(run_dir, path, fd)
            os.close(fd)
            raise error from None
        except OSError as e:  # a file system without locks: go on, unprotected, and say so
            print(f"warning: cannot lock {path} ({e.strerror}); a second run into {run_dir} would not be "
                  f"detected", file=sys.stderr, flush=True)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: lock the new one
            os.close(fd)
            fd = None
            continue
        previous = _read(fd)
        if previous.strip():
            print(f"{path}: taking over from {_holder(previous)} (it no longer runs)", flush=True)
        _held[key] = fd
    info = {"host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(["python3", *sys.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def release(run_dir: str) -> None:
    """Give `run_dir/run.lock` back and remove it (a run that ends, however, except by a kill, leaves none)."""
    key = os.path.realpath(os.path.join(run_dir, LOCK_NAME))
    fd = _held.pop(key, None)
    if fd is not None:
        try:
            os.unlink(key)  # while held: a process that opened it meanwhile sees it gone and retries (acquire)
        except FileNotFoundError:
            pass
        os.close(fd)  # closing the descriptor ends the flock


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(os.path.dirname(key))


def fingerprint(run_dir: str) -> tuple:
    """What a run decided on when it looked at the directory: its run files and latest.pth's size and time."""
    latest = os.path.join(run_dir, "latest.pth")
    stamp = (os.stat(latest).st_mtime_ns, os.stat(latest).st_size) if os.path.isfile(latest) else None
    return tuple(run_files(run_dir)), stamp


def claim(run_dir: str, restart: bool, seen: tuple) -> None:
    """Before a run writes its directory: hold it, check that nothing changed since the run looked at it (`seen`, a
    `fingerprint`: another run that wrote meanwhile), then with --restart move the earlier run's files aside."""
    acquire(run_dir)
    if fingerprint(run_dir) != seen:
        release(run_dir)
        raise UserError(f"another run wrote to {run_dir} while this one was starting; run the command again (it "
                        f"will decide on what is there now).")
    if restart:
        moved = move_aside(run_dir)
        if moved:
            print(f"--restart: the earlier run's files in {run_dir} are now in {moved}/; starting afresh", flush=True)


def run_files(run_dir: str) -> list[str]:
    """The files an earlier run left in `run_dir` (RUN_FILES), sorted; [] for a missing folder."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(n for n in os.listdir(run_dir) if any(fnmatch.fnmatch(n, p) for p in RUN_FILES))


def move_aside(run_dir: str) -> str | None:
    """--restart: move the earlier run's files into `run_dir/replaced-<time>/`; returns that folder (None: nothing
    to move)."""
    names = run_files(run_dir)
    if not names:
        return None
    target = os.path.join(run_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    k = 1
    while os.path.exists(target):
        k += 1
        target = os.path.join(run_dir, time.strftime("replaced-%Y%m%d-%H%M%S") + f"-{k}")
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(target, name))
    return target


def write_run_files(run_dir: str, cfg: dict, train_names: list[str], labeled_idx: list[int]) -> None:
    """config.json (the resolved config) and train_split.txt (the labeled training images) of a starting run."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(run_dir, "train_split.txt"), "w") as f:
        f.write("".join(train_names[k] + "\n" for k in labeled_idx))
