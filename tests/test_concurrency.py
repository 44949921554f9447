"""Eight processes editing and importing the same and different identities at once lose nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossinit_cli.store import Identity, Library
from tests.conftest import OFFICIAL

WORKERS = 8
ROUNDS = 4

# Each worker is one process running many commands in-process (fast), so eight of them contend for
# the library's lock the way eight shell-loop processes would.
WORKER = r"""
import sys
from crossinit_cli.cli import app

worker, rounds, official = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def run(*args):
    try:
        app(list(args), standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise

for j in range(rounds):
    run("import", official, "--name", f"w{worker}-{j}")
    run("edit", "shared", "--tag", f"t{worker}-{j}")
    run("import", official, "--name", "contested", "--force")
    run("edit", f"own{worker}", "--note", f"round {j}")
    if j % 2:
        run("edit", f"w{worker}-{j - 1}", "--rename", f"renamed{worker}-{j - 1}")
    run("list", "--json")
print("ok")
"""


@pytest.mark.slow  # the default suite stays under ~10 min; the README's test command runs it
def test_parallel_edits_and_imports_lose_nothing(library: Library, tmp_path: Path) -> None:
    learned = np.ones((2, 32), np.float32)
    library.add(Identity(name="shared", tokens=2, width=32), learned, learned)
    for i in range(WORKERS):
        library.add(Identity(name=f"own{i}", tokens=2, width=32), learned * i)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(ROUNDS), str(OFFICIAL[0])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "ok" in out

    entries = library.list()
    names = {e.name for e in entries}
    assert all(isinstance(e, Identity) for e in entries), [e for e in entries if not isinstance(e, Identity)]
    for entry in entries:  # every entry's tensors load
        assert library.vectors(entry.name).learned.shape[0] == 2
    for i in range(WORKERS):
        for j in range(ROUNDS):
            expected = f"renamed{i}-{j}" if j % 2 == 0 and j + 1 < ROUNDS else f"w{i}-{j}"
            assert expected in names, expected
        assert library.get(f"own{i}").notes == f"round {ROUNDS - 1}"
    assert set(library.get("shared").tags) == {f"t{i}-{j}" for i in range(WORKERS) for j in range(ROUNDS)}
    assert library.vectors("contested").learned.shape == (2, 1024)
    leftovers = [p for p in library.home.rglob("*") if ".crossinit-tmp-" in p.name or "~" in p.name]
    assert leftovers == []
