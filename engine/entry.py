"""The top level of every script: user errors and deliberate stops end with one message and their exit code."""
from __future__ import annotations

import sys

from engine import distributed as dist
from utils.errors import UserError


def main_guard(main) -> None:
    """Run `main`; a user error prints its message and exits 2, without a traceback; a run that stopped on purpose
    (utils/errors.RunStopped: signal, bad file, divergence) prints its message once and exits with its own code.

    Under torchrun a failing rank exits at once (other errors are also recorded for torchrun's failure summary)
    and torchrun stops the other ranks, so the job ends non-zero instead of hanging in a collective. The process
    group is torn down only after success: NCCL's teardown could wait for ranks that will never arrive.
    """
    code = 0
    try:
        dist.run_recording_errors(main)
    except UserError as e:  # RunStopped (a stop on purpose) too: its own prefix and exit code, told by rank 0
        if dist.is_main() or not e.main_only:
            print(f"{e.label}{dist.rank_tag()}: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    if code:  # outside the handler: the run and its frames are released before the interpreter exits
        sys.exit(code)
    dist.cleanup()
