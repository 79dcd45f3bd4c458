#!/usr/bin/env python3
"""Does the memory bank help? The pre-registered study on the synthetic street scenes (benchmarks/ssl_protocol.py).

Arms (each a training script with a few config keys, every arm from the same synthetic-pretrained backbone):
supervised only; pseudo-labels + ClassMix; the full method under fidelity "code" and under "paper"; domain
adaptation's source only and domain adaptation. Five paired seeds for the semi-supervised arms (a seed draws the
labeled subset every arm of that seed uses), three for the domain-adaptation pair. Per arm mean ± std, per
comparison the mean paired difference and its 95 % t-interval (benchmarks/paired_stats.py), per arm why (memory
vectors per class, each loss term's share, the teacher's confident-and-correct share per class).

    python benchmarks/ssl_synthetic.py --run-length  # the pre-registration step: the run length, supervised arm only
    python benchmarks/ssl_synthetic.py               # the study (26 runs, 2 at a time, 1 thread each)
    python benchmarks/ssl_synthetic.py --quick       # every arm once, seed 1, 200 iterations
    python benchmarks/ssl_synthetic.py --smoke       # 3 iterations per arm at tiny sizes (tests)
    python benchmarks/ssl_synthetic.py --report      # tables, plots and JSON again from the finished runs
    python benchmarks/ssl_synthetic.py --plan        # the commands of every run
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import ssl_report as report  # noqa: E402
from benchmarks.ssl_protocol import (ARMS, BASE_CONFIG, DEFAULT_OUT, DIFFERENCES_FROM_RELEASE, PAIRS,  # noqa: E402
                                     RELEASED_ITERATIONS, RUN_LENGTH_RULE, arm_documentation, arm_keys, command,
                                     mode_settings, overrides, plan, rule_decision, scaled_run_length, set_args)
from benchmarks.ssl_runner import LoadSampler, finished, machine, run_all  # noqa: E402

SESSIONS = "sessions.json"  # in --out: every invocation that trained runs (wall time, load), to report true times


def prepare_backbone(config: str, extra: dict, threads: int) -> dict | None:
    """Build (or find) the synthetic-pretrained backbone every arm starts from, before the runs (so that parallel runs
    do not wait on its lock), with `threads` torch threads like each run (the bytes depend on the thread count);
    its path and SHA-256 for the report. None when the config does not use one."""
    import hashlib

    import torch

    from engine import synthetic_pretrain
    from engine.config import load_config
    from utils.variants import TRAIN_SSL, backbone_depth
    cfg = load_config(config, overrides(extra))
    if cfg["backbone"]["pretrained"] != "synthetic":
        return None
    spec = synthetic_pretrain.spec_of(cfg, backbone_depth(cfg, TRAIN_SSL))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        path = synthetic_pretrain.build(spec)
    finally:
        torch.set_num_threads(before)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": path, "sha256": digest, "spec": spec.stem, "threads": threads}


def record_session(out: str, session: dict) -> list[dict]:
    """Every training session recorded in --out (this one appended when it trained runs)."""
    path = os.path.join(out, SESSIONS)
    sessions = json.load(open(path)) if os.path.isfile(path) else []
    if session:
        sessions.append(session)
        with open(path, "w") as f:
            f.write("[\n" + ",\n".join(json.dumps(x) for x in sessions) + "\n]\n")
    return sessions


def train(runs: list[dict], args, config: str, diagnose: bool) -> tuple[list[dict], list[dict], dict]:
    """Train the runs not finished yet; (finished runs, failures, this session's record)."""
    t0 = time.time()
    load = LoadSampler(t0)
    load.start()

    def said(r: dict, k: int, n: int) -> None:
        c = report.collect(r)
        took = "cached" if r["cached"] else f"{r['seconds']:.0f} s" + (
            f", {c['cpu_seconds']:.0f} CPU-s" if c.get("cpu_seconds") is not None else "")
        print(f"  {r['arm']:18s} N={r['iterations']} seed={r['seed']}: best mIoU {100 * c['best_miou']:.2f} ({took}; "
              f"{k}/{n} done, {time.time() - t0:.0f} s elapsed)", flush=True)

    done, failed = run_all(runs, config, args.device, args.jobs, args.threads, args.keep_checkpoints,
                           args.in_process, diagnose, on_done=said)
    load.stop()
    trained = [r for r in done if not r["cached"]]
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
               "wall_seconds": round(time.time() - t0, 1), "runs_trained": len(trained),
               "cpu_seconds": round(sum(r.get("cpu_seconds") or 0 for r in map(report.collect, trained) if r), 1),
               "jobs": args.jobs, "threads": args.threads, "load_samples": load.samples} if trained else {}
    return done, failed, session


