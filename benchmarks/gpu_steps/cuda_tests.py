"""Step 1, cuda_tests: pytest -m cuda — every method part agrees between CUDA and CPU, one iteration makes no host
sync beyond the documented ones, the CUDA-only switches in a run, SyncBatchNorm under torchrun. In the dry run
the CPU stands in for the device (SSL_CUDA_TESTS_ON_CPU=1)."""
from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET

from benchmarks.gpu_steps.plan import PYTHON, Plan
from benchmarks.gpu_steps.processes import Completed, tail


def command(plan: Plan, work: str) -> tuple[list[str], dict]:
    xml = os.path.join(work, "cuda_tests.xml")
    paths = sorted(glob.glob(os.path.join("tests", "test_cuda_*.py"))) if plan.dry_run else ["tests"]
    cmd = [PYTHON, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths]
    env = {"SSL_CUDA_TESTS_ON_CPU": "1", "OMP_NUM_THREADS": "1"} if plan.dry_run else {}
    return cmd, env


def result(plan: Plan, work: str, done: Completed) -> tuple[dict, str | None]:
    """Counts from pytest's JUnit XML; the failure (None when all ran and passed)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    try:
        root = ET.parse(os.path.join(work, "cuda_tests.xml")).getroot()
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                failing.append(f"{case.get('classname')}::{case.get('name')}: "
                               f"{(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else ''}")
    except (OSError, ET.ParseError):
        pass
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    data = {**counts, "failing": failing}
    if done.returncode != 0 or counts["passed"] == 0:
        why = "no cuda test ran" if counts["passed"] == 0 and done.returncode in (0, 5) else \
            f"pytest exit code {done.returncode}"
        return data, f"{why}\n{tail(done.output)}"
    return data, None
