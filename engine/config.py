"""Configuration: the released JSON format, validated, with every default resolved.

Every config file of the original release loads unchanged. Keys it did not have are optional and default to the
released behaviour. An unknown key or a value of the wrong type stops with a message naming the key and the file.
`--set a.b.c=value` overrides one key (the value is parsed as JSON when it parses, else taken as a string).

`SCHEMA` below is the single list of keys: (types, default, help). `null` method constants take the training
script's own value from `utils/variants.py`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from data.common import parse_size
from engine.config_checks import check_values
from utils.errors import UserError
from utils.fidelity import FIDELITY_PRESETS, Fidelity

REQUIRED = object()  # marker: the key has no default

# Each leaf: (allowed types, default, help). Nested dicts are sections.
SCHEMA: dict[str, Any] = {
    "model": ((str,), "DeepLab", "network family; only \"DeepLab\""),
    "version": ((str,), "2",
                "\"2\" DeepLabv2 (ResNet-101), \"3\" DeepLabv3+ (ResNet-50; 101 in domain adaptation)"),
    "dataset": ((str,), REQUIRED,
                "\"cityscapes\", \"pascal_voc\" (alias \"pascal\"), \"synthetic\" or \"folder\""),
    "fidelity": ((str,), "code", "\"code\" reproduces the released code, \"paper\" the paper's text (docs/fidelity.md)"),
    "precision": ((str,), "fp32", "\"fp32\", \"bf16\" or \"fp16\" (autocast; losses and memory stay fp32)"),
    "backbone": {
        "depth": ((int, type(None)), None,
                  "ResNet depth 18/34/50/101; null: 101 for v2, 50 for v3 (101 in domain adaptation)"),
        "pretrained": ((str, type(None)), "default",
                       "\"default\" (COCO or ImageNet file by `training.pretraining`), \"synthetic\" (built on "
                       "first use: trained on synthetic style \"c\" scenes), \"none\", or a file path"),
        "width": ((int,), 64, "ResNet base width (stem and layer1; layer2..4: 2x, 4x, 8x); 64 is the standard one, "
                              "the only one \"default\" weights fit"),
        "synthetic_iterations": ((int,), 1000, "backbone.pretrained \"synthetic\": iterations of its supervised "
                                              "pretraining"),
        "synthetic_seed": ((int,), 0, "backbone.pretrained \"synthetic\": seed of its pretraining (not `seed`: "
                                      "every run starts from the same backbone)"),
    },
    "training": {
        "batch_size": ((int,), REQUIRED, "labeled batch B; the unlabeled batch is B/2, augmented twice"),
        "num_workers": ((int,), 3, "data-loading worker processes (training batches, and the images of every "
                                   "evaluation)"),
        "optimizer": ((str,), "SGD", "only \"SGD\""),
        "momentum": ((float,), 0.9, "SGD momentum"),
        "num_iterations": ((int,), REQUIRED, "N, training iterations (trainSSL_less_memory.py runs 2N alternating steps)"),
        "learning_rate": ((float,), REQUIRED, "base lr of the one SGD group holding every trainable parameter"),
        "lr_schedule": ((str, type(None)), "Poly", "\"Poly\" or null (constant)"),
        "lr_schedule_power": ((float,), 0.9, "poly power"),
        "pretraining": ((str,), "COCO", "\"COCO\" (BGR input) or \"imagenet\" (RGB input)"),
        "weight_decay": ((float,), 5e-4, "SGD weight decay"),
        "use_teacher_train": ((bool,), True, "pseudo-labels and memory features from the EMA teacher (else the student, eval mode)"),
        "save_teacher_test": ((bool,), False, "best checkpoints (and trainSSL.py's periodic ones) hold the teacher"),
        "scale_lr_with_world_size": ((bool,), False, "multiply the lr by the number of processes under torchrun"),
        "sync_batchnorm": ((bool,), False, "SyncBatchNorm across processes under torchrun"),
        "compile": ((bool,), False, "torch.compile the student network (forwards; heads and checkpoints unaffected)"),
        "data": {
            "split_id_list": ((int,), 0, "0/1/2: the release's published splits; any other value: random split from `seed`"),
            "labeled_samples": ((int,), REQUIRED, "L, labeled training images"),
            "input_size": ((str,), REQUIRED, "\"H,W\" crop size"),
            "root": ((str, type(None)), None, "dataset folder (default ../data/CityScapes, ../data/VOC2012)"),
            "split_file": ((str, type(None)), None, "labeled images: a list of image ids, a list of `image mask` lines "
                                                    "relative to the dataset root (Cityscapes, VOC), or the release's "
                                                    ".pkl split"),
            "unlabeled_file": ((str, type(None)), None, "with an `image mask` split_file: the unlabeled images, one "
                                                        "per line (first column; default: the rest of the training "
                                                        "list)"),
            "gta5_root": ((str, type(None)), None, "GTA5 folder for domain adaptation (default ../data/GTA5)"),
        },
    },
    "method": {
        "ramp_up_iterations": ((int,), 2000, "R: pseudo-label ramp-up; contrastive terms and ClassMix start after R"),
        "memory_start_offset": ((int,), 1000, "the memory is filled from iteration R - offset on"),
        "memory_size": ((int,), 256, "vectors per class in the memory bank"),
        "memory_confidence": ((float,), 0.95, "teacher confidence needed for a labeled pixel to enter memory"),
        "contrastive_weight": ((float, type(None)), None, "weight of each contrastive term; null: 0.1 (0.2 DA)"),
        "entropy_weight": ((float,), 0.01, "weight of the entropy term on unlabeled predictions"),
        "pseudo_label_power": ((float,), 6, "pseudo-label pixel weight = confidence ** power"),
        "unlabeled_classmix_prob": ((float,), 0.75, "probability of ClassMix on each strong unlabeled view"),
        "labeled_classmix_prob": ((float, type(None)), None, "probability of ClassMix on labeled data; null: 0.2 (0.25 DA)"),
        "class_balancing": ((bool, type(None)), None, "class-balanced CE weights; null: on for Cityscapes only"),
        "use_unlabeled": ((bool,), True, "false: supervised only (no pseudo-labels, entropy, unlabeled contrastive)"),
        "use_contrastive": ((bool,), True, "false: no memory bank and no contrastive terms"),
        "bn_refresh_iterations": ((int,), 1000, "train-mode passes over unlabeled data after training (BN refresh)"),
        "da_source_schedule": ((str, type(None)), None,
                               "domain adaptation: iterations whose labeled batch is from the source; null: the "
                               "fidelity preset's (\"last100_odd\" code, \"alternate\" paper)"),
    },
    "seed": ((int,), 5555, "seeds Python, NumPy and torch"),
    "ignore_label": ((int,), 250, "label value ignored by losses and metrics"),
    "utils": {
        "save_checkpoint_every": ((int,), 10000, "periodic checkpoint interval (replaces the previous one)"),
        "checkpoint_dir": ((str,), "../saved/DeepLab",
                           "folder of the runs: the run directory is checkpoint_dir/run_name"),
        "run_name": ((str, type(None)), None,
                     "run directory inside checkpoint_dir (checkpoints, logs, config.json); null: the config file's "
                     "name without .json; \"\": checkpoint_dir itself"),
        "val_per_iter": ((int,), 1000, "evaluation interval"),
        "save_best_model": ((bool,), True, "write best_model.pth on a new best mIoU"),
        "save_latest_every": ((int,), 1000, "interval of latest.pth, the full run state for exact resume"),
        "log_every": ((int,), 50, "interval of log lines, train_log.jsonl rows and TensorBoard scalars"),
        "tensorboard": ((bool,), True, "write TensorBoard event files in the run directory"),
        "curves": ((bool,), True, "draw curves.png in the run directory at evaluations (at most every 30 s) and at "
                                  "the end (about a second of matplotlib each time)"),
        "log_images": ((int,), 4, "images logged to TensorBoard at each evaluation"),
        "deterministic": ((bool,), False, "true: deterministic kernels (torch.use_deterministic_algorithms, warnings "
                                          "where none exists) and no cuDNN benchmark; false: cuDNN benchmarks its "
                                          "convolutions, as released"),
    },
    "synthetic": {
        "num_train": ((int,), 300, "synthetic training images"),
        "num_val": ((int,), 40, "synthetic validation images"),
        "image_size": ((str,), "96,160", "\"H,W\" of the generated scenes"),
        "style": ((str,), "a", "look of the scenes: \"a\", \"b\" or \"c\" (other colours, textures, lighting and "
                               "layout; same classes; \"c\" pretrains backbone.pretrained \"synthetic\")"),
        "num_source": ((int,), 300, "domain adaptation: fully labeled source scenes, in the other style"),
    },
    "folder": {
        "train_images": ((str, type(None)), None, "directory (or list file) of training images"),
        "train_labels": ((str, type(None)), None, "directory (or list file) of training labels"),
        "val_images": ((str, type(None)), None, "directory (or list file) of validation images"),
        "val_labels": ((str, type(None)), None, "directory (or list file) of validation labels"),
        "unlabeled_images": ((str, type(None)), None, "directory (searched recursively) or list file of training "
                                                      "images without labels: the unlabeled set"),
        "class_names": ((list, type(None)), None, "class names, one per class"),
        "palette": ((list, type(None)), None, "[[r,g,b], ...] colours for predictions"),
        "num_classes": ((int, type(None)), None, "number of classes (default: len(class_names))"),
        "mean": ((list, type(None)), None, "[r,g,b] mean for normalisation (default 127.5 each)"),
    },
}

DATASET_ALIASES = {"pascal": "pascal_voc"}
# Keys this project had and removed, with why and what to do. A config file or --set naming one stops with that
# message; a config stored in an older checkpoint (resume, evaluation) has it dropped, as it changed nothing.
REMOVED_KEYS = {
    "utils.eval_batch_size": "it never had an effect (evaluation goes one whole image at a time: images differ in "
                             "size); delete the key",
}
CHOICES = {
    "model": ("DeepLab",),
    "version": ("2", "3"),
    "dataset": ("cityscapes", "pascal_voc", "synthetic", "folder"),
    "fidelity": ("code", "paper"),
    "precision": ("fp32", "bf16", "fp16"),
    "training.optimizer": ("SGD",),
    "training.lr_schedule": ("Poly", None),
    "training.pretraining": ("COCO", "imagenet"),
    "synthetic.style": ("a", "b", "c"),
    "method.da_source_schedule": (None, "last100_odd", "alternate"),
}


def fidelity(cfg: dict) -> Fidelity:
    """The switches of the config's fidelity preset; `method.da_source_schedule`, when set, replaces the preset's
    domain-adaptation schedule (the released one draws source batches only on 50 of the last 100 iterations)."""
    preset = FIDELITY_PRESETS[cfg["fidelity"]]
    schedule = cfg.get("method", {}).get("da_source_schedule")
    return preset if schedule is None else dataclasses.replace(preset, da_source_schedule=schedule)


def _type_ok(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _type_names(types: tuple) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "true/false", list: "list", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _resolve(user: dict, schema: dict, prefix: str, source: str) -> dict:
    if not isinstance(user, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.')}' must be a JSON object, got {json.dumps(user)}")
    unknown = sorted(set(user) - set(schema))
    removed = [prefix + k for k in unknown if prefix + k in REMOVED_KEYS]
    if removed:
        raise UserError(f"{source}: config key '{removed[0]}' was removed: {REMOVED_KEYS[removed[0]]}.")
    if unknown:
        known = ", ".join(sorted(schema))
        raise UserError(f"{source}: unknown config key '{prefix}{unknown[0]}'. Known keys here: {known}. "
                        f"Fix the spelling or remove it (see docs/configuration.md).")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        name = prefix + key
        if isinstance(spec, dict):
            out[key] = _resolve(user.get(key, {}), spec, name + ".", source)
            continue
        types, default, _ = spec
        if key not in user:
            if default is REQUIRED:
                raise UserError(f"{source}: required config key '{name}' is missing.")
            out[key] = copy.deepcopy(default)
            continue
        value = user[key]
        if not _type_ok(value, types):
            raise UserError(f"{source}: config key '{name}' must be {_type_names(types)}, "
                            f"got {json.dumps(value)}.")
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_semantics(cfg: dict, source: str) -> None:
    for dotted, choices in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            shown = ", ".join(json.dumps(c) for c in choices)
            raise UserError(f"{source}: config key '{dotted}' is {json.dumps(value)}; choose one of {shown}.")
    t = cfg["training"]
    for dotted in ("training.batch_size", "training.num_iterations", "training.data.labeled_samples",
                   "utils.val_per_iter", "utils.save_checkpoint_every", "utils.save_latest_every",
                   "utils.log_every", "method.memory_size"):
        if _get(cfg, dotted) < 1:
            raise UserError(f"{source}: config key '{dotted}' must be at least 1, got {_get(cfg, dotted)}.")
    if t["batch_size"] < 2:
        raise UserError(f"{source}: 'training.batch_size' must be at least 2 (the unlabeled batch is B/2).")
    if cfg["version"] == "3" and t["batch_size"] // 2 < 2:
        raise UserError(f"{source}: DeepLabv3+ needs 'training.batch_size' of at least 4: its image-pooling "
                        f"BatchNorm needs two images of the unlabeled batch (B/2) in training mode.")
    for dotted in ("training.data.input_size", "synthetic.image_size"):
        parse_size(_get(cfg, dotted), f"{source}: '{dotted}'")
    depth = cfg["backbone"]["depth"]
    if depth is not None and depth not in (18, 34, 50, 101):
        raise UserError(f"{source}: 'backbone.depth' is {depth}; choose 18, 34, 50, 101 or null.")
    width, pretrained = cfg["backbone"]["width"], cfg["backbone"]["pretrained"]
    if width < 1:
        raise UserError(f"{source}: 'backbone.width' must be at least 1, got {width}.")
    if width != 64 and pretrained == "default":  # a local file or "synthetic" loads where its tensors fit
        from model import width_without_weights
        raise UserError(f"{source}: {width_without_weights(width, pretrained)}")
    check_values(cfg, source)  # numeric ranges, NaN, the ignore label against the classes (engine/config_checks.py)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value parsed as JSON when it parses, else the string)."""
    if "=" not in text:
        raise UserError(f"--set expects key=value (for example training.batch_size=2), got '{text}'.")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(user: dict, overrides: list[str], source: str) -> dict:
    """Set single keys in the raw (unresolved) config; unknown keys are refused against SCHEMA."""
    user = copy.deepcopy(user)
    for text in overrides or []:
        path, value = parse_override(text)
        schema: Any = SCHEMA
        node = user
        if ".".join(path) in REMOVED_KEYS:
            raise UserError(f"--set {text}: config key '{'.'.join(path)}' was removed: "
                            f"{REMOVED_KEYS['.'.join(path)]}.")
        for i, part in enumerate(path):
            if not isinstance(schema, dict) or part not in schema:
                raise UserError(f"--set {text}: unknown config key '{'.'.join(path[:i + 1])}' "
                                f"(config {source}); see docs/configuration.md.")
            schema = schema[part]
            if i < len(path) - 1:
                node = node.setdefault(part, {})
        if isinstance(schema, dict):
            raise UserError(f"--set {text}: '{'.'.join(path)}' is a section; set one of its keys.")
        types = schema[0]
        if str in types and not _type_ok(value, types):
            value = text.split("=", 1)[1]  # e.g. version=3 means the string "3"
        node[path[-1]] = value
    return user


