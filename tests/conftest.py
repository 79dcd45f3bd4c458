"""Shared test set-up: CPU only, few threads, repository root importable, signal handlers restored; the hooks of
mutation testing."""
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (`make test` runs two workers) each worker computes on one thread; alone, two; `make mutants`
# sets SSL_TEST_THREADS=1 (one test process per core).
torch.set_num_threads(int(os.environ.get("SSL_TEST_THREADS") or (1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)))


# No test reads or writes the real torch hub cache: tests that build or download weights point TORCH_HOME (or
# torch.hub.get_dir) at their own temporary folder; the rest get this session's (subprocesses inherit it).
if "PYTEST_TORCH_HOME_SET" not in os.environ:
    import tempfile
    os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="ssl_tests_torch_home_")
    os.environ["PYTEST_TORCH_HOME_SET"] = "1"

TINY_BACKBONE_ITERATIONS = 50  # tests build synthetic backbones of a few iterations only


@pytest.fixture(autouse=True)
def no_large_synthetic_backbone(monkeypatch):
    """A test that would build a real-sized synthetic backbone (configs/demo.json's, minutes of CPU) fails at once:
    tiny runs set backbone.pretrained "none", tests of the builder a few iterations."""
    from engine import synthetic_pretrain
    train = synthetic_pretrain.train_backbone

    def guarded(spec, *args, **kwargs):
        if spec.iterations > TINY_BACKBONE_ITERATIONS:
            raise AssertionError(f"a test would build the synthetic backbone {spec.stem} ({spec.iterations} "
                                 f"iterations): set backbone.pretrained to \"none\" in its run's overrides")
        return train(spec, *args, **kwargs)

    monkeypatch.setattr(synthetic_pretrain, "train_backbone", guarded)


@pytest.fixture(scope="session")
def original_signal_handlers():
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


@pytest.fixture(autouse=True)
def restore_signal_handlers(original_signal_handlers):
    """A run installs SIGTERM/SIGINT handlers (engine/graceful_stop.py) and removes them at its end; a run cut
    short by a test (Run.finish patched out, an injected exception) must not leave them to the test process."""
    yield
    for s, handler in original_signal_handlers.items():
        signal.signal(s, handler)


def pytest_runtest_logreport(report):
    from tests import mutation
    if mutation.collecting_stats():
        mutation.add_setup_duration(report)


def pytest_sessionfinish(session):
    from tests import mutation
    if mutation.collecting_stats():
        mutation.widen_stats(session)


# `make test` hands whole files to its two workers (--dist loadfile: a module's fixtures are set up once) in the
# order below: the files that cost most CPU (subprocesses and torchrun jobs included) first, so that the last ones
# to run are short and neither worker waits long for the other at the end. Measured on the 2-core machine; a file
# missing here only runs later in collection order.
HEAVY_FILES_FIRST = ("test_distributed.py", "test_gpu_check.py", "test_ssl_benchmark.py", "test_resume.py",
                     "test_dry_run_configs.py", "test_other_scripts.py", "test_long_runs.py", "test_model.py",
                     "test_run_wiring.py", "test_train_e2e.py", "test_precision.py", "test_return_to_best.py",
                     "test_logging.py", "test_benchmarks.py", "test_translate_labels.py", "test_script_fidelity.py",
                     "test_cli.py")


def order_heavy_files_first(items) -> None:
    """Stable sort of the items by their file's place in HEAVY_FILES_FIRST (the others after, as collected)."""
    rank = {name: k for k, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


def pytest_collection_modifyitems(session, config, items):
    from tests import mutation
    if mutation.running_a_mutant():
        mutation.order_cheapest_first(session, items)
    else:
        order_heavy_files_first(items)
