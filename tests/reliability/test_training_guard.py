"""The NaN/Inf guard of training, through a real `crossinit learn`: a run that diverges (what fp16 overflow
does on a GPU; here an absurd learning rate) stops with one line and keeps nothing, and an identity it was
meant to replace stays as it was."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.reliability.harness import DATA, assert_one_line_error, crossinit, leftovers, snapshot, write_embedding

pytestmark = pytest.mark.reliability


def test_diverging_training_stops_and_keeps_nothing(
    rhome: Path, env: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    write_embedding(tmp_path / "victim.safetensors", 1)
    assert crossinit("import", tmp_path / "victim.safetensors", "--name", "victim", env=env).returncode == 0
    before = snapshot(rhome)
    base = ["learn", DATA / "astronaut.png", "--fast", "--lr", "1e30", "--model", tiny_model, "--quiet"]
    runs = {
        # diverges at step 2: the loss itself becomes NaN
        "loss": [*base, "--steps", "3", "--name", "newcomer"],
        # one step: the loss was finite, the update that followed it overflowed the vectors
        "last update": [*base, "--steps", "1", "--name", "victim", "--force"],
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(lambda args: crossinit(*args, env=env, timeout=300), runs.values())))
    for label, done in results.items():
        assert_one_line_error(done, "diverged")
        assert "--lr" in done.stderr, label
    assert snapshot(rhome) == before
    assert leftovers(rhome) == []
