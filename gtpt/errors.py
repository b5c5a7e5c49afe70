"""How the ``gtpt`` commands report failures: one line naming what is wrong and what to do, never a traceback.

``--debug`` (any position on the command line) or ``GTPT_DEBUG=1`` in the environment turns tracebacks back on.
Exit codes: 2 for a bad argument (a bad value, a missing input file, a checkpoint of another variant: the
command line has to change), 1 for anything else (a full disk, a bug), 130 after Ctrl-C. Torch-free, so that
``gtpt --help`` stays fast.
"""
from __future__ import annotations

import os

DEBUG_ENV = "GTPT_DEBUG"


class UsageError(ValueError):
    """A bad command-line argument or input: exit code 2, with the message as the one line shown."""


def debug_enabled() -> bool:
    """True when ``--debug`` was given to ``gtpt`` or ``GTPT_DEBUG`` is set to anything but ``""`` / ``0``."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def exit_code(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return 2
    return 1


def one_line(e: BaseException, limit: int = 400) -> str:
    """The message of ``e`` as one line: its first line (the rest is in ``--debug``'s traceback), the type named
    for errors that are not plain bad values, truncated to ``limit`` characters."""
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = f"missing key {e.args[0]!r}"
    lines = text.splitlines()
    msg = lines[0].rstrip(":") if lines else ""
    if exit_code(e) != 2 or not msg:
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    if len(msg) > limit:
        msg = msg[:limit - 3] + "..."
    if exit_code(e) == 1:
        msg += " (run again with --debug for the traceback)"
    elif len(lines) > 1:
        msg += " (details: --debug)"
    return msg
