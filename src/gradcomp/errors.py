"""The one base of the errors a user can act on.

`gradcomp` (cli.py) shows a `GradcompError` as one line and exits 2: the input was wrong (a job file,
an argument, a file on disk, an answer from the other side), not the program. Any other exception is
an internal error and is shown with its traceback. Each package's own errors (`ConfigError`,
`TaskError`, `WireError`, ...) derive from it, most also from `ValueError` for callers that catch that.
"""

from __future__ import annotations


class GradcompError(Exception):
    """An error in what gradcomp was given, reported to the user without a traceback."""


class UserError(GradcompError, ValueError):
    """Bad input with no more specific error class (an argument, a bind address, a tokens file, ...)."""
