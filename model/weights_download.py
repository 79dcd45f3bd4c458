"""The released pretrained weights on first use: downloaded into torch hub's checkpoint folder (SPEC 3).

`backbone.pretrained: "default"` names a file by URL (model/pretrained.py, `default_weights`). When it is not yet
in `<torch hub dir>/checkpoints/`, `fetch_weights` downloads it with `torch.hub.load_state_dict_from_url`: a
progress bar on stderr, and a SHA-256 check when the file name carries a hash prefix (`name-<sha256 prefix>.pth`,
torch hub's convention, which both the COCO file and torchvision's ResNets follow). torch hub writes to a temporary
`.partial` file and moves it into place only when complete; on any failure this module also removes a file that
arrived but cannot be loaded, so the cache never holds a broken copy. Failures stop with one message naming the
URL, the path to save the file to by hand, and the `backbone.pretrained` alternatives.
"""
from __future__ import annotations

import os
import re

import torch

from torch import distributed as torch_dist

from utils.errors import UserError

HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # resnet18-f37072fd.pth -> f37072fd (torch hub's HASH_REGEX, 8+ digits)


def hash_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix a file name carries ('resnet18-f37072fd.pth' -> 'f37072fd'), or None."""
    match = HASH_IN_NAME.search(file_name)
    return match.group(1) if match else None


def cache_status(path: str, url: str) -> str:
    """One line for --dry-run: whether the default weights are cached or will be downloaded (nothing is fetched)."""
    if os.path.isfile(path):
        return f"{path} (cached; not loaded in a dry run)"
    return f"{path} not cached yet: training will download {url} there first (nothing downloaded in a dry run)"


def failure_message(url: str, path: str, reason: str) -> str:
    return (f"could not download the pretrained weights of backbone.pretrained \"default\" ({reason}).\n"
            f"  URL:        {url}\n"
            f"  save it as: {path}\n"
            f"Download the file on a machine with internet access and copy it to that path, or set "
            f"backbone.pretrained in the config to a local weights file, or to \"none\" for random initialisation.")


def download(url: str, path: str, progress: bool = True) -> object:
    """Download `url` to `path` (torch.hub.load_state_dict_from_url, weights only) and return what it holds.

    Raises UserError (see `failure_message`) on any failure, after removing whatever this call left at `path`.
    """
    folder, name = os.path.split(path)
    existed = os.path.exists(path)
    check = hash_prefix(name) is not None
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=folder, map_location="cpu", progress=progress,
                                                  check_hash=check, file_name=name, weights_only=True)
    except BaseException as e:  # an interrupted download (Ctrl-C) is cleaned up too
        if not existed and os.path.exists(path):  # arrived complete but unreadable (an error page, a truncation)
            os.remove(path)
        if not isinstance(e, Exception):
            raise
        reason = f"{type(e).__name__}: {e}"
        if check and "invalid hash value" in str(e):
            reason += f"; the file's SHA-256 must start with {hash_prefix(name)}, as its name says"
        raise UserError(failure_message(url, path, reason)) from None


def _process_group() -> tuple[int, bool]:
    """(rank, whether several processes run) from torch.distributed's own state: under torchrun the engine has
    started the process group before any model is built."""
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        return torch_dist.get_rank(), True
    return 0, False


def fetch_weights(url: str, path: str) -> object | None:
    """Make sure the default weights are at `path`: None when they already were (read them from `path`), else
    the downloaded object. Under torchrun rank 0 downloads while the other processes wait; a process that still
    does not see the file afterwards (another machine's file system) downloads its own copy."""
    rank, several = _process_group()
    missing = [not os.path.isfile(path)]
    if several:
        torch_dist.broadcast_object_list(missing, src=0)  # rank 0's answer on every rank
    if not missing[0]:  # rank 0 has the file: no collective follows
        return None if os.path.isfile(path) else download(url, path, progress=False)
    obj = download(url, path) if rank == 0 else None
    if several:
        torch_dist.barrier()
    if rank != 0 and not os.path.isfile(path):
        return download(url, path, progress=False)
    return obj
