"""Distributed helpers: one code path for a plain `python3` run and a `torchrun` run.

Without a launcher every function is the identity for one process. Under torchrun (env RANK/WORLD_SIZE set)
`init_distributed` starts the process group (NCCL on CUDA, gloo on CPU) and the collectives below make every
rank see the same memory bank, class-balancing counts and confusion matrix.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device) -> None:
    """Start the process group when launched by torchrun; no-op otherwise."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=int(os.environ.get("SSL_DIST_TIMEOUT_MIN", 30))))


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


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns t."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate rows [n_r, ...] of every rank in rank order (n_r may differ between ranks).

    Exchanges the row counts first (one small collective), pads to the largest, gathers, and trims. `others`
    are tensors with the same row count gathered alike (for example the labels of feature vectors).
    """
    tensors = (x, *others)
    if not is_distributed():
        return tensors
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts_host = [int(c) for c in torch.cat(counts).tolist()]  # one sync per call, independent of classes
    biggest = max(counts_host)
    out = []
    for t in tensors:
        padded = t.new_zeros((biggest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts_host)]))
    return tuple(out)


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(module: torch.nn.Module, bucket_numel: int = 2 ** 24) -> None:
    """Average the gradients of every trainable parameter over ranks (data-parallel SGD).

    Done after backward in flat buckets. A parameter without a gradient on this step (heads before the
    contrastive terms start) counts as zero, so every rank takes the same step. This replaces DDP's reducer,
    which cannot follow parameters used outside `forward` (projection heads, selectors) or two forward passes
    (labeled and unlabeled batches, each with its own BatchNorm statistics) before one backward.
    """
    if not is_distributed():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    n = world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= n
            offset = 0
            for g in bucket:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0
