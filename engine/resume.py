"""Which config a run uses, which directory it writes and which checkpoint it continues: --config, --resume
PATH|auto, --recover, --restart, and an earlier run found in the run directory (engine/run_dir.py)."""
from __future__ import annotations

import argparse
import os
import shlex

from engine import distributed as dist
from engine import run_dir as rundir
from engine.checkpoint import load_checkpoint
from engine.config import config_diff, load_config, resolve_config
from engine.fault_guard import RECOVERY_KEYS, recovery_changes
from engine.run_state import FORMAT as RUN_STATE_FORMAT
from utils.errors import UserError
from utils.variants import Variant

# Keys that may differ between a run and its resumption (they change no result).
RESUME_FREE_KEYS = ("training.num_workers", "utils.log_every", "utils.tensorboard", "utils.log_images",
                    "utils.save_latest_every", "utils.checkpoint_dir", "utils.run_name", "training.data.root",
                    "training.data.gta5_root")


def load_config_and_checkpoint(a: argparse.Namespace, variant: Variant, argv: list[str]
                               ) -> tuple[dict, str, dict | None, tuple]:
    """The run's config (from --config, else the one stored in the --resume checkpoint) with --set applied and its
    run directory resolved (utils.run_name filled in), where it came from, the checkpoint to resume from (None for
    a new run), and what the run directory held when this was decided (for `claim`). The run directory is checked
    writable and not held by another run.

    A run state (latest.pth) continues its run in its own directory, wherever the config points; a config that
    differs from the checkpoint's in a key that changes results is refused (RESUME_FREE_KEYS may differ, and with
    --recover the RECOVERY_KEYS), and so is a run state of another training script. Without --resume, a directory
    holding an earlier run is resumed when that run is this one (the same script and config, interrupted), and
    refused otherwise; --restart moves the earlier run's files aside and starts afresh."""
    ckpt = None
    if a.resume and a.resume != "auto":
        if os.path.isdir(a.resume):
            raise UserError(f"--resume {a.resume} is a folder; give its run state "
                            f"({os.path.join(a.resume, 'latest.pth')}) or a checkpoint file, or --resume auto with the "
                            f"run's --config.")
        ckpt = load_checkpoint(a.resume, map_location="cpu")
    if a.restart and (a.resume == "auto" or ckpt is not None and ckpt.get("format") == RUN_STATE_FORMAT):
        raise UserError("--restart starts a new run in the run directory; it does not go with --resume auto or a "
                        "run state (latest.pth), which continue a run.")
    if a.config:
        cfg = load_config(a.config, a.overrides)
        cfg_source = a.config
    elif ckpt is not None and isinstance(ckpt.get("config"), dict):
        cfg = resolve_config(ckpt["config"], f"{a.resume} (stored config)", a.overrides, stored=True)
        cfg_source = a.resume
    else:
        raise UserError("--config is required (or --resume with a checkpoint that stores its config).")
    u = cfg["utils"]
    if u["run_name"] is None:  # the config file's name: one directory per config (engine/run_dir.py)
        u["run_name"] = os.path.splitext(os.path.basename(a.config))[0] if a.config else ""
    if ckpt is not None and ckpt.get("format") == RUN_STATE_FORMAT:
        # A run state continues its run in its own directory (best_model.pth, logs), wherever the config points.
        run_dir = os.path.dirname(a.resume) or "."
        configured = rundir.run_directory(cfg, None)
        if os.path.abspath(configured) != os.path.abspath(run_dir) and dist.is_main():
            key = "utils.checkpoint_dir" + ("/run_name" if u["run_name"] else "")
            print(f"--resume {a.resume}: continuing the run in its directory {run_dir} ({key} {configured} is "
                  f"not used)", flush=True)
        u["checkpoint_dir"], u["run_name"] = run_dir, ""
    run_dir = rundir.run_directory(cfg, None)
    seen = _on_main(lambda: _look(run_dir, a))
    if a.resume == "auto":
        path = os.path.join(run_dir, "latest.pth")
        # rank 0 decides; a rank that cannot see the file then fails loudly instead of starting afresh
        ckpt = load_checkpoint(path, map_location="cpu") if dist.broadcast_object(os.path.isfile(path)) else None
        if ckpt is None and dist.is_main():
            print(f"--resume auto: no {path} yet, starting a new run", flush=True)
        elif ckpt is not None:
            a.resume = path  # messages name the file
    if not a.restart and (ckpt is None or ckpt.get("format") != RUN_STATE_FORMAT):  # a new run: what is there?
        weights = a.resume if ckpt is not None else None
        found = _on_main(lambda: _earlier_run(cfg, run_dir, a, variant, argv, weights))
        if found:
            ckpt, a.resume = load_checkpoint(found, map_location="cpu"), found
    if ckpt is not None and ckpt.get("format") == RUN_STATE_FORMAT:
        script = ckpt.get("script")  # absent in run states written before it was recorded: not checked
        if script is not None and script != variant.name:
            raise UserError(f"cannot resume {a.resume} with {variant.name}.py: it is the run state of {script}.py "
                            f"(another method, and its iterations count {script}.py's steps). Continue it with:\n  "
                            f"python3 {shlex.join([script + '.py', *argv])}")
        best = os.path.join(run_dir, "best_model.pth")
        if ckpt.get("best_miou", -1.0) >= 0 and u["save_best_model"] and \
                not os.path.isfile(best) and dist.is_main():
            print(f"warning: {best} is missing, so the return to the best model (after N/5 iterations without "
                  f"improvement) cannot happen and the resumed run may differ from an uninterrupted one; copy "
                  f"best_model.pth next to {a.resume}.", flush=True)
    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        stored = resolve_config(ckpt["config"], f"{a.resume} (stored config)", stored=True)
        diff = config_diff(stored, cfg, ignore=RESUME_FREE_KEYS + (RECOVERY_KEYS if a.recover else ()))
        if diff:
            raise UserError(f"cannot resume {a.resume}: it belongs to a run with another config. Differing keys "
                            f"(checkpoint -> now):\n  " + "\n  ".join(diff) + f"\n({', '.join(RECOVERY_KEYS)} may "
                            f"differ with --recover, e.g. to continue after a divergence.)")
        if a.recover and dist.is_main():
            print(f"--recover: resuming {a.resume} with " + ("; ".join(recovery_changes(stored, cfg))
                                                               or "no changed key"), flush=True)
    return cfg, cfg_source, ckpt, seen


