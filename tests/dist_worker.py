"""The program that tests/test_distributed.py starts under torchrun: trainSSL.py with test-only probes.

    python -m torch.distributed.run --nproc_per_node=2 ... tests/dist_worker.py <trainSSL.py arguments>

The probes wrap `Run` methods from the outside (production code has no test hooks). After every iteration each
rank appends one JSON line to $DW_OUT/rank<r>.jsonl with digests of its student, teacher, optimiser, memory bank,
class balancing and class weights, the dataset indices it drew and the memory rows it contributed/received;
every evaluation appends the model digest, confusion matrix and the validation images this rank predicted; once
the run is built, each rank records whether it holds the run directory's lock and whose pid run.lock names.
$DW_FAIL_RANK / $DW_FAIL_ITER make that rank raise after that iteration (the failure test);
$DW_STARVE_RANK / $DW_STARVE_ITER give that rank no valid pixel for the memory update and the contrastive terms in
that iteration (all labels ignored there), as a rank with fewer than two selected pixels of every class has: its
heads and selectors then skip a step the other rank's take;
$DW_BAD_RANK / $DW_BAD_LOAD make that rank's labeled loader fail (a UserError naming a planted file, as a bad
image gives) when it loads its labeled batch number $DW_BAD_LOAD (counted from 0: the batch of that iteration).
$DW_CHECK_COLLECTIVES runs `check_collectives` on the torchrun group before training.
$DW_COUNT_COLLECTIVES=1 records the collectives of every iteration, by operation (torch's profiler sees every c10d
operation, DistributedDataParallel's own all-reduces included): those of the iteration's training steps (from
the learning rate to the end of the optimiser step) and those of the stop decision after it.
$DW_REFERENCE=1 trains a second time after the first run, in the same processes, with the gradient averaging of
before DistributedDataParallel (`reference_average_gradients`, a copy kept here as the oracle, and BatchNorm
buffers averaged after every step), into <run dir>_reference, its records under the prefix "reference_"; both
runs save the student's parameters after their last iteration in $DW_OUT/final_<prefix>rank<r>.pt.
$DW_SHARE_DEVICE=1 puts every rank on the first GPU (LOCAL_RANK 0: two processes on a one-GPU machine);
$DW_BACKEND=gloo starts the process group with that backend before Run does (gloo on CUDA tensors, where NCCL
refuses two ranks on one GPU). benchmarks/gpu_check.py uses both, and `rank_differences` to check the records.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("DW_COUNT_COLLECTIVES"):
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler that counts them: fewer log lines

import torch  # noqa: E402

from engine import distributed as dist  # noqa: E402


def digest(obj) -> str:
    """sha256 of a (nested) state: names, dtypes, shapes and the exact bytes of every tensor."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in x:
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


PREFIX = [""]  # "reference_" while the reference run trains
RUN_DIRS: list[str] = []  # of the runs this process started


