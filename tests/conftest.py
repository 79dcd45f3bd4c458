"""Shared test set-up: CPU only, few threads, repository root importable, signal handlers restored."""
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (`make test` runs two workers) each worker computes on one thread; alone, two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def original_signal_handlers():
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


@pytest.fixture(autouse=True)
def restore_signal_handlers(original_signal_handlers):
    """A run installs SIGTERM/SIGINT handlers (utils/graceful_stop.py) and removes them at its end; a run cut
    short by a test (Run.finish patched out, an injected exception) must not leave them to the test process."""
    yield
    for s, handler in original_signal_handlers.items():
        signal.signal(s, handler)
