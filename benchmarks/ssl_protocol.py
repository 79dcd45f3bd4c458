"""The study's protocol: arms, comparisons, seeds, run length, the released constants, and every run's command.

Does the class-wise memory bank add accuracy on top of pseudo-labels and ClassMix, in the paper's regime (every arm
fine-tunes the same pretrained backbone)? Arms differ only in config keys; a seed fixes the labeled subset and every
other random draw of the data, so the arms of one seed are paired:

  semi-supervised, trainSSL.py on style "a" scenes, 20 of 200 labeled, seeds 1..5:
    supervised        method.use_unlabeled=false method.use_contrastive=false
    pseudo_classmix   method.use_unlabeled=true  method.use_contrastive=false
    full              method.use_unlabeled=true  method.use_contrastive=true  fidelity=code  (the released code)
    full_paper        method.use_unlabeled=true  method.use_contrastive=true  fidelity=paper (the paper's text)
  domain adaptation, trainSSL_domain_adaptation_targetCity.py: style "b" target (20 of 200 labeled), fully labeled
  style "a" source, source and target labeled batches alternating, seeds 1..3:
    source_only       method.use_unlabeled=false method.use_contrastive=false
    domain_adaptation method.use_unlabeled=true  method.use_contrastive=true

Every arm starts from the same backbone, `backbone.pretrained: "synthetic"` (engine/synthetic_pretrain.py: the
configured ResNet trained fully supervised on style "c" scenes, a third look), as every arm of the paper starts from
the same ImageNet or COCO file.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "benchmarks", "configs", "ssl_synthetic.json")
DEFAULT_OUT = os.path.join("benchmarks", "results", "ssl_synthetic")
RUNNER = os.path.join(ROOT, "benchmarks", "ssl_diagnostics.py")
DA_SCRIPT = "trainSSL_domain_adaptation_targetCity.py"

# The comparisons: a training script and the keys every arm of the comparison shares.
COMPARISONS: dict[str, dict] = {
    "semi_supervised": {"script": "trainSSL.py", "sets": {"synthetic.style": "a", "fidelity": "code"}},
    "domain_adaptation": {"script": DA_SCRIPT, "sets": {"synthetic.style": "b", "fidelity": "code",
                                                        "method.da_source_schedule": "alternate"}},
}
# The arms: their comparison and the only keys in which they differ from the other arms of it.
ARMS: dict[str, dict] = {
    "supervised": {"comparison": "semi_supervised",
                   "sets": {"method.use_unlabeled": False, "method.use_contrastive": False}},
    "pseudo_classmix": {"comparison": "semi_supervised",
                        "sets": {"method.use_unlabeled": True, "method.use_contrastive": False}},
    "full": {"comparison": "semi_supervised", "sets": {"method.use_unlabeled": True, "method.use_contrastive": True}},
    "full_paper": {"comparison": "semi_supervised",
                   "sets": {"method.use_unlabeled": True, "method.use_contrastive": True, "fidelity": "paper"}},
    "source_only": {"comparison": "domain_adaptation",
                    "sets": {"method.use_unlabeled": False, "method.use_contrastive": False}},
    "domain_adaptation": {"comparison": "domain_adaptation",
                          "sets": {"method.use_unlabeled": True, "method.use_contrastive": True}},
}
LABELS = {"supervised": "supervised only", "pseudo_classmix": "pseudo-labels + ClassMix",
          "full": "full method, fidelity \"code\"", "full_paper": "full method, fidelity \"paper\"",
          "source_only": "source only (DA)", "domain_adaptation": "domain adaptation"}
# The paired comparisons (b − a) and the pre-registered target of each (None: reported without a target).
PAIRS: list[dict] = [
    {"name": "full - supervised", "b": "full", "a": "supervised", "target": "mean >= +5 points"},
    {"name": "full - pseudo_classmix", "b": "full", "a": "pseudo_classmix", "target": "95 % interval above 0"},
    {"name": "full_paper - full", "b": "full_paper", "a": "full", "target": None},
    {"name": "domain_adaptation - source_only", "b": "domain_adaptation", "a": "source_only",
     "target": "positive at every seed (3)"},
]

# Released run-length constants (SCHEMA defaults, the release's N = 150000): scaled by N / 150000.
RELEASED_ITERATIONS = 150000
RELEASED_RUN_LENGTH = {"method.ramp_up_iterations": 2000, "method.memory_start_offset": 1000,
                       "method.bn_refresh_iterations": 1000}

# The run length N, fixed by RUN_LENGTH_RULE on the supervised arm alone before any method run (docs/benchmarks.md,
# "Study protocol"); None until then.
STUDY_ITERATIONS: int | None = 1000  # the cap: doubling 500 gained +4.80 points (run_length.json)
RUN_LENGTH_RULE = {
    "arm": "supervised", "seeds": [1, 2], "start": 250, "cap": 1000, "min_gain_points": 1.0,
    "text": "Train the supervised arm alone at seeds 1 and 2 for N and 2N iterations, N = 250, 500, ...: the run "
            "length is the first N at which doubling it gains less than 1.0 point of mean best mIoU; at most 1000 "
            "(the 90-minute budget), also when the rule is not met by then.",
}


def rule_decision(n: int, gain: float, rule: dict = RUN_LENGTH_RULE) -> tuple[int | None, str]:
    """The run-length rule after measuring N = n and 2n: (the run length, why), or (None, "") to double N."""
    if gain < rule["min_gain_points"]:
        return n, f"rule met: doubling {n} gained {gain:+.2f} < {rule['min_gain_points']} points"
    if 2 * n >= rule["cap"]:
        return rule["cap"], f"cap reached: doubling {n} still gained {gain:+.2f} points"
    return None, ""


EVALUATIONS_PER_RUN = 4   # periodic evaluations: every N/4 iterations

# Modes: run length, seeds, and size overrides on the base config. "da_seeds": the domain-adaptation pair's seeds.
MODES: dict[str, dict] = {
    "full": {"iterations": STUDY_ITERATIONS, "seeds": [1, 2, 3, 4, 5], "da_seeds": [1, 2, 3], "sets": {}},
    "quick": {"iterations": 200, "seeds": [1], "sets": {}},
    "smoke": {"iterations": 3, "seeds": [1], "val_every": 2,
              "sets": {"synthetic.num_train": 12, "synthetic.num_val": 2, "synthetic.num_source": 8,
                       "synthetic.image_size": "40,64", "training.data.input_size": "32,48",
                       "training.data.labeled_samples": 4, "utils.curves": False, "backbone.width": 8,
                       "backbone.synthetic_iterations": 2}},
}

# Where the study's config differs from the released method, and why (docs and JSON).
DIFFERENCES_FROM_RELEASE = [
    "network: DeepLabv3+ on a ResNet-18 of half width (backbone.width 32: stem 32, layer4 256; ASPP and decoder "
    "keep 256 channels), batch 4 (the smallest v3+ batch), 32x48 crops of 64x96 scenes: CPU-sized (released: "
    "ResNet-50/101, 321x321 or 512x512 crops, batch 5 to 20)",
    "pretrained backbone: backbone.pretrained \"synthetic\" (the same network trained fully supervised on 300 "
    "style-\"c\" scenes, 1000 iterations, seed 0; backbone tensors only) in place of the ImageNet/COCO files",
    "learning rate 0.01 (the earlier protocol's, chosen then on the supervised arm; released 2e-4, 4e-4 for the "
    "v3+ Cityscapes configs), not changed for this study",
    "run length N fixed by the rule on the supervised arm (RUN_LENGTH_RULE); ramp-up R, memory start offset and "
    "BatchNorm refresh passes scaled by N/150000, as R/N = 2000/150000 in the release; evaluation every N/4",
    "class balancing on (method.class_balancing true): the scenes stand in for Cityscapes, where the release "
    "balances classes",
    "domain adaptation: method.da_source_schedule \"alternate\" (the paper's schedule); the released code draws "
    "source batches only on odd iterations of the last 100, so a source-only arm would be target-only training",
]


def scaled_run_length(iterations: int) -> dict[str, int]:
    """Ramp-up, memory start offset and BN refresh scaled proportionally to the run length (at least 1)."""
    return {k: max(1, round(v * iterations / RELEASED_ITERATIONS)) for k, v in RELEASED_RUN_LENGTH.items()}


def val_every(iterations: int) -> int:
    return max(1, iterations // EVALUATIONS_PER_RUN)


def overrides(sets: dict[str, object]) -> list[str]:
    """KEY=VALUE strings (values as JSON, strings bare), as --set takes them."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sets.items()]


