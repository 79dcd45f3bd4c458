"""trainSSL_less_memory.py and trainSSL_domain_adaptation_targetCity.py end to end on tiny trees (SPEC section 9).

Each script runs a few iterations of a depth-18, randomly initialised network on CPU with a ramp-up of R = 2 and
the memory active from the first iteration, so every phase (memory, contrastive terms, evaluation, checkpoints,
BatchNorm refresh) happens. A spy wraps the run's batch sources and the steps of utils/ssl_steps.py to record, per
iteration, what the script drew and did; the expected schedules below are written out by hand.
"""
import json
import math
import os
from contextlib import contextmanager

import pytest
import torch

import trainSSL
import trainSSL_domain_adaptation_targetCity as da_script
import trainSSL_less_memory as less_memory
from tests.fixtures_data import make_cityscapes_tree, make_gta5_tree, make_voc_tree
from tests.run_helpers import TINY_WIDTH, TeacherProbe
from utils import ssl_steps
from utils.errors import UserError
from engine.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITY_CONFIG = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_imagenet.json")
VOC_CONFIG = os.path.join(ROOT, "configs", "configSSL_pascal_1_50_split2_COCO_reduced.json")

R = 2  # method.ramp_up_iterations: contrastive terms from i = 3 on
# Train ids of the label ids the Cityscapes fixture writes (road 7->0, sidewalk 8->1, building 11->2, pole 17->5,
# vegetation 21->8, sky 23->10, person 24->11, car 26->13; ids 0, 1 and 255 are ignored). GTA5 labels use 0..18.
CITY_CLASSES = {0, 1, 2, 5, 8, 10, 11, 13}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads make these tiny convolutions several times
    slower (measured 0.2 s vs 1.5 s per forward+backward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def overrides(run_dir: str, iterations: int, **extra) -> list[str]:
    """The paper config scaled down to a few CPU iterations with every phase active."""
    sets = {
        "backbone.depth": 18, "backbone.pretrained": "none", "backbone.width": TINY_WIDTH,
        "training.batch_size": 2, "training.num_workers": 0, "training.num_iterations": iterations,
        "training.learning_rate": 0.001, "training.data.labeled_samples": 4, "training.data.input_size": "33,49",
        "method.ramp_up_iterations": R, "method.memory_start_offset": R + 1, "method.memory_confidence": 0.0,
        "method.bn_refresh_iterations": 1,
        # the paper configs' split ids 0/1/2 are the release's splits of the full datasets: random ones here
        "training.data.split_id_list": -1,
        "utils.checkpoint_dir": run_dir, "utils.run_name": "", "utils.val_per_iter": 3, "utils.save_checkpoint_every": 4,
        "utils.save_latest_every": 6, "utils.log_every": 1, "utils.tensorboard": False, "utils.curves": False,
        **extra,
    }
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return out


def classes_of(labels: torch.Tensor, num_classes: int) -> set[int]:
    return {int(c) for c in torch.unique(labels) if 0 <= int(c) < num_classes}


class Spy:
    """Records, per iteration, the batches a real run draws and the steps it calls.

    Wraps the Run's batch sources, learning-rate setter (which marks the start of iteration i), class-weight
    update and return to the best model, the step functions of utils/ssl_steps.py (the scripts call them through
    the module) and the scripts' labeled / unlabeled loss terms (which mark the phase). `stop`
    ends the loop early (iterations start..stop-1 of an N-iteration run), so schedules that depend on N can be
    observed without running N iterations. Batch sources are named "labeled" (the run's labeled subset: the
    Cityscapes one in domain adaptation), "gta5" and "unlabeled".
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop: int | None = None):
        self.run: Run | None = None
        self.i: int | str | None = None   # iteration in progress; "after" once the loop has finished
        self.phase: str | None = None     # "labeled" / "unlabeled": which half of the method is running
        self.events: list[tuple] = []     # (iteration, kind, detail)
        self.stop = stop
        self.scripted_miou: dict[int, float] = {}  # validation mIoU to report instead of the real one, by iteration
        spy = self
        orig_init = Run.__init__

        def init(run, *args, **kwargs):
            orig_init(run, *args, **kwargs)
            spy._attach(run)

        monkeypatch.setattr(Run, "__init__", init)
        for name in ("pseudo_label", "augment_labeled", "augment_unlabeled", "update_memory", "contrastive_term",
                     "unlabeled_losses"):
            monkeypatch.setattr(ssl_steps, name, getattr(self, "_" + name)(getattr(ssl_steps, name)))
        for module in (trainSSL, less_memory):  # (the less-memory script takes labeled_terms from trainSSL.py)
            for name, phase in (("labeled_terms", "labeled"), ("unlabeled_terms", "unlabeled")):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, self._phase(phase, getattr(module, name)))

    def at(self, kind: str) -> list[tuple]:
        """(iteration, detail) of every event of `kind` inside the loop."""
        return [(i, d) for i, k, d in self.events if k == kind and i != "after"]

    def _record(self, kind: str, detail=None) -> None:
        self.events.append((self.i, kind, detail))

    def _attach(self, run: Run) -> None:
        self.run = run
        set_lr, update_cw, finish, back = run.set_learning_rate, run.update_class_weights, run.finish, run.return_to_best

        def set_learning_rate(i):
            self.i, self.phase = i, None
            return set_lr(i)

        def update_class_weights(i, labels, pseudo, after_ramp_up=True):
            self._record("class_weights", (labels is not None, pseudo is not None, after_ramp_up))
            return update_cw(i, labels, pseudo, after_ramp_up)

        def return_to_best(i):
            self._record("return_to_best")
            return back(i)

        def finish_():
            self.i = "after"
            return finish()

        run.set_learning_rate, run.update_class_weights, run.finish = set_learning_rate, update_class_weights, finish_
        run.return_to_best = return_to_best
        if self.stop is not None:
            run.iterations = lambda: range(run.start_iteration, min(run.num_iterations, self.stop))
        evaluate = run.evaluate

        def evaluate_(model, i, tag="val"):
            result = evaluate(model, i, tag)
            if tag == "val" and self.i != "after" and i in self.scripted_miou:
                result = {**result, "miou": self.scripted_miou[i]}
            return result

        run.evaluate = evaluate_
        # the teacher after every step against the EMA of the student with alpha by hand
        probe = TeacherProbe(run, div=1, other_div=10)  # the warm-up 1 - 1/(i + 1) of both scripts
        self.ema_deviation = probe.deviation
        sources = {"labeled": run.labeled, "unlabeled": run.unlabeled, "gta5": run.gta5_batches}
        for source, batches in sources.items():
            if batches is not None:
                batches.next = self._draw(source, batches.next)

    def _draw(self, source, next_):
        def draw():
            batch = next_()
            classes = classes_of(batch[1], self.run.num_classes) if source != "unlabeled" else None
            self._record("draw", (source, classes))
            return batch
        return draw

    def _pseudo_label(self, f):
        def wrapped(run, unlabeled):
            self._record("pseudo_label")
            return f(run, unlabeled)
        return wrapped

    def _phase(self, phase, f):
        def wrapped(*args, **kwargs):
            self.phase = phase
            return f(*args, **kwargs)
        return wrapped

    def _augment_labeled(self, f):
        def wrapped(*args, **kwargs):
            self._record("augment_labeled")
            return f(*args, **kwargs)
        return wrapped

    def _augment_unlabeled(self, f):
        def wrapped(*args, **kwargs):
            self._record("augment_unlabeled")
            return f(*args, **kwargs)
        return wrapped

    def _update_memory(self, f):
        def wrapped(run, images, labels):
            before = run.memory.memory.clone()
            f(run, images, labels)
            changed = (run.memory.memory != before).flatten(1).any(1)
            self._record("update_memory", {"label_classes": classes_of(labels, run.num_classes),
                                           "changed": {c for c in range(run.num_classes) if changed[c]}})
        return wrapped

    def _contrastive_term(self, f):
        def wrapped(run, features, labels):
            value = f(run, features, labels)
            self._record("contrastive", (self.phase, float(value.detach()), classes_of(labels, run.num_classes)))
            return value
        return wrapped

    def _unlabeled_losses(self, f):
        def wrapped(run, i, logits, pseudo, *args, **kwargs):
            broadcast = args[2] if len(args) > 2 else kwargs["broadcast_entropy_mask"]
            loss_pseudo, loss_entropy = f(run, i, logits, pseudo, *args, **kwargs)
            with torch.no_grad():  # the entropy term written out as released: per image, and with the mask
                n, c, h, w = logits.shape  # [n,1,h,w] broadcast against the per-pixel sums [n,h,w] -> [n,n,h,w]
                q = torch.softmax(logits, dim=1)
                plogq = (q * torch.log2(q + 1e-30)).sum(dim=1)
                mask = (pseudo != run.ignore_label).float()
                scale = n * h * w * math.log2(c) * mask.mean()
                per_image = float(-(mask * plogq).sum() / scale)
                broadcast_form = float(-(mask.unsqueeze(1) * plogq).sum() / scale)
            self._record("entropy", {"broadcast": bool(broadcast), "term": float(loss_entropy.detach()),
                                     "per_image": per_image, "broadcast_form": broadcast_form})
            return loss_pseudo, loss_entropy
        return wrapped


def train_rows(run_dir: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    return {r["iteration"]: r for r in rows if r["kind"] == "train"}


def ema_alpha_by_hand(i: int, n: int, div: int) -> float:
    return min(1 - 1 / (div * i + 1), 1 - 0.005 * (math.cos(math.pi * i / n) + 1) / 2)


def assert_run_outputs(run_dir: str, last_iteration: int, num_classes: int, scripted: dict | None = None) -> None:
    """The run's files, and evaluation.json's best mIoU = the best of the evaluations: as logged, except where the
    spy scripted the mIoU the run saw (`scripted`, by iteration)."""
    scripted = scripted or {}
    for name in ("best_model.pth", "latest.pth", "config.json", "train_split.txt", "evaluation.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert f"checkpoint-iter{last_iteration}.pth" in os.listdir(run_dir)
    report = json.load(open(os.path.join(run_dir, "evaluation.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "train_log.jsonl"))]
    kinds = [r["kind"] for r in rows]
    assert "val" in kinds and "val_bn_refresh" in kinds
    seen = [scripted.get(r["iteration"], r["miou"]) if r["kind"] == "val" and r["iteration"] < last_iteration
            else r["miou"] for r in rows if r["kind"] in ("val", "val_bn_refresh")]
    best = max(seen)
    assert len(report["iou"]) == num_classes and report["best_miou"] == pytest.approx(best, rel=1e-12)


@contextmanager
def spied(stop: int | None = None):
    with pytest.MonkeyPatch.context() as mp:
        yield Spy(mp, stop)


# ------------------------------------------------------------------------------------ trainSSL_less_memory.py
N_LM = 6  # steps: the release runs 2N for training.num_iterations N = 3
# validation every step with a scripted mIoU: a best at step 1, then no improvement
SCRIPTED_MIOU = {1: 0.5, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1}
LM_LR = 0.01  # learning rate of the less-memory run (see its fixture)


@pytest.fixture(scope="module")
def less_memory_run(tmp_path_factory):
    """VOC (the script's documented config), fidelity code, num_iterations 3: 6 steps L U L U L U."""
    root = str(tmp_path_factory.mktemp("VOC2012"))
    make_voc_tree(root, n_train=8, n_val=2, size=(40, 60))
    run_dir = str(tmp_path_factory.mktemp("run_less_memory"))
    with spied() as spy:
        spy.scripted_miou = SCRIPTED_MIOU
        # lr 0.01: with the release's single learning rate (the heads no longer get 10x) the teacher labels enough
        # pixels correctly by step 2 for every later contrastive term to be non-zero on this tree
        result = less_memory.main(["--config", VOC_CONFIG, "--data-root", root, "--device", "cpu"]
                                  + overrides(run_dir, N_LM // 2,
                                              **{"utils.val_per_iter": 1, "training.learning_rate": LM_LR}))
    return run_dir, spy, result


def test_less_memory_runs_2n_steps_and_schedules_count_steps(less_memory_run):
    """The release doubles num_iterations: poly lr, EMA momentum, checkpoints and the return to the best model
    (after more than 2N/5 = 1.2 steps without improvement) all count the 2N = 6 steps."""
    run_dir, spy, _ = less_memory_run
    assert spy.run.num_iterations == 6
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(6))
    for i, row in rows.items():
        assert row["lr"] == pytest.approx(LM_LR * (1 - i / 6) ** 0.9, rel=1e-9), i
        assert row["ema_momentum"] == pytest.approx(1 - 0.005 * (math.cos(math.pi * i / 6) + 1) / 2, abs=1e-12), i
    assert rows[5]["lr"] == pytest.approx(LM_LR * (1 / 6) ** 0.9)  # the last step; 0 would be reached at step 6
    # mIoU 0.5 at step 1, then 0.1: steps without improvement 1, 2 -> back at 3; 1, 2 -> back at 5
    assert [i for i, _ in spy.at("return_to_best")] == [3, 5]
    # periodic checkpoint at step 4 (save_checkpoint_every 4), the final one named after 2N
    assert {"checkpoint-iter4.pth", "checkpoint-iter6.pth"} <= set(os.listdir(run_dir))


def test_less_memory_rows_alternate(less_memory_run):
    run_dir, _, _ = less_memory_run
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(N_LM))
    labeled_keys = {"loss_sup", "loss_contr_l"}
    unlabeled_keys = {"loss_pseudo", "loss_entropy", "loss_contr_u"}
    for i, row in rows.items():
        keys = set(row) & (labeled_keys | unlabeled_keys)
        if i % 2 == 0:
            assert keys == ({"loss_sup", "loss_contr_l"} if i > R else {"loss_sup"}), (i, row)
            assert row["loss_sup"] > 0
        else:
            assert keys == (unlabeled_keys if i > R else {"loss_pseudo", "loss_entropy"}), (i, row)
            assert row["loss_pseudo"] > 0 and row["loss_entropy"] > 0
        assert row["loss"] == pytest.approx(sum(row[k] for k in keys), rel=1e-5)
        if i > R:  # the memory holds vectors from the labeled steps since i = 0
            assert row["loss_contr_l" if i % 2 == 0 else "loss_contr_u"] > 0, (i, row)


