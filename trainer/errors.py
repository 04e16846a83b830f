"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad input, wrong flag, mismatched files). The message says how."""
