"""`learn --resume`: a run interrupted by Ctrl-C or kill -9 continues to the same vectors, bit for bit (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossinit_cli import checkpoint
from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
RUN = ("--steps", "100", "--batch-size", "1", "--seed", "3", "--snapshot-every", "40")


def _start(home: Path, tiny_model: Path, name: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "crossinit_cli", "learn", str(ASTRONAUT), "--name", name,
               "--model", str(tiny_model), *RUN]  # fmt: skip
    env = {**os.environ, "CROSSINIT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(home: Path, name: str, process: subprocess.Popen, step: int) -> None:
    """Until the run's checkpoint has passed `step` (it is written every few steps)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        run = checkpoint.find(home, name)
        if run is not None and run.step >= step:
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no checkpoint past step {step}: {process.communicate()[1]}")


def _kill_when_past(home: Path, tiny_model: Path, name: str, step: int) -> None:
    """A learn killed with SIGKILL once its checkpoint has passed `step`."""
    process = _start(home, tiny_model, name)
    try:
        _wait_for_checkpoint(home, name, process, step)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def _assert_same_run(library: Library, resumed: str, reference: str) -> None:
    one, two = library.vectors(resumed), library.vectors(reference)
    assert np.array_equal(one.learned, two.learned) and np.array_equal(one.init, two.init)
    assert sorted(one.snapshots) == sorted(two.snapshots) == [40, 80, 100]
    for step in one.snapshots:
        assert np.array_equal(one.snapshots[step]["learned"], two.snapshots[step]["learned"])
    a, b = library.get(resumed), library.get(reference)
    assert a.training["final_loss"] == b.training["final_loss"] and a.snapshots == b.snapshots


@pytest.mark.parametrize(
    "how",
    [pytest.param(signal.SIGINT, id="ctrl-c"), pytest.param(signal.SIGKILL, id="kill-9", marks=pytest.mark.slow)],
)
def test_an_interrupted_learn_resumes_to_the_same_vectors(
    how: signal.Signals, cli, library: Library, home: Path, tiny_model: Path
) -> None:
    process = _start(home, tiny_model, "alice")
    try:
        _wait_for_checkpoint(home, "alice", process, 20)
        process.send_signal(how)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    run = checkpoint.find(home, "alice")
    assert run is not None and 20 <= run.step < 100, stderr
    assert not library.exists("alice")  # nothing half-stored in the library
    if how == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in stderr
        assert f"the run is kept at step {run.step} of 100" in stderr and "crossinit learn --resume alice" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
        assert run.step % 5 == 0  # the last periodic checkpoint

    listed = cli("list")
    assert f"unfinished run: alice at step {run.step} of 100" in " ".join(listed.stderr.split())
    again = cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_model, *RUN)
    assert again.exit_code == 1 and "crossinit learn --resume alice" in again.stderr  # not silently restarted

    resumed = cli("learn", "--resume", "alice")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming alice at step {run.step} of 100" in resumed.stderr  # continued, not started over
    assert checkpoint.find(home, "alice") is None and library.get("alice").training["resumed_at"] == run.step
    assert not (home / checkpoint.FOLDER).exists()  # nothing left behind once stored
    reference = cli("learn", ASTRONAUT, "--name", "reference", "--model", tiny_model, *RUN, "--quiet")
    assert reference.exit_code == 0, reference.stderr
    _assert_same_run(library, "alice", "reference")


def test_remove_clears_an_unfinished_run_and_resume_needs_one(cli, library: Library, home: Path, tiny_model: Path):
    _kill_when_past(home, tiny_model, "bob", 5)
    assert checkpoint.find(home, "bob") is not None
    removed = cli("remove", "bob", "--yes")
    assert removed.exit_code == 0 and "removed the unfinished run of bob" in removed.stderr
    assert checkpoint.find(home, "bob") is None and not (home / checkpoint.FOLDER / "bob").exists()
    missing = cli("learn", "--resume", "bob")
    assert missing.exit_code == 1 and missing.stderr.strip() == (
        "error: no unfinished run of 'bob'; `crossinit list` shows unfinished runs"
    )
    both = cli("learn", ASTRONAUT, "--resume", "bob")
    assert both.exit_code == 2 and "give only the name" in both.stderr  # a usage mistake