def test_less_memory_rows_average_each_term_over_the_steps_that_computed_it(tmp_path, monkeypatch):
    """Log rows of two steps (log_every 2, 2N = 6 steps, contrastive terms from step 2 on): the labeled terms are
    their labeled step's values and the unlabeled terms their unlabeled step's (not halved by the step that did
    not compute them); the total is the mean of both steps' totals; the terms come in one order on every row
    (whichever step the window starts with)."""
    from engine.log_window import TERM_ORDER
    from tests.run_helpers import argv_of, tiny_sets
    terms = {}
    end = Run.end_iteration

    def end_iteration(self, i, t):
        terms[i] = {k: float(v.detach()) for k, v in t.items()}
        end(self, i, t)

    monkeypatch.setattr(Run, "end_iteration", end_iteration)
    run_dir = tmp_path / "run"
    less_memory.main(argv_of(tiny_sets(str(run_dir), 3, **{"utils.log_every": 2, "method.ramp_up_iterations": 1,
                                                            "method.memory_start_offset": 1,
                                                            "method.memory_confidence": 0.0})))
    rows = [r for r in map(json.loads, open(run_dir / "train_log.jsonl")) if r["kind"] == "train"]
    assert [r["iteration"] for r in rows] == [1, 3, 5] and sorted(terms) == list(range(6))
    for row in rows:
        labeled, unlabeled = terms[row["iteration"] - 1], terms[row["iteration"]]
        assert "loss_sup" in labeled and "loss_pseudo" in unlabeled
        expected = {**{k: v for k, v in labeled.items() if k != "loss"},
                    **{k: v for k, v in unlabeled.items() if k != "loss"},
                    "loss": (labeled["loss"] + unlabeled["loss"]) / 2}
        assert {k: row[k] for k in row if k.startswith("loss")} == pytest.approx(expected, rel=1e-6)
        assert [k for k in row if k.startswith("loss")] == [k for k in TERM_ORDER if k in expected]
    assert "loss_contr_l" in rows[1] and "loss_contr_u" in rows[1]


