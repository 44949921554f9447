"""Fixtures of the reliability suite: a library home and the environment of `crossinit` processes using it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.harness import cli_env


@pytest.fixture()
def rhome(tmp_path: Path) -> Path:
    """The library home the `crossinit` processes of one test use (not created yet)."""
    return tmp_path / "home"


@pytest.fixture()
def env(rhome: Path, tmp_path: Path) -> dict[str, str]:
    return cli_env(rhome, tmp_path / "config.toml")