def test_the_checkpoint_holds_the_whole_run_state(library: Library, home: Path, tiny_model: Path) -> None:
    """What a checkpoint file holds: rows, AdamW moments, every generator, data order, losses, settings."""
    from typer.testing import CliRunner

    from crossinit_cli.cli import app

    _kill_when_past(home, tiny_model, "carol", 10)
    run = checkpoint.find(home, "carol")
    state = run.load_state()
    assert state["step"] == run.step and len(state["losses"]) == run.step
    assert state["rows"]["learned"].shape == (2, 32)
    assert set(state["optimizer"]["state"][0]) >= {"exp_avg", "exp_avg_sq", "step"}
    assert int(state["optimizer"]["state"][0]["step"]) == run.step
    assert {"draw", "noise", "torch"} <= set(state["rng"])
    settings = json.loads((run.path / checkpoint.RUN).read_text())
    assert settings["train"]["seed"] == 3 and settings["train"]["steps"] == 100 and settings["snapshot_every"] == 40
    assert len(run.crops()) == 1 and run.crops()[0].size == (64, 64)
    assert not [p for p in run.path.rglob("*") if p.name.startswith(".crossinit-tmp")]  # atomic writes only

    # The state is what the rest of the run follows: AdamW's moments zeroed, the result is another one.
    import torch

    state["optimizer"]["state"][0]["exp_avg"].zero_()
    state["optimizer"]["state"][0]["exp_avg_sq"].zero_()
    torch.save(state, run.path / checkpoint.STATE)
    runner = CliRunner()
    assert runner.invoke(app, ["learn", "--resume", "carol", "--quiet"]).exit_code == 0
    reference = ["learn", str(ASTRONAUT), "--name", "reference", "--model", str(tiny_model), *RUN, "--quiet"]
    assert runner.invoke(app, reference).exit_code == 0
    assert not np.array_equal(library.vectors("carol").learned, library.vectors("reference").learned)


def test_resume_takes_a_new_total_of_steps_and_refuses_every_other_training_option(
    cli, library: Library, home: Path, tiny_model: Path
) -> None:
    _kill_when_past(home, tiny_model, "dave", 10)
    done = checkpoint.find(home, "dave").step
    for option in (["--lr", "0.1"], ["--seed", "0"], ["--fast"], ["--model", str(tiny_model)], ["--no-align"]):
        refused = cli("learn", "--resume", "dave", *option)
        assert refused.exit_code == 2 and refused.stderr.startswith("Usage: crossinit learn"), refused.stderr
        assert f"{option[0]} cannot change a resumed run" in " ".join(refused.stderr.replace("│", " ").split())
    fewer = cli("learn", "--resume", "dave", "--steps", "1")
    assert fewer.exit_code == 1 and f"fewer than the {done} steps" in fewer.stderr
    assert checkpoint.find(home, "dave").steps == 100  # nothing changed by what was refused

    resumed = cli("learn", "--resume", "dave", "--steps", str(done + 2), "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming dave at step {done} of {done + 2}" in resumed.stderr
    training = library.get("dave").training
    assert training["steps"] == done + 2 and training["resumed_at"] == done
    import typer

    from crossinit_cli.cli import app

    learn = typer.main.get_command(app).commands["learn"]
    assert "only --steps (a new total" in next(p.help for p in learn.params if p.name == "resume")


def test_a_second_learn_of_a_name_in_training_is_refused_and_the_first_goes_on(
    cli, library: Library, home: Path, tiny_model: Path
) -> None:
    """Two `learn`s of one name in one library: the second (even with --force, which starts an unfinished run
    over) is refused in one line while the first trains; it no longer deletes the first's checkpoint."""
    first = _start(home, tiny_model, "alice")
    try:
        _wait_for_checkpoint(home, "alice", first, 5)
        first.send_signal(signal.SIGSTOP)  # frozen mid-run: its checkpoint and its run lock held
        saved = checkpoint.find(home, "alice")
        assert saved is not None
        second = cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_model, *RUN, "--force")
        assert second.exit_code == 1 and second.stderr.count("error:") == 1, second.stderr
        last = second.stderr.splitlines()[-1]
        assert last.startswith("error: another crossinit process is learning 'alice' in this library right now")
        after = checkpoint.find(home, "alice")
        assert after is not None and after.settings["started"] == saved.settings["started"]
        assert (after.path / checkpoint.STATE).is_file() and after.step == saved.step
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=180)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert library.get("alice").training["steps"] == 100 and checkpoint.find(home, "alice") is None


def test_a_name_stored_while_the_model_loads_is_refused_before_training(
    cli, library: Library, home: Path, tiny_model: Path, add_identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`learn` checks the name first, loads the model for seconds, then trains: an identity of that name
    stored meanwhile (another `learn`, an `import`) is refused once the run is held, before any training,
    with no unfinished run left behind; the stored one is untouched."""
    from crossinit_cli import learning

    real = learning.load_trainer

    def loading_while_another_stores(*args, **kwargs):
        trainer = real(*args, **kwargs)
        add_identity("bob", seed=7)
        return trainer

    monkeypatch.setattr(learning, "load_trainer", loading_while_another_stores)
    assert not library.exists("bob")
    result = cli("learn", ASTRONAUT, "--name", "bob", "--model", tiny_model, "--steps", "2", "--batch-size", "1")
    assert result.exit_code == 1 and result.stderr.count("error:") == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: identity 'bob' already exists; pass --force")
    assert checkpoint.find(home, "bob") is None and not (home / checkpoint.FOLDER).exists()
    assert library.get("bob").training == {"mode": "fast", "steps": 25}  # the one stored meanwhile