def test_less_memory_steps_per_iteration(less_memory_run):
    _, spy, _ = less_memory_run
    even, odd = list(range(0, N_LM, 2)), list(range(1, N_LM, 2))
    assert [(i, d[0]) for i, d in spy.at("draw")] == [(i, "labeled" if i % 2 == 0 else "unlabeled")
                                                      for i in range(N_LM)]
    assert [i for i, _ in spy.at("augment_labeled")] == even
    assert [i for i, _ in spy.at("augment_unlabeled")] == odd
    assert [i for i, _ in spy.at("pseudo_label")] == odd
    assert [i for i, _ in spy.at("update_memory")] == even  # memory active from i = 0 (offset R + 1)
    assert [(i, d[0]) for i, d in spy.at("contrastive")] == [(3, "unlabeled"), (4, "labeled"), (5, "unlabeled")]
    # class-balancing statistics on the matching step: labels on labeled steps (weights after the ramp-up),
    # pseudo-labels on unlabeled ones (weights at every step, as released)
    assert [(i, d) for i, d in spy.at("class_weights")] == [
        (i, (True, False, True) if i % 2 == 0 else (False, True, False)) for i in range(N_LM)]
    # fidelity "code" keeps the release's batch-broadcast entropy mask (weight 0.01); here n = 2 (two views of
    # B/2 = 1 image), so the term is about twice the per-image one
    entropy = spy.at("entropy")
    assert [(i, d["broadcast"]) for i, d in entropy] == [(i, True) for i in odd]
    for i, d in entropy:
        assert d["term"] == pytest.approx(0.01 * d["broadcast_form"], rel=1e-4), i
        assert d["broadcast_form"] > 1.5 * d["per_image"] > 0, i
    # after the loop only the BatchNorm refresh draws (one unlabeled batch)
    after = [d for i, k, d in spy.events if i == "after" and k == "draw"]
    assert after == [("unlabeled", None)]


