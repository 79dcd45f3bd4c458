"""Endless, exactly resumable batches of a training subset (labeled or unlabeled).

Epoch e visits the index list in the order of a torch permutation seeded by (seed, e); with several processes
(DDP) each rank takes every world_size-th entry of it. Every item is requested as the key
(index, item_seed), item_seed a function of (seed, epoch, position in the permutation), and the dataset draws its
random crop from that seed alone — so the batches do not depend on the number of workers, on which process loads
them, or on whether the run was interrupted. The position (epoch, batches consumed) is the whole state: a resumed
run re-creates the iterator at that epoch and skips the consumed batches in the sampler, without loading them.

`prefetch(n)` loads the next n batches ahead (the training run calls it between iterations), so that an unreadable
file surfaces between iterations, with the position still that of the last completed one. Loader worker processes run
in their own process group: a Ctrl-C in the terminal or torchrun's SIGTERM to a rank's group reaches the main
process alone, which finishes its iteration and saves (engine/graceful_stop.py) while its workers live on.
"""
from __future__ import annotations

import os
import signal
from collections import deque
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from utils.errors import UserError

_MIX = 1000003
_MASK = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s permutation (non-negative, < 2**63)."""
    return (seed * _MIX + epoch) & _MASK


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the item at `position` of epoch `epoch`'s permutation: drives that item's random crop."""
    return (epoch_seed(seed, epoch) * _MIX + position) & _MASK


def _own_process_group(worker_id: int) -> None:
    """worker_init_fn: leave the main process's group, so that signals sent to that group (a terminal's Ctrl-C,
    torchrun's SIGTERM) do not kill a worker while the main process finishes its iteration and saves — a dead
    worker would end it with an error. The handlers forked from the main process are reset: SIGINT ignored,
    SIGTERM by default (multiprocessing ends leftover workers with it at exit; a worker that ignored it would
    hang the exit). A worker whose main process has died exits on its own (torch's watchdog)."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker_user_error(e: UserError) -> UserError:
    """A UserError raised in a loader worker reaches the main process re-created with the worker's whole traceback
    as its message; this returns one with the original message alone (a data error names its file)."""
    text = str(e)
    marker = f"\n{UserError.__module__}.{UserError.__qualname__}: "
    if text.startswith("Caught UserError in DataLoader worker") and marker in text:
        return UserError(text.rpartition(marker)[2].rstrip("\n"))
    return e


class _EndlessBatchSampler:
    """Batch sampler for DataLoader: lists of (index, item_seed) keys, epoch after epoch, from `start`."""

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int, rank: int, world_size: int,
                 drop_last: bool):
        self.indices = [int(i) for i in indices]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        n = len(self.indices)
        # With drop_last every rank gets the same number of items (the permutation's tail is cut to a multiple).
        self.usable = n - n % world_size if drop_last else n
        shard = len(range(rank, self.usable, world_size))
        self.batches_per_epoch = shard // batch_size if drop_last else -(-shard // batch_size)
        self.start = (0, 0)  # (epoch, batches to skip) of the next iterator

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of epoch `epoch`."""
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(len(self.indices), generator=g).tolist()
        keys = [(self.indices[perm[pos]], item_seed(self.seed, epoch, pos))
                for pos in range(self.rank, self.usable, self.world_size)]
        bs = self.batch_size
        return [keys[k:k + bs] for k in range(0, self.batches_per_epoch * bs, bs)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.start
        while True:
            yield from self.epoch_batches(epoch)[skip:]
            epoch, skip = epoch + 1, 0


class InfiniteBatches:
    """Batches of `dataset` items drawn from `indices`, forever; `next()` returns the collated tuple on `device`.

    Uses a torch DataLoader (num_workers processes, persistent; pinned memory on CUDA) with its own generator, so
    creating iterators never consumes the global torch RNG. `drop_last` (default) never yields a short batch
    (the released loop skipped them). `state_dict()` = {"epoch", "consumed"}; `load_state_dict` continues with
    exactly the batches an uninterrupted run would have drawn next.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], batch_size: int, seed: int = 0,
                 device: torch.device | str = "cpu", num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, pin_memory: bool | None = None,
                 source: tuple[str, str] = ("images", "training.data.labeled_samples")):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.device = torch.device(device)
        self.sampler = _EndlessBatchSampler(indices, batch_size, seed, rank, world_size, drop_last)
        n = len(self.sampler.indices)
        if n and self.sampler.batches_per_epoch == 0:  # `source`: (what the images are, the setting that counts them)
            raise UserError(f"{n} {source[0]} cannot fill one batch of {batch_size}"
                            f"{f' on each of {world_size} processes' if world_size > 1 else ''}; use more images "
                            f"({source[1]}) or a smaller training.batch_size.")
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers, pin_memory=pin,
                                 persistent_workers=num_workers > 0, generator=torch.Generator(),
                                 worker_init_fn=_own_process_group if num_workers > 0 else None)
        self.epoch = 0
        self.consumed = 0
        self._iterator: Iterator | None = None
        self._ready: deque[tuple] = deque()  # batches loaded by prefetch(), not yet returned (not counted)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def next(self) -> tuple[Any, ...]:
        """The next batch, e.g. (images [B,3,h,w], labels [B,h,w], indices [B]), tensors on the device."""
        if self.batches_per_epoch == 0:
            raise UserError("no images to draw batches from (the index list is empty); check "
                            "training.data.labeled_samples against the size of the training set.")
        batch = self._ready.popleft() if self._ready else self._load()
        self.consumed += 1
        if self.consumed == self.batches_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0
        return tuple(t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)

    __next__ = next

    def prefetch(self, batches: int = 1) -> None:
        """Load the next `batches` batches now (kept for `next()`); a data error is raised here. The position is
        unchanged."""
        while len(self._ready) < batches and self.batches_per_epoch:
            self._ready.append(self._load())

    def _load(self) -> tuple:
        if self._iterator is None:
            self.sampler.start = (self.epoch, self.consumed)
            self._iterator = iter(self.loader)
        try:
            return next(self._iterator)
        except UserError as e:
            raise _worker_user_error(e) from None

    def close(self) -> None:
        """End the loader's worker processes now, cleanly. Persistent workers left to the end of the program are
        ended by multiprocessing's exit handler with SIGTERM, which torch then reports as a worker failure."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None
        self._ready.clear()

    def __iter__(self) -> "InfiniteBatches":
        return self

    def state_dict(self) -> dict[str, int]:
        """Position in the stream: the epoch and the batches of it already returned."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`: the next `next()` returns the batch after the last one counted in it."""
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if epoch < 0 or consumed < 0:
            raise ValueError(f"invalid sampler state {state}")
        if self.batches_per_epoch:
            epoch, consumed = epoch + consumed // self.batches_per_epoch, consumed % self.batches_per_epoch
        self.epoch, self.consumed = epoch, consumed
        self._ready.clear()
        self._iterator = None  # re-created lazily at the new position (persistent workers are reset, not respawned)
