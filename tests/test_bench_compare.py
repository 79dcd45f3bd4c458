"""benchmarks/bench_components.py --compare-reference (benchmarks/bench_compare.py): each part timed next to its
reference, interleaved, with the documented JSON; and the interleaved timer's accounting."""
import json

import pytest
import torch

from benchmarks import bench_components
from benchmarks.common import cpu_threads, time_interleaved
from utils.errors import UserError

CPU = torch.device("cpu")


def test_compare_reference_quick_writes_json(tmp_path):
    path = str(tmp_path / "compare.json")
    report = bench_components.main(["--compare-reference", "--quick", "--threads", "1", "--repeats", "2",
                                    "--warmup", "0", "--json", path])
    with open(path) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(report))
    assert stored["benchmark"] == "components" and stored["mode"] == "quick+compare"
    assert [r["name"] for r in stored["results"]] == [
        "memory_update", "memory_update (blocks)", "class_balancing", "evaluation_argmax",
        "evaluation_argmax_release", "contrastive_ones",
        "contrastive_ones (blocks)", "contrastive_mean", "contrastive_mean (blocks)"]
    for r in stored["results"]:
        assert set(r) == {"name", "what", "ms_median", "ms_min", "ms_all", "repeats", "syncs_per_call", "reference",
                          "ratio_median", "ratio_min"}
        ref = r["reference"]
        assert set(ref) == {"ms_median", "ms_min", "ms_all", "repeats", "syncs_per_call"}
        assert r["repeats"] == ref["repeats"] == 2 and r["ms_median"] > 0 and ref["ms_median"] > 0
        assert r["ms_all"] != ref["ms_all"]                                         # timed separately
        assert r["ratio_median"] == pytest.approx(r["ms_median"] / ref["ms_median"])
        assert r["ratio_min"] == pytest.approx(r["ms_min"] / ref["ms_min"])
        assert r["syncs_per_call"] is None and ref["syncs_per_call"] is None          # CPU: n/a
    by_name = {r["name"]: r for r in stored["results"]}                               # one reference per part
    assert by_name["contrastive_ones"]["reference"] == by_name["contrastive_ones (blocks)"]["reference"]


def test_compare_reference_parts():
    with pytest.raises(UserError, match="unknown part 'heads' with --compare-reference"):
        bench_components.main(["--compare-reference", "--quick", "--only", "heads"])
    with cpu_threads(1):
        report = bench_components.main(["--compare-reference", "--quick", "--only", "argmax,balancing",
                                        "--repeats", "1", "--warmup", "0"])
    assert [r["name"] for r in report["results"]] == ["evaluation_argmax", "evaluation_argmax_release",
                                                      "class_balancing"]


def test_time_interleaved_calls_in_rounds():
    calls = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, repeats=3,
                           warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(out) == {"a", "b"} and all(len(t["ms_all"]) == 3 and t["repeats"] == 3 for t in out.values())
    with pytest.raises(UserError, match="repeats"):
        time_interleaved({"a": lambda: None}, CPU, repeats=0)
