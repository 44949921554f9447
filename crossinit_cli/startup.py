"""Ctrl-C in a command's first second or so: one line and exit 130, not a traceback.

Before a command's own error handling runs (`commandline.handles_errors`), the `crossinit` process spends
about a second importing typer, rich and its own modules and parsing options; a KeyboardInterrupt there
would end in a traceback from whatever was being imported. Imported first by `cli.py`, this module takes
Ctrl-C over for that time (only in the `crossinit` program itself: not in a test or a program importing
the CLI, and not where SIGINT is ignored, as under nohup); `handles_errors` gives it back to Python.
"""

from __future__ import annotations

import os
import signal
import sys

MESSAGE = b"error: interrupted; nothing was written\n"


def _interrupted_at_start(signum: int, frame: object) -> None:
    os.write(2, MESSAGE)
    os._exit(130)  # nothing to clean up: no command has started


def started_as_crossinit(argv0: str) -> bool:
    """`argv0` is the `crossinit` script's or `python -m crossinit_cli`'s."""
    started = os.path.basename(argv0)
    return started == "crossinit" or (
        started == "__main__.py" and os.path.basename(os.path.dirname(argv0)) == "crossinit_cli"
    )


def take_over() -> None:
    """Ctrl-C exits at once with one line (from here until a command starts)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_at_start)


def give_back() -> None:
    """Ctrl-C raises KeyboardInterrupt again, so that a command that keeps finished work says what it kept."""
    if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if sys.argv and sys.argv[0] and started_as_crossinit(sys.argv[0]):
    take_over()