def resolve_config(user: dict, source: str = "<config>", overrides: list[str] | None = None,
                   stored: bool = False) -> dict:
    """Validate a raw config dict (plus overrides) and return it with every default filled in. stored: the config
    a checkpoint holds (written by an earlier version, perhaps), whose REMOVED_KEYS are dropped."""
    if stored:
        user = drop_removed_keys(user)
    user = apply_overrides(user, overrides or [], source)
    if isinstance(user.get("dataset"), str):
        user["dataset"] = DATASET_ALIASES.get(user["dataset"], user["dataset"])
    cfg = _resolve(user, SCHEMA, "", source)
    _check_semantics(cfg, source)
    return cfg


def drop_removed_keys(user: dict) -> dict:
    """A copy of a raw config without the REMOVED_KEYS it names."""
    user = copy.deepcopy(user)
    for dotted in REMOVED_KEYS:
        *parents, last = dotted.split(".")
        node = user
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return user


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    """Read a JSON config file, apply `--set` overrides, validate, and fill in defaults."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}. Pass one of configs/*.json with --config.")
    try:
        with open(path) as f:
            user = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}).") from None
    return resolve_config(user, path, overrides)


def config_diff(a: dict, b: dict, prefix: str = "", ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two resolved configs, as 'key: a -> b' lines."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = prefix + key
        if name in ignore:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, name + ".", ignore)
        elif va != vb:
            out.append(f"{name}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out


def schema_rows(schema: dict | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every key, for docs/configuration.md's table."""
    rows = []
    for key, spec in (schema or SCHEMA).items():
        if isinstance(spec, dict):
            rows += schema_rows(spec, prefix + key + ".")
        else:
            _, default, text = spec
            rows.append((prefix + key, "required" if default is REQUIRED else json.dumps(default), text))
    return rows