def claim(run_dir: str, a: argparse.Namespace, seen: tuple) -> None:
    """Before the run writes anything: rank 0 holds the run directory, checks that it is as it was when the run
    looked at it, and with --restart moves the earlier run's files aside (engine/run_dir.py)."""
    _on_main(lambda: rundir.claim(run_dir, a.restart, seen))


def _on_main(fn):
    """fn() on rank 0 (every rank in a single process); its result, or its UserError, on every rank."""
    result, error = None, None
    if dist.is_main():
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        e = UserError(error)
        e.main_only = True  # every rank raises it: rank 0 prints it
        raise e
    return result


def _look(run_dir: str, a: argparse.Namespace) -> tuple:
    """The run directory can be written and no other run holds it (it stops at once); returns what it holds."""
    rundir.check_writable(run_dir)
    rundir.check_not_held(run_dir)
    if a.dry_run and a.restart and rundir.run_files(run_dir):
        print(f"--restart: the run would move the files of the earlier run in {run_dir} into "
              f"{os.path.join(run_dir, 'replaced-<time>')}/", flush=True)
    return rundir.fingerprint(run_dir)


def _earlier_run(cfg: dict, run_dir: str, a: argparse.Namespace, variant: Variant, argv: list[str],
                 weights: str | None) -> str | None:
    """What a new run (no run state to continue; `weights`: the checkpoint it starts from) does with a directory
    holding an earlier run: None (nothing there), the path of its latest.pth (the same run, interrupted, and no
    weights given: it is resumed), or a UserError saying what is there and what to do."""
    files = rundir.run_files(run_dir)
    if not files:
        return None
    own = "give this run its own directory (--set utils.run_name=NAME)"
    restart = (f"start afresh there with --restart (it moves the earlier run's files into "
               f"{os.path.join(run_dir, 'replaced-<time>')}/)")
    latest = os.path.join(run_dir, "latest.pth")
    if weights is not None:
        shown = ", ".join(files[:6]) + (", ..." if len(files) > 6 else "")
        cont = " (--resume auto continues that run)" if "latest.pth" in files else ""
        raise UserError(f"{run_dir} holds files of an earlier run ({shown}){cont}; a run started from the weights of "
                        f"{weights} would write over them. To keep them, {own}; or {restart}.")
    if "latest.pth" not in files:
        shown = ", ".join(files[:6]) + (", ..." if len(files) > 6 else "")
        raise UserError(f"{run_dir} holds files of an earlier run ({shown}) but no latest.pth to continue from. "
                        f"To keep them, {own}; or {restart}.")
    state = load_checkpoint(latest, map_location="cpu")
    done, total = state.get("iteration"), cfg["training"]["num_iterations"] * variant.steps_per_iteration
    script = state.get("script") or variant.name
    if script != variant.name:
        raise UserError(f"{run_dir} holds a run of {script}.py (latest.pth after {done} iterations); this is "
                        f"{variant.name}.py. Continue that run with:\n  python3 {shlex.join([script + '.py', *argv])}\n"
                        f"or, to keep it, {own}; or {restart}.")
    if isinstance(state.get("config"), dict):
        stored = resolve_config(state["config"], f"{latest} (stored config)", stored=True)
        diff = config_diff(stored, cfg, ignore=RESUME_FREE_KEYS)
        if diff:
            raise UserError(f"{run_dir} holds a run of another config (latest.pth after {done} iterations). Differing "
                            f"keys (there -> now):\n  " + "\n  ".join(diff) + f"\nTo keep it, {own}; or {restart}.")
    if done is not None and done >= total and os.path.isfile(os.path.join(run_dir, "evaluation.json")):
        raise UserError(f"{run_dir} holds this run, finished (evaluation.json). To train it again, {restart}; to "
                        f"repeat its final evaluation and BatchNorm refresh, --resume auto.")
    verb = "a run would resume it" if a.dry_run else "resuming it"
    print(f"{run_dir} holds this run, interrupted (latest.pth after {done} of {total} iterations): {verb}, as "
          f"--resume auto does. To start afresh there instead: --restart.", flush=True)
    return latest
