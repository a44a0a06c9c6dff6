"""One exception type for everything a user can fix.

The CLI turns a `UserError` into a single red line and exit code 2, so every stage
can fail loudly on bad input without ever showing a traceback to the user.
"""


class UserError(Exception):
    """Bad input: the message names the thing and the fix, in one line."""
