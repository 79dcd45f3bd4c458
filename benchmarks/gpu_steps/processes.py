"""Step records and processes of `make gpu-check`: atomic JSON records, commands in their own process group killed
past their time limit, and the context a Python step records its results in."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass

from benchmarks.gpu_steps.plan import KILL_GRACE_S, Plan, ROOT


def tail(text: str, lines: int = 30, chars: int = 3000) -> str:
    """The last `lines` lines (at most `chars` characters) of a process's output: its error."""
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


def write_json(path: str, obj) -> None:
    """Atomic write (a step killed mid-write leaves the previous record)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass
class Completed:
    returncode: int | None      # None: killed on its time limit
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


@dataclass
class Started:
    """A command running in its own process group, its output going to a log file."""
    proc: subprocess.Popen
    log_path: str
    t0: float


def start_command(cmd: list[str], log_path: str, env: dict | None = None) -> Started:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Started(proc, log_path, time.monotonic())


def wait_command(started: Started, timeout: float) -> Completed:
    """Wait until `timeout` seconds after the start; then the process group gets SIGTERM (torchrun stops its
    workers on it) and, KILL_GRACE_S later, SIGKILL."""
    p = started.proc
    try:
        code = p.wait(timeout=max(started.t0 + timeout - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        code = None
        terminate(p)
    except BaseException:  # Ctrl-C: the step's group is in its own session, so it would not get the SIGINT
        terminate(p)
        raise
    with open(started.log_path, errors="replace") as f:
        output = f.read()
    return Completed(code, output, time.monotonic() - started.t0)


def terminate(p: subprocess.Popen) -> None:
    """SIGTERM to the process group of p, SIGKILL KILL_GRACE_S later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], timeout: float, log_path: str, env: dict | None = None) -> Completed:
    """Run cmd in its own process group, stdout and stderr to log_path, killed past `timeout` seconds."""
    return wait_command(start_command(cmd, log_path, env), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StepContext:
    """What a Python step sees: the plan, its folder, and `record` to keep results as they come."""

    def __init__(self, name: str, plan: Plan, work: str):
        self.name, self.plan, self.work = name, plan, work
        self.device = plan.device
        self.path = os.path.join(work, "steps", f"{name}.json")
        self.data: dict = {}
        self.errors: list[str] = []
        write_json(self.path, {"data": self.data, "errors": self.errors, "done": False})

    def record(self, key: str, value) -> None:
        self.data[key] = value
        self._save()

    def error(self, what: str) -> None:
        """An action failed (with its traceback); the step goes on with the next action and ends failed."""
        self.errors.append(f"{what}:\n{tail(traceback.format_exc())}")
        print(f"[{self.name}] {what} failed:\n{traceback.format_exc()}", flush=True)
        self._save()
        release_device_memory()

    def finish(self) -> None:
        write_json(self.path, {"data": self.data, "errors": self.errors, "done": True})

    def _save(self) -> None:
        write_json(self.path, {"data": self.data, "errors": self.errors, "done": False})


def release_device_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
