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
- Under torchrun every rank stops after the same iteration, and no collective of its own decides it: a rank with
  a reason to stop (a signal, or a bad file among the batches it loads ahead) votes in its next gradient pass, and
  DistributedDataParallel's gradient all-reduce delivers the vote to every rank in that same iteration
  (engine/ddp_step.py: an iteration without a vote costs no device read either). So that a bad file is known before
  its batch is needed, each rank loads two iterations ahead under torchrun (one in a single process): a file that
  fails while loading the batch of iteration i + 2 stops every rank after iteration i + 1. Rank 0 writes latest.pth
  (the others take part in gathering their RNG states). Outside the loop, where no gradient pass runs, the flags
  are combined with one all-reduce of a few integers: before the first iteration (the batches loaded ahead), after
  each evaluated image and each BatchNorm refresh pass. A single process does no collective and no device sync.
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
        """The run is over (finished or stopped): signals go back to their handlers, the loader workers end,
        DistributedDataParallel lets go of the process group (before it is destroyed or the process exits)."""
        self.uninstall()
        for batches in (run.labeled, run.unlabeled, run.gta5_batches):
            if batches is not None:
                batches.close()
        if getattr(run, "gradient_pass", None) is not None:
            run.gradient_pass.close()
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

    def vote(self) -> tuple[float, ...]:
        """This rank's reasons to stop, one per slot of engine/ddp_step.STOP_REASONS (SIGINT, SIGTERM, a bad file),
        for the next gradient pass."""
        signum = self.signum
        return float(signum == signal.SIGINT), float(signum == signal.SIGTERM), float(self.error is not None)

    def _load_ahead(self, run, i: int) -> None:
        """After iteration i: the batches of the next iterations loaded (one ahead in one process, two under
        torchrun, never past the last iteration); a data error is kept in `error`."""
        ahead = min(2 if dist.is_distributed() else 1, run.num_iterations - 1 - i)
        if self.signum or self.error is not None or ahead <= 0:
            return
        try:
            for batches in (run.labeled, run.unlabeled, run.gta5_batches):
                if batches is not None:
                    batches.prefetch(ahead)
        except UserError as e:
            self.error = str(e)

    def after_iteration(self, run, i: int, voted: bool = True) -> None:
        """End of iteration i: stop if a signal or a bad file was met on any rank (latest.pth with the state after
        i + 1 iterations, then RunStopped); else load the next batches ahead.

        One process: the batches of iteration i + 1 are loaded first, so that a bad file among them stops the run
        now. Under torchrun the ranks' votes came with the gradients of iteration i (`voted`; otherwise, outside
        the loop, one all-reduce agrees), and a bad file met while loading ahead is voted on in iteration i + 1. An
        evaluation after iteration i that a stop interrupted was interrupted on every rank at once (its polls
        agree): the run stops now, before another iteration, so that the resumed run does it first."""
        if dist.is_distributed() and voted:
            sigint, sigterm, failed = run.gradient_pass.votes()
            signum = signal.SIGTERM if sigterm else signal.SIGINT if sigint else 0
            if run.pending_evaluation is not None:
                signum = signum or self.signum  # agreed by the evaluation's last poll
        else:
            self._load_ahead(run, i)
            signum, failed = self._agree(self.signum, int(self.error is not None))
        if signum or failed:
            self.signum = signum
            self._stop(run, i + 1, failed=bool(failed))
        if dist.is_distributed() and voted:
            self._load_ahead(run, i)  # a bad file met here is voted on in iteration i + 1

    def before_loop(self, run) -> None:
        """Before the first iteration: an evaluation that a stop interrupted is done first (the resumed run then
        continues exactly), and under torchrun the first batches are loaded ahead and any rank's bad file or
        signal is agreed on."""
        i = run.pending_evaluation
        if i is not None:
            run.pending_evaluation = None
            run.logger.message(f"the evaluation after iteration {i} was interrupted by the stop; evaluating now")
            run.evaluate_if_due(i)
            if run.pending_evaluation is None:
                run.save_latest(i + 1)  # no longer pending on disk either
        if i is not None or dist.is_distributed():
            self.after_iteration(run, run.start_iteration - 1, voted=False)

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
