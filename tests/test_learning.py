"""learning.py and batches.py used from Python, without the CLI: silent, told through hooks, the CLI's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossinit_cli.batches import BatchEntry, BatchHooks, BatchRequest, learn_batch
from crossinit_cli.errors import CrossinitError
from crossinit_cli.learning import LearnHooks, LearnRequest, Start, learn_identity
from crossinit_cli.store import Library

GRACE = Path(__file__).parent / "data" / "grace_hopper.jpg"


def test_learn_identity_is_silent_tells_its_hooks_and_learns_what_the_cli_learns(
    cli, library: Library, tiny_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    steps: list[tuple[int, int]] = []
    starts: list[Start] = []
    phases: list[str] = []
    hooks = LearnHooks(
        on_progress=lambda step, total, loss: steps.append((step, total)),
        on_start=starts.append,
        on_phase=lambda name, seconds: phases.append(name),
    )
    request = LearnRequest(name="engine", mode="fast", steps=3, seed=5, model=str(tiny_model))
    learned = learn_identity(library, [GRACE], request, hooks)
    assert capfd.readouterr() == ("", "")  # nothing printed: the hooks are the only voice
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert [s.name for s in starts] == ["engine"] and starts[0].resumed_at is None
    assert {"model load", "training", "library write"} <= set(phases)
    assert learned.identity.name == "engine" and learned.target.is_dir() and learned.model == str(tiny_model)

    result = cli("learn", GRACE, "--fast", "--steps", "3", "--seed", "5", "--model", tiny_model, "--name", "cli")
    assert result.exit_code == 0, result.stderr
    assert np.array_equal(library.effective_vectors("engine"), library.effective_vectors("cli"))


def test_learn_identity_raises_for_a_taken_name_before_loading_anything(
    library: Library, add_identity, tiny_model: Path
) -> None:
    add_identity("taken")
    phases: list[str] = []
    request = LearnRequest(name="taken", mode="fast", steps=1, model=str(tiny_model))
    with pytest.raises(CrossinitError, match="already exists; pass --force"):
        learn_identity(library, [GRACE], request, LearnHooks(on_phase=lambda name, seconds: phases.append(name)))
    assert phases == []  # refused before the photos, the imports or the model


def test_learn_batch_returns_every_outcome_and_tells_its_hooks(
    library: Library, tiny_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "people.csv"
    manifest.write_text(f"name,photos\nalice,{GRACE}\nbob,{tmp_path / 'missing.jpg'}\n")
    outcomes: list[str] = []
    hooks = BatchHooks(on_outcome=lambda outcome, finished: outcomes.append(f"{outcome.name} {outcome.status}"))
    request = BatchRequest(manifest, BatchEntry(mode="fast", steps=1), model=str(tiny_model))
    result = learn_batch(library, request, hooks)
    assert capfd.readouterr() == ("", "")
    assert outcomes == ["alice learned", "bob failed"]
    assert [(r["name"], r["status"]) for r in result.results] == [("alice", "learned"), ("bob", "failed")]
    assert result.failed == 1 and result.main and library.exists("alice")