def test_less_memory_memory_and_outputs(less_memory_run):
    run_dir, spy, result = less_memory_run
    run = spy.run
    assert run.variant.name == "trainSSL_less_memory" and run.method["contrastive_weight"] == 0.1
    for i, d in spy.at("update_memory"):
        assert d["changed"] <= d["label_classes"], i  # only classes of the batch's own labels enter
    counts = run.memory.counts
    assert int(counts.sum()) > 0 and int(counts.max()) <= 256
    entered = set().union(*(d["changed"] for _, d in spy.at("update_memory")))
    assert {c for c in range(run.num_classes) if counts[c] > 0} == entered
    # EMA warm-up 1 - 1/(i + 1) (not trainSSL.py's 1 - 1/(10 i + 1)): as logged, and in the teacher after each step
    assert run.variant.ema_warmup_div == 1
    for i, row in train_rows(run_dir).items():
        assert row["ema_alpha"] == pytest.approx(ema_alpha_by_hand(i, N_LM, 1), abs=1e-9), i
    assert sorted(spy.ema_deviation) == list(range(N_LM))
    assert all(d < 1e-6 for d in spy.ema_deviation.values()), spy.ema_deviation
    assert_run_outputs(run_dir, N_LM, 21, SCRIPTED_MIOU)
    assert result["miou"] == pytest.approx(json.load(open(os.path.join(run_dir, "evaluation.json")))["best_miou"])


