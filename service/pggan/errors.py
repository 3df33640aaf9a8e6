"""Errors the user can act on. The CLI prints them as one line (no traceback) and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file or bucket, absent credentials, a config clash."""
