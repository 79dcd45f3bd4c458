"""The run of a training script: everything an iteration needs, in one object that a checkpoint can hold.

`Run` loads the config, builds data, student, teacher, memory bank, class balancing and optimiser, and offers
the bookkeeping around the method's steps (learning rate, optimiser step + EMA, logging, evaluation,
checkpoints, exact resume, the final BatchNorm refresh). The method itself — the order of the steps — is
written out in each training script; the steps are in `utils/ssl_steps.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from data import build_data, build_source
from data.check_files import check_files
from data.sampler import InfiniteBatches
from model import build_model
from model.checkpoint_io import load_state_strict
from model.pretrained import default_weights
from model.weights_download import cache_status
from utils import distributed as dist
from utils.augmentations import normalize
from utils.checkpoint import load_checkpoint, model_state_from, save_atomic
from utils.class_balancing import ClassBalancing
from utils.config import config_diff, fidelity, load_config, parse_size, resolve_config
from utils.ema import create_teacher, ema_alpha, ema_momentum, update_teacher
from utils.errors import UserError
from utils.evaluation import evaluate
from utils.fault_guard import RECOVERY_KEYS, NonFiniteGuard, all_finite, recovery_changes
from utils.graceful_stop import GracefulStop
from utils.logger import TrainLogger
from utils.memory_bank import MemoryBank, per_class_quota
from utils.metrics import format_iou_table
from utils.schedules import poly_lr, set_lr
from utils.variants import Variant, backbone_depth
from utils.visualize import unlabeled_panel, validation_panel

# Keys that may differ between a run and its resumption (they change no result).
RESUME_FREE_KEYS = ("training.num_workers", "utils.log_every", "utils.tensorboard", "utils.log_images",
                    "utils.save_latest_every", "utils.checkpoint_dir", "training.data.root",
                    "training.data.gta5_root", "utils.eval_batch_size")


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every training script takes (SPEC section 1)."""
    p = argparse.ArgumentParser(description=description)
    # The help texts are the README's flag table, word for word (tests/test_run_wiring.py holds them to it).
    p.add_argument("--config", metavar="FILE", help="JSON config (configs/)")
    p.add_argument("--data-root", metavar="PATH",
                   help="dataset folder (default: training.data.root, else ../data/CityScapes, ../data/VOC2012)")
    p.add_argument("--gta5-root", metavar="PATH", help="GTA5 folder for domain adaptation (default ../data/GTA5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set training.batch_size=2 (repeatable; JSON values)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="training device (auto: CUDA when available; under torchrun each process takes "
                        "cuda:<LOCAL_RANK>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config and data folder, build model and optimiser, say whether the pretrained "
                        "weights are cached or will be downloaded (downloads nothing), print the plan, exit")
    p.add_argument("--check-files", action="store_true",
                   help="with --dry-run: also read every image and label once (progress shown) and list every bad file")
    p.add_argument("--resume", metavar="CHECKPOINT|auto",
                   help="continue a run from its latest.pth (auto: the run directory's latest.pth)")
    p.add_argument("--recover", action="store_true",
                   help=f"with --resume: let {' and '.join(RECOVERY_KEYS)} differ from the checkpoint's "
                        f"(after a divergence)")
    return p


def choose_device(name: str) -> torch.device:
    """One device for the whole run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
        if dist.launched_by_torchrun():
            name = f"cuda:{dist.local_rank()}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class Run:
    """All state of one training run (student, teacher, optimiser, memory bank, class balancing, samplers,
    iteration, best mIoU) and the bookkeeping around the method's steps."""

    def __init__(self, variant: Variant, argv: list[str] | None = None, description: str = ""):
        self.t_start = time.time()
        self.variant = variant
        parser = build_arg_parser(description or variant.name)
        self.args = parser.parse_args(argv)
        self.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command printed on a stop
        if self.args.check_files and not self.args.dry_run or self.args.recover and not self.args.resume:
            parser.error("--check-files goes with --dry-run, --recover with --resume")
        self.device = choose_device(self.args.device)
        dist.init_distributed(self.device)
        resume_ckpt = self._load_config_and_resume_checkpoint()
        cfg = self.cfg
        self.fidelity = fidelity(cfg)
        self.method = self._resolve_method(cfg)
        self.run_dir = cfg["utils"]["checkpoint_dir"]
        # steps of the loop: 2N in trainSSL_less_memory.py, where every schedule counts steps (utils/variants.py)
        self.num_iterations = cfg["training"]["num_iterations"] * variant.steps_per_iteration
        self.crop = parse_size(cfg["training"]["data"]["input_size"], "training.data.input_size")
        self.batch_size = cfg["training"]["batch_size"]
        seed_everything(cfg["seed"])

        # Data: labeled subset, unlabeled rest, validation (and GTA5 for domain adaptation). The domain-adaptation
        # script reads Cityscapes at half size with v3 too, and then evaluates at full size only after training.
        self.half_size = variant.cityscapes_half_size and cfg["version"] != "2" and cfg["dataset"] == "cityscapes"
        self.data = build_data(cfg, self.args.data_root, cityscapes_half_size=self.half_size)
        # the set evaluations use: the periodic one now, the final one in finish()
        self.val_set = self.data.val
        self.final_val_set = build_data(cfg, self.args.data_root, split=False).val if self.half_size else self.data.val
        self.num_classes = self.data.num_classes
        self.ignore_label = self.data.ignore_label
        self.drop_background = self.data.name == "pascal_voc"
        self.gta5 = None
        if variant.uses_gta5:  # the labeled source: GTA5 for Cityscapes, the other style for synthetic scenes
            self.gta5 = build_source(cfg, self.args.gta5_root or cfg["training"]["data"]["gta5_root"])

        # Networks: student, EMA teacher; the pseudo-labeler is the teacher or the student (eval mode).
        t = cfg["training"]
        depth = backbone_depth(cfg, variant)
        if self.args.dry_run:  # shapes only: no allocation, no weights read
            with torch.device("meta"):
                self.student = build_model(cfg["version"], self.num_classes, t["pretraining"],
                                           depth, None, v2_branches=self.fidelity.v2_branches,
                                           width=cfg["backbone"]["width"])
        else:
            self.student = build_model(cfg["version"], self.num_classes, t["pretraining"], depth,
                                       cfg["backbone"]["pretrained"], v2_branches=self.fidelity.v2_branches,
                                       width=cfg["backbone"]["width"], verbose=dist.is_main()).to(self.device)
        if t["sync_batchnorm"] and dist.is_distributed():
            self.student = dist.convert_sync_batchnorm(self.student, self.device)
        dist.broadcast_parameters(self.student)
        self.student.train()
        self.student_module = self.student
        self.teacher = create_teacher(self.student)
        self.labeler = self.teacher if t["use_teacher_train"] else self.student_module
        lr = t["learning_rate"] * (dist.world_size() if t["scale_lr_with_world_size"] else 1)
        self.base_lr = lr
        self.optimizer = torch.optim.SGD(self.student.optim_parameters(lr), lr=lr, momentum=t["momentum"],
                                         weight_decay=t["weight_decay"])
        self.precision = cfg["precision"]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.device.type == "cuda":  # NHWC convolutions on tensor cores
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        if t["compile"] and not self.args.dry_run:
            # forwards go through the compiled graph; heads, selectors and state dicts use student_module
            self.student = torch.compile(self.student_module)

        # Method state: memory bank and class balancing.
        m = self.method
        labeled_samples = len(self.data.labeled_idx)
        self.memory = MemoryBank(self.num_classes, size=m["memory_size"], dim=256, device=self.device)
        self.memory_quota = per_class_quota(self.data.name, self.batch_size, labeled_samples, self.num_classes)
        self.balancing = None
        if m["class_balancing"]:
            self.balancing = ClassBalancing(
                self.num_classes,
                ClassBalancing.labeled_slots_for(labeled_samples, self.batch_size),
                ClassBalancing.unlabeled_slots_for(len(self.data.train), labeled_samples, self.batch_size),
                device=self.device, reduce=dist.all_reduce_sum)
        self.ones = torch.ones(self.num_classes, device=self.device)
        self.class_weights = self.ones

        # Loaders: every process draws its own shard; the item seeds make data independent of workers.
        seed = cfg["seed"]
        common = dict(num_workers=t["num_workers"], device=self.device, rank=dist.rank(),
                      world_size=dist.world_size())
        self.labeled = InfiniteBatches(self.data.train, self.data.labeled_idx, self.batch_size, seed=seed, **common)
        self.unlabeled = InfiniteBatches(self.data.train, self.data.unlabeled_idx, self.batch_size // 2,
                                         seed=seed + 1, **common)
        self.gta5_batches = None
        if self.gta5 is not None:
            self.gta5_batches = InfiniteBatches(self.gta5, list(range(len(self.gta5))), self.batch_size,
                                                seed=seed + 2, **common)

        self.start_iteration = 0
        self.best_miou = -1.0
        self.since_best = 0
        self.best_result: dict | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self.pending_evaluation: int | None = None  # an evaluation a stop interrupted (utils/graceful_stop.py)
        self.latest_saved: int | None = None  # iterations in the latest.pth this process wrote last
        if self.args.dry_run:
            self.print_plan()
            if self.args.check_files:
                extra = {"GTA5": self.gta5} if self.gta5 is not None else {}
                check_files({"train": self.data.train, "val": self.data.val, **extra})  # lists every bad file
            return
        # Different augmentation draws on every process, identical networks (already broadcast); a resumed run
        # then restores each process's own RNG state (load_state_dict).
        seed_offset = dist.rank() * 1000003
        if seed_offset:
            seed_everything(seed + seed_offset)
        if resume_ckpt is not None:
            self.load_state_dict(resume_ckpt)
        self.logger = TrainLogger(self.run_dir, self.num_iterations, self.start_iteration, enabled=dist.is_main(),
                                  tensorboard=cfg["utils"]["tensorboard"], curves=cfg["utils"]["curves"])
        if dist.is_main():
            self._write_run_files()
        self.logger.message(f"{variant.name}: {self.data.name} v{cfg['version']} ({t['pretraining']}), "
                            f"{labeled_samples} labeled / {len(self.data.unlabeled_idx)} unlabeled, "
                            f"{self.num_iterations} iterations from {self.start_iteration}, device {self.device}"
                            f"{f' x{dist.world_size()} processes' if dist.is_distributed() else ''}, "
                            f"fidelity {cfg['fidelity']}, precision {self.precision}, run dir {self.run_dir}")
        self.guard = NonFiniteGuard(self)  # NaN/Inf loss terms or weights: stop before anything is written
        self.stop = GracefulStop(self.device)  # SIGTERM/SIGINT, a bad file: write latest.pth, then stop
        self.stop.install()

    # ----------------------------------------------------------------------------------------------- set-up
    def _load_config_and_resume_checkpoint(self) -> dict | None:
        a = self.args
        ckpt = None
        if a.resume and a.resume != "auto":
            ckpt = load_checkpoint(a.resume, map_location="cpu")
        if a.config:
            self.cfg = load_config(a.config, a.overrides)
            self.cfg_source = a.config
        elif ckpt is not None and isinstance(ckpt.get("config"), dict):
            self.cfg = resolve_config(ckpt["config"], f"{a.resume} (stored config)", a.overrides)
            self.cfg_source = a.resume
        else:
            raise UserError("--config is required (or --resume with a checkpoint that stores its config).")
        if a.resume == "auto":
            path = os.path.join(self.cfg["utils"]["checkpoint_dir"], "latest.pth")
            # rank 0 decides; a rank that cannot see the file then fails loudly instead of starting afresh
            ckpt = load_checkpoint(path, map_location="cpu") if dist.broadcast_object(os.path.isfile(path)) else None
            if ckpt is None and dist.is_main():
                print(f"--resume auto: no {path} yet, starting a new run", flush=True)
            elif ckpt is not None:
                a.resume = path  # messages name the file
        if ckpt is not None and ckpt.get("format") == "ssl-run-state-1":
            # A run state continues its run in its own directory (best_model.pth, logs), wherever the config points.
            run_dir = os.path.dirname(a.resume) or "."
            configured = self.cfg["utils"]["checkpoint_dir"]
            if os.path.abspath(configured) != os.path.abspath(run_dir) and dist.is_main():
                print(f"--resume {a.resume}: continuing the run in its directory {run_dir} (utils.checkpoint_dir "
                      f"{configured} is not used)", flush=True)
            self.cfg["utils"]["checkpoint_dir"] = run_dir
            best = os.path.join(run_dir, "best_model.pth")
            if ckpt.get("best_miou", -1.0) >= 0 and self.cfg["utils"]["save_best_model"] and \
                    not os.path.isfile(best) and dist.is_main():
                print(f"warning: {best} is missing, so the return to the best model (after N/5 iterations without "
                      f"improvement) cannot happen and the resumed run may differ from an uninterrupted one; copy "
                      f"best_model.pth next to {a.resume}.", flush=True)
        if ckpt is not None and isinstance(ckpt.get("config"), dict):
            stored = resolve_config(ckpt["config"], f"{a.resume} (stored config)")
            diff = config_diff(stored, self.cfg, ignore=RESUME_FREE_KEYS + (RECOVERY_KEYS if a.recover else ()))
            if diff:
                raise UserError(f"cannot resume {a.resume}: it belongs to a run with another config. Differing keys "
                                f"(checkpoint -> now):\n  " + "\n  ".join(diff) + f"\n({', '.join(RECOVERY_KEYS)} may "
                                f"differ with --recover, e.g. to continue after a divergence.)")
            if a.recover and dist.is_main():
                print(f"--recover: resuming {a.resume} with " + ("; ".join(recovery_changes(stored, self.cfg))
                                                                   or "no changed key"), flush=True)
        return ckpt

    def _resolve_method(self, cfg: dict) -> dict:
        """Method constants with the script's own values where the config leaves them null."""
        m = dict(cfg["method"])
        v = self.variant
        if m["contrastive_weight"] is None:
            m["contrastive_weight"] = v.contrastive_weight
        if m["labeled_classmix_prob"] is None:
            m["labeled_classmix_prob"] = v.labeled_classmix_prob
        if m["class_balancing"] is None:
            m["class_balancing"] = cfg["dataset"] == "cityscapes"
        return m

    def _write_run_files(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(self.cfg, f, indent=2)
        with open(os.path.join(self.run_dir, "train_split.txt"), "w") as f:
            names = self.data.train_names
            f.write("".join(names[k] + "\n" for k in self.data.labeled_idx))

    def print_plan(self) -> None:
        """--dry-run: the resolved config and what the run would do."""
        cfg, t = self.cfg, self.cfg["training"]
        n_params = sum(p.numel() for p in self.student.parameters())
        lines = [
            f"config: {self.cfg_source}",
            json.dumps(cfg, indent=2),
            f"script: {self.variant.name}; method constants: {json.dumps(self.method)}",
            f"fidelity '{cfg['fidelity']}': {self.fidelity}",
            f"data: {self.data.name}, {len(self.data.train)} train ({len(self.data.labeled_idx)} labeled, "
            f"{len(self.data.unlabeled_idx)} unlabeled), {len(self.data.val)} val, {self.num_classes} classes, "
            f"crop {self.crop}{' of half-size images (full-size final evaluations)' if self.half_size else ''}, "
            f"channel order {self.data.channel_order}"
            + (f"; GTA5: {len(self.gta5)} images" if self.gta5 is not None else ""),
            f"model: {'DeepLabv2' if cfg['version'] == '2' else 'DeepLabv3+'} ResNet-{self.student.depth}, {n_params / 1e6:.1f} M parameters, "
            f"pretrained weights: {self._pretrained_status()}",
            f"optimiser: SGD, one group of {sum(len(g['params']) for g in self.optimizer.param_groups)} trainable "
            f"tensors at lr {self.base_lr}, momentum {t['momentum']}, "
            f"weight decay {t['weight_decay']}, {t['lr_schedule']} power {t['lr_schedule_power']}",
            f"memory: {self.num_classes} x {self.method['memory_size']} vectors, quota {self.memory_quota} per class "
            f"and update; class balancing: {'on' if self.balancing else 'off'}",
            f"run directory: {self.run_dir}; device {self.device}",
            "dry run: OK",
        ]
        print("\n".join(lines), flush=True)

    def _pretrained_status(self) -> str:
        source = self.cfg["backbone"]["pretrained"]
        if source in (None, "none"):
            return "none (random initialisation)"
        if source == "default":
            try:
                path, url = default_weights(self.cfg["version"], self.cfg["training"]["pretraining"],
                                            self.student.depth)
            except UserError as e:
                return f"unavailable: {e}"
            return cache_status(path, url)
        if os.path.isfile(source):
            return f"{source} (found; not loaded in a dry run)"
        return f"{source} MISSING (backbone.pretrained: give an existing file, \"default\" or \"none\")"

    # --------------------------------------------------------------------------------------- per iteration
    def iterations(self) -> range:
        self.stop.resume_pending_evaluation(self)  # an evaluation interrupted by a stop is done first
        return range(self.start_iteration, self.num_iterations)

    def autocast(self):
        """Mixed precision context for network forwards (losses and the memory bank stay in fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def set_learning_rate(self, i: int) -> float:
        """Step 1: poly learning rate, set every iteration."""
        t = self.cfg["training"]
        lr = poly_lr(self.base_lr, i, self.num_iterations, t["lr_schedule_power"]) if t["lr_schedule"] else self.base_lr
        set_lr(self.optimizer, lr)
        self.lr = lr
        self.iteration = i
        return lr

    def evaluation_due(self, i: int) -> bool:
        """Whether an evaluation follows iteration i (periodic, or the final one after the loop)."""
        return (i > 0 and i % self.cfg["utils"]["val_per_iter"] == 0) or i == self.num_iterations - 1

    def remember_unlabeled(self, images: torch.Tensor, pseudo: torch.Tensor, mixed_images: torch.Tensor,
                           mixed_pseudo: torch.Tensor) -> None:
        """Keep references (no copy, no sync) to this iteration's unlabeled batch [b,3,H,W], its pseudo-labels
        [b,H,W] and the strong (ClassMix) views [2b,...], only when an evaluation follows this iteration or the
        next (trainSSL_less_memory.py draws unlabeled batches every other iteration): it shows them."""
        i = getattr(self, "iteration", -2)
        if self.cfg["utils"]["log_images"] > 0 and self.logger.tb is not None and \
                (self.evaluation_due(i) or self.evaluation_due(i + 1)):
            self._unlabeled_views = (images.detach(), pseudo.detach(), mixed_images.detach(), mixed_pseudo.detach())

    def update_class_weights(self, i: int, labels: torch.Tensor | None, pseudo: torch.Tensor | None,
                             after_ramp_up: bool = True) -> torch.Tensor:
        """Steps 3 and 7: class-balancing statistics (Cityscapes) and the class weights of this iteration (ones
        until i > R unless `after_ramp_up` is False: the less-memory script's unlabeled step, as released)."""
        if self.balancing is None:
            return self.ones
        weights = self.balancing.update(labels, pseudo)
        self.class_weights = weights if i > self.method["ramp_up_iterations"] or not after_ramp_up else self.ones
        return self.class_weights

    def gather_rows(self, *tensors: torch.Tensor):
        """Rows from every process (memory-bank vectors), so every process holds the same bank."""
        return dist.all_gather_rows(*tensors)

    def memory_active(self, i: int) -> bool:
        m = self.method
        return m["use_contrastive"] and i > m["ramp_up_iterations"] - m["memory_start_offset"]

    def contrastive_active(self, i: int) -> bool:
        return self.method["use_contrastive"] and i > self.method["ramp_up_iterations"]

    def optimizer_step(self, i: int, loss: torch.Tensor) -> None:
        """Step 11: one backward, one SGD step (gradients averaged over processes), then the teacher's EMA.

        Gradients are zeroed, not freed (torch 1.6's `zero_grad()`, as released): a parameter that ever had a
        gradient keeps getting weight decay and momentum on steps whose loss does not reach it."""
        self.optimizer.zero_grad(set_to_none=False)
        self.scaler.scale(loss).backward()
        dist.average_gradients(self.student_module)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.alpha = ema_alpha(i, self.num_iterations, self.variant.ema_warmup_div)
        update_teacher(self.teacher, self.student_module, self.alpha)
        dist.average_buffers(self.student_module, self.teacher)  # BatchNorm running statistics: the same on every rank

    def end_iteration(self, i: int, terms: dict[str, torch.Tensor]) -> None:
        """Step 12: logging at intervals, checkpoints, evaluation and the return to the best weights; then a stop
        (signal, bad file in the next batches) writes latest.pth and ends the run (utils/graceful_stop.py)."""
        u = self.cfg["utils"]
        for k, v in terms.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._count += 1
        self.logger.advance()
        if (i + 1) % u["log_every"] == 0 or i == self.num_iterations - 1:
            self._log(i)
        if i > 0 and i % u["save_checkpoint_every"] == 0:
            self.save_periodic(i)
        new_best = self.evaluate_if_due(i)
        # A new best_model.pth is followed by latest.pth at once: a resumed run must never start from a state older
        # than the best_model.pth on disk (a return to the best model would read weights from its future).
        if (i + 1) % u["save_latest_every"] == 0 or i == self.num_iterations - 1 or new_best:
            self.save_latest(i + 1)
        self.stop.after_iteration(self, i)

    def evaluate_if_due(self, i: int) -> bool:
        """The periodic evaluation after iteration i and the return to the best weights; whether a new
        best_model.pth was written. A stop request during it leaves it pending (the resumed run does it)."""
        u = self.cfg["utils"]
        if not (i > 0 and i % u["val_per_iter"] == 0):
            return False
        best_before = self.best_miou
        with self.stop.pending_evaluation(self, i):
            self.evaluate_and_keep_best(i)
            if self.since_best > self.num_iterations / 5:
                self.return_to_best(i)
        return self.best_miou != best_before and u["save_best_model"]

    def _log(self, i: int) -> None:
        self.guard.check(self)
        if dist.is_distributed() and self._sums:  # the mean over all processes' batches
            keys = list(self._sums)
            total = dist.all_reduce_sum(torch.stack([self._sums[k] for k in keys])) / dist.world_size()
            self._sums = dict(zip(keys, total))
        values = {k: float(v) / self._count for k, v in self._sums.items()}  # one sync per log interval
        values.update(lr=self.lr, ema_alpha=getattr(self, "alpha", 0.0),
                      ema_momentum=ema_momentum(i, self.num_iterations))
        self._sums, self._count = {}, 0
        self.logger.scalars(i, values)
        self.logger.vector(i, "class_weights", self.class_weights.tolist(), self.data.class_names)
        self.logger.vector(i, "memory_fill", self.memory.counts.tolist(), self.data.class_names)

    # ------------------------------------------------------------------------------ evaluation, checkpoints
    def evaluate(self, model: torch.nn.Module, i: int, tag: str = "val") -> dict:
        """Evaluate on `self.val_set` (the final validation set once finish() has begun) and log the result."""
        self.logger.evaluation_started()
        d = self.data
        n_images = self.cfg["utils"]["log_images"] if self.logger.tb is not None else 0
        shown: list[torch.Tensor] = []
        poll = self.stop.evaluation_poll(self, len(d.val))

        def keep_image(name, image, label, pred):  # the first n_images validation images, as panels; a stop
            if len(shown) < n_images:              # request ends the evaluation here
                shown.append(validation_panel(image, label, pred, d.palette, self.ignore_label, d.channel_order))
            poll()

        result = evaluate(model, self.val_set, num_classes=self.num_classes, ignore_label=self.ignore_label,
                          mean_rgb=d.mean_rgb, channel_order=d.channel_order, device=self.device,
                          autocast=self.autocast, on_prediction=keep_image)
        self.logger.scalars(i, {"miou": result["miou"], "loss": result["loss"]}, prefix=tag, print_line=False)
        self.logger.vector(i, f"{tag}_iou", result["iou"], d.class_names)
        for k, picture in enumerate(shown):  # image | ground truth | prediction
            self.logger.images(i, f"{tag}_images/{k}", picture.unsqueeze(0))
        views = self.__dict__.pop("_unlabeled_views", None)
        if views is not None and n_images:  # image | pseudo-label, then each strong view: mixed image | labels
            images, pseudo, mixed, mixed_pseudo = views
            b = images.shape[0]
            for k in range(min(n_images, b)):
                picture = unlabeled_panel(images[k], pseudo[k], [(mixed[v * b + k], mixed_pseudo[v * b + k])
                                                                 for v in range(mixed.shape[0] // b)],
                                          d.palette, self.ignore_label, d.channel_order)
                self.logger.images(i, f"unlabeled_images/{k}", picture.unsqueeze(0))
        self.logger.message(f"[{tag}] iteration {i}: mIoU {100 * result['miou']:.2f}  loss {result['loss']:.4f}")
        self.logger.evaluation_finished()  # ETA without evaluation time; curves.png redrawn
        return result

    def _model_for_saving(self, kind: str) -> torch.nn.Module:
        """The network a checkpoint of `kind` holds, as released: with save_teacher_test, the teacher in best
        checkpoints written during the loop and (trainSSL.py only) in periodic ones; the student otherwise, and
        always in the final checkpoint and in best models written after the loop."""
        teacher = self.cfg["training"]["save_teacher_test"] and (
            kind == "best" or (kind == "periodic" and self.variant.teacher_in_periodic_checkpoint))
        return self.teacher if teacher else self.student_module

    def _checkpoint(self, i: int, kind: str, **extra) -> dict:
        return {"model": self._model_for_saving(kind).state_dict(), "config": self.cfg,
                "optimizer": self.optimizer.state_dict(), "iteration": i, **extra}

    def save_periodic(self, i: int) -> None:
        self.guard.check(self, weights=True)
        if not dist.is_main():
            return
        path = os.path.join(self.run_dir, f"checkpoint-iter{i}.pth")
        save_atomic(self._checkpoint(i, "periodic"), path)
        for name in os.listdir(self.run_dir):
            if name.startswith("checkpoint-iter") and name.endswith(".pth") and name != os.path.basename(path):
                os.remove(os.path.join(self.run_dir, name))

    def evaluate_and_keep_best(self, i: int, final: bool = False) -> dict:
        """Evaluate the student; a new best is saved as best_model.pth (after the loop, `final`: the student)."""
        self.guard.check(self, weights=True)  # before best_model.pth (and, at the end, the final checkpoint)
        result = self.evaluate(self.student_module, i)
        if result["miou"] > self.best_miou:
            self.best_miou, self.best_result = result["miou"], result
            self.since_best = 0
            if self.cfg["utils"]["save_best_model"] and dist.is_main():
                save_atomic(self._checkpoint(i, "final" if final else "best", miou=result["miou"]),
                            os.path.join(self.run_dir, "best_model.pth"))
        else:
            self.since_best += self.cfg["utils"]["val_per_iter"]
        return result

    def _load_best_into_student(self) -> bool:
        """best_model.pth of this run into the student; False when there is none. With save_best_model false the run
        writes none, so a best_model.pth in its directory is another run's and is not read."""
        if not self.cfg["utils"]["save_best_model"]:
            return False
        path = os.path.join(self.run_dir, "best_model.pth")
        # Rank 0 wrote the file; it reads it and sends the weights to the others (no shared file system needed).
        if not dist.broadcast_object(os.path.isfile(path) if dist.is_main() else None):
            return False
        if dist.is_main():
            state = model_state_from(load_checkpoint(path, map_location=self.device), path)
            load_state_strict(self.student_module, state, path)
        dist.broadcast_parameters(self.student_module)
        return True

    def return_to_best(self, i: int) -> None:
        """No improvement for more than N/5 iterations: back to the best weights, teacher rebuilt from them."""
        if self._load_best_into_student():
            self.teacher = create_teacher(self.student_module)
            if self.cfg["training"]["use_teacher_train"]:
                self.labeler = self.teacher
            self.logger.message(f"iteration {i}: no improvement for {self.since_best} iterations, "
                                f"back to the best model (mIoU {100 * self.best_miou:.2f})")
        self.since_best = 0

    def state_dict(self, iteration: int) -> dict:
        """The whole run state, enough to continue bit-identically."""
        state = {
            "model": self.student_module.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "memory": self.memory.state_dict(),
            "balancing": self.balancing.state_dict() if self.balancing is not None else None,
            "class_weights": self.class_weights, "iteration": iteration, "best_miou": self.best_miou,
            "since_best": self.since_best, "config": self.cfg, "rng": rng_state(),
            # every process's RNG state (augmentation draws differ per process), for an exact resume
            "rng_ranks": dist.all_gather_object(rng_state()) if dist.is_distributed() else None,
            "world_size": dist.world_size(),
            "best_result": None if self.best_result is None else
            {k: self.best_result[k] for k in ("iou", "miou", "loss")},
            "samplers": {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict(),
                         "gta5": self.gta5_batches.state_dict() if self.gta5_batches is not None else None},
            # the loss sums of the current log interval, so that a resumed run logs the same averages
            "log_window": {"sums": dict(self._sums), "count": self._count},
            "pending_evaluation": self.pending_evaluation,
            "format": "ssl-run-state-1",
        }
        return state

    def load_state_dict(self, ckpt: dict) -> None:
        source = self.args.resume
        load_state_strict(self.student_module, model_state_from(ckpt, source), source)
        if ckpt.get("format") != "ssl-run-state-1":
            # A checkpoint of the original release or a best/periodic one: weights (and optimiser) only.
            if "optimizer" in ckpt:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            self.teacher = create_teacher(self.student_module)
            self.labeler = self.teacher if self.cfg["training"]["use_teacher_train"] else self.student_module
            self.start_iteration = int(ckpt.get("iteration", 0))
            if dist.is_main():
                print(f"resuming from {source}: weights and optimiser only (not a latest.pth run state); memory "
                      f"bank, class balancing and data order start afresh at iteration {self.start_iteration}",
                      flush=True)
            return
        load_state_strict(self.teacher, ckpt["teacher"], source + " (teacher)")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when saved in fp32 (a --recover resume may switch precision)
            self.scaler.load_state_dict(ckpt["scaler"])
        self.memory.load_state_dict(ckpt["memory"])
        if self.balancing is not None and ckpt["balancing"] is not None:
            self.balancing.load_state_dict(ckpt["balancing"])
        self.class_weights = ckpt["class_weights"].to(self.device)
        self.start_iteration = ckpt["iteration"]
        self.best_miou = ckpt["best_miou"]
        self.since_best = ckpt["since_best"]
        self.best_result = ckpt["best_result"]
        self.labeled.load_state_dict(ckpt["samplers"]["labeled"])
        self.unlabeled.load_state_dict(ckpt["samplers"]["unlabeled"])
        if self.gta5_batches is not None and ckpt["samplers"]["gta5"] is not None:
            self.gta5_batches.load_state_dict(ckpt["samplers"]["gta5"])
        window = ckpt.get("log_window") or {"sums": {}, "count": 0}
        self._sums = {k: v.to(self.device) for k, v in window["sums"].items()}
        self._count = int(window["count"])
        self.pending_evaluation = ckpt.get("pending_evaluation")
        states = ckpt.get("rng_ranks") or [ckpt["rng"]]  # one per process of the run that saved it
        saved_world = int(ckpt.get("world_size", len(states)))
        if saved_world != dist.world_size() and dist.is_main():
            print(f"resuming a run of {saved_world} process(es) with {dist.world_size()}: weights, optimiser, memory "
                  f"bank and class balancing continue; data order and random draws are not those of the original "
                  f"run", flush=True)
        if dist.rank() < len(states):
            set_rng_state(states[dist.rank()])

    def save_latest(self, next_iteration: int) -> None:
        """latest.pth: the whole run state after `next_iteration` iterations, written atomically."""
        self.guard.check(self, weights=True)
        state = self.state_dict(next_iteration)
        if dist.is_main():
            save_atomic(state, os.path.join(self.run_dir, "latest.pth"))
        self.latest_saved = next_iteration

    # ------------------------------------------------------------------------------------------ after loop
    @torch.no_grad()
    def refresh_batchnorm(self, model: torch.nn.Module, passes: int) -> None:
        """Forward passes in train mode over unlabeled batches to re-estimate BatchNorm statistics."""
        model.train()
        for _ in range(passes):
            self.stop.poll(self, "the BatchNorm refresh")
            images = self.unlabeled.next()[0]
            with self.autocast():
                model(normalize(images, self.data.mean_rgb, self.data.channel_order))
        dist.average_buffers(model)  # every process refreshed on its own batches

    def finish(self) -> dict:
        """Final checkpoint and evaluation, best model, BatchNorm refresh, evaluation again; returns the best."""
        N = self.num_iterations
        self.val_set = self.final_val_set  # as released: final evaluations by version (v3: full size)
        result = self.evaluate_and_keep_best(N, final=True)
        if dist.is_main():
            save_atomic(self._checkpoint(N, "final", miou=result["miou"]),
                        os.path.join(self.run_dir, f"checkpoint-iter{N}.pth"))
        if self._load_best_into_student() and self.method["bn_refresh_iterations"] > 0:
            self.refresh_batchnorm(self.student_module, self.method["bn_refresh_iterations"])
            refreshed = self.evaluate(self.student_module, N, tag="val_bn_refresh")
            if refreshed["miou"] > self.best_miou and all_finite(self.student_module.state_dict().values()):
                self.best_miou, self.best_result = refreshed["miou"], refreshed
                if dist.is_main() and self.cfg["utils"]["save_best_model"]:
                    save_atomic({"model": self.student_module.state_dict(), "config": self.cfg, "iteration": N,
                                 "miou": refreshed["miou"]}, os.path.join(self.run_dir, "best_model.pth"))
            else:
                self.logger.message("BatchNorm refresh did not improve the best model; keeping it")
        best = self.best_result
        if dist.is_main():
            report = {"best_miou": self.best_miou, "iou": dict(zip(self.data.class_names, best["iou"])),
                      "loss": best["loss"], "iterations": N, "seconds": round(time.time() - self.t_start, 1)}
            with open(os.path.join(self.run_dir, "evaluation.json"), "w") as f:
                json.dump(report, f, indent=2)
            self.logger.message(format_iou_table(torch.tensor(best["iou"]), self.data.class_names))
            self.logger.message(f"best mIoU {100 * self.best_miou:.2f}; total time {time.time() - self.t_start:.1f} s")
        self.stop.end(self)  # closes the logger too
        return best


def main_guard(main) -> None:
    """Run `main`; a user error prints its message and exits 2, without a traceback; a run that stopped on purpose
    (utils/errors.RunStopped: signal, bad file, divergence) prints its message once and exits with its own code.

    Under torchrun a failing rank exits at once (other errors are also recorded for torchrun's failure summary)
    and torchrun stops the other ranks, so the job ends non-zero instead of hanging in a collective. The process
    group is torn down only after success: NCCL's teardown could wait for ranks that will never arrive.
    """
    code = 0
    try:
        dist.run_recording_errors(main)
    except UserError as e:  # RunStopped (a stop on purpose) too: its own prefix and exit code, told by rank 0
        if dist.is_main() or not e.main_only:
            print(f"{e.label}{dist.rank_tag()}: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    if code:  # outside the handler: the run and its frames are released before the interpreter exits
        sys.exit(code)
    dist.cleanup()