# --------------------------------------------------------------------- trainSSL_domain_adaptation_targetCity.py
@pytest.fixture(scope="module")
def city_gta5(tmp_path_factory):
    city = str(tmp_path_factory.mktemp("CityScapes"))
    files = make_cityscapes_tree(city, n_train=6, n_val=2, size=(70, 100))
    gta5 = str(tmp_path_factory.mktemp("GTA5"))
    make_gta5_tree(gta5, n_train=3, n_val=1, size=(70, 100), seed=1)
    # labeled: images 1, 2, 3, 5 of the sorted list; with them the memory holds two vectors of a batch's class by
    # i = R + 1 on this tree, so every contrastive term is non-zero (chosen again for the release's optimiser: one
    # learning rate for every parameter; with 5, 2, 1, 3 the paper run's memory held one vector per class at i = 3)
    split = os.path.join(city, "labeled.txt")
    with open(split, "w") as f:
        f.write("".join(os.path.basename(files["train"][k][0]) + "\n" for k in (1, 2, 3, 5)))
    return city, gta5, split


def run_da(city_gta5, tmp_path_factory, fidelity: str, iterations: int, stop: int | None = None, **extra):
    city, gta5, split = city_gta5
    run_dir = str(tmp_path_factory.mktemp(f"run_da_{fidelity}"))
    with spied(stop) as spy:
        result = da_script.main(["--config", CITY_CONFIG, "--data-root", city, "--gta5-root", gta5, "--device",
                                 "cpu"] + overrides(run_dir, iterations, fidelity=fidelity,
                                                    **{"training.data.split_file": split, **extra}))
    return run_dir, spy, result


