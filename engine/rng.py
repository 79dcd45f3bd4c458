"""Random number generators: seeding, and their states in a form a `weights_only` checkpoint holds (exact resume);
deterministic kernels or cuDNN's benchmark."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; NumPy takes the seed modulo 2**32 (a rank's seed, the config seed plus a rank
    offset, may pass NumPy's 32-bit range; every seed below 2**32 is used as it is)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """utils.deterministic. false (default): the release's pair of cuDNN settings (its trainSSL.py sets both): cuDNN
    times its deterministic convolution algorithms for each new input shape and keeps the fastest (`cudnn.benchmark`
    and `cudnn.deterministic`; the choice may differ between runs, and so may the last bits). true: no benchmark,
    cuDNN's deterministic algorithms, and torch.use_deterministic_algorithms with
    warn_only — a kernel without a deterministic form (on CUDA, the backward of the bilinear upsampling every
    iteration runs) warns once and runs anyway instead of stopping the run; cuBLAS gets the workspace setting
    determinism needs (CUBLAS_WORKSPACE_CONFIG, unless already set). The same run then repeats bit for bit on the
    same machine and software, up to those warned kernels."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = True  # as the release, whichever the setting
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
