"""Support of the `cuda`-marked tests (tests/test_cuda_*.py): the device under test, identical random draws on
two devices, and a host-synchronisation guard.

The cuda tests run on a CUDA device and are skipped without one. `benchmarks/gpu_check.py --dry-run` sets
SSL_CUDA_TESTS_ON_CPU=1 so that they also run on a machine without a GPU, with the CPU standing in for the
device (CPU is then compared with CPU, and the sync guard is a proxy, see `no_host_sync`): their code cannot rot
before the first GPU is lent.
"""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

ON_CPU_ENV = "SSL_CUDA_TESTS_ON_CPU"


def device_under_test() -> torch.device | None:
    """cuda when a CUDA device is present; cpu when SSL_CUDA_TESTS_ON_CPU=1 (dry run); else None (skip)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(ON_CPU_ENV) == "1":
        return torch.device("cpu")
    return None


DEVICE = device_under_test()
# marks for a cuda test module: pytestmark = CUDA_MARKS
CUDA_MARKS = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason=f"needs CUDA (or {ON_CPU_ENV}=1: the CPU stands in)")]


# ------------------------------------------------------------------------------------- identical random draws
_RANDOM_FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal}
_RANDOM_LIKE = {torch.rand_like, torch.randn_like, torch.randint_like}


class _CpuRandom(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _RANDOM_FACTORIES and kwargs.get("generator") is None:
            device = kwargs.pop("device", None)
            out = func(*args, **kwargs)
            return out if device is None else out.to(device)
        if func in _RANDOM_LIKE:
            like = args[0]
            return func(like.cpu(), *args[1:], **kwargs).to(like.device)
        return func(*args, **kwargs)


@contextmanager
def random_draws_on_cpu():
    """Inside the block, torch.rand/randn/randint/randperm/normal (global generator) and the *_like variants draw
    on the CPU and move the result to the requested device: code that draws on its input's device (ClassMix's
    random class keys) sees the same numbers on CUDA as on the CPU after the same torch.manual_seed."""
    with _CpuRandom():
        yield


# ------------------------------------------------------------------------------------------- host sync guard
class HostSyncError(AssertionError):
    """An operation that waits for the device (CPU proxy of torch.cuda.set_sync_debug_mode("error"))."""


def _method(name: str):
    return getattr(torch.Tensor, name)


# Python-level operations whose result depends on tensor values, so that on CUDA they wait for the device.
_SYNC_FUNCS = {
    _method("item"), _method("__bool__"), _method("__int__"), _method("__float__"), _method("__index__"),
    _method("nonzero"), torch.nonzero, _method("argwhere"), torch.argwhere, _method("masked_select"),
    torch.masked_select, _method("unique"), torch.unique, torch.unique_consecutive, _method("bincount"),
    torch.bincount, torch.equal, _method("equal"), torch.allclose, _method("allclose"), torch.is_nonzero,
}
_CREATE_FROM_HOST = {torch.tensor, torch.as_tensor}


def _has_bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_bool_index(i) for i in index)
    return False


def _proxy_violation(func, args, kwargs) -> str | None:
    """Why `func` would synchronise with the host on CUDA, or None. Catches value-dependent operations
    (item/bool/int/float of a tensor, nonzero, boolean-mask indexing, unique, bincount, masked_select,
    single-argument where, repeat_interleave without output_size, equal/allclose) and tensors built from host
    data with an explicit device (a blocking host-to-device copy when that device is CUDA). Blocking copies to
    the host (.cpu(), .tolist()) cannot be told apart from host-side work on a CPU-only machine: only the real
    guard on CUDA sees them."""
    if func in _SYNC_FUNCS:
        return "reads a value computed on the device"
    if func in (_method("__getitem__"), _method("__setitem__")) and len(args) > 1 and _has_bool_index(args[1]):
        return "boolean-mask indexing (nonzero: the result size depends on the values)"
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "single-argument where (nonzero)"
    if func in (torch.repeat_interleave, _method("repeat_interleave")) and "output_size" not in kwargs:
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0])
        if isinstance(repeats, torch.Tensor):
            return "repeat_interleave with tensor repeats and no output_size"
    if func in _CREATE_FROM_HOST and kwargs.get("device") is not None and args and \
            not isinstance(args[0], torch.Tensor):
        return "a tensor built from host data directly on the device (blocking host-to-device copy)"
    if func is _method("new_tensor") and len(args) > 1 and not isinstance(args[1], torch.Tensor):
        return "new_tensor from host data (blocking host-to-device copy)"
    return None


def _caller() -> str:
    """'file:line' of the innermost frame outside torch and this module (the line that made the call)."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != here and f"{os.sep}torch{os.sep}" not in path:
            return f"{os.path.relpath(path)}:{frame.lineno}"
    return "?"


class _SyncProxy(TorchFunctionMode):
    """CPU stand-in for set_sync_debug_mode("error"): raises HostSyncError on the operations of _proxy_violation."""

    def __init__(self):
        super().__init__()
        self.allowing = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.allowing:
            why = _proxy_violation(func, args, kwargs)
            if why is not None:
                name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
                raise HostSyncError(f"{name} at {_caller()}: {why}; on CUDA this synchronises with the host")
        return func(*args, **kwargs)


class SyncGuard:
    """State of an active `no_host_sync` block; `allowing()` suspends it."""

    def __init__(self, device: torch.device, proxy: _SyncProxy | None):
        self.device, self.proxy = device, proxy

    @contextmanager
    def allowing(self):
        """Let one operation synchronise (the documented sync points)."""
        if self.proxy is not None:
            self.proxy.allowing += 1
            try:
                yield
            finally:
                self.proxy.allowing -= 1
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@contextmanager
def no_host_sync(device: torch.device):
    """Inside the block, an operation that makes the host wait for the device raises.

    CUDA: torch.cuda.set_sync_debug_mode("error") (RuntimeError "called a synchronizing CUDA operation": .item(),
    boolean indexing, nonzero, blocking copies in either direction, torch.cuda.synchronize). CPU (dry run): a
    TorchFunctionMode proxy that raises HostSyncError on the value-dependent operations (see _proxy_violation); the
    selectors then take their GPU method ("blocks"), since the CPU's own method reads class sizes on the host, which
    is free there. Yields a SyncGuard."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield SyncGuard(device, None)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    import utils.selectors as selectors
    cpu_choice = selectors.selector_method
    selectors.selector_method = lambda method, dev: cpu_choice("blocks" if method == "auto" else method, dev)
    proxy = _SyncProxy()
    try:
        with proxy:
            yield SyncGuard(device, proxy)
    finally:
        selectors.selector_method = cpu_choice


class _SelectionAllower(TorchFunctionMode):
    def __init__(self, guard: SyncGuard, record: list, site: str):
        super().__init__()
        self.guard, self.record, self.site = guard, record, site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _method("__getitem__") and len(args) > 1 and _has_bool_index(args[1]):
            self.record.append(self.site)
            with self.guard.allowing():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def allowing_boolean_selections(fn, guard_box: list, record: list, site: str):
    """`fn` with its boolean-mask selections x[mask] (and only those) let through the active guard
    (guard_box[0], a SyncGuard or None when no guard is active), each recorded in `record` as `site`."""
    def wrapped(*args, **kwargs):
        guard = guard_box[0]
        if guard is None:
            return fn(*args, **kwargs)
        with _SelectionAllower(guard, record, site):
            return fn(*args, **kwargs)
    return wrapped
