"""The layout's one rule (issue 29): imports run one way, scripts -> engine/ -> {utils/ (the method), data/, model/}.

The method's building blocks (utils/) and the networks (model/) use neither the engine nor the data; the data uses
no engine and no method; utils.errors is the one module everybody may share. Every import statement of every module
is read (also those inside functions), so an arrow back up anywhere fails here with the file and the line."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "utils", "data", "model")
SHARED = "utils.errors"
# Which project packages each package may import (besides itself and utils.errors).
ALLOWED = {"engine": {"utils", "data", "model"}, "utils": set(), "data": set(), "model": set()}
# Thin entry points kept at the paths of documented commands: `python3 utils/translate_labels.py` (the release's
# command) and `python3 -m utils.curves RUN_DIR`. They only import the tool they start.
ENTRY_POINTS = {"utils/translate_labels.py": "data.translate_labels", "utils/curves.py": "engine.curves"}
SCRIPTS = ("trainSSL", "trainSSL_less_memory", "trainSSL_domain_adaptation_targetCity", "evaluateSSL", "predict")


def imported_modules(path: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the file: `import a.b` -> a.b; `from a.b import c` -> a.b, and a.b.c when
    a.b is a bare package name (`from utils import ssl_steps` imports the module utils.ssl_steps)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if "." in node.module:
                found.append((node.lineno, node.module))
            else:
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def arrows_back_up(root: str = ROOT) -> list[str]:
    """Every import that breaks the rule, as 'file:line imports module'."""
    bad = []
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                for line, module in imported_modules(path):
                    top = module.split(".")[0]
                    if rel in ENTRY_POINTS and module.startswith(ENTRY_POINTS[rel]):
                        continue
                    if top in SCRIPTS or top in ("benchmarks", "tests"):
                        bad.append(f"{rel}:{line} imports {module}")
                    elif top in PACKAGES and top != package and top not in ALLOWED[package] \
                            and module != SHARED:
                        bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_imports_run_one_way():
    assert arrows_back_up() == []


@pytest.mark.parametrize("package, line, expected", [
    ("utils", "from engine.config import fidelity", "utils/planted.py:1 imports engine.config"),
    ("model", "import data.synthetic", "model/planted.py:1 imports data.synthetic"),
    ("data", "from utils.memory_bank import MemoryBank", "data/planted.py:1 imports utils.memory_bank"),
    ("engine", "import trainSSL", "engine/planted.py:1 imports trainSSL"),
])
def test_an_arrow_back_up_is_found(tmp_path, package, line, expected):
    """The walker itself, on a planted module in a copy-free tree: each forbidden kind of import is reported."""
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    (tmp_path / package / "planted.py").write_text(line + "\n")
    (tmp_path / "model" / "ok.py").write_text("from utils.errors import UserError\nimport torch\n")
    (tmp_path / "engine" / "ok.py").write_text("from data import build_data\nfrom utils import ssl_steps\n")
    assert arrows_back_up(str(tmp_path)) == [expected]


def test_scripts_reach_the_method_through_the_engine_only_where_they_must():
    """The training scripts import the engine's Run and main_guard and the method's steps; nothing of the engine's
    internals (distributed, checkpoints, config) is imported by a training script."""
    for script in SCRIPTS[:3]:
        modules = {m for _, m in imported_modules(os.path.join(ROOT, script + ".py"))}
        engine = {m for m in modules if m.startswith("engine.")}
        assert engine <= {"engine.run", "engine.run.Run", "engine.entry", "engine.entry.main_guard"}, script