N_DA = 6


@pytest.fixture(scope="module")
def da_code_run(city_gta5, tmp_path_factory):
    """Fidelity code, N = 6: every iteration is in the last 100, so GTA5 on the odd ones."""
    # the standard width: test_da_contrastive_terms needs memory rows for the classes of iteration 3's batch, which
    # this run's trajectory gives (the tiny width's does not)
    return run_da(city_gta5, tmp_path_factory, "code", N_DA, **{"backbone.width": 64})


@pytest.fixture(scope="module")
def da_paper_run(city_gta5, tmp_path_factory):
    """Fidelity paper, N = 103 (the last 100 start at i = 3), iterations 0..5 run: G C G C C C."""
    return run_da(city_gta5, tmp_path_factory, "paper", 103, stop=6, **{"utils.val_per_iter": 5})


def labeled_sources(spy: Spy) -> list[str]:
    return [d[0] for _, d in spy.at("draw") if d[0] != "unlabeled"]


def test_da_code_draws_gta5_on_odd_iterations_of_last_100(da_code_run):
    _, spy, _ = da_code_run
    assert labeled_sources(spy) == ["labeled", "gta5"] * 3
    draws = spy.at("draw")
    assert [i for i, _ in draws] == [i for i in range(N_DA) for _ in range(2)]  # one labeled + one unlabeled each
    assert [d[0] for _, d in draws][1::2] == ["unlabeled"] * N_DA


def test_da_paper_alternates_then_cityscapes_only(da_paper_run):
    run_dir, spy, _ = da_paper_run
    assert labeled_sources(spy) == ["gta5", "labeled", "gta5", "labeled", "labeled", "labeled"]
    assert [i for i, _ in spy.at("update_memory")] == [1, 3, 4, 5]
    assert spy.run.num_iterations == 103 and sorted(train_rows(run_dir)) == list(range(6))


@pytest.mark.parametrize("which", ["code", "paper"])
def test_da_memory_only_from_cityscapes(which, da_code_run, da_paper_run):
    _, spy, _ = da_code_run if which == "code" else da_paper_run
    source_at = {i: d[0] for i, d in spy.at("draw") if d[0] != "unlabeled"}
    city_iterations = [i for i, s in source_at.items() if s == "labeled"]
    assert [i for i, _ in spy.at("update_memory")] == city_iterations  # memory active from i = 0
    for i, d in spy.at("update_memory"):
        assert d["changed"] <= d["label_classes"] <= CITY_CLASSES, i
    counts = spy.run.memory.counts
    filled = {c for c in range(19) if counts[c] > 0}
    assert filled and filled <= CITY_CLASSES  # GTA5 labels have all 19 classes: none of theirs got in
    assert filled == set().union(*(d["changed"] for _, d in spy.at("update_memory")))


def test_da_gta5_batches_hold_gta5_labels(da_code_run):
    """The spy's sources are what they claim: GTA5 labels use classes the Cityscapes fixture never writes."""
    _, spy, _ = da_code_run
    for _, (source, classes) in spy.at("draw"):
        if source == "labeled":
            assert classes <= CITY_CLASSES
        elif source == "gta5":
            assert classes - CITY_CLASSES


def test_da_contrastive_terms(da_code_run):
    run_dir, spy, _ = da_code_run
    rows = train_rows(run_dir)
    contrastive = spy.at("contrastive")
    assert [(i, d[0]) for i, d in contrastive] == [(i, p) for i in range(R + 1, N_DA) for p in ("labeled", "unlabeled")]
    sources = {i: d[0] for i, d in spy.at("draw") if d[0] != "unlabeled"}
    for i, (phase, raw, classes) in contrastive:
        key = "loss_contr_l" if phase == "labeled" else "loss_contr_u"
        assert raw > 0, (i, phase)
        assert rows[i][key] == pytest.approx(0.2 * raw, rel=1e-5)  # contrastive weight 0.2 in domain adaptation
        if phase == "labeled":  # the current batch's own labels (the release reused the previous iteration's)
            assert (classes <= CITY_CLASSES) == (sources[i] == "labeled"), i
    for i in range(R + 1):
        assert "loss_contr_l" not in rows[i] and "loss_contr_u" not in rows[i]


