"""The figures of `make gpu-check` against their targets, and its Markdown report."""
from __future__ import annotations

import shutil
import subprocess

from benchmarks.gpu_steps.plan import (BF16_SPEEDUP_TARGET, CONTEXT_MIB, EVAL_SECONDS_TARGET, METHOD_SHARE_TARGET,
                                       MIOU_TOLERANCE, V100_MIB, Plan)


# ------------------------------------------------------------------------------------------------ the figures
def _figure(figure: str, value, unit: str, target: str, passed: bool | None, step: str) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "target": target,
            "result": "n/a" if passed is None or value is None else ("PASS" if passed else "FAIL"), "step": step}


def _rows(results: dict, step: str) -> list[tuple[str, dict, dict]]:
    """(run label, run info, result row) of every bench_step result of a step."""
    out = []
    for label, run in results.get(step, {}).get("data", {}).items():
        for row in run.get("results", []):
            out.append((label, run, row))
    return out


def _fits_v100(row: dict) -> tuple[float | None, bool | None]:
    """Peak memory in MiB as a V100 would need it: allocator's reserved peak (else allocated) + CUDA context."""
    if row.get("peak_memory_kind") != "cuda_max_memory_allocated":
        return None, None  # CPU figures say nothing about a GPU
    peak = row.get("peak_memory_reserved_bytes") or row["peak_memory_bytes"]
    mib = peak / 2 ** 20 + CONTEXT_MIB
    return round(mib), mib <= V100_MIB


# Every target's figure (name prefix), its target, and the step that measures it.
EXPECTED_FIGURES = (
    ("cuda tests", "all pass", "cuda_tests"),
    ("demo fp32 checkpoint: evaluateSSL.py", f"<= {MIOU_TOLERANCE}", "demo"),
    ("bf16 / fp32 iterations/s", f">= {BF16_SPEEDUP_TARGET}", "bench_step"),
    ("method parts share of an iteration", f"< {100 * METHOD_SHARE_TARGET:.0f} %", "bench_step"),
    ("peak memory (the target)", f"fits a V100 16 GB ({V100_MIB} MiB, {CONTEXT_MIB} MiB context included)",
     "bench_step"),
    ("evaluation of", f"< {EVAL_SECONDS_TARGET:.0f} s", "eval_full_size"),
    ("torchrun 2 processes", "identical", "torchrun_gloo"),
)


def figures(results: dict, plan: Plan) -> list[dict]:
    """Every measured figure with its target (PASS/FAIL), from the step records."""
    figs = []
    tests = results.get("cuda_tests", {})
    d = tests.get("data") or {}
    if d:
        figs.append(_figure("cuda tests passed / failed+errors / skipped",
                            f"{d.get('passed', 0)} / {d.get('failures', 0) + d.get('errors', 0)} / "
                            f"{d.get('skipped', 0)}", "", "all pass",
                            tests.get("status") == "ok", "cuda_tests"))
    demo = results.get("demo", {}).get("data", {})
    for precision in ("fp32", "bf16"):
        train = demo.get(f"train_{precision}")
        if train:
            figs.append(_figure(f"demo {precision}: best mIoU after {train['iterations']} iterations",
                                round(train["best_miou"], 4), "", "", None, "demo"))
        ev = demo.get(f"evaluate_{precision}")
        if ev:
            figs.append(_figure(f"demo {precision} checkpoint: evaluateSSL.py mIoU difference, {ev['device']} vs cpu",
                                round(ev["abs_difference"], 6), "", f"<= {MIOU_TOLERANCE}",
                                ev["abs_difference"] <= MIOU_TOLERANCE, "demo"))
    rows = _rows(results, "bench_step") + _rows(results, "bench_step_compile")
    v2 = plan.bench_runs[0].label
    by_precision = {row["precision"]: row for label, _, row in _rows(results, "bench_step") if label == v2}
    if "fp32" in by_precision and "bf16" in by_precision:
        ratio = by_precision["bf16"]["iterations_per_second"] / by_precision["fp32"]["iterations_per_second"]
        figs.append(_figure(f"bf16 / fp32 iterations/s, {v2}", round(ratio, 2), "x", f">= {BF16_SPEEDUP_TARGET}",
                            ratio >= BF16_SPEEDUP_TARGET, "bench_step"))
    for label, run, row in rows:
        tag = f"{label} {row['precision']}{' compile' if run['setup'].get('compile') else ''}"
        if run["setup"].get("script") == "trainSSL":
            share = row["method_share"]
            figs.append(_figure(f"method parts share of an iteration, {tag}", round(100 * share, 1), "%",
                                f"< {100 * METHOD_SHARE_TARGET:.0f} %", share < METHOD_SHARE_TARGET,
                                "bench_step"))
        if not run["setup"].get("compile"):
            mib, fits = _fits_v100(row)
            is_target = label == v2 and row["precision"] == "fp32"
            figs.append(_figure(f"peak memory{' (the target)' if is_target else ''}, {tag}"
                                f"{' (trainSSL_less_memory.py)' if run['setup'].get('script') != 'trainSSL' else ''}",
                                mib if mib is not None else round(row["peak_memory_bytes"] / 2 ** 20),
                                "MiB" if mib is not None else "MiB (CPU process RSS)",
                                f"fits a V100 16 GB ({V100_MIB} MiB, {CONTEXT_MIB} MiB context included)",
                                fits, "bench_step"))
    ev = results.get("eval_full_size", {}).get("data", {}).get("evaluation")
    if ev:
        done = "" if ev["complete"] else f" (stopped after {ev['images']} of {ev['of']} images)"
        figs.append(_figure(f"evaluation of {ev['of']} images {ev['size'][0]}x{ev['size'][1]}{done}",
                            round(ev["seconds"], 1), "s", f"< {EVAL_SECONDS_TARGET:.0f} s",
                            ev["complete"] and ev["seconds"] < EVAL_SECONDS_TARGET, "eval_full_size"))
    for name in ("torchrun_nccl", "torchrun_gloo"):
        r = results.get(name, {})
        if name == "torchrun_nccl" and r.get("status") != "ok" and \
                results.get("torchrun_gloo", {}).get("status") not in (None, "skipped"):
            continue  # NCCL refused two ranks on one GPU: gloo stands in (the NCCL step keeps NCCL's error)
        if r.get("status") in ("ok", "failed", "timed out") and r.get("data"):
            d = r["data"]
            value = "timed out" if r["status"] == "timed out" else \
                ("yes" if d["rank_identical"] else f"no ({r['status']})" if any(d["steps_recorded"]) else "did not run")
            figs.append(_figure(f"torchrun 2 processes ({d['backend']} on {d['device']}): rank-identical state "
                                f"after {d['iterations']} iterations", value, "", "identical", r["status"] == "ok",
                                name))
    for prefix, target, step in EXPECTED_FIGURES:  # a target that a failed or skipped step left unmeasured
        if not any(f["figure"].startswith(prefix) for f in figs):
            status = results.get(step, {}).get("status", "not run")
            why = f"{step}: {status}" if status != "ok" else f"not in this run's plan of {step}"
            figs.append(_figure(prefix, f"not measured ({why})", "", target, None, step))
    return figs


