"""User-facing errors: one line naming the file, sample or field and the reason; no traceback."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2
