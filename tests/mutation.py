"""Mutation testing (`make mutants`): mutmut 3.8.1 over utils/ and model/, a developer tool kept out of `make test`.

mutmut copies the repository into mutants/, writes every mutant of the files it mutates behind a switch, runs the
selected test files once to learn which tests call which function ("stats"), then runs, for each mutant, the tests
that called its function, and records killed / survived / timeout per mutant. Configuration: setup.cfg, [mutmut];
the test files that may kill each module's mutants: setup.cfg, [mutants] (fast ones: a module's run then takes
minutes, not hours, on two cores).

Three pieces live here:
- `widen_stats`, called from tests/conftest.py when mutmut collects its stats. mutmut gives a function to the test
  during whose run it was called; a module-scoped fixture (one tiny training run shared by a file's tests) runs
  inside the first test that asks for it, so the other tests of that file, which assert on the same run, would
  never see the mutant. Every test of a file that called the function is given to it, limited to the files that
  setup.cfg's [mutants] lists for the function's module, and the setup time of fixtures is added to the tests'
  durations (mutmut's time limit per mutant is a multiple of them).
- `order_cheapest_first`, called from tests/conftest.py when mutmut runs a mutant: see its docstring.
- `report()`: the score per module from mutmut's result files (python tests/mutation.py).
"""
from __future__ import annotations

import configparser
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code), reduced to what the report shows
KILLED, SURVIVED, TIMEOUT, NO_TESTS = "killed", "survived", "timeout", "no tests"
STATUS = {1: KILLED, 3: KILLED, 0: SURVIVED, 5: NO_TESTS, 33: NO_TESTS, 36: TIMEOUT, -24: TIMEOUT, 24: TIMEOUT,
          152: TIMEOUT, 255: TIMEOUT}


def plan(root: Path = ROOT) -> dict[str, set[str]]:
    """setup.cfg [mutants]: module path (utils/ssl_steps.py) -> the test files that may kill its mutants."""
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the paths as written
    parser.read(root / "setup.cfg")
    return {module: set(files.split()) for module, files in parser["mutants"].items()}


def _module_of(function: str, modules: list[str]) -> str | None:
    """The module path of a mangled function name (engine.run.xǁRunǁfinish -> engine/run.py)."""
    for module in modules:
        if function.startswith(module[:-3].replace("/", ".") + "."):
            return module
    return None


def collecting_stats() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST") == "stats"


def add_setup_duration(report) -> None:
    """pytest_runtest_logreport while mutmut collects stats: fixture set-up counts towards the test's duration."""
    if report.when == "setup":
        from mutmut.state import state
        state().duration_by_test[report.nodeid] = state().duration_by_test.get(report.nodeid, 0.0) + report.duration


def widen_stats(session) -> None:
    """pytest_sessionfinish while mutmut collects stats: see the module docstring."""
    from mutmut.state import state
    by_file: dict[str, set[str]] = defaultdict(set)
    for item in session.items:
        by_file[item.nodeid.split("::")[0]].add(item.nodeid)
    allowed = plan(Path(session.config.rootpath))
    modules = sorted(allowed, key=len, reverse=True)
    tests_by_function = state().tests_by_mangled_function_name
    for function, tests in list(tests_by_function.items()):
        widened = set(tests).union(*(by_file[t.split("::")[0]] for t in tests))
        module = _module_of(function, modules)
        if module is not None:
            widened = {t for t in widened if t.split("::")[0] in allowed[module]}
        tests_by_function[function] = widened


def running_a_mutant() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST", "") not in ("", "stats", "list_all_tests", "mutant_generation")


def _shares_a_costly_fixture(item) -> bool:
    """Whether the test asks (in its signature) for a fixture wider than the function, e.g. a file's tiny run."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(defs and defs[-1].scope != "function"
               for name, defs in info.name2fixturedefs.items() if name in info.argnames)


def order_cheapest_first(session, items) -> None:
    """pytest_collection_modifyitems for a mutant: the cheapest first, by mutmut's stats (fixture set-up included):
    each test that needs no shared run is a unit of its own, the tests of a file that share its runs (module
    fixtures) one unit, which keeps them together, cheapest first (the fixture is set up by whichever runs first);
    a test not in the stats yet counts 0.
    mutmut stops at the first failure, so a unit test that kills the mutant in milliseconds runs before any tiny
    training run."""
    path = Path(session.config.rootpath) / "mutants" / "mutmut-stats.json"
    if not path.is_file():
        path = Path(session.config.rootpath) / "mutmut-stats.json"  # pytest runs inside mutants/
    if not path.is_file():
        return
    durations = json.loads(path.read_text())["duration_by_test"]
    position = {item: k for k, item in enumerate(items)}
    # units: a test that needs no shared run alone; the tests of a file that share its runs together
    shared = {item for item in items if _shares_a_costly_fixture(item)}
    shared_cost: dict[str, float] = defaultdict(float)
    for item in shared:
        shared_cost[item.nodeid.split("::")[0]] += durations.get(item.nodeid, 0.0)

    def key(item):
        file, seconds = item.nodeid.split("::")[0], durations.get(item.nodeid, 0.0)  # a new test: 0
        if item in shared:
            return (shared_cost[file], file, seconds, position[item])
        return (seconds, item.nodeid, 0.0, position[item])
    items.sort(key=key)


def scores(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """Per mutated file: counts of killed / survived / timeout / no tests / other, from mutants/**/*.py.meta."""
    out: dict[str, dict[str, int]] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(root / "mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = {KILLED: 0, SURVIVED: 0, TIMEOUT: 0, NO_TESTS: 0, "not run": 0, "other": 0}
        for code in codes.values():
            counts["not run" if code is None else STATUS.get(code, "other")] += 1
        out[module] = counts
    return out


def report(root: Path = ROOT, only: list[str] | None = None) -> str:
    """A table: module, mutants, killed, timeout, survived, no tests, not run, score = (killed + timeout) / (all
    that ran) in per cent."""
    rows = ["| module | mutants | killed | timeout | survived | no tests | not run | score |",
            "|---|---|---|---|---|---|---|---|"]
    for module, c in scores(root).items():
        if only and module not in only:
            continue
        ran = c[KILLED] + c[TIMEOUT] + c[SURVIVED]
        score = f"{100 * (c[KILLED] + c[TIMEOUT]) / ran:.1f} %" if ran else "-"
        rows.append(f"| {module} | {sum(c.values())} | {c[KILLED]} | {c[TIMEOUT]} | {c[SURVIVED]} | {c[NO_TESTS]} "
                    f"| {c['not run']} | {score} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(report(only=sys.argv[1:] or None))
