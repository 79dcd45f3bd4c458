"""Non-finite guard: a run whose loss terms or weights become NaN or Inf stops before it writes anything from after
its last finite state, names the iterations and the terms, and prints how to continue from the last good state.

No host sync per iteration: the run already sums every loss term on the device over the log window (`Run._sums`,
for the logged averages), and a NaN or Inf in any iteration makes that sum non-finite — the sums are the
accumulated flag. The guard reads them (one small transfer; under torchrun one all-reduce so that every rank
decides alike) before every log row and before every write: periodic checkpoint, evaluation (which may write
best_model.pth, and at the end the final checkpoint), latest.pth, and the latest.pth of a graceful stop. Before a
write it also checks every floating-point tensor of the run state (student, teacher, optimiser, memory bank, class
weights): a step can blow the weights up after a finite loss.

fp16: GradScaler skips the steps whose scaled gradients overflow and lowers its scale; that is not divergence and
the guard never sees it — it reads the loss terms (fp32, computed before the scaling) and the weights (which a
skipped step leaves as they were), never the gradients.
"""
from __future__ import annotations

import torch

from engine import distributed as dist
from engine.config import config_diff
from utils.errors import RunStopped
from engine.graceful_stop import resume_command

# Config keys that `--recover` lets differ from the checkpoint's when resuming (they change results, on purpose).
RECOVERY_KEYS = ("training.learning_rate", "precision")
EXIT_DIVERGED = 3


class Diverged(RunStopped):
    """The run stopped because a loss term or a weight became NaN/Inf; nothing after the last finite state was
    written."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=EXIT_DIVERGED)


def state_tensors(run) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating-point tensor a checkpoint of `run` holds, besides the loss sums."""
    parts = {"student": run.student_module.state_dict(), "teacher": run.teacher.state_dict(),
             "optimizer": run.optimizer.state_dict()["state"], "memory": run.memory.state_dict(),
             "class_weights": run.class_weights}
    out: list[tuple[str, torch.Tensor]] = []

    def walk(name: str, x) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                out.append((name, x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{name}.{k}" if name else str(k), v)

    walk("", parts)
    return out


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor in `tensors` is finite (one host read)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard:
    """Checks the accumulated loss terms (and, before writes, the weights) of a run; raises `Diverged`."""

    def __init__(self, run):
        self.good_through = run.start_iteration - 1  # the last iteration known finite
        self._checked: tuple[int | None, bool] = (None, False)  # (iteration, weights too) of the last check

    def check(self, run, weights: bool = False) -> None:
        """Raise Diverged if a loss term summed since the last log row (or, with `weights`, a tensor of the run
        state) is NaN/Inf. At most one read per iteration; call it on every rank at the same points."""
        i = getattr(run, "iteration", run.start_iteration - 1)  # the iteration in progress or just completed
        if self._checked[0] == i and (self._checked[1] or not weights):
            return
        names = list(run._sums)
        parts = []
        if names:
            sums = torch.stack([run._sums[k].float() for k in names])
            parts.append(torch.isnan(sums).long() * 2 + torch.isinf(sums).long())  # 2 NaN, 1 Inf, 0 finite
        tensors = state_tensors(run) if weights else []
        if tensors:
            parts.append(torch.stack([(~torch.isfinite(t)).any().to(run.device) for _, t in tensors]).long())
        codes = dist.all_reduce_max(torch.cat(parts)).tolist() if parts else []
        if not any(codes):
            self.good_through, self._checked = i, (i, weights)
            return
        terms = [f"{k}={'nan' if c == 2 else 'inf'}" for k, c in zip(names, codes) if c]
        bad = [n for (n, _), c in zip(tensors, codes[len(names):]) if c]
        what = []
        if terms:
            what.append("non-finite loss terms " + ", ".join(terms))
        if bad:
            what.append(f"non-finite weights ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}; "
                        f"{len(bad)} tensors)")
        run.stop.end(run)
        raise Diverged(self._message(run, " and ".join(what), self.good_through + 1, i))

    @staticmethod
    def _message(run, what: str, first: int, last: int) -> str:
        window = f"iteration {last}" if first >= last else f"iterations {first}..{last}"
        def iterations(n: int) -> str:
            return f"{n} iteration{'' if n == 1 else 's'}"

        if run.latest_saved is not None:
            kept = f"latest.pth holds the state after {iterations(run.latest_saved)}"
        elif run.start_iteration > 0:
            kept = f"latest.pth is still the state this run resumed from ({iterations(run.start_iteration)})"
        else:
            kept = "no latest.pth was written yet (the command below starts afresh)"
        lr = run.cfg["training"]["learning_rate"]
        lower = resume_command(run, ("--recover", "--set", f"training.learning_rate={lr / 2:g}"),
                               replace=("training.learning_rate",))
        lines = [f"training diverged: {what} in {window} (counted from 0, as in train_log.jsonl).",
                 f"Nothing from after the last finite state was written: {kept}; best_model.pth and the periodic "
                 f"checkpoints are those written before.",
                 f"{'Continue from the last good state' if run.latest_saved or run.start_iteration else 'Start again'}"
                 f" with a lower learning rate (here half of {lr:g}):",
                 f"  {lower}"]
        if run.precision != "fp32":
            lines.append(f"The run computes in {run.precision}: activations can overflow there; full precision may "
                         f"help: add --set precision=fp32 to that command.")
        return "\n".join(lines)


def recovery_changes(stored: dict, cfg: dict) -> list[str]:
    """The `RECOVERY_KEYS` lines of the difference between a checkpoint's config and the run's ('key: a -> b')."""
    return [line for line in config_diff(stored, cfg) if line.split(":")[0] in RECOVERY_KEYS]
