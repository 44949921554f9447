"""What several commands share: the progress display on stderr, reading a FILE-or-stdin option.

Engines (train.py, sample.py, scoring.py) never import from here; what engines and commands both need
lives at engine level (`hf.py` quiets the Hugging Face libraries, `sample.check_seed_range` checks seeds).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from crossinit_cli import ui
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    from rich.progress import Progress

    from crossinit_cli.generation import GenerateHooks


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


# ---- generate's displays (the command and --manifest) -----------------------------------------


@contextmanager
def loading_status(show: bool, message: str) -> Iterator[None]:
    """A spinner with `message` (plain text) on stderr while a model loads, when `show`."""
    if not show:
        yield
        return
    with ui.err().status(escape(message)):
        yield


class SamplingBar:
    """Images done overall, and steps of the batch being sampled (rich, on stderr)."""

    def __init__(self, progress: Any, total_images: int) -> None:
        self.progress = progress
        self.images = progress.add_task("images", total=total_images) if progress else None
        self.steps = progress.add_task("steps", total=1) if progress else None

    def start(self, prompt: str, steps: int) -> None:
        if self.progress:
            description = json.dumps(prompt if len(prompt) <= 40 else prompt[:39] + "…", ensure_ascii=False)
            self.progress.reset(self.steps, total=steps, description=escape(description))

    def step(self, done: int, total: int) -> None:
        if self.progress:
            self.progress.update(self.steps, completed=done, total=total)

    def images_done(self, count: int) -> None:
        if self.progress:
            self.progress.advance(self.images, count)


@contextmanager
def sampling_progress(show: bool, total_images: int) -> Iterator[SamplingBar]:
    if not show:
        yield SamplingBar(None, total_images)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=ui.err(), transient=True) as progress:
        yield SamplingBar(progress, total_images)


def generation_hooks(show: bool) -> GenerateHooks:
    """The generation engine's warnings, hints and phases on stderr (the spinner only when `show`)."""
    from crossinit_cli.generation import GenerateHooks

    return GenerateHooks(
        warn=ui.warn,
        hint=lambda message: ui.info(escape(message)),
        loading=lambda message: loading_status(show, message),
        timed=ui.timed,
    )
