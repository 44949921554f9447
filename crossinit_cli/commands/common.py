"""What several commands share: the progress display on stderr.

Engines (train.py, sample.py, scoring.py) never import from here; what engines and commands both need
lives at engine level (`hf.py` quiets the Hugging Face libraries, `sample.check_seed_range` checks seeds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossinit_cli import ui

if TYPE_CHECKING:
    from rich.progress import Progress


def stderr_progress(quiet: bool, *columns: Any, transient: bool = False) -> Progress | None:
    """A rich progress bar with these columns on stderr, not yet started; None when `quiet` or when stderr
    is not a terminal (a log file gets plain lines from the caller, or nothing)."""
    console = ui.err()
    if quiet or not console.is_terminal:
        return None
    from rich.progress import Progress

    return Progress(*columns, console=console, transient=transient)
