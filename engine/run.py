"""The run of a training script: its state, in one object that a checkpoint can hold, and the services of its loop.

`Run` loads the config, builds data, student, teacher, memory bank, class balancing and optimiser, and offers the
bookkeeping around the method's steps (learning rate, optimiser step + EMA, logging, evaluation, checkpoints, exact
resume, the final BatchNorm refresh). The method itself — the order of the steps — is written out in each training
script; the steps are in `utils/ssl_steps.py` and see the run only through `Run.step_context`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext

import torch

from data import build_data, build_source
from data.check_files import check_files
from data.common import parse_size
from data.sampler import InfiniteBatches
from engine import batchnorm, run_state
from engine import distributed as dist
from engine.batchnorm import BatchNormStatistics
from engine.checkpoint import load_checkpoint, model_state_from, save_atomic
from engine.cli import build_arg_parser, choose_device, config_required_for
from engine.config import fidelity
from engine.ddp_step import GradientPass
from engine.evaluation import evaluate
from engine.fault_guard import NonFiniteGuard, all_finite
from engine.graceful_stop import GracefulStop
from engine.log_window import add_terms, window_means
from engine.logger import TrainLogger
from engine.networks import build_optimizer, build_student, student_forward
from engine.plan import print_plan
from engine.resume import claim, load_config_and_checkpoint
from engine.run_dir import release, run_directory, write_run_files
from engine.rng import seed_everything, set_determinism
from engine.visualize import log_unlabeled_panels, validation_panel
from model.checkpoint_io import load_state_strict
from utils.class_balancing import ClassBalancing
from utils.ema import create_teacher, ema_alpha, ema_momentum, update_teacher
from utils.memory_bank import MemoryBank, format_fill, per_class_quota
from utils.metrics import format_iou_table
from utils.schedules import poly_lr, set_lr
from utils.ssl_steps import StepContext
from utils.variants import Variant, resolve_method


class Run:
    """All state of one training run (student, teacher, optimiser, memory bank, class balancing, samplers,
    iteration, best mIoU) and the bookkeeping around the method's steps."""

    def __init__(self, variant: Variant, argv: list[str] | None = None, description: str = ""):
        self.t_start = time.time()
        self.variant = variant
        self.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command printed on a stop
        parser = build_arg_parser(description or variant.name, gta5=variant.uses_gta5,
                                  config_required=config_required_for(self.argv))
        self.args = parser.parse_args(self.argv)
        if self.args.check_files and not self.args.dry_run or self.args.recover and not self.args.resume:
            parser.error("--check-files goes with --dry-run, --recover with --resume")
        self.device = choose_device(self.args.device)
        dist.init_distributed(self.device)
        # the config, the run directory (checked, and held by this run) and the checkpoint to continue, if any
        self.cfg, self.cfg_source, resume_ckpt, seen = load_config_and_checkpoint(self.args, variant, self.argv)
        cfg, t, dry_run = self.cfg, self.cfg["training"], self.args.dry_run
        self.fidelity = fidelity(cfg)
        self.method = resolve_method(cfg, variant)
        self.run_dir = run_directory(cfg, None)  # utils.run_name is resolved: one directory per config
        # steps of the loop: 2N in trainSSL_less_memory.py, where every schedule counts steps (utils/variants.py)
        self.num_iterations = t["num_iterations"] * variant.steps_per_iteration
        self.crop = parse_size(t["data"]["input_size"], "training.data.input_size")
        self.batch_size = t["batch_size"]
        seed_everything(cfg["seed"])
        set_determinism(cfg["utils"]["deterministic"])

        # Data: labeled subset, unlabeled rest, validation (and GTA5 for domain adaptation). The domain-adaptation
        # script reads Cityscapes at half size with v3 too, and then evaluates at full size only after training.
        self.half_size = variant.cityscapes_half_size and cfg["version"] != "2" and cfg["dataset"] == "cityscapes"
        self.data = build_data(cfg, self.args.data_root, cityscapes_half_size=self.half_size,
                               check_pairs=not self.args.check_files)  # --check-files lists both splits' bad files
        # the set evaluations use: the periodic one now, the final one in finish()
        self.val_set = self.data.val
        self.final_val_set = build_data(cfg, self.args.data_root, split=False).val if self.half_size else self.data.val
        self.num_classes = self.data.num_classes
        self.ignore_label = self.data.ignore_label
        self.drop_background = self.data.name == "pascal_voc"
        # the labeled source of domain adaptation: GTA5 for Cityscapes, the other style for synthetic scenes
        self.gta5 = build_source(cfg, self.args.gta5_root or t["data"]["gta5_root"]) if variant.uses_gta5 else None

        # Networks: student, EMA teacher (the pseudo-labeler: the teacher or the student in eval mode), optimiser.
        self.student_module = build_student(cfg, variant, self.num_classes, self.device, self.fidelity, dry_run)
        self.student = student_forward(self.student_module, cfg, dry_run)
        self._new_teacher()
        self.optimizer, self.base_lr = build_optimizer(self.student_module, cfg)
        self.precision = cfg["precision"]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

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
        self.unlabeled = InfiniteBatches(self.data.train, self.data.unlabeled_idx, self.batch_size // 2, seed=seed + 1,
                                         source=("unlabeled images", "the training set beyond the labeled ones"),
                                         **common)
        self.gta5_batches = None
        if self.gta5 is not None:
            self.gta5_batches = InfiniteBatches(self.gta5, list(range(len(self.gta5))), self.batch_size,
                                                seed=seed + 2, source=("source images", "synthetic.num_source, or "
                                                                       "the GTA5 folder"), **common)

        self.start_iteration = 0
        self.best_miou = -1.0
        self.since_best = 0
        self.best_result: dict | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}  # iterations of the window in which each term was computed
        self._count = 0
        self.pending_evaluation: int | None = None  # an evaluation a stop interrupted (engine/graceful_stop.py)
        self.latest_saved: int | None = None  # iterations in the latest.pth this process wrote last
        if dry_run:
            print_plan(self)
            if self.args.check_files:
                extra = {"GTA5": self.gta5} if self.gta5 is not None else {}
                check_files({"train": self.data.train, "val": self.data.val, **extra})  # lists every bad file
            return
        claim(self.run_dir, self.args, seen)  # held by this run from now on (engine/run_dir.py)
        # Different augmentation draws on every process, identical networks (already broadcast); a resumed run
        # then restores each process's own RNG state (load_state_dict).
        seed_offset = dist.rank() * 1000003
        if seed_offset:
            seed_everything(seed + seed_offset)
        if resume_ckpt is not None:
            self.load_state_dict(resume_ckpt)
        # run.gradient_pass(steps, *args): steps 6-10 as one forward, DDP's under torchrun (engine/ddp_step.py)
        self.gradient_pass = GradientPass(self.student_module, self.device, vote=lambda: self.stop.vote())
        self.statistics = BatchNormStatistics(lambda: (self.student_module, self.teacher))  # averaged where read
        self.logger = TrainLogger(self.run_dir, self.num_iterations, self.start_iteration, enabled=dist.is_main(),
                                  tensorboard=cfg["utils"]["tensorboard"], curves=cfg["utils"]["curves"])
        if dist.is_main():
            write_run_files(self.run_dir, cfg, self.data.train_names, self.data.labeled_idx)
        self.logger.message(f"{variant.name}: {self.data.name} v{cfg['version']} ({t['pretraining']}), "
                            f"{labeled_samples} labeled / {len(self.data.unlabeled_idx)} unlabeled, "
                            f"{self.num_iterations} iterations from {self.start_iteration}, device {self.device}"
                            f"{f' x{dist.world_size()} processes' if dist.is_distributed() else ''}, "
                            f"fidelity {cfg['fidelity']}, precision {self.precision}, run dir {self.run_dir}")
        self.guard = NonFiniteGuard(self)  # NaN/Inf loss terms or weights: stop before anything is written
        self.stop = GracefulStop(self.device)  # SIGTERM/SIGINT, a bad file: write latest.pth, then stop
        self.stop.install()

    # ----------------------------------------------------------------------------------------------- set-up
    def _new_teacher(self) -> None:
        """The one place the teacher and the pseudo-labeler are set: a fresh EMA copy of the student; the labeler is
        that teacher, or the student (in eval mode) with training.use_teacher_train false."""
        self.teacher = create_teacher(self.student_module)
        self.labeler = self.teacher if self.cfg["training"]["use_teacher_train"] else self.student_module

    def step_context(self) -> StepContext:
        """What the method's steps may touch this iteration (utils/ssl_steps.py)."""
        d = self.data
        return StepContext(student=self.student, student_module=self.student_module, teacher=self.teacher,
                           labeler=self.labeler, memory=self.memory, method=self.method, fidelity=self.fidelity,
                           memory_quota=self.memory_quota, num_classes=self.num_classes,
                           ignore_label=self.ignore_label, drop_background=self.drop_background, crop=self.crop,
                           mean_rgb=d.mean_rgb, channel_order=d.channel_order, autocast=self.autocast,
                           gather_rows=self.gather_rows)

    def iterations(self) -> range:
        self.stop.before_loop(self)  # an evaluation interrupted by a stop is done first; batches loaded ahead
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
        if self.labeler is self.student_module:  # its eval-mode pseudo-labels read the BatchNorm statistics
            self.statistics.agree()
        return lr

    def periodic_evaluation_after(self, i: int) -> bool:
        """The one rule of the periodic evaluation: after iteration i > 0 every utils.val_per_iter iterations."""
        return i > 0 and i % self.cfg["utils"]["val_per_iter"] == 0

    def evaluation_due(self, i: int) -> bool:
        """Whether an evaluation follows iteration i (periodic, or the final one after the loop)."""
        return self.periodic_evaluation_after(i) or i == self.num_iterations - 1

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

    def gather_rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows from every process (memory-bank vectors), so every process holds the same bank."""
        return dist.all_gather_rows(*tensors)

    def memory_active(self, i: int) -> bool:
        m = self.method
        return m["use_contrastive"] and i > m["ramp_up_iterations"] - m["memory_start_offset"]

    def contrastive_active(self, i: int) -> bool:
        return self.method["use_contrastive"] and i > self.method["ramp_up_iterations"]

    def optimizer_step(self, i: int, loss: torch.Tensor) -> None:
        """Step 11: one backward (DDP averages the gradients over processes as it goes), one SGD step, then the
        teacher's EMA.

        Gradients are zeroed, not freed (torch 1.6's `zero_grad()`, as released): a parameter that ever had a
        gradient keeps getting weight decay and momentum on steps whose loss does not reach it."""
        self.optimizer.zero_grad(set_to_none=False)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.alpha = ema_alpha(i, self.num_iterations, self.variant.ema_warmup_div)
        update_teacher(self.teacher, self.student_module, self.alpha)
        self.statistics.changed()  # BatchNorm statistics of this rank's batches: averaged when next read

    def end_iteration(self, i: int, terms: dict[str, torch.Tensor]) -> None:
        """Step 12: logging at intervals, checkpoints, evaluation and the return to the best weights; then a stop
        (signal, bad file in the next batches) writes latest.pth and ends the run (engine/graceful_stop.py)."""
        u = self.cfg["utils"]
        add_terms(self._sums, self._counts, terms)  # each term counted where computed (engine/log_window.py)
        self._count += 1
        self.logger.advance(i)
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
        if not self.periodic_evaluation_after(i):
            return False
        best_before = self.best_miou
        with self.stop.pending_evaluation(self, i):
            self.evaluate_and_keep_best(i)
            if self.since_best > self.num_iterations / 5:
                self.return_to_best(i)
        return self.best_miou != best_before and u["save_best_model"]

    def _log(self, i: int) -> None:
        self.guard.check(self)
        values = window_means(self._sums, self._counts)  # fixed order; over processes; one sync per row
        values.update(lr=self.lr, ema_alpha=getattr(self, "alpha", 0.0),
                      ema_momentum=ema_momentum(i, self.num_iterations))
        self._sums, self._counts, self._count = {}, {}, 0
        self.logger.scalars(i, values)
        self.logger.vector(i, "class_weights", self.class_weights.tolist(), self.data.class_names)
        self.logger.vector(i, "memory_fill", self.memory.counts.tolist(), self.data.class_names)

    # ------------------------------------------------------------------------------ evaluation, checkpoints
    def evaluate(self, model: torch.nn.Module, i: int, tag: str = "val") -> dict:
        """Evaluate on `self.val_set` (the final validation set once finish() has begun) and log the result."""
        self.statistics.agree()
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
                          autocast=self.autocast, on_prediction=keep_image,
                          num_workers=self.cfg["training"]["num_workers"])
        self.logger.scalars(i, {"miou": result["miou"], "loss": result["loss"]}, prefix=tag, print_line=False)
        self.logger.vector(i, f"{tag}_iou", result["iou"], d.class_names)
        for k, picture in enumerate(shown):  # image | ground truth | prediction
            self.logger.images(i, f"{tag}_images/{k}", picture.unsqueeze(0))
        views = self.__dict__.pop("_unlabeled_views", None)
        if views is not None and n_images:
            log_unlabeled_panels(self.logger, i, views, n_images, d.palette, self.ignore_label, d.channel_order)
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
        """Every model checkpoint (latest.pth, the run state, is `state_dict`): "periodic", "best" (during the
        loop), "final" (after it) and "refreshed" (the best model after the BatchNorm refresh, without optimiser)."""
        ckpt = {"model": self._model_for_saving(kind).state_dict(), "config": self.cfg}
        if kind != "refreshed":
            ckpt["optimizer"] = self.optimizer.state_dict()
        return {**ckpt, "iteration": i, **extra}

    def save_periodic(self, i: int) -> None:
        self.statistics.agree()
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
        self.statistics.agree()
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
            self._new_teacher()
            self.logger.message(f"iteration {i}: no improvement for {self.since_best} iterations, "
                                f"back to the best model (mIoU {100 * self.best_miou:.2f})")
        self.since_best = 0

    def state_dict(self, iteration: int) -> dict:
        """The whole run state after `iteration` iterations, enough to continue bit-identically (latest.pth)."""
        return run_state.capture(self, iteration)

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from a run state, or from a model checkpoint's weights and optimiser (engine/run_state.py)."""
        run_state.restore(self, ckpt)

    def save_latest(self, next_iteration: int) -> None:
        """latest.pth: the whole run state after `next_iteration` iterations, written atomically."""
        self.statistics.agree()
        self.guard.check(self, weights=True)
        state = self.state_dict(next_iteration)
        if dist.is_main():
            save_atomic(state, os.path.join(self.run_dir, "latest.pth"))
        self.latest_saved = next_iteration

    # ------------------------------------------------------------------------------------------ after loop
    def finish(self) -> dict:
        """Final checkpoint and evaluation, best model, BatchNorm refresh, evaluation again; returns the best."""
        N = self.num_iterations
        self.val_set = self.final_val_set  # as released: final evaluations by version (v3: full size)
        result = self.evaluate_and_keep_best(N, final=True)
        if dist.is_main():
            save_atomic(self._checkpoint(N, "final", miou=result["miou"]),
                        os.path.join(self.run_dir, f"checkpoint-iter{N}.pth"))
        if self._load_best_into_student() and self.method["bn_refresh_iterations"] > 0:
            batchnorm.refresh(self, self.student_module, self.method["bn_refresh_iterations"])
            refreshed = self.evaluate(self.student_module, N, tag="val_bn_refresh")
            if refreshed["miou"] > self.best_miou and all_finite(self.student_module.state_dict().values()):
                self.best_miou, self.best_result = refreshed["miou"], refreshed
                if dist.is_main() and self.cfg["utils"]["save_best_model"]:
                    save_atomic(self._checkpoint(N, "refreshed", miou=refreshed["miou"]),
                                os.path.join(self.run_dir, "best_model.pth"))
            else:
                self.logger.message("BatchNorm refresh did not improve the best model; keeping it")
        best = self.best_result
        if dist.is_main():
            report = {"best_miou": self.best_miou, "iou": dict(zip(self.data.class_names, best["iou"])),
                      "loss": best["loss"], "iterations": N, "seconds": round(time.time() - self.t_start, 1)}
            with open(os.path.join(self.run_dir, "evaluation.json"), "w") as f:
                json.dump(report, f, indent=2)
            self.logger.message(format_iou_table(torch.tensor(best["iou"]), self.data.class_names))
            self.logger.message(format_fill(self.memory, self.data.class_names, self.method["use_contrastive"]))
            self.logger.message(f"best mIoU {100 * self.best_miou:.2f}; total time {time.time() - self.t_start:.1f} s")
        self.stop.end(self)  # closes the logger too
        release(self.run_dir)
        return best
