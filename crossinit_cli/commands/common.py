"""What several commands share: the progress display on stderr, reading a FILE-or-stdin option.

Engines (train.py, sample.py, scoring.py) never import from here; what engines and commands both need
lives at engine level (`hf.py` quiets the Hugging Face libraries, `sample.check_seed_range` checks seeds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import ui
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    from rich.progress import Progress


EXIT_PARTIAL = 4
"""`generate --manifest` / `learn --batch`: some lines or identities failed (the rest were done); when none
was done the status is 1. docs/exit-codes.md."""


def partial_failure(failed: int, total: int, what: str) -> int:
    """The exit status of a run of `total` lines or identities of which `failed` failed, after one summary
    line on stderr saying how many ("2 of 7 lines failed"): 0 none, EXIT_PARTIAL some."""
    if not failed:
        return 0
    ui.warn(f"{failed} of {total} {what} failed (exit status {EXIT_PARTIAL}; see above for each)")
    return EXIT_PARTIAL


def stderr_progress(quiet: bool, *columns: Any, transient: bool = False) -> Progress | None:
    """A rich progress bar with these columns on stderr, not yet started; None when `quiet` or when stderr
    is not a terminal (a log file gets plain lines from the caller, or nothing)."""
    console = ui.err()
    if quiet or not console.is_terminal:
        return None
    from rich.progress import Progress

    return Progress(*columns, console=console, transient=transient)


def read_source(source: str, what: str, shape: str) -> str:
    """The text of FILE, or of stdin for '-' (saying so on a terminal); a one-line error if unreadable."""
    if source == "-":
        if sys.stdin.isatty():
            ui.info(f"reading {what} from stdin, {shape} (Ctrl-D to finish)")
        return sys.stdin.read()
    try:
        return Path(source).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CrossinitError(f"cannot read {what} from {source}: {reason}") from None