def _write(record: dict) -> None:
    with open(os.path.join(os.environ["DW_OUT"], f"{PREFIX[0]}rank{dist.rank()}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def install_probes() -> None:
    from engine import run as training
    run_init, end_iteration, gather_rows = training.Run.__init__, training.Run.end_iteration, training.Run.gather_rows
    evaluate, finish = training.evaluate, training.Run.finish

    def init(self, *args, **kwargs):
        run_init(self, *args, **kwargs)
        RUN_DIRS.append(self.run_dir)
        from engine import run_dir
        lock = os.path.join(self.run_dir, run_dir.LOCK_NAME)  # who holds the run directory (rank 0 only)
        _write({"kind": "lock", "pid": os.getpid(), "holds": os.path.realpath(lock) in run_dir._held,
                "holder": json.load(open(lock))["pid"] if os.path.isfile(lock) else None})
        self._probe = {"labeled": [], "unlabeled": [], "gathered": []}
        for name in ("labeled", "unlabeled"):
            batches = getattr(self, name)
            draw = batches.next

            def next_batch(draw=draw, name=name):
                batch = draw()
                self._probe[name] += batch[2].tolist()  # the dataset indices of this batch
                return batch

            batches.next = next_batch
        if os.environ.get("DW_BAD_RANK") == str(dist.rank()):
            plant_bad_file(self.labeled, int(os.environ["DW_BAD_LOAD"]))

    def gather(self, *tensors):
        out = gather_rows(self, *tensors)
        self._probe["gathered"].append([tensors[0].shape[0], out[0].shape[0]])
        return out

    def end(self, i, terms):
        try:
            end_iteration(self, i, terms)
        finally:  # also the iteration after which a stop ends the run (end_iteration raises RunStopped)
            write_step(self, i)
        if os.environ.get("DW_FAIL_RANK") == str(dist.rank()) and os.environ.get("DW_FAIL_ITER") == str(i):
            raise RuntimeError(f"injected failure on rank {dist.rank()} after iteration {i}")

    def write_step(self, i):
        record = {"kind": "step", "i": i, "lr": self.lr,
                  # BatchNorm statistics averaged over the ranks since this iteration's step (a save or an
                  # evaluation read them): only then are the buffers ("student", "teacher" and the *_buffers
                  # digests) the same on every rank
                  "statistics_agreed": not self.statistics.pending,
                  "optimizer_lr": [g["lr"] for g in self.optimizer.param_groups],
                  "student": digest(self.student_module.state_dict()),
                  "student_params": digest([p for p in self.student_module.parameters()]),
                  "teacher": digest(self.teacher.state_dict()),
                  # every buffer by name (persistent or not), and every parameter, of both networks
                  "student_buffers": buffer_digests(self.student_module),
                  "teacher_buffers": buffer_digests(self.teacher),
                  "student_all_params": digest(dict(self.student_module.named_parameters())),
                  "teacher_all_params": digest(dict(self.teacher.named_parameters())),
                  "sync_batchnorm": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in self.student_module.modules()),
                  "starved": starving(i),
                  "optimizer": digest(self.optimizer.state_dict()["state"]),
                  "memory": digest(self.memory.state_dict()), "memory_counts": self.memory.counts.tolist(),
                  "balancing": digest(self.balancing.state_dict()) if self.balancing is not None else None,
                  "class_weights": digest(self.class_weights), **self._probe}
        self._probe = {"labeled": [], "unlabeled": [], "gathered": []}
        _write(record)

    def evaluate_probe(model, dataset, **kwargs):
        names = []
        inner = kwargs.get("on_prediction")

        def on_prediction(name, image, label, pred):
            names.append(str(name))
            if inner is not None:
                inner(name, image, label, pred)

        kwargs["on_prediction"] = on_prediction
        state = digest(model.state_dict())  # before: evaluation must not change the model
        result = evaluate(model, dataset, **kwargs)
        _write({"kind": "eval", "model": state, "model_after": digest(model.state_dict()), "names": names,
                "confusion": result["confusion"].tolist(), "miou": result["miou"], "loss": result["loss"]})
        return result

    def finish_probe(self):
        params = {name: p.detach().clone() for name, p in self.student_module.named_parameters()}
        torch.save(params, os.path.join(os.environ["DW_OUT"], f"final_{PREFIX[0]}rank{dist.rank()}.pt"))
        return finish(self)

    from utils import ssl_steps
    update_memory, contrastive_term = ssl_steps.update_memory, ssl_steps.contrastive_term
    set_learning_rate, current = training.Run.set_learning_rate, {}

    def set_lr(self, i):
        current["i"] = i  # the iteration the steps run in (they see a StepContext, not the run)
        return set_learning_rate(self, i)

    def starve(labels, ctx):
        return torch.full_like(labels, ctx.ignore_label) if starving(current["i"]) else labels

    ssl_steps.update_memory = lambda ctx, images, labels: update_memory(ctx, images, starve(labels, ctx))
    ssl_steps.contrastive_term = lambda ctx, features, labels: contrastive_term(ctx, features, starve(labels, ctx))
    training.Run.set_learning_rate = set_lr
    training.Run.__init__ = init
    training.Run.gather_rows = gather
    training.Run.end_iteration = end
    training.Run.finish = finish_probe
    training.evaluate = evaluate_probe
    if os.environ.get("DW_COUNT_COLLECTIVES"):
        count_collectives()


def count_collectives() -> None:
    """Each iteration's collectives by c10d operation, in two windows: its training steps (set_learning_rate to
    the end of optimizer_step) and the stop decision after it (GracefulStop.after_iteration)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from engine import run as training
    from engine.graceful_stop import GracefulStop
    set_lr, optimizer_step, after_iteration = (training.Run.set_learning_rate, training.Run.optimizer_step,
                                               GracefulStop.after_iteration)
    state = {}

    def ops(prof) -> dict[str, int]:
        return dict(Counter(e.name for e in prof.events() if e.name.startswith("c10d::")))

    def start():
        state["prof"] = profile(activities=[ProfilerActivity.CPU])
        state["prof"].__enter__()

    def stop() -> dict[str, int]:
        prof = state.pop("prof")
        prof.__exit__(None, None, None)
        return ops(prof)

    def set_lr_probe(self, i):
        start()
        return set_lr(self, i)

    def step_probe(self, i, loss):
        optimizer_step(self, i, loss)
        state["train"] = stop()

    def after_probe(self, run, i, voted=True):
        start()
        try:
            after_iteration(self, run, i, voted)
        finally:
            _write({"kind": "collectives_count", "i": i, "voted": voted, "train": state.pop("train", {}),
                    "stop": stop()})

    training.Run.set_learning_rate = set_lr_probe
    training.Run.optimizer_step = step_probe
    GracefulStop.after_iteration = after_probe


def reference_average_gradients(module: torch.nn.Module) -> None:
    """The gradient averaging the project had before DistributedDataParallel (engine/distributed.average_gradients
    until then), kept as the oracle of tests/test_distributed.py: a parameter with a gradient on some rank is
    averaged with zeros from the ranks without one (which get a zero gradient tensor); a parameter with a gradient
    on no rank keeps `grad None`. One all-reduce per parameter (the original bucketed them: the same sums)."""
    params = [p for p in module.parameters() if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    torch.distributed.all_reduce(has_grad)
    for p, n in zip(params, has_grad.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(dist.world_size())


def use_reference_averaging() -> None:
    """Train as the project did before DistributedDataParallel: the script's steps called directly (no gradient
    pass module), the gradients averaged after backward by `reference_average_gradients`, BatchNorm buffers
    averaged after every step."""
    from engine import ddp_step
    from engine import run as training
    from utils.ema import ema_alpha, update_teacher

    def optimizer_step(self, i, loss):  # Run.optimizer_step as it was, with the averaging of then
        self.optimizer.zero_grad(set_to_none=False)
        self.scaler.scale(loss).backward()
        reference_average_gradients(self.student_module)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.alpha = ema_alpha(i, self.num_iterations, self.variant.ema_warmup_div)
        update_teacher(self.teacher, self.student_module, self.alpha)
        dist.average_buffers(self.student_module, self.teacher)

    ddp_step.GradientPass.__call__ = lambda self, steps, *args: steps(*args)
    training.Run.optimizer_step = optimizer_step


def plant_bad_file(batches, bad: int) -> None:
    """Loading labeled batch number `bad` (from 0) fails as an unreadable image does, the batches before it load."""
    from utils.errors import UserError
    load, loaded = batches._load, [0]

    def failing_load():
        if loaded[0] == bad:
            raise UserError(f"cannot read image /data/planted_bad_{bad}.png: planted")
        loaded[0] += 1
        return load()
    batches._load = failing_load


def starving(i: int) -> bool:
    """Whether this rank has no valid pixel for the memory and the contrastive terms in iteration i."""
    return os.environ.get("DW_STARVE_RANK") == str(dist.rank()) and os.environ.get("DW_STARVE_ITER") == str(i)


def buffer_digests(module: torch.nn.Module) -> dict[str, str]:
    """A short digest of every buffer of `module` by name (running statistics and step counters)."""
    return {name: digest(b)[:16] for name, b in module.named_buffers()}


def check_collectives() -> None:
    """The helpers of engine/distributed.py against values worked out by hand, on the 2-process group that
    torchrun started (run before training when $DW_CHECK_COLLECTIVES is set). Raises AssertionError."""
    from torch import nn

    from utils.class_balancing import ClassBalancing

    rank = dist.rank()
    assert dist.is_distributed() and dist.world_size() == 2 and dist.local_rank() == rank

    # all_gather_rows: 0 rows on rank 0, 3 on rank 1 -> rank 1's rows on both, with their labels
    n = 3 * rank
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * rank
    y = torch.arange(n, dtype=torch.int64) + 10 * rank
    gx, gy = dist.all_gather_rows(x, y)
    assert gx.tolist() == [[100.0, 101.0], [102.0, 103.0], [104.0, 105.0]], gx
    assert gy.tolist() == [10, 11, 12] and gy.dtype == torch.int64
    # 2 rows and 1 row -> rank order
    x = torch.full((2 - rank, 3), float(rank))
    (gx,) = dist.all_gather_rows(x)
    assert gx.tolist() == [[0.0] * 3, [0.0] * 3, [1.0] * 3], gx
    # nothing anywhere
    gx, gy = dist.all_gather_rows(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert gx.shape == (0, 4) and gy.shape == (0,)

    # reference_average_gradients (the oracle of the DDP comparison): a on both ranks, b on rank 1 only, c nowhere,
    # frozen f untouched
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(2, 2))
    m.b = nn.Parameter(torch.ones(3))
    m.c = nn.Parameter(torch.ones(2))
    m.f = nn.Parameter(torch.ones(1), requires_grad=False)
    m.a.grad = torch.full((2, 2), 1.0 + 2 * rank)          # 1 and 3 -> 2
    if rank == 1:
        m.b.grad = torch.tensor([2.0, 4.0, 6.0])            # -> [1, 2, 3]
    reference_average_gradients(m)
    assert m.a.grad.tolist() == [[2.0, 2.0], [2.0, 2.0]], m.a.grad
    assert m.b.grad.tolist() == [1.0, 2.0, 3.0], m.b.grad
    assert m.c.grad is None and m.f.grad is None  # so SGD skips c (no weight decay, no momentum), as 1 process
    # the next step, after zero_grad(set_to_none=False) as in Run.optimizer_step: b holds zero gradients on both
    # ranks and takes part (weight decay and momentum, as in one process); c still has none anywhere
    for p in (m.a, m.b):
        p.grad.zero_()
    m.a.grad += 2.0 * rank                                  # 0 and 2 -> 1
    reference_average_gradients(m)
    assert m.a.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]] and m.b.grad.tolist() == [0.0, 0.0, 0.0], m.b.grad
    assert m.c.grad is None

    # average_buffers: running stats averaged; the step counters take the largest: a BatchNorm that ran on one rank
    # only (rank 1 here: 9 steps against 7) counts the step on both
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(float(rank))                      # 0, 1 -> 0.5
    bn.running_var.fill_(1.0 + 2 * rank)                    # 1, 3 -> 2
    bn.num_batches_tracked.fill_(7 + 2 * rank)              # 7, 9 -> 9
    bn.weight.data.fill_(float(rank))                       # a parameter: not a buffer
    dist.average_buffers(bn, bucket_numel=1)
    assert bn.running_mean.tolist() == [0.5, 0.5] and bn.running_var.tolist() == [2.0, 2.0]
    assert int(bn.num_batches_tracked) == 9 and bn.weight.tolist() == [float(rank)] * 2

    # broadcast_parameters: rank 0's parameters and buffers
    dist.broadcast_parameters(bn)
    assert bn.weight.tolist() == [0.0, 0.0]

    assert dist.all_gather_object({"r": rank}) == [{"r": 0}, {"r": 1}]
    assert dist.broadcast_object(f"from {rank}") == "from 0"

    # class balancing with the counts summed over ranks: both ranks hold the histories of the global batch
    cb = ClassBalancing(3, labeled_slots=1, unlabeled_slots=2, reduce=dist.all_reduce_sum)
    labels = torch.tensor([[0, 0, 1, 9]]) if rank == 0 else torch.tensor([[2, 2, 2, 0]])
    pseudo = torch.tensor([[1, 1]]) if rank == 0 else torch.tensor([[1, 2]])
    w = cb.update(labels, pseudo)
    assert cb.labeled.tolist() == [[3, 1, 3]] and cb.unlabeled.tolist() == [[0, 3, 1], [0, 0, 0]], cb.labeled
    assert w.tolist() == [1.0, 1.0, 1.0]                   # unlabeled history not full yet
    w = cb.update(None, torch.tensor([[0, 0]]) if rank == 0 else torch.tensor([[0, 2]]))
    # f = [3,1,3] + [0,3,1] + [3,0,1] = [6,4,5]; median 5 -> sqrt(5/6), sqrt(5/4), 1
    assert torch.allclose(w, torch.tensor([(5 / 6) ** 0.5, (5 / 4) ** 0.5, 1.0])), w


STATE_KEYS = ("student", "teacher", "student_buffers", "teacher_buffers", "student_all_params", "teacher_all_params",
              "optimizer", "memory", "balancing", "class_weights", "lr", "optimizer_lr")
# the keys that hold BatchNorm buffers: per rank between two reads, the same on every rank where they are read
BUFFER_KEYS = ("student", "teacher", "student_buffers", "teacher_buffers")


def compared_keys(per_rank: list[dict]) -> tuple[str, ...]:
    """The STATE_KEYS to compare across the ranks' records of one iteration: all of them once the BatchNorm
    statistics were agreed in that iteration (records without the flag: always), else those without buffers."""
    agreed = all(r.get("statistics_agreed", True) for r in per_rank)
    return STATE_KEYS if agreed else tuple(k for k in STATE_KEYS if k not in BUFFER_KEYS)


def rank_differences(records: list[list[dict]], iterations: int) -> list[str]:
    """What breaks the rank-identical state in the per-rank records (one list per rank, read from
    $DW_OUT/rank<r>.jsonl): every rank must have a step record for iterations 0..iterations-1, the same
    digests of student and teacher parameters, optimiser, memory bank, class balancing, class weights and learning
    rate after every step (and of the BatchNorm buffers after the steps that averaged them: `compared_keys`),
    disjoint labeled batches, and memory updates that received every rank's rows. [] when all holds."""
    problems = []
    steps = [[r for r in rank if r["kind"] == "step"] for rank in records]
    for r, rank_steps in enumerate(steps):
        if [s["i"] for s in rank_steps] != list(range(iterations)):
            problems.append(f"rank {r} recorded iterations {[s['i'] for s in rank_steps]}, "
                            f"expected 0..{iterations - 1}")
    if problems or len(steps) < 2:
        return problems or [f"{len(steps)} rank(s) recorded, expected at least 2"]
    for per_rank in zip(*steps):
        i = per_rank[0]["i"]
        for key in compared_keys(per_rank):
            if len({json.dumps(s[key]) for s in per_rank}) > 1:
                names = ""
                if key.endswith("_buffers"):  # which buffers, by name
                    differing = sorted(k for k in per_rank[0][key] if len({json.dumps(s[key].get(k))
                                                                           for s in per_rank}) > 1)
                    names = f": {', '.join(differing[:6])}{' ...' if len(differing) > 6 else ''}"
                problems.append(f"{key} differs between the ranks after iteration {i}{names}")
        labeled = [set(s["labeled"]) for s in per_rank]
        if any(a & b for k, a in enumerate(labeled) for b in labeled[k + 1:]):
            problems.append(f"ranks drew the same labeled images in iteration {i}")
        for events in zip(*(s["gathered"] for s in per_rank)):
            sent = sum(n for n, _ in events)
            if any(got != sent for _, got in events):
                problems.append(f"memory update of iteration {i}: ranks sent {sent} rows in all but received "
                                f"{[got for _, got in events]}")
    return problems


if __name__ == "__main__":
    import trainSSL
    from engine.entry import main_guard
    if os.environ.get("DW_SHARE_DEVICE") == "1":
        os.environ["LOCAL_RANK"] = "0"  # engine.run.choose_device takes cuda:<LOCAL_RANK> under torchrun
    if os.environ.get("DW_BACKEND"):
        from datetime import timedelta
        timeout = timedelta(minutes=float(os.environ.get("SSL_DIST_TIMEOUT_MIN", 30)))
        torch.distributed.init_process_group(backend=os.environ["DW_BACKEND"], timeout=timeout)
    if os.environ.get("DW_CHECK_COLLECTIVES"):
        dist.init_distributed(torch.device("cpu"))  # the group Run would start; Run then finds it started
        check_collectives()
        _write({"kind": "collectives", "ok": True})
    install_probes()

    def main():
        result = trainSSL.main(sys.argv[1:])
        if os.environ.get("DW_REFERENCE"):
            run_dir = RUN_DIRS[-1]
            PREFIX[0] = "reference_"
            use_reference_averaging()
            result = trainSSL.main(sys.argv[1:] + ["--set", f"utils.checkpoint_dir={run_dir}_reference"])
        return result
    main_guard(main)
