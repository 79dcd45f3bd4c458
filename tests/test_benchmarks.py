"""benchmarks/: the component and whole-iteration benchmarks run on CPU and write their documented JSON; the
confusion matrix meets its speed target exactly; the timing helpers account time correctly."""
import json
import math
import os

import numpy as np
import pytest
import torch

import utils.contrastive
import utils.ssl_steps as step
import engine.run as training
from benchmarks import bench_components, bench_step
from benchmarks.common import count_syncs, cpu_threads, format_table, time_call
from utils.errors import UserError
from utils.metrics import confusion_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITY = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_imagenet.json")
TINY = ["--set", "backbone.depth=18", "--set", "training.data.input_size=33,33", "--set", "training.batch_size=2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small ops: on a shared 2-core machine two torch threads wait on each other far more than they gain."""
    with cpu_threads(1):
        yield


# ------------------------------------------------------------------------------------------ confusion matrix
def test_confusion_matrix_full_resolution_exact():
    """Exact counts at Cityscapes size, with out-of-range ids dropped (its speed is bench_components' business)."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 20, (1024, 2048), generator=g)
    label[label == 19] = 250
    label[0, :7] = -3                # negative ids, and ids far beyond any int16/int32 range, are dropped
    label[1, :5] = 10 ** 12
    label[2, :3] = -(10 ** 12)
    pred = torch.randint(0, 19, (1024, 2048), generator=g)
    cm = confusion_matrix(pred, label, 19)
    lab, p = label.reshape(-1).numpy(), pred.reshape(-1).numpy()
    keep = (lab >= 0) & (lab < 19)
    oracle = np.bincount(lab[keep] * 19 + p[keep], minlength=19 * 19).reshape(19, 19)
    assert cm.dtype == torch.int64 and np.array_equal(cm.numpy(), oracle)
    assert int(cm.sum()) == int(keep.sum())


def test_confusion_matrix_small_int_dtypes_and_border_ids():
    # uint8 labels (as read from PNGs); label C-1 counted, label C and the ignore label dropped
    label = torch.tensor([[0, 2, 3], [250, 2, 1]], dtype=torch.uint8)
    pred = torch.tensor([[1, 2, 0], [0, 0, 1]], dtype=torch.uint8)
    cm = confusion_matrix(pred, label, 3)
    assert cm.tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 1]]


# ------------------------------------------------------------------------------------------------- helpers
def test_time_call_and_count_syncs_on_cpu():
    calls = []
    out = time_call(lambda: calls.append(1), CPU, repeats=3, warmup=2)
    assert len(calls) == 5 and out["repeats"] == 3 and len(out["ms_all"]) == 3
    assert 0 <= out["ms_min"] <= out["ms_median"]
    assert count_syncs(lambda: calls.append(1), CPU) is None and len(calls) == 5  # n/a on CPU, not run
    with pytest.raises(UserError, match="repeats"):
        time_call(lambda: None, CPU, repeats=0)


def test_format_table_alignment_and_na():
    text = format_table([("a", 1.5, None), ("long name", 12.25, 3)], ["part", "ms", "syncs"])
    lines = text.splitlines()
    assert lines[0].split() == ["part", "ms", "syncs"]
    assert lines[2].startswith("a ") and lines[2].endswith("n/a")
    assert lines[3].split() == ["long", "name", "12.2", "3"]      # floats >= 10: one decimal
    assert len({len(line) for line in lines[:2]}) == 1             # header and rule equally wide


def test_part_timer_exclusive_nesting():
    ticks = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])                  # fake clock, seconds
    timer = bench_step.PartTimer(CPU, clock=lambda: next(ticks))
    timer.start("outer")       # t=0
    timer.start("inner")       # t=1: outer got 1
    timer.stop()               # t=3: inner got 2
    timer.start("inner")       # t=6: outer got 3 more
    timer.stop()               # t=10: inner got 4 more
    timer.stop()               # t=15: outer got 5 more
    assert dict(timer.totals) == {"outer": 9.0, "inner": 6.0}


# ---------------------------------------------------------------------------------------- bench_components
def test_bench_components_quick_writes_json(tmp_path):
    path = str(tmp_path / "components.json")
    with cpu_threads(2):
        report = bench_components.main(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0",
                                        "--json", path])
        threads_after = torch.get_num_threads()
    with open(path) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(report))
    assert stored["benchmark"] == "components" and stored["mode"] == "quick"
    assert stored["env"]["device"] == "cpu" and stored["env"]["torch"] == torch.__version__
    sizes = stored["sizes"]
    assert sizes["feature_size"] == [9, 9]                          # 65 -> 33 -> 17 -> 9 (COCO variant)
    assert sizes["vectors"] == (2 + 2) * 81 and sizes["memory_vectors"] == 2 * 81
    names = [r["name"] for r in stored["results"]]
    assert names == ["contrastive_vectorised_ones", "contrastive_vectorised_mean", "contrastive_reference_ones",
                     "contrastive_reference_mean", "heads", "memory_add", "class_balancing", "augment_unlabeled",
                     "augment_labeled", "confusion_matrix", "network_student_fwd_bwd", "network_teacher_fwd"]
    for r in stored["results"]:
        assert set(r) == {"name", "what", "ms_median", "ms_min", "ms_all", "repeats", "syncs_per_call"}
        assert r["repeats"] == 1 and r["ms_median"] > 0 and r["ms_min"] <= r["ms_median"]
        assert r["syncs_per_call"] is None                           # CPU: n/a
    assert threads_after == 2                                         # --threads only inside the run


def test_bench_components_paper_sizes_and_bad_part():
    s = bench_components.PAPER
    assert s.feature_size == (65, 65) and s.vectors == 9 * 65 * 65 == 38025
    assert s.memory_vectors == 5 * 65 * 65 and s.quota == 15          # 5 x round(256 / 100)
    with pytest.raises(UserError, match="unknown part"):
        bench_components.main(["--quick", "--only", "network,bogus"])


# ---------------------------------------------------------------------------------------------- bench_step
@pytest.fixture(scope="module")
def step_report(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "step.json")
    originals = {name: getattr(step, name) for name in ("pseudo_label", "update_memory", "contrastive_loss")}
    report = bench_step.main(["--config", CITY, *TINY, "--iterations", "2", "--warmup", "1", "--threads", "1",
                              "--json", path])
    return path, report, originals


def test_bench_step_tiny_config_writes_json(step_report):
    path, report, _ = step_report
    with open(path) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(report))
    assert stored["benchmark"] == "step" and stored["config"] == CITY
    assert stored["overrides"][-1] == "method.memory_confidence=0.0"
    setup = stored["setup"]
    assert (setup["depth"], setup["batch_size"], setup["unlabeled_batch"], setup["crop"]) == (18, 2, 1, "33,33")
    (r,) = stored["results"]
    assert r["precision"] == "fp32" and r["iterations"] == 2 and r["warmup"] == 1
    assert r["first_iteration"] == 2001                               # past the ramp-up R = 2000
    assert r["iterations_per_second"] == pytest.approx(2e3 / sum(r["ms_per_iteration_all"]))
    assert r["peak_memory_kind"] == "cpu_peak_rss_process_lifetime" and r["peak_memory_bytes"] > 0
    assert r["syncs_per_iteration"] is None
    assert math.isfinite(r["final_loss"])
    # every term of an iteration after the ramp-up, the memory update fed with vectors
    assert r["loss_terms"] == sorted(["loss", "loss_sup", "loss_pseudo", "loss_entropy", "loss_contr_l",
                                      "loss_contr_u"])
    assert r["vectors_per_call"]["memory add"] > 0 and r["vectors_per_call"]["contrastive loss"] > 0
    split = r["split_ms"]
    assert set(split) == set(bench_step.GROUPS) == set(r["split_groups"])
    for part in ("student forward", "teacher forward", "backward", "memory add", "contrastive loss",
                 "augment unlabeled (ClassMix, strong x2)", "class balancing", "SGD step", "EMA teacher"):
        assert split[part] > 0, part
    assert r["network_ms"] + r["method_ms"] + r["other_ms"] == pytest.approx(sum(split.values()))
    measured = sum(v for k, v in split.items() if k != "other")     # "other" = the rest of the iteration
    assert sum(split.values()) == pytest.approx(max(r["split_iteration_ms_mean"], measured))


def test_bench_step_restores_what_it_instrumented(step_report):
    _, _, originals = step_report
    for name, fn in originals.items():
        assert getattr(step, name) is fn
    assert step.contrastive_loss is utils.contrastive.contrastive_loss
    assert training.update_teacher.__name__ == "update_teacher"


def test_bench_step_refuses_fp16_on_cpu():
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        bench_step.main(["--config", CITY, *TINY, "--precision", "fp16"])


def test_release_memory_weights_measurement_small():
    """benchmarks/release_memory_weights.py on a few small classes: the release's memory weights are 1 or 1 - 2^-24,
    the memory selectors get gradients of rounding size, and SGD with the paper's schedule keeps ~0.924 of a weight
    whose gradient is ~0 (worked out: weight decay through momentum at every step)."""
    from benchmarks.release_memory_weights import measure, poly_sgd_factor
    r = measure(classes=3, memory_size=16, features=60, seed=0)
    assert set(r["weights"]["distinct_values_minus_1"]) <= {0.0, -2.0 ** -24}
    assert 0 < r["memory_selector_gradients"]["max"] < 1e-6
    assert r["feature_gradient_relative_change_with_exact_ones"] < 1e-6
    assert r["sgd_factor_after_a_paper_run"] == pytest.approx(0.9241, abs=1e-4)
    # by hand: lr 0.1 then 0.05 (poly, power 1); buf 0.5 then 0.9 * 0.5 + 0.5 * 0.95
    assert poly_sgd_factor(2, 0.1, 1.0, 0.9, 0.5) == pytest.approx((1 - 0.1 * 0.5) - 0.05 * (0.9 * 0.5 + 0.5 * 0.95))


def test_bench_eval_workers_small(tmp_path):
    """benchmarks/bench_eval_workers.py at toy size: the PNG pairs written and read back through the folder dataset,
    each case evaluated with 0 and 1 loader workers (equal results: checked inside), the JSON report."""
    from benchmarks import bench_eval_workers
    path = str(tmp_path / "report.json")
    report = bench_eval_workers.main(["--files", "3", "--size", "48,64", "--workers", "0", "1", "--rounds", "1",
                                      "--width", "8", "--dir", str(tmp_path / "files"), "--json", path])
    assert sorted(os.listdir(tmp_path / "files" / "images")) == ["000.png", "001.png", "002.png"]
    rows = {(r["case"], r["workers"]): r for r in report["results"]}
    assert set(rows) == {("decode", 0), ("decode", 1), ("network", 0), ("network", 1)}
    assert all(r["seconds_median"] > 0 and r["images_per_second"] == pytest.approx(3 / r["seconds_median"])
               for r in rows.values())
    assert rows[("decode", 0)]["ratio_to_first"] == 1.0 and report["size"] == [48, 64]
    assert json.load(open(path))["files"] == 3
