"""The one exception type for bad user input (defined with the model, which raises it too).

`UserError` is a `ValueError`, so Python callers can catch it as such; the CLI catches it, prints its
single line and exits with status 2 (no traceback).
"""

from moelpr.model.errors import UserError

__all__ = ["UserError"]
