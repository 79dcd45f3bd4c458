"""Shared test set-up: CPU only, few threads, repository root importable; the hooks of mutation testing."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# two intra-op threads (the machine's cores); `make mutants` runs one test process per core with one each
torch.set_num_threads(int(os.environ.get("SSL_TEST_THREADS", "2")))


def pytest_runtest_logreport(report):
    from tests import mutation
    if mutation.collecting_stats():
        mutation.add_setup_duration(report)


def pytest_sessionfinish(session):
    from tests import mutation
    if mutation.collecting_stats():
        mutation.widen_stats(session)


def pytest_collection_modifyitems(session, config, items):
    from tests import mutation
    if mutation.running_a_mutant():
        mutation.order_fast_files_first(session, items)
