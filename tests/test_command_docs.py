"""docs/commands/ has one current page per command (regenerate with scripts/gen_command_docs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_command_docs  # noqa: E402


def test_every_command_has_a_page() -> None:
    from crossinit_cli.cli import app

    declared = {c.name or c.callback.__name__ for c in app.registered_commands}
    declared |= {g.name for g in app.registered_groups}
    assert declared == set(gen_command_docs.EXAMPLES)


@pytest.mark.parametrize("command", sorted(gen_command_docs.EXAMPLES))
def test_command_page_is_current(command: str) -> None:
    page = (ROOT / "docs" / "commands" / f"{command}.md").read_text(encoding="utf-8")
    assert page == gen_command_docs.render(command), "run: python scripts/gen_command_docs.py"