def run_length(args, config: str, out: str, extra: dict, diagnose: bool) -> dict:
    """The pre-registration step: RUN_LENGTH_RULE on the supervised arm alone; writes run_length.json."""
    rule = RUN_LENGTH_RULE
    print("run-length rule: " + rule["text"], flush=True)
    n, steps, chosen, why, failed = rule["start"], [], None, "", []
    while chosen is None:
        runs = [r for k in (n, 2 * n) for r in plan(mode_settings("full", k, rule["seeds"]), out, [rule["arm"]], extra)]
        done, bad, session = train(runs, args, config, diagnose)
        record_session(out, session)
        failed += bad
        res = [report.collect(r) for r in done]
        mean = {k: sum(100 * r["best_miou"] for r in res if r["iterations"] == k) / len(rule["seeds"])
                for k in (n, 2 * n)}
        gain = mean[2 * n] - mean[n]
        steps.append({"n": n, "mean_best_miou_n": mean[n], "mean_best_miou_2n": mean[2 * n], "gain": gain,
                      "per_seed": {k: {r["seed"]: 100 * r["best_miou"] for r in res if r["iterations"] == k}
                                   for k in (n, 2 * n)}})
        print(f"N={n}: mean best mIoU {mean[n]:.2f}; 2N={2 * n}: {mean[2 * n]:.2f}; gain {gain:+.2f} points "
              f"(rule: < {rule['min_gain_points']})", flush=True)
        chosen, why = rule_decision(n, gain, rule)
        n *= 2
    result = {"rule": rule, "steps": steps, "chosen": chosen, "why": why, "failed": failed}
    with open(os.path.join(out, "run_length.json"), "w") as f:
        f.write(report.compact_json(result))
    print(f"run length N = {chosen} ({why})", flush=True)
    return result


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="every arm once (seed 1), 200 iterations")
    g.add_argument("--smoke", action="store_true", help="3 iterations per arm, tiny sizes (tests)")
    g.add_argument("--run-length", action="store_true",
                   help="the pre-registration step: fix the run length on the supervised arm alone")
    p.add_argument("--report", action="store_true", help="no training: tables, plots, JSON from the finished runs")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="only these arms (default all)")
    p.add_argument("--iterations", type=int, help="replace the mode's run length N (R etc. are scaled to it)")
    p.add_argument("--seeds", type=int, nargs="+", help="replace the mode's seeds")
    p.add_argument("--val-every", type=int, help="replace the mode's evaluation interval (N/4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config key for every run (repeatable)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--config", default=BASE_CONFIG, help="base config the arms override")
    p.add_argument("--device", default="cpu", help="device for the training scripts (default cpu)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' .pth files")
    p.add_argument("--diagnose", action=argparse.BooleanOptionalAction, default=None,
                   help="run every script through benchmarks/ssl_diagnostics.py (teacher accuracy, memory candidates, "
                        "BatchNorm statistics at each evaluation); default on, off in --smoke")
    p.add_argument("--in-process", action="store_true",
                   help="run the arms one after another in this process instead of as subprocesses (tests)")
    p.add_argument("--plan", action="store_true", help="print the runs' commands and exit")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_arg_parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    diagnose = (mode != "smoke") if args.diagnose is None else args.diagnose
    out, config = os.path.abspath(args.out), os.path.abspath(args.config)
    from engine.config import parse_override
    extra = {".".join(k): v for k, v in map(parse_override, args.overrides)}
    if mode == "smoke":
        extra = {**mode_settings("smoke")["sets"], **extra}
    os.makedirs(out, exist_ok=True)
    if args.run_length:
        backbone = None if args.plan else prepare_backbone(config, extra, args.threads)
        return run_length(args, config, out, extra, diagnose) | {"backbone": backbone}
    m = mode_settings(mode, args.iterations, args.seeds, args.val_every)
    runs = plan(m, out, args.arms, extra)
    print(f"ssl_synthetic study, mode {mode}: {len(runs)} runs, seeds {m['seeds']}"
          + (f" (domain adaptation {m['da_seeds']})" if "da_seeds" in m else "") + f", {m['iterations']} iterations "
          f"each, evaluation every {m['val_every']}, base config {os.path.relpath(config, ROOT)}")
    print(f"run-length constants scaled by N/{RELEASED_ITERATIONS}: " + ", ".join(
        f"{k}={v}" for k, v in scaled_run_length(m["iterations"]).items()))
    print("arms (the only config keys in which they differ):\n" + arm_documentation(), flush=True)
    if args.plan:
        for r in runs:
            print(" ".join(shlex.quote(a) for a in command(r, config, args.device, diagnose)))
        return {}
    info = machine()
    backbone = prepare_backbone(config, extra, args.threads)
    failed: list[dict] = []
    if args.report:
        done = [r for r in runs if finished(r, config, diagnose)]
        print(f"--report: {len(done)} of {len(runs)} runs finished in {out}")
    else:
        done, failed, session = train(runs, args, config, diagnose)
        record_session(out, session)
    return write_report(done, failed, runs, m, mode, args, config, out, info, backbone, diagnose)


