"""latest.pth: the whole state of a run (networks, optimiser, memory bank, class balancing, samplers, RNGs, the open
log window), captured and restored so that a resumed run continues bit-identically."""
from __future__ import annotations

from engine import distributed as dist
from engine.checkpoint import model_state_from
from engine.rng import rng_state, set_rng_state
from model.checkpoint_io import load_state_strict
from utils.errors import UserError

FORMAT = "ssl-run-state-1"


def capture(run, iteration: int) -> dict:
    """The whole run state after `iteration` iterations: enough to continue bit-identically."""
    return {
        "model": run.student_module.state_dict(), "teacher": run.teacher.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "memory": run.memory.state_dict(),
        "balancing": run.balancing.state_dict() if run.balancing is not None else None,
        "class_weights": run.class_weights, "iteration": iteration, "best_miou": run.best_miou,
        "since_best": run.since_best, "config": run.cfg, "rng": rng_state(),
        # every process's RNG state (augmentation draws differ per process), for an exact resume
        "rng_ranks": dist.all_gather_object(rng_state()) if dist.is_distributed() else None,
        "world_size": dist.world_size(),
        "best_result": None if run.best_result is None else
        {k: run.best_result[k] for k in ("iou", "miou", "loss")},
        "samplers": {"labeled": run.labeled.state_dict(), "unlabeled": run.unlabeled.state_dict(),
                     "gta5": run.gta5_batches.state_dict() if run.gta5_batches is not None else None},
        # the loss sums of the current log interval, so that a resumed run logs the same averages
        "log_window": {"sums": dict(run._sums), "count": run._count, "counts": dict(run._counts)},
        "pending_evaluation": run.pending_evaluation,
        "script": run.variant.name,  # the training script that wrote it: another one refuses to continue it
        "format": FORMAT,
    }


def restore(run, ckpt: dict) -> None:
    """Load a run state into `run`; a model checkpoint (best, periodic, final, the original release's) gives
    weights and optimiser only, and the rest of the run starts afresh at its iteration."""
    source = run.args.resume
    load_state_strict(run.student_module, model_state_from(ckpt, source), source)
    if ckpt.get("format") != FORMAT:
        # A checkpoint of the original release or a best/periodic one: weights (and optimiser) only.
        if "optimizer" in ckpt:
            run.optimizer.load_state_dict(ckpt["optimizer"])
        run._new_teacher()
        run.start_iteration = int(ckpt.get("iteration", 0))
        if run.start_iteration > run.num_iterations:
            raise UserError(f"{source} holds weights of iteration {run.start_iteration}, past this run's "
                            f"{run.num_iterations} iterations: there is nothing left to train. Raise "
                            f"training.num_iterations, or start from its weights at iteration 0 with a checkpoint "
                            f"whose 'iteration' is removed.")
        if dist.is_main():
            print(f"resuming from {source}: weights and optimiser only (not a latest.pth run state); memory "
                  f"bank, class balancing and data order start afresh at iteration {run.start_iteration}",
                  flush=True)
        return
    load_state_strict(run.teacher, ckpt["teacher"], source + " (teacher)")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when saved in fp32 (a --recover resume may switch precision)
        run.scaler.load_state_dict(ckpt["scaler"])
    run.memory.load_state_dict(ckpt["memory"])
    if run.balancing is not None and ckpt["balancing"] is not None:
        run.balancing.load_state_dict(ckpt["balancing"])
    run.class_weights = ckpt["class_weights"].to(run.device)
    run.start_iteration = ckpt["iteration"]
    run.best_miou = ckpt["best_miou"]
    run.since_best = ckpt["since_best"]
    run.best_result = ckpt["best_result"]
    run.labeled.load_state_dict(ckpt["samplers"]["labeled"])
    run.unlabeled.load_state_dict(ckpt["samplers"]["unlabeled"])
    if run.gta5_batches is not None and ckpt["samplers"]["gta5"] is not None:
        run.gta5_batches.load_state_dict(ckpt["samplers"]["gta5"])
    window = ckpt.get("log_window") or {"sums": {}, "count": 0}
    run._sums = {k: v.to(run.device) for k, v in window["sums"].items()}
    run._count = int(window["count"])
    # a state written before the per-term counts: every term was averaged over the whole window then
    run._counts = {k: int(n) for k, n in (window.get("counts") or dict.fromkeys(window["sums"], run._count)).items()}
    run.pending_evaluation = ckpt.get("pending_evaluation")
    states = ckpt.get("rng_ranks") or [ckpt["rng"]]  # one per process of the run that saved it
    saved_world = int(ckpt.get("world_size", len(states)))
    if saved_world != dist.world_size() and dist.is_main():
        print(f"resuming a run of {saved_world} process(es) with {dist.world_size()}: weights, optimiser, memory "
              f"bank and class balancing continue; data order and random draws are not those of the original "
              f"run", flush=True)
    if dist.rank() < len(states):
        set_rng_state(states[dist.rank()])
