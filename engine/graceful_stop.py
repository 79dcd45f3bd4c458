"""Graceful stop: SIGTERM or SIGINT (and a bad file in the next batches) end a run between two iterations, with
latest.pth written, a resume command printed and exit code 128 + signal (2 for a bad file).

- A signal only sets a flag. The current iteration finishes; at its end (`after_iteration`) the run writes
  latest.pth with the state after that iteration and raises `RunStopped`. A second signal stops the process at
  once (the default action of that signal): latest.pth is then the one written before (writes are atomic).
- Between iterations the next batches are loaded ahead (`InfiniteBatches.prefetch`), so an unreadable image or
  label surfaces there, with every sampler at the position of the last completed iteration: the run writes
  latest.pth and names the file; after the file is fixed, `--resume auto` continues exactly.
- An evaluation is interruptible: a stop request ends it at the next image. The state saved is that after the
  last completed iteration, with the evaluation marked pending (`pending_evaluation` in latest.pth); the resumed
  run does that evaluation first, so it continues exactly as an uninterrupted run. A bad validation file does
  the same in a single process. The evaluations and the BatchNorm refresh after the loop are interruptible too:
  latest.pth already holds the state after the last iteration, and the resumed run repeats them.
- Under torchrun every rank stops at the same iteration: the flags are combined with one all-reduce of two
  integers per iteration (the same one after each evaluated image and each refresh pass), and rank 0 writes
  latest.pth (the others take part in gathering their RNG states). Why a collective of its own: a bad file can be
  met on one rank only, and it must be known to all before the next iteration's first collective. Its cost is one
  small round trip and one host read per iteration; the iteration already waits on the gradient all-reduce and
  its host read (utils/distributed.average_gradients), so the device pipeline loses little (not measured on GPUs
  here). A single process does no collective and no device sync for this.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager
from typing import Callable

import torch

from engine import distributed as dist
from engine.checkpoint import remove_partial_files
from utils.errors import RunStopped, UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Interrupted(Exception):
    """Ends an evaluation early when a stop was requested (caught by `pending_evaluation`)."""


def resume_command(run, extra: tuple[str, ...] = (), replace: tuple[str, ...] = ()) -> str:
    """The command that continues `run` from its latest.pth: the run's own arguments with `--resume auto` (or
    the run directory's latest.pth when the run was started from a checkpoint alone), then `extra`; `--set` of
    the keys in `replace` and an earlier `--resume` / `--recover` are left out."""
    args, kept, k = list(run.argv), [], 0
    while k < len(args):
        name, eq, value = args[k].partition("=")
        takes_value = name in ("--resume", "-r", "--set")
        if takes_value and not eq:
            value = args[k + 1] if k + 1 < len(args) else ""
            k += 2
        else:
            k += 1
        if name in ("--resume", "-r", "--recover") or (name == "--set" and value.split("=")[0] in replace):
            continue
        kept += [name, value] if takes_value else [args[k - 1]]
    resume = "auto" if run.args.config else os.path.join(run.run_dir, "latest.pth")
    command = "python3 " + shlex.join([f"{run.variant.name}.py", *kept, "--resume", resume, *extra])
    if dist.is_distributed():
        command += "\n  (under torchrun: your torchrun command with these script arguments)"
    return command


class GracefulStop:
    """SIGTERM/SIGINT handling and the end-of-iteration stop check of one run (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signum = 0                    # the first signal received (agreed over ranks once acted on)
        self.error: str | None = None      # a data error met between iterations or in an evaluation
        self._previous: dict[int, object] = {}
        self._deferring = False            # inside an evaluation that may be left pending
        self._talk = dist.is_main()

    # ------------------------------------------------------------------------------------------- signals
    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers they had before `install`."""
        for s, previous in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, previous)
        self._previous = {}

    def end(self, run) -> None:
        """The run is over (finished or stopped): signals go back to their handlers, the loader workers end."""
        self.uninstall()
        for batches in (run.labeled, run.unlabeled, run.gta5_batches):
            if batches is not None:
                batches.close()
        run.logger.close()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self._previous:  # uninstalled, still referenced somewhere: behave as if never installed
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum:  # the second signal: stop now, by that signal's default action
            self._say(f"\n{name} again: stopping now; latest.pth is the one written before\n")
            remove_partial_files()  # a save in progress leaves no .tmp-* file behind
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self._say(f"\n{name} received: finishing this iteration, then writing latest.pth "
                  f"(send {name} again to stop at once)\n")

    def _say(self, text: str) -> None:
        if self._talk:  # os.write: safe inside a signal handler, unlike print
            os.write(2, text.encode())

    # -------------------------------------------------------------------------------------- decisions
    def _agree(self, *values: int) -> list[int]:
        """The maximum of each value over ranks (one small all-reduce under torchrun; the values alone else)."""
        if not dist.is_distributed():
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        return dist.all_reduce_max(t).tolist()

    def after_iteration(self, run, i: int) -> None:
        """End of iteration i: load the next batches ahead, then stop if a signal or a bad file was met on any
        rank (latest.pth with the state after i + 1 iterations, then RunStopped)."""
        if not self.signum and self.error is None and i + 1 < run.num_iterations:
            try:
                for batches in (run.labeled, run.unlabeled, run.gta5_batches):
                    if batches is not None:
                        batches.prefetch()
            except UserError as e:
                self.error = str(e)
        signum, failed = self._agree(self.signum, int(self.error is not None))
        if signum or failed:
            self.signum = signum
            self._stop(run, i + 1, failed=bool(failed))

    def _stop(self, run, completed: int, failed: bool) -> None:
        errors = dist.all_gather_object(self.error) if failed else []
        run.guard.check(run, weights=True)  # a state that diverged is not written (raises Diverged)
        if run.latest_saved != completed:
            run.save_latest(completed)
        self.end(run)
        pending = run.pending_evaluation
        saved = (f"latest.pth in {run.run_dir} holds the state after {completed} of {run.num_iterations} "
                 f"iterations" + (f" (the evaluation after iteration {pending} was interrupted; the resumed run "
                                  f"does it first)" if pending is not None else ""))
        if failed:
            found = "\n".join(f"{e}" + (f" (rank {r})" if dist.is_distributed() else "")
                              for r, e in enumerate(errors) if e)
            raise RunStopped(f"{found}\n{saved}. Fix or replace the file, check the others with --dry-run "
                             f"--check-files, then continue:\n  {resume_command(run)}", exit_code=2)
        name = signal.Signals(self.signum).name
        raise RunStopped(f"{saved}. Continue with:\n  {resume_command(run)}", exit_code=128 + self.signum,
                         label=f"stopped by {name}")

    # ------------------------------------------------------------------------------ interruptible phases
    @contextmanager
    def pending_evaluation(self, run, i: int):
        """Around the evaluation after iteration i: a stop request (or, in one process, a bad validation file)
        ends it and leaves it pending; `after_iteration` then saves and stops."""
        self._deferring = True
        try:
            yield
        except _Interrupted:
            run.pending_evaluation = i
            run.student_module.train()  # evaluate() left it in eval mode
        except RunStopped:
            raise
        except UserError as e:
            # under torchrun the other ranks wait in the evaluation's all-reduce: the job ends as any failure
            if dist.is_distributed():
                raise
            self.error, run.pending_evaluation = str(e), i
            run.student_module.train()
        finally:
            self._deferring = False

    def evaluation_poll(self, run, n_images: int) -> Callable[[], None]:
        """A function to call after each evaluated image: ends the evaluation when a stop was requested. Under
        torchrun it polls (collectively) only while every rank still has images (n_images // world_size)."""
        shared, count = n_images // dist.world_size(), 0

        def poll() -> None:
            nonlocal count
            count += 1
            if count <= shared:
                self.poll(run, "an evaluation")
        return poll

    def poll(self, run, where: str) -> None:
        """Stop now if a stop was requested on any rank: inside a loop evaluation by leaving it pending, after the
        training loop (final evaluations, BatchNorm refresh) with RunStopped at once — latest.pth already holds
        the state after the last iteration."""
        (signum,) = self._agree(self.signum)
        if not signum:
            return
        self.signum = signum
        if self._deferring:
            raise _Interrupted
        self.end(run)
        name = signal.Signals(signum).name
        raise RunStopped(f"during {where} after the last iteration; latest.pth in {run.run_dir} holds the state "
                         f"after all {run.num_iterations} iterations. Repeat the final evaluation and BatchNorm "
                         f"refresh with:\n  {resume_command(run)}", exit_code=128 + signum, label=f"stopped by {name}")

    def resume_pending_evaluation(self, run) -> None:
        """A run resumed from a state whose evaluation was interrupted does that evaluation first."""
        i = run.pending_evaluation
        if i is None:
            return
        run.pending_evaluation = None
        run.logger.message(f"the evaluation after iteration {i} was interrupted by the stop; evaluating now")
        run.evaluate_if_due(i)
        if run.pending_evaluation is None:
            run.save_latest(i + 1)  # no longer pending on disk either
        self.after_iteration(run, i)
