"""The one exception type for mistakes a user can make (config, data, checkpoints).

Scripts catch it at the top level and print its message alone, without a traceback.
"""


class UserError(ValueError):
    """A problem the user can fix; the message names the thing and the fix."""
