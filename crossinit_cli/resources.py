"""Files shipped inside the package (see data/README.md for their sources and licences)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def celeb_names() -> tuple[str, ...]:
    """The 691 celebrity names of Celeb Basis (duplicates kept, as the official code keeps them)."""
    text = resources.files("crossinit_cli").joinpath("data/celeb_names.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
