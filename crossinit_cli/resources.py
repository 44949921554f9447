"""Files shipped inside the package (see data/README.md for their sources and licences)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path

SAMPLE_PHOTO = "grace_hopper.jpg"


@cache
def celeb_names() -> tuple[str, ...]:
    """The 691 celebrity names of Celeb Basis (duplicates kept, as the official code keeps them)."""
    text = resources.files("crossinit_cli").joinpath("data/celeb_names.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@contextmanager
def sample_photo() -> Iterator[Path]:
    """The face photo shipped for `doctor --self-test` (public domain, see data/README.md), as a file path."""
    with resources.as_file(resources.files("crossinit_cli").joinpath(f"data/{SAMPLE_PHOTO}")) as path:
        yield Path(path)
