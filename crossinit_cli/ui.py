"""Terminal output: data on stdout (rich tables, or one JSON document with --json), messages on stderr.

rich honours NO_COLOR and drops styling when the stream is not a terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from rich.console import Console
from rich.markup import escape

from crossinit_cli.errors import clean, shown

STARTED = time.perf_counter()
"""When the CLI's modules were imported (Python's own start, ~0.1 s, comes before): `elapsed` counts from here."""


@cache
def out() -> Console:
    return Console(highlight=False)


@cache
def err() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """The one JSON document a --json command prints; nothing else goes to stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def print_json_lines(items: list[str]) -> None:
    """A JSON array of already-encoded items, one a line (`list --json` of 10,000 entries stays fast)."""
    sys.stdout.write("[\n" + ",\n".join(items) + "\n]\n" if items else "[]\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A message on stderr (rich markup), any control character in it written as its escape (`errors.shown`):
    names, paths and metadata from other people's files reach it."""
    err().print("\n".join(shown(line) for line in message.split("\n")), soft_wrap=True)


def warn(message: str) -> None:
    err().print(f"[yellow]warning:[/] {escape(clean(message))}", soft_wrap=True)


def error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    err().print(f"[bold red]error:[/] {escape(clean(first))}", soft_wrap=True)


class Verbosity:
    """Set by the global --verbose flag: commands then report how long each phase took."""

    on = False


def elapsed() -> float:
    """Seconds since the CLI started (`STARTED`): what a whole command has cost so far."""
    return time.perf_counter() - STARTED


def timing(phase: str, seconds: float) -> None:
    """With --verbose, print on stderr a time measured elsewhere, as `timed` prints its own."""
    if Verbosity.on:
        err().print(f"[dim]time[/] {escape(phase)}: {seconds:.2f} s", soft_wrap=True)


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """With --verbose, print on stderr how long `phase` took (also when it fails)."""
    if not Verbosity.on:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        timing(phase, time.perf_counter() - started)
