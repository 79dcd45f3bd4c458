"""Running the study's training runs: one subprocess per run (a fixed thread count each), finished runs kept, wall and
CPU seconds measured, the machine's load sampled."""
from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import platform
import subprocess
import threading
import time

from benchmarks.ssl_protocol import ROOT, command, overrides
from engine.run_dir import run_files

RUN_TIME = "run_time.json"  # in each run directory: wall and CPU seconds of the run, as measured here


def _stored_config_matches(run: dict, config: str) -> bool:
    path = os.path.join(run["run_dir"], "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        stored = json.load(f)
    from engine.config import config_diff, load_config
    planned = load_config(config, overrides(run["sets"]))
    return not config_diff(stored, planned, ignore=("utils.checkpoint_dir",))


def finished(run: dict, config: str, diagnose: bool = False) -> bool:
    """Whether the run directory holds a finished run of exactly this config (with its measurements when
    `diagnose`)."""
    d = run["run_dir"]
    return (os.path.isfile(os.path.join(d, "evaluation.json")) and _stored_config_matches(run, config)
            and (not diagnose or os.path.isfile(os.path.join(d, "diagnostics.jsonl"))))


def run_in_process(run: dict, config: str, device: str, threads: int, diagnose: bool = False) -> int:
    """The run in this process (no interpreter start-up per run: the smoke test); returns 0."""
    import torch

    from benchmarks.ssl_diagnostics import run_script
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    argv = command(run, config, device)[2:]
    try:
        with open(os.path.join(run["run_dir"], "stdout.txt"), "w") as log, contextlib.redirect_stdout(log):
            if diagnose:
                run_script(run["script"], argv)
            else:
                importlib.import_module(os.path.splitext(run["script"])[0]).main(argv)
    finally:
        torch.set_num_threads(previous)
    return 0


def run_subprocess(cmd: list[str], env: dict, log_path: str) -> tuple[int, float | None]:
    """Run `cmd` with its output in `log_path`; (exit code, CPU seconds user + system of the process and its
    children, None where os.wait4 is missing)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if not hasattr(os, "wait4"):
            return proc.wait(), None
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        return proc.returncode, usage.ru_utime + usage.ru_stime


def execute(run: dict, config: str, device: str, threads: int, keep_checkpoints: bool,
            in_process: bool = False, diagnose: bool = False) -> dict:
    """Run one training subprocess (its output in run_dir/stdout.txt) unless already finished; `in_process`: call
    the script in this process instead. Wall and CPU seconds go to run_dir/run_time.json."""
    if finished(run, config, diagnose):
        return {**run, "seconds": None, "cached": True}
    os.makedirs(run["run_dir"], exist_ok=True)
    stale = [os.path.join(run["run_dir"], n) for n in run_files(run["run_dir"]) + ["diagnostics.jsonl", RUN_TIME]]
    for path in stale:  # of another config or interrupted: a run starts only in a directory without them
        if os.path.isfile(path):
            os.remove(path)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0, cpu0 = time.time(), time.process_time()
    if in_process:
        rc = run_in_process(run, config, device, threads, diagnose)
        cpu = time.process_time() - cpu0
    else:
        rc, cpu = run_subprocess(command(run, config, device, diagnose), env,
                                 os.path.join(run["run_dir"], "stdout.txt"))
    seconds = time.time() - t0
    if rc != 0:
        with open(os.path.join(run["run_dir"], "stdout.txt")) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"run {run['run_dir']} failed (exit {rc}):\n{tail}")
    if not keep_checkpoints:  # tens of MB each; the study needs only the logs and evaluation.json
        for path in glob.glob(os.path.join(run["run_dir"], "*.pth")):
            os.remove(path)
    timing = {"wall_seconds": round(seconds, 1), "cpu_seconds": None if cpu is None else round(cpu, 1),
              "threads": threads, "in_process": in_process, "diagnose": diagnose,
              "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    with open(os.path.join(run["run_dir"], RUN_TIME), "w") as f:
        json.dump(timing, f)
    return {**run, "seconds": round(seconds, 1), "cached": False}


def machine() -> dict:
    """CPU, platform, Python (the load while runs train is in each session's record)."""
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


class LoadSampler:
    """The 1-minute load average every `every` seconds while the runs train ([elapsed seconds, load] pairs): how
    busy the machine was, to read the wall time by."""

    def __init__(self, t0: float, every: float = 60.0):
        self.t0, self.every, self.samples = t0, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        if hasattr(os, "getloadavg"):
            self.samples.append([round(time.time() - self.t0), round(os.getloadavg()[0], 2)])

    def _loop(self) -> None:
        self._sample()
        while not self._stop.wait(self.every):
            self._sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._sample()

    def values(self) -> list[float]:
        return [v for _, v in self.samples]


def run_all(runs: list[dict], config: str, device: str, jobs: int, threads: int, keep_checkpoints: bool,
            in_process: bool, diagnose: bool, on_done=None) -> tuple[list[dict], list[dict]]:
    """Run `runs` `jobs` at a time, slowest arms first (so that the last runs of the pool are short ones); returns
    (finished runs, failures). A failed run does not stop the others; `on_done(run)` after each finished one."""
    import concurrent.futures as cf
    cost = {"full": 0, "full_paper": 0, "domain_adaptation": 1, "pseudo_classmix": 2, "supervised": 3,
            "source_only": 4}
    order = sorted(runs, key=lambda r: (cost.get(r["arm"], 5), r["seed"]))
    done, failed = [], []
    with cf.ThreadPoolExecutor(max_workers=1 if in_process else max(1, jobs)) as pool:
        futures = {pool.submit(execute, r, config, device, threads, keep_checkpoints, in_process, diagnose): r
                   for r in order}
        for fut in cf.as_completed(futures):
            r = futures[fut]
            try:
                result = fut.result()
            except Exception as e:  # the other runs go on; the failure is reported at the end
                failed.append({"arm": r["arm"], "seed": r["seed"], "run_dir": r["run_dir"],
                               "error": f"{type(e).__name__}: {e}"[-3000:]})
                print(f"  {r['arm']:18s} seed={r['seed']}: FAILED ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})", flush=True)
                continue
            done.append(result)
            if on_done is not None:
                on_done(result, len(done), len(runs))
    return done, failed