def set_args(sets: dict[str, object]) -> list[str]:
    """--set KEY=VALUE arguments."""
    return [a for o in overrides(sets) for a in ("--set", o)]


def mode_settings(mode: str, iterations: int | None = None, seeds: list[int] | None = None,
                  val_every_: int | None = None) -> dict:
    """The mode's settings with command-line replacements (run length, seeds, evaluation interval)."""
    m = dict(MODES[mode])
    if iterations is not None:
        m["iterations"] = iterations
    if m["iterations"] is None:
        raise SystemExit("the study's run length is not fixed yet (benchmarks/ssl_protocol.py STUDY_ITERATIONS): "
                         "run --run-length first, or give --iterations")
    if seeds:
        m["seeds"] = list(seeds)
        m.pop("da_seeds", None)
    if val_every_ is not None:
        m["val_every"] = val_every_
    m.setdefault("val_every", val_every(m["iterations"]))
    return m


def arm_keys() -> set[str]:
    """Keys the comparisons and arms set (a common --set may not change them)."""
    return {k for spec in list(ARMS.values()) + list(COMPARISONS.values()) for k in spec["sets"]} | {"seed"}


def run_dir(out: str, arm: str, iterations: int, seed: int) -> str:
    return os.path.join(out, f"{arm}_N{iterations}_seed{seed}")


