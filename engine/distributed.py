"""Distributed helpers: one code path for a plain `python3` run and a `torchrun` run.

Without a launcher every function is the identity for one process. Under torchrun (env RANK/WORLD_SIZE set,
WORLD_SIZE > 1) `init_distributed` starts the process group (NCCL on CUDA, gloo on CPU) and the collectives below
keep every rank's run state identical:
- gradients: averaged by DistributedDataParallel during the backward pass (engine/ddp_step.py), so every rank takes
  the same SGD step;
- BatchNorm running statistics of student and teacher: averaged where they are read (before an evaluation or a
  checkpoint), and their step counters (num_batches_tracked) set to the largest over ranks (`average_buffers`);
- memory bank: the vectors selected on every rank are gathered (`all_gather_rows`) before the update;
- class-balancing counts, evaluation confusion matrix and loss sums: summed (`all_reduce_sum`);
- start and the return to the best model: rank 0's weights broadcast (`broadcast_parameters`).
Every collective is called by all ranks in the same order; the conditions that guard them depend only on the
iteration number and on values that are already identical on all ranks.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import UserError

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device) -> None:
    """Start the process group when launched by torchrun (NCCL for CUDA devices, gloo otherwise); no-op
    otherwise. The collective timeout is SSL_DIST_TIMEOUT_MIN minutes (default 30)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    timeout = timedelta(minutes=float(os.environ.get("SSL_DIST_TIMEOUT_MIN", 30)))
    if device.type == "cuda":
        # device_id binds the NCCL communicator to this rank's GPU (no guessing in barrier()).
        dist.init_process_group(backend="nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def rank_tag() -> str:
    """' (rank r)' under torchrun, '' otherwise: for messages that one rank prints about itself."""
    return f" (rank {rank()})" if is_distributed() else ""


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns t."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place; returns t."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_rows(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate rows [n_r, ...] of every rank in rank order (n_r may differ between ranks, 0 included).

    Exchanges the row counts first (one small collective), pads to the largest, gathers, and trims. `others`
    are tensors with the same row count gathered alike (for example the labels of feature vectors). Every rank
    gets the same rows in the same order.
    """
    tensors = (x, *others)
    if not is_distributed():
        return tensors
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts_host = [int(c) for c in torch.cat(counts).tolist()]  # one sync per call, independent of classes
    biggest = max(counts_host)
    if biggest == 0:  # nothing anywhere (the same decision on every rank)
        return tensors
    out = []
    for t in tensors:
        padded = t.new_zeros((biggest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts_host)]))
    return tuple(out)


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] for one process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's Python object on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup() -> None:
    """End the process group after a successful run: a barrier first, so that no rank tears it down while another
    still has a collective or a write in flight (a rank leaving early made NCCL abort the job at teardown)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_parameters(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical start, the return to the best model)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def _all_reduce_flat(tensors: list[torch.Tensor], bucket_numel: int, finish: Callable[[torch.Tensor], None],
                     op: Any = None) -> None:
    """Reduce `tensors` over ranks in place (sum, or `op`), in flat buckets of at most ~bucket_numel elements per
    dtype and device; `finish(flat)` runs on each reduced bucket before it is copied back (e.g. the division by
    world size)."""
    op = dist.ReduceOp.SUM if op is None else op
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        start = 0
        while start < len(group):
            bucket, size = [], 0
            while start < len(group) and (not bucket or size + group[start].numel() <= bucket_numel):
                bucket.append(group[start])
                size += group[start].numel()
                start += 1
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=op)
            finish(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def average_buffers(*modules: nn.Module, bucket_numel: int = 2 ** 24) -> None:
    """Make the buffers of `modules` identical on all ranks, in place: floating-point ones (BatchNorm running
    mean/var) averaged, integer ones (BatchNorm's num_batches_tracked) set to their largest value over ranks.

    Each rank's forwards update the running statistics from its own batches; their mean equals running statistics
    updated with the rank-averaged batch statistics (the update is linear), so all ranks evaluate, refresh and
    save the same model. The step counters can differ: the heads and the per-class selectors run on a rank's own
    selected pixels and are skipped on a rank with fewer than two of a class, so their BatchNorm counts a step on
    one rank and not on another. The largest count is that of the rank on which the layer ran most often since
    the counters last agreed. With momentum set, as everywhere here, the counter changes no value; it is part of
    every checkpoint, which must not depend on the rank that writes it.
    """
    if not is_distributed():
        return
    buffers = [b for m in modules for b in m.buffers()]
    floats = [b for b in buffers if b.is_floating_point()]
    counters = [b for b in buffers if not b.is_floating_point()]
    n_ranks = world_size()
    with torch.no_grad():
        if floats:
            _all_reduce_flat(floats, bucket_numel, lambda flat: flat.div_(n_ranks))
        if counters:
            _all_reduce_flat(counters, bucket_numel, lambda flat: None, op=dist.ReduceOp.MAX)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`training.sync_batchnorm`: the network's BatchNorm2d layers become SyncBatchNorm (batch statistics over
    all ranks), in place; returns `model`.

    Only BatchNorm2d (backbone and decoder): the BatchNorm1d of the projection/prediction heads and of the
    per-class selectors stay per rank, because those run on a rank's own selected pixels (a rank may skip them
    when it has fewer than two) and the selectors are evaluated from their stacked parameters, not their forward.
    SyncBatchNorm has CUDA kernels only.
    """
    if device.type != "cuda":
        raise UserError(f"training.sync_batchnorm needs CUDA devices (SyncBatchNorm has no {device.type} kernels); "
                        f"set training.sync_batchnorm=false for this run.")
    parents = [m for m in model.modules() if any(isinstance(c, nn.BatchNorm2d) for c in m.children())]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return model


def run_recording_errors(fn: Callable[[], T]) -> T:
    """Call `fn()`; under torchrun an exception (other than a UserError, which prints one line) is also written
    to torchrun's error file, so the launcher's failure summary names the rank and shows its traceback.

    torchrun then stops the other ranks: a failing rank ends the whole job with a non-zero exit code instead of
    leaving the others waiting in a collective.
    """
    if not launched_by_torchrun():
        return fn()
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler
    handler = get_error_handler()
    handler.initialize()
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:
        handler.record_exception(e)
        raise