def write_report(done, failed, runs, m, mode, args, config, out, info, backbone, diagnose) -> dict:
    from benchmarks.ssl_plots import draw_diagnostics, draw_study
    results = sorted((c for c in map(report.collect, done) if c is not None),
                     key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    rows = report.summarize(results)
    comps = report.comparisons(results)
    sessions = record_session(out, {})
    cpu_total = sum(r["cpu_seconds"] or 0.0 for r in results)
    wall = sum(s["wall_seconds"] for s in sessions)
    if rows:
        print("\n" + report.format_table(rows))
    if comps:
        print("\n" + report.format_comparisons(comps) + "\n\n" + report.format_targets(comps))
    print(f"wall time of the training sessions {wall / 60:.1f} min ({len(sessions)} session(s)); CPU time of the "
          f"{len(results)} runs {cpu_total / 60:.1f} CPU-min")
    png, diag_png = os.path.join(out, "ssl_study.png"), os.path.join(out, "ssl_study_diagnostics.png")
    if results:
        draw_study(results, comps, png, f"{m['iterations']} iterations per run")
        draw_diagnostics(results, diag_png)
    result = {
        "mode": mode, "iterations": m["iterations"], "seeds": m["seeds"], "da_seeds": m.get("da_seeds", m["seeds"]),
        "val_every": m["val_every"], "base_config": report.shown_path(config),
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu_total, 1), "sessions": sessions,
        "backbone": backbone, "pairs": PAIRS, "comparisons": comps, "summary": rows,
        "common_sets": {k: v for k, v in (runs[0]["sets"].items() if runs else [])
                        if k not in arm_keys() and k != "utils.checkpoint_dir"},
        "arm_set_args": {a: set_args(s["sets"]) for a, s in ARMS.items()},
        "differences_from_release": DIFFERENCES_FROM_RELEASE, "machine": info, "jobs": args.jobs,
        "threads": args.threads, "diagnose": diagnose, "failed": failed,
        "plots": [report.shown_path(png), report.shown_path(diag_png)],
        "runs": [{**{k: v for k, v in r.items() if k not in ("sets", "losses", "diagnostics")},
                  "run_dir": report.shown_path(r["run_dir"]),
                  "diagnostics_final": {k: v[-1] if isinstance(v, list) and v else v
                                        for k, v in (r["diagnostics"] or {}).items()}} for r in results],
    }
    with open(os.path.join(out, "ssl_synthetic.json"), "w") as f:
        f.write(report.compact_json(result))
    print(f"wrote {os.path.join(out, 'ssl_synthetic.json')}, {png} and {diag_png}")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; their output is in <run dir>/stdout.txt: "
                         + ", ".join(f["run_dir"] for f in failed))
    return result


if __name__ == "__main__":
    main()
