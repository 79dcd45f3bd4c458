"""The value checks of a resolved config, done when it is loaded: every number a user can get wrong, NaN and
infinities, the ignore label against the classes of the dataset, the run directory's name.

Each failure is one UserError naming the file, the key, the value and the fix. `engine.config` calls
`check_values` after the types and choices are checked; `RANGES` is the table of numeric ranges.
"""
from __future__ import annotations

import json
import math
from typing import Any

from utils.errors import UserError

SEED_MAX = 2 ** 32 - 1  # NumPy's legacy seeds are 32-bit

# key: (lowest, lowest allowed itself, highest or None, highest allowed itself, the fix). None values (null keys
# whose default the training script chooses) are not checked.
RANGES: dict[str, tuple[float, bool, float | None, bool, str]] = {
    "training.learning_rate": (0, False, None, True, "a positive learning rate, e.g. 2e-4 (the paper configs)"),
    "training.momentum": (0, True, 1, False, "SGD momentum in [0, 1), e.g. 0.9 (the paper configs)"),
    "training.weight_decay": (0, True, None, True, "0 (none) or a positive weight decay, e.g. 5e-4"),
    "training.lr_schedule_power": (0, True, None, True, "0 (constant) or a positive poly power, e.g. 0.9"),
    "training.num_workers": (0, True, None, True, "0 (load in the training process) or a number of worker processes"),
    "seed": (0, True, SEED_MAX, True, "a 32-bit seed, e.g. 5555 (the Cityscapes configs) or 7 (VOC)"),
    "ignore_label": (0, True, 255, True, "a value in 0..255 (labels are 8-bit images), e.g. 250 or 255"),
    "method.ramp_up_iterations": (0, True, None, True, "0 or more iterations"),
    "method.memory_start_offset": (0, True, None, True, "0 or more iterations"),
    "method.memory_confidence": (0, True, 1, True, "a confidence in [0, 1], e.g. 0.95"),
    "method.contrastive_weight": (0, True, None, True, "0 or a positive weight, or null (the script's own)"),
    "method.entropy_weight": (0, True, None, True, "0 or a positive weight, e.g. 0.01"),
    "method.pseudo_label_power": (0, True, None, True, "0 or a positive power, e.g. 6"),
    "method.unlabeled_classmix_prob": (0, True, 1, True, "a probability in [0, 1], e.g. 0.75"),
    "method.labeled_classmix_prob": (0, True, 1, True, "a probability in [0, 1], or null (the script's own)"),
    "method.bn_refresh_iterations": (0, True, None, True, "0 (no refresh) or more passes"),
    "utils.log_images": (0, True, None, True, "0 (none) or a number of images"),
    "synthetic.num_train": (1, True, None, True, "at least 1 image"),
    "synthetic.num_val": (1, True, None, True, "at least 1 image: without validation images nothing is scored"),
    "synthetic.num_source": (1, True, None, True, "at least 1 image"),
    "backbone.synthetic_iterations": (1, True, None, True, "at least 1 iteration, e.g. 1000 (the default)"),
    "backbone.synthetic_seed": (0, True, SEED_MAX, True, "a 32-bit seed, e.g. 0 (the default)"),
}

# The smallest training crop: the strong augmentation's 23x23 Gaussian blur pads by 11 pixels (reflect), which needs
# at least 12 (measured: 12,12 trains with DeepLabv2 and v3+, 11 and less stop in the blur or in a BatchNorm).
MIN_CROP = 12


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bound(low: float, low_in: bool, high: float | None, high_in: bool) -> str:
    lower = f">= {_num(low)}" if low_in else f"> {_num(low)}"
    if high is None:
        return lower
    return f"in [{_num(low)}, {_num(high)}{']' if high_in else ')'}"


def _non_finite(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(key, value) of every NaN or infinite number in the config (JSON accepts NaN and Infinity)."""
    if isinstance(node, dict):
        return [bad for k, v in node.items() for bad in _non_finite(v, prefix + k + ".")]
    if isinstance(node, list):
        return [bad for k, v in enumerate(node) for bad in _non_finite(v, f"{prefix}{k}.")]
    if isinstance(node, float) and not math.isfinite(node):
        return [(prefix.rstrip("."), node)]
    return []


def num_classes_of(cfg: dict) -> int | None:
    """The number of classes of the config's dataset (None: a folder dataset that does not say; refused elsewhere)."""
    name = cfg["dataset"]
    if name == "cityscapes":
        from data.cityscapes_labels import NUM_CLASSES
        return NUM_CLASSES
    if name == "pascal_voc":
        from data.voc import NUM_CLASSES
        return NUM_CLASSES
    if name == "synthetic":
        from data.synthetic import NUM_CLASSES
        return NUM_CLASSES
    section = cfg["folder"]
    if section["num_classes"] is not None:
        return section["num_classes"]
    return len(section["class_names"]) if section["class_names"] else None


def check_values(cfg: dict, source: str) -> None:
    """Every range check of a resolved config; raises one UserError naming the key, the value and the fix."""
    for key, value in _non_finite(cfg):
        raise UserError(f"{source}: config key '{key}' is {json.dumps(value)}; give a finite number.")
    for key, (low, low_in, high, high_in, fix) in RANGES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        ok = (value >= low if low_in else value > low) and (
            high is None or (value <= high if high_in else value < high))
        if not ok:
            raise UserError(f"{source}: config key '{key}' is {json.dumps(value)}; it must be "
                            f"{_bound(low, low_in, high, high_in)}: {fix}.")
    n = num_classes_of(cfg)
    ignore = cfg["ignore_label"]
    if n is not None and 0 <= ignore < n:
        raise UserError(f"{source}: config key 'ignore_label' is {ignore}, one of the {n} class ids 0..{n - 1} of "
                        f"the {cfg['dataset']} dataset: that class would be left out of training but still scored. "
                        f"Use a value from {n} to 255 (the paper configs: 250 Cityscapes, 255 Pascal VOC).")
    from data.common import parse_size
    h, w = parse_size(cfg["training"]["data"]["input_size"], f"{source}: 'training.data.input_size'")
    if min(h, w) < MIN_CROP:
        raise UserError(f"{source}: config key 'training.data.input_size' is \"{h},{w}\"; training crops must be at "
                        f"least {MIN_CROP},{MIN_CROP} (the strong augmentation's 23x23 blur pads by 11 pixels): use "
                        f"e.g. \"{max(h, MIN_CROP)},{max(w, MIN_CROP)}\" (the paper configs: \"512,512\", "
                        f"\"321,321\").")
    u = cfg["utils"]
    if not u["checkpoint_dir"].strip():
        raise UserError(f"{source}: config key 'utils.checkpoint_dir' is empty; name the folder of the runs, e.g. "
                        f"\"../saved/DeepLab\".")
    name = u["run_name"]
    if name is not None and (name.startswith(("/", "~")) or ".." in name.replace("\\", "/").split("/")):
        raise UserError(f"{source}: config key 'utils.run_name' is {json.dumps(name)}; give a name (or a relative "
                        f"path without '..') inside utils.checkpoint_dir, \"\" for that folder itself, or null for "
                        f"the config file's name.")
