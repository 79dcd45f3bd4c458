"""Which config a run uses and which checkpoint it continues: --config, --resume PATH|auto, --recover."""
from __future__ import annotations

import argparse
import os

from engine import distributed as dist
from engine.checkpoint import load_checkpoint
from engine.config import config_diff, load_config, resolve_config
from engine.fault_guard import RECOVERY_KEYS, recovery_changes
from engine.run_state import FORMAT as RUN_STATE_FORMAT
from utils.errors import UserError

# Keys that may differ between a run and its resumption (they change no result).
RESUME_FREE_KEYS = ("training.num_workers", "utils.log_every", "utils.tensorboard", "utils.log_images",
                    "utils.save_latest_every", "utils.checkpoint_dir", "training.data.root",
                    "training.data.gta5_root", "utils.eval_batch_size")


def load_config_and_checkpoint(a: argparse.Namespace) -> tuple[dict, str, dict | None]:
    """The run's config (from --config, else the one stored in the --resume checkpoint) with --set applied, where
    it came from, and the checkpoint to resume from (None for a new run).

    A run state (latest.pth) continues its run in its own directory, wherever the config points; a config that
    differs from the checkpoint's in a key that changes results is refused (RESUME_FREE_KEYS may differ, and with
    --recover the RECOVERY_KEYS)."""
    ckpt = None
    if a.resume and a.resume != "auto":
        ckpt = load_checkpoint(a.resume, map_location="cpu")
    if a.config:
        cfg = load_config(a.config, a.overrides)
        cfg_source = a.config
    elif ckpt is not None and isinstance(ckpt.get("config"), dict):
        cfg = resolve_config(ckpt["config"], f"{a.resume} (stored config)", a.overrides)
        cfg_source = a.resume
    else:
        raise UserError("--config is required (or --resume with a checkpoint that stores its config).")
    if a.resume == "auto":
        path = os.path.join(cfg["utils"]["checkpoint_dir"], "latest.pth")
        # rank 0 decides; a rank that cannot see the file then fails loudly instead of starting afresh
        ckpt = load_checkpoint(path, map_location="cpu") if dist.broadcast_object(os.path.isfile(path)) else None
        if ckpt is None and dist.is_main():
            print(f"--resume auto: no {path} yet, starting a new run", flush=True)
        elif ckpt is not None:
            a.resume = path  # messages name the file
    if ckpt is not None and ckpt.get("format") == RUN_STATE_FORMAT:
        # A run state continues its run in its own directory (best_model.pth, logs), wherever the config points.
        run_dir = os.path.dirname(a.resume) or "."
        configured = cfg["utils"]["checkpoint_dir"]
        if os.path.abspath(configured) != os.path.abspath(run_dir) and dist.is_main():
            print(f"--resume {a.resume}: continuing the run in its directory {run_dir} (utils.checkpoint_dir "
                  f"{configured} is not used)", flush=True)
        cfg["utils"]["checkpoint_dir"] = run_dir
        best = os.path.join(run_dir, "best_model.pth")
        if ckpt.get("best_miou", -1.0) >= 0 and cfg["utils"]["save_best_model"] and \
                not os.path.isfile(best) and dist.is_main():
            print(f"warning: {best} is missing, so the return to the best model (after N/5 iterations without "
                  f"improvement) cannot happen and the resumed run may differ from an uninterrupted one; copy "
                  f"best_model.pth next to {a.resume}.", flush=True)
    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        stored = resolve_config(ckpt["config"], f"{a.resume} (stored config)")
        diff = config_diff(stored, cfg, ignore=RESUME_FREE_KEYS + (RECOVERY_KEYS if a.recover else ()))
        if diff:
            raise UserError(f"cannot resume {a.resume}: it belongs to a run with another config. Differing keys "
                            f"(checkpoint -> now):\n  " + "\n  ".join(diff) + f"\n({', '.join(RECOVERY_KEYS)} may "
                            f"differ with --recover, e.g. to continue after a divergence.)")
        if a.recover and dist.is_main():
            print(f"--recover: resuming {a.resume} with " + ("; ".join(recovery_changes(stored, cfg))
                                                               or "no changed key"), flush=True)
    return cfg, cfg_source, ckpt
