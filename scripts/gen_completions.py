"""Write crossinit's shell completion scripts into completions/ (run after adding or renaming commands).

The scripts are Typer's: they ask `crossinit` itself for candidates at completion time, so every command
and option is offered. tests/test_completions.py fails when these files differ from what this writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TARGETS = {"bash": "crossinit.bash", "zsh": "_crossinit", "fish": "crossinit.fish"}


def render(shell: str) -> str:
    env = dict(os.environ, _CROSSINIT_COMPLETE=f"source_{shell}")
    code = "import sys; sys.argv[0] = 'crossinit'; from crossinit_cli.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout


def main(folder: Path = Path(__file__).resolve().parent.parent / "completions") -> None:
    folder.mkdir(exist_ok=True)
    for shell, filename in TARGETS.items():
        (folder / filename).write_text(render(shell), encoding="utf-8")
        print(f"wrote {folder / filename}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "completions")