def plan(mode: str | dict, out: str, arms: list[str] | None = None, extra: dict | None = None) -> list[dict]:
    """Every run of the mode (a MODES name or settings): arm, seed, script, run dir and the full --set overrides;
    `extra`: keys set for every run, after the mode's."""
    m = mode_settings(mode) if isinstance(mode, str) else mode
    clash = sorted(set(extra or {}) & arm_keys())
    if clash:
        raise SystemExit(f"--set {clash[0]}: the arms set this key themselves")
    n = m["iterations"]
    common = {**m["sets"], "training.num_iterations": n, "utils.val_per_iter": m["val_every"],
              **scaled_run_length(n), **(extra or {})}
    runs = []
    for seed in m["seeds"]:
        for arm, spec in ARMS.items():
            if arms and arm not in arms:
                continue
            if spec["comparison"] == "domain_adaptation" and seed not in m.get("da_seeds", m["seeds"]):
                continue
            comparison = COMPARISONS[spec["comparison"]]
            d = run_dir(out, arm, n, seed)
            sets = {**common, **comparison["sets"], "seed": seed, **spec["sets"], "utils.checkpoint_dir": d,
                    "utils.run_name": ""}  # the run directory is d itself
            runs.append({"arm": arm, "comparison": spec["comparison"], "seed": seed, "script": comparison["script"],
                         "iterations": n, "run_dir": d, "sets": sets})
    return runs


def command(run: dict, config: str, device: str, diagnose: bool = False) -> list[str]:
    """The run's command line: the training script itself, or through ssl_diagnostics.py with `diagnose`."""
    script = [RUNNER, run["script"]] if diagnose else [os.path.join(ROOT, run["script"])]
    return [sys.executable] + script + ["--config", config, "--device", device] + set_args(run["sets"])


def arm_documentation() -> str:
    """The comparisons' and arms' keys, one line each."""
    import shlex
    lines = []
    for name, c in COMPARISONS.items():
        lines.append(f"  {name}: {c['script']} " + " ".join(shlex.quote(a) for a in set_args(c["sets"])))
        for arm, spec in ARMS.items():
            if spec["comparison"] == name:
                lines.append(f"    {arm:18s} " + " ".join(shlex.quote(a) for a in set_args(spec["sets"])))
    return "\n".join(lines)