# ------------------------------------------------------------------------------------------------ the report
def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _md(text) -> str:
    """A table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """The Markdown report: targets, steps, bench_step and bench_components tables."""
    env = report["env"]
    lines = []
    if report["dry_run"]:
        lines += ["**DRY RUN on the CPU at toy sizes: these are not GPU figures.**", ""]
    lines += [f"GPU check of {report['started']}: {env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, "
              f"CUDA {env.get('cuda')}; {report['wall_s']:.0f} s in all"
              + (f" (limit {report['budget_s']:.0f} s)." if report["budget_s"] else "."), "",
              "| figure | measured | target | result |", "|---|---:|---|:---:|"]
    for f in report["figures"]:
        value = f"{_cell(f['value'])} {f['unit']}".strip()
        lines.append(f"| {_md(f['figure'])} | {_md(value)} | {_md(f['target'] or '—')} | {f['result']} |")
    lines += ["", "| step | status | seconds | limit |", "|---|---|---:|---:|"]
    for s in report["steps"]:
        status = s["status"] + (f" ({s['note']})" if s.get("note") else "")
        if s.get("error"):
            first = next((line for line in reversed(s["error"].splitlines()) if line.strip()), "")
            status += f": {first.strip()[:160]}"
        lines.append(f"| {s['name']} | {_md(status)} | {s['seconds']:.0f} | {s['limit_s']:.0f} |")
    rows = _rows(report["results"], "bench_step") + _rows(report["results"], "bench_step_compile")
    if rows:
        lines += ["", "bench_step.py (peak: PyTorch allocator, allocated / reserved; method: everything but the "
                  "network's forward and backward):", "",
                  "| run | precision | it/s | ms/it | peak MiB | network ms | method ms | method % | syncs/it |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, run, row in rows:
            reserved = row.get("peak_memory_reserved_bytes")
            peak = f"{row['peak_memory_bytes'] / 2 ** 20:.0f}" + \
                (f" / {reserved / 2 ** 20:.0f}" if reserved is not None else "")
            tag = f"{row['precision']}{' + compile' if run['setup'].get('compile') else ''}"
            lines.append(f"| {label} | {tag} | {_cell(row['iterations_per_second'])} | "
                         f"{_cell(row['ms_per_iteration_median'])} | {peak} | {_cell(row['network_ms'])} | "
                         f"{_cell(row['method_ms'])} | {100 * row['method_share']:.1f} | "
                         f"{_cell(row['syncs_per_iteration'])} |")
    comp = report["results"].get("bench_components", {}).get("data", {}).get("components")
    if comp:
        by_name = {r["name"]: r for r in comp["results"]}
        lines += ["", f"bench_components.py ({comp['mode']} sizes; loop = the per-class reference):", "",
                  "| part | ms | syncs/call | per-class loop ms | loop / vectorised |", "|---|---:|---:|---:|---:|"]
        for r in comp["results"]:
            if "reference" in r["name"]:
                continue
            ref = r.get("reference")                  # --compare-reference rows carry their reference's timing
            if ref is None and "vectorised" in r["name"]:
                ref = by_name.get(r["name"].replace("vectorised", "reference"))
            ref = ref or by_name.get(f"{r['name']}_reference")
            speedup = ref["ms_median"] / r["ms_median"] if ref and r["ms_median"] else None
            lines.append(f"| {r['name']} | {_cell(r['ms_median'])} | {_cell(r['syncs_per_call'])} | "
                         f"{_cell(ref['ms_median']) if ref else '—'} | {_cell(speedup) if speedup else '—'} |")
    return "\n".join(lines) + "\n"


def environment(plan: Plan) -> dict:
    """torch, CUDA, and the GPU as nvidia-smi names it (the parent does not start a CUDA context)."""
    import platform

    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": plan.device, "gpu": None}
    if plan.device == "cuda" and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            env["gpu"] = out.strip().splitlines()[0] if out.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env
