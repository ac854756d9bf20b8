"""The one exception type for bad user input.

`UserError` is a `ValueError`, so Python callers can catch it as such; the CLI catches it, prints its
single line and exits with status 2 (no traceback).
"""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it, on one line."""
