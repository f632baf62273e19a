"""Where `gradcomp client` takes its bearer token from, and how it shows text it did not write.

A token on the command line (`--token`) is in /proc/PID/cmdline, which every local user can read
(`ps`). `--token-file PATH` (one line; warned about when others may read it) and the environment
variable `$GRADCOMP_TOKEN` keep it out of the process list; `--token` still works, with a warning.

Text from the coordinator (its refusal reasons, job and client names, the DONE message) reaches the
client's terminal and logs. `printable` escapes control characters (ANSI escapes, newlines,
carriage returns, bidi overrides) and cuts it short, so a coordinator cannot forge log lines.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

TOKEN_ENV = "GRADCOMP_TOKEN"
MAX_SHOWN = 500  # characters of coordinator text shown


class TokenError(ValueError):
    """No usable token: none given, or a token file that cannot be read."""


def resolve_token(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(token, warnings): from --token-file, else --token, else $GRADCOMP_TOKEN."""
    warnings: list[str] = []
    path = getattr(args, "token_file", None)
    if path:
        try:
            mode = Path(path).stat().st_mode
            token = Path(path).read_text().strip()
        except OSError as err:
            raise TokenError(f"--token-file {path}: {err.strerror or err}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"--token-file {path} is readable by other users (mode {mode & 0o777:o}); chmod 600 it")
    elif getattr(args, "token", None):
        token = args.token
        if getattr(args, "token_from_cli", False):
            warnings.append(
                "--token puts the token in the process list (/proc/PID/cmdline, ps) for every local user to read; "
                f"use --token-file or ${TOKEN_ENV}"
            )
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token or any(c.isspace() for c in token):
        raise TokenError(f"no token: pass --token-file PATH or set ${TOKEN_ENV} (a token has no white space)")
    return token, warnings


def printable(text: object, limit: int = MAX_SHOWN) -> str:
    """`text` with every non-printable character escaped (\\x1b, \\n, \\u202e), at most `limit` characters."""
    s = str(text)
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s[:limit])
    return out + (f"... ({len(s) - limit} more characters)" if len(s) > limit else "")
