"""The exception types for what a user can fix (config, data, checkpoints) and for runs that stop on purpose.

Scripts catch them at the top level (`engine.run.main_guard`) and print the message alone, without a
traceback, then exit with the exception's `exit_code`.
"""


class UserError(ValueError):
    """A problem the user can fix; the message names the thing and the fix."""

    exit_code = 2
    label = "error"        # the message's prefix
    main_only = False      # under torchrun: only rank 0 prints it (every rank knows the same story)


class RunStopped(UserError):
    """A run that stopped on purpose after saving what it could (a signal, a bad file, a divergence).

    Every process raises it at the same point, so only rank 0 prints the message.
    """

    main_only = True

    def __init__(self, message: str, exit_code: int = 2, label: str = "error"):
        super().__init__(message)
        self.exit_code = exit_code
        self.label = label
