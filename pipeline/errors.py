"""The one exception type for mistakes a user can fix.

Anything raised as `UserError` reaches the user as a single line naming the cause and the fix,
with exit code 2 (see `pipeline.cli`). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the input or the environment that the user can fix; the message says how."""

    exit_code = 2