def test_da_constants_and_outputs(da_code_run):
    run_dir, spy, _ = da_code_run
    run = spy.run
    assert run.method["contrastive_weight"] == 0.2 and run.method["labeled_classmix_prob"] == 0.25
    for i, row in train_rows(run_dir).items():
        assert row["ema_alpha"] == pytest.approx(ema_alpha_by_hand(i, N_DA, 1), abs=1e-9), i
        terms = [k for k in row if k.startswith("loss_")]
        assert row["loss"] == pytest.approx(sum(row[k] for k in terms), rel=1e-5), i
        if i <= R:  # later the class-balancing weights apply; on this tiny tree (most of the 19 classes never
            # seen in Cityscapes labels) the released median rule can give the seen classes weight 0
            assert row["loss_sup"] > 0 and row["loss_pseudo"] > 0, i
    # the teacher after every step: the EMA of the student with alpha = min(1 - 1/(i + 1), m_i) by hand
    assert sorted(spy.ema_deviation) == list(range(N_DA))
    assert all(d < 1e-6 for d in spy.ema_deviation.values()), spy.ema_deviation
    # every iteration: one labeled step and one unlabeled step, pseudo-labels once
    assert [i for i, _ in spy.at("pseudo_label")] == list(range(N_DA))
    assert [i for i, _ in spy.at("augment_labeled")] == list(range(N_DA))
    # the released domain-adaptation script broadcasts the entropy mask like the less-memory one (fidelity code)
    entropy = spy.at("entropy")
    assert [(i, d["broadcast"]) for i, d in entropy] == [(i, True) for i in range(N_DA)]
    for i, d in entropy:
        assert d["term"] == pytest.approx(0.01 * d["broadcast_form"], rel=1e-4), i
    assert_run_outputs(run_dir, N_DA, 19)


@pytest.mark.parametrize("which", ["code", "paper"])
def test_da_class_balancing_and_gta5_source(which, da_code_run, da_paper_run):
    """As released: labels and pseudo-labels enter the class-balancing histories on Cityscapes iterations only
    (the counter counts those), and GTA5 batches come from its train split."""
    _, spy, _ = da_code_run if which == "code" else da_paper_run
    source_at = {i: d[0] for i, d in spy.at("draw") if d[0] != "unlabeled"}
    assert [(i, d) for i, d in spy.at("class_weights")] == [
        (i, (True, True, True) if source == "labeled" else (False, False, True)) for i, source in source_at.items()]
    city_iterations = sum(source == "labeled" for source in source_at.values())
    assert spy.run.balancing.count == city_iterations == (3 if which == "code" else 4)
    gta5 = spy.run.gta5
    assert len(gta5) == 3 and all(os.sep + os.path.join("images", "train") + os.sep in p for p in gta5.images)


def test_da_paper_entropy_mask_per_image(da_paper_run):
    _, spy, _ = da_paper_run
    for i, d in spy.at("entropy"):
        assert not d["broadcast"] and d["term"] == pytest.approx(0.01 * d["per_image"], rel=1e-4), i


def test_da_paper_outputs(da_paper_run):
    run_dir, spy, _ = da_paper_run
    assert_run_outputs(run_dir, 103, 19)  # the final checkpoint carries N, the loop having been cut short
    rows = train_rows(run_dir)
    for i in range(R + 1, 6):
        assert rows[i]["loss_contr_l"] > 0 and rows[i]["loss_contr_u"] > 0, i


def test_da_refuses_a_voc_config(tmp_path):
    root = str(tmp_path / "VOC2012")
    make_voc_tree(root, n_train=6, n_val=1, size=(40, 60))
    with pytest.raises(UserError, match="configSSL_city"):
        da_script.main(["--config", VOC_CONFIG, "--data-root", root, "--device", "cpu"]
                       + overrides(str(tmp_path / "run"), 4))
    assert not os.path.exists(tmp_path / "run")
