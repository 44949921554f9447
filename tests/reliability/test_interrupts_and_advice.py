"""Ctrl-C and the tool's own advice, through a real `crossinit` process (issue 28): Ctrl-C in a command's first
second and a half is one line and exit 130, never a traceback from an import; Ctrl-C during a multi-name
`remove` says exactly what went and what stayed; a value the Hub would reject is one line at once."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from crossinit_cli.store import Library
from tests.reliability.harness import (
    DATA,
    assert_one_line_error,
    crossinit,
    fault_env,
    start,
    write_embedding,
)

pytestmark = pytest.mark.reliability

DELAYS_S = (0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.5)
"""When Ctrl-C comes, after the process starts: from just after Python's own start-up (the `crossinit` script's
first line, `import re`, comes before any of crossinit's code can take Ctrl-C over) through the imports,
option parsing and the command's first work."""


def test_ctrl_c_in_a_commands_first_second_and_a_half_is_one_line(env: dict[str, str]) -> None:
    outcomes = []
    for delay in DELAYS_S:
        # learn: seconds of imports (face detection) before it refuses the absent model
        proc = start("learn", DATA / "astronaut.png", "--model", "owner/not-downloaded", env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        outcomes.append((delay, proc.returncode))
        assert "Traceback" not in err, (delay, err[-2000:])
        if proc.returncode == 130:  # after what it had said so far (on a fast CPU: "using 1 photo: ...")
            lines = err.splitlines()
            assert lines[-1] == "error: interrupted; nothing was written", (delay, err)
            assert not any(line.startswith("error:") for line in lines[:-1]), (delay, err)
        else:  # it finished first: its own one-line refusal
            assert proc.returncode == 1 and err.strip().startswith("error:"), (delay, proc.returncode, err)
    assert sum(code == 130 for _, code in outcomes) >= len(DELAYS_S) // 2, outcomes
    print(f"\nCtrl-C at start: {outcomes}")


def _kill_point(env: dict[str, str], home: Path, tmp_path: Path, names: list[str]) -> int:
    """The number of the counted file-system call that removes `names[1]`'s folder (its rename aside)."""
    log = tmp_path / "calls.log"
    probe = tmp_path / "probe"
    shutil.copytree(home, probe)
    counted = fault_env({**env, "CROSSINIT_HOME": str(probe)}, f"count:{log}", probe, "rename")
    assert crossinit("remove", *names, "--yes", env=counted).returncode == 0
    calls = log.read_text().splitlines()
    return next(int(line.split()[0]) for line in calls if f"/identities/{names[1]}" in line)


def test_an_interrupted_multi_name_remove_says_exactly_what_it_removed(
    rhome: Path, env: dict[str, str], tmp_path: Path
) -> None:
    names = ["alice", "carol", "dave"]
    for seed, name in enumerate(names):
        write_embedding(tmp_path / f"{name}.safetensors", seed)
        assert crossinit("import", tmp_path / f"{name}.safetensors", env=env).returncode == 0
    nth = _kill_point(env, rhome, tmp_path, names)
    ready = tmp_path / "hanging"
    proc = start("remove", *names, "--yes", env=fault_env(env, f"hang-before:{nth}:{ready}", rhome, "rename"))
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # alice is gone, carol is about to go
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines() == ["removed alice", "error: interrupted: removed alice; kept carol, dave"], err
    assert [i.name for i in Library(rhome).list()] == ["carol", "dave"]


@pytest.mark.parametrize("model", ["a/b c", "owner/-x"])
def test_a_model_the_hub_would_reject_is_one_line_at_once(
    rhome: Path, env: dict[str, str], tmp_path: Path, model: str
) -> None:
    write_embedding(tmp_path / "bob.safetensors", 1)
    assert crossinit("import", tmp_path / "bob.safetensors", env=env).returncode == 0
    for args in (
        ["generate", "<bob>", "--model", model],
        ["import", tmp_path / "bob.safetensors", "--name", "b2", "--model", model],
    ):
        started = time.perf_counter()
        done = crossinit(*args, env=env, timeout=60)
        assert_one_line_error(done, model)
        assert time.perf_counter() - started < 30


def test_learn_with_a_seed_past_64_bits_is_refused_before_the_model(env: dict[str, str], tiny_model: Path) -> None:
    started = time.perf_counter()
    done = crossinit("learn", DATA / "astronaut.png", "--seed", "9" * 20, "--model", tiny_model, env=env, timeout=120)
    assert_one_line_error(done, "--seed")
    assert time.perf_counter() - started < 30, "refused only after a model load"


def test_a_home_that_cannot_be_expanded_is_one_line(env: dict[str, str]) -> None:
    done = crossinit("list", env={**env, "CROSSINIT_HOME": "~nouser-crossinit/x"}, timeout=60)
    assert_one_line_error(done, "~nouser-crossinit")
