"""User-facing errors: one line naming the file, sample or field and the reason; no traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2


def reports_user_errors(fn):
    """Decorator for CLI commands: a UserError becomes one line `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(UserError.exit_code)

    return wrapper
