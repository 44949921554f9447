"""completions/ holds what scripts/gen_completions.py writes, and completion offers every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_completions  # noqa: E402


@pytest.mark.parametrize("shell", sorted(gen_completions.TARGETS))
def test_completion_scripts_are_current(shell: str) -> None:
    committed = (ROOT / "completions" / gen_completions.TARGETS[shell]).read_text(encoding="utf-8")
    assert committed == gen_completions.render(shell), "run: python scripts/gen_completions.py"


def _complete(words: str, cword: int) -> list[str]:
    env = dict(os.environ, _CROSSINIT_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
    code = "import sys; sys.argv[0] = 'crossinit'; from crossinit_cli.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return done.stdout.split()


def test_every_command_is_offered() -> None:
    from crossinit_cli.cli import app

    declared = {c.name or c.callback.__name__ for c in app.registered_commands}
    declared |= {g.name for g in app.registered_groups}
    assert declared <= set(_complete("crossinit ", 1))
    assert {"list", "learn", "generate", "export", "import", "config"} <= declared


def test_identity_names_are_completed(home: Path) -> None:
    (home / "identities" / "alice").mkdir(parents=True)
    (home / "identities" / "albert").mkdir()
    (home / "identities" / "bob").mkdir()
    assert _complete("crossinit show Al", 2) == ["Albert", "Alice"]


def test_tags_are_completed_from_the_catalog(home: Path) -> None:
    import numpy as np

    from crossinit_cli.store import Identity, Library

    library = Library(home)
    for name, tags in (("alice", ["Family", "2024"]), ("bob", ["work"]), ("carol", ["family"])):
        library.add(Identity(name=name, tokens=2, width=32, tags=tags), np.ones((2, 32), np.float32))
    assert library.tags("fa") == ["Family"]  # one spelling of each tag, whatever its case elsewhere
    assert _complete("crossinit list --tag ", 3) == ["2024", "Family", "work"]
    assert _complete("crossinit list --tag W", 3) == ["Work"]  # as typed, or bash would drop it
