"""kill -9 at any moment: the library a reader sees is the one before the command or the one after, never
something between, and the next command is not held up by the dead process's lock.

Two ways of choosing the moment:
- exhaustively, at every file-system call a command makes in the library (hooks/sitecustomize.py kills the
  process just before its N-th such call, for every N), which proves the recovery code paths;
- at random times from process start to finish (seeded), with a real SIGKILL from outside, which proves
  nothing was missed by the first (a write the hooks do not see, a window between two reads).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crossinit_cli.formats import read_embedding_file
from crossinit_cli.librarylock import LOCK_TIMEOUT_S
from crossinit_cli.store import Identity, Library
from tests.reliability.harness import (
    DATA,
    Timer,
    assert_catalog_matches,
    assert_no_traceback,
    copy_library,
    crossinit,
    fault_env,
    kill_after,
    leftovers,
    snapshot,
    start,
    write_embedding,
)
from tests.test_tools import install

pytestmark = pytest.mark.reliability

NEXT_COMMAND_LIMIT_S = 15.0
"""The command after a kill must finish well inside the lock timeout: a stale lock would cost 60 s."""


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    """A small library: a victim with learned + init vectors and a crop, two bystanders, a shared tag."""
    import numpy as np
    from PIL import Image

    home = tmp_path / "base"
    library = Library(home)
    rng = np.random.default_rng(0)
    crop = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    learned, init = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((2, 32)).astype(np.float32)
    library.add(Identity(name="Victim", tokens=2, width=32, notes="before", tags=["x"]), learned, init, [crop])
    for name in ("bystander", "other"):
        library.add(Identity(name=name, tokens=2, width=32), rng.standard_normal((2, 32)).astype(np.float32))
    return home


def _count_calls(home: Path, args: list[str], env: dict[str, str], log: Path) -> list[str]:
    done = crossinit(*args, env=fault_env(env, f"count:{log}", home))
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def _check_after_kill(
    home: Path, env: dict[str, str] | None, probe: Path, before: dict, after: dict, label: str
) -> str:
    """A reader sees before or after, and `list` (the catalog) says what the folders hold; the next write (a
    `crossinit import` process, or the same write in-process when `env` is None) is not held up and leaves
    no leftovers. Returns which state it was."""
    assert_catalog_matches(home, label)
    seen = snapshot(home)
    state = "before" if seen == before else "after" if seen == after else None
    assert state is not None, f"{label}: between states\nbefore={before}\nafter={after}\nseen={seen}"
    with Timer() as timer:
        if env is None:
            Library(home).add(Identity(name="probe", tokens=2, width=32), read_embedding_file(probe).vectors)
        else:
            done = crossinit("import", probe, "--name", "probe", env=env, timeout=120)
            assert done.returncode == 0, f"{label}: the next command failed: {done.stderr}"
    assert timer.elapsed < NEXT_COMMAND_LIMIT_S, f"{label}: the next command waited {timer.elapsed:.1f} s"
    assert leftovers(home) == [], f"{label}: {leftovers(home)}"
    assert_catalog_matches(home, f"{label}, after the next write")
    seen = snapshot(home)
    seen.pop("probe")
    assert seen == (before if state == "before" else after), f"{label}: recovery changed the state"
    return state


COMMANDS = {
    "import-replace": ["import", "{file}", "--name", "victim", "--force"],
    "import-new": ["import", "{file}", "--name", "newcomer"],
    "rename": ["edit", "victim", "--rename", "Renamed"],
    "edit": ["edit", "victim", "--note", "after", "--tag", "y", "--untag", "x", "--strength", "0.5"],
    "edit-and-rename": ["edit", "victim", "--note", "after", "--rename", "Renamed"],
    "remove": ["remove", "victim", "--yes"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_at_every_file_system_call(command: str, base: Path, env: dict[str, str], tmp_path: Path) -> None:
    file = tmp_path / "incoming.safetensors"
    write_embedding(file, 7)
    probe = tmp_path / "probe.safetensors"
    write_embedding(probe, 8)
    args = [a.format(file=file) for a in COMMANDS[command]]
    before = snapshot(base)

    reference = copy_library(base, tmp_path / "reference")
    calls = _count_calls(reference, args, {**env, "CROSSINIT_HOME": str(reference)}, tmp_path / "calls.log")
    after = snapshot(reference)
    assert after != before and len(calls) >= 3, calls

    def one(nth: int) -> str:
        home = copy_library(base, tmp_path / f"kill-{nth}")
        done = crossinit(*args, env=fault_env({**env, "CROSSINIT_HOME": str(home)}, f"kill-before:{nth}", home))
        call = calls[nth - 1].replace(str(reference), "<home>")
        assert done.returncode == -9, f"call {call}: {done.returncode} {done.stderr}"
        state = _check_after_kill(home, None, probe, before, after, f"killed before call {call}")
        shutil.rmtree(home)
        return state

    with ThreadPoolExecutor(2) as pool:
        states = list(pool.map(one, range(1, len(calls) + 1)))
    # One commit point: every kill before it leaves the library as it was, every kill after it as it will be.
    assert states[0] == "before" and states == sorted(states, key=["before", "after"].index), states
    print(f"{command}: {len(calls)} kill points, {states.count('before')} before, {states.count('after')} after")


def test_kill_between_the_two_renames_of_a_learn_force(
    base: Path, env: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    """A learn that replaces an identity dies with the old entry moved aside and the new one not yet in
    place: readers still see the old one, and the next write puts it back."""
    library = Library(base)
    probe = tmp_path / "probe.safetensors"
    write_embedding(probe, 8)
    before = snapshot(base)
    args = [
        "learn",
        DATA / "astronaut.png",
        "--fast",
        "--steps",
        "1",
        "--model",
        tiny_model,
        "--name",
        "victim",
        "--force",
        "--quiet",
        "--seed",
        "3",
    ]
    run_env = {**env, "CROSSINIT_HOME": str(base)}
    done = crossinit(*args, env=fault_env(run_env, "kill-before:2", base, ops="rename"), timeout=300)
    assert done.returncode == -9, done.stderr
    assert list((base / ".trash").iterdir()), "the kill was meant to land between the two renames"
    assert not library.entries.joinpath("victim").exists()  # on disk: the old entry is moved aside
    assert _check_after_kill(base, run_env, probe, before, {}, "learn --force killed between renames") == "before"
    assert leftovers(base) == []


def test_a_killed_lock_holder_does_not_block_the_next_command(base: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The library lock is an flock on <home>/.lock: the OS drops it when its holder dies, whatever is on disk."""
    from filelock import FileLock, Timeout

    ready = tmp_path / "holding"
    run_env = {**env, "CROSSINIT_HOME": str(base)}
    # Hang just before the first rename: the process holds the lock, with the old entry not yet moved.
    proc = start("edit", "victim", "--rename", "held", env=fault_env(run_env, f"hang-before:1:{ready}", base, "rename"))
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    with pytest.raises(Timeout):  # it really holds the lock
        FileLock(str(base / ".lock"), timeout=0.2).acquire()
    kill_after(proc, 0)
    assert proc.returncode == -9
    assert (base / ".lock").exists()  # the file stays; the lock on it does not
    with Timer() as timer:
        done = crossinit("edit", "victim", "--note", "next", env=run_env, timeout=120)
    assert done.returncode == 0 and timer.elapsed < NEXT_COMMAND_LIMIT_S < LOCK_TIMEOUT_S, (timer.elapsed, done.stderr)
    print(f"lock holder killed: the next command took {timer.elapsed:.1f} s")
    assert Library(base).get("victim").notes == "next"


# ---- random moments, real SIGKILL from outside ------------------------------------------------------


def _random_kills(
    base: Path, env: dict[str, str], tmp_path: Path, args: list[str], seeds: range, probe: Path
) -> dict[str, int]:
    """Run `args` once to the end (the 'after' and its duration), then once per seed killed at a random
    moment between start and 1.2x that duration; check each. Returns how many ended before / after."""
    before = snapshot(base)
    reference = copy_library(base, tmp_path / "reference")
    with Timer() as timer:
        done = crossinit(*args, env={**env, "CROSSINIT_HOME": str(reference)}, timeout=300)
    assert done.returncode == 0, done.stderr
    after = snapshot(reference)
    counts = {"before": 0, "after": 0, "finished": 0}
    for seed in seeds:
        delay = random.Random(seed).uniform(0, timer.elapsed * 1.2)
        home = copy_library(base, tmp_path / f"seed-{seed}")
        run_env = {**env, "CROSSINIT_HOME": str(home)}
        code, err = kill_after(start(*args, env=run_env), delay)
        if code != -9:
            counts["finished"] += 1
            assert_no_traceback(subprocess.CompletedProcess(args, code, "", err))
        state = _check_after_kill(home, run_env, probe, before, after, f"seed {seed}, killed at {delay:.2f} s")
        counts[state] += 1
        shutil.rmtree(home)
    print(f"{args[0]} {args[1]}: {len(seeds)} kills in 0-{timer.elapsed * 1.2:.1f} s: {counts}")
    return counts


def test_sigkill_import_at_random_moments(base: Path, env: dict[str, str], tmp_path: Path) -> None:
    file, probe = tmp_path / "incoming.safetensors", tmp_path / "probe.safetensors"
    write_embedding(file, 7)
    write_embedding(probe, 8)
    counts = _random_kills(base, env, tmp_path, ["import", file, "--name", "victim", "--force"], range(10), probe)
    assert counts["before"] + counts["after"] == 10


def test_sigkill_rename_at_random_moments(base: Path, env: dict[str, str], tmp_path: Path) -> None:
    probe = tmp_path / "probe.safetensors"
    write_embedding(probe, 8)
    counts = _random_kills(base, env, tmp_path, ["edit", "victim", "--rename", "Renamed"], range(10), probe)
    assert counts["before"] + counts["after"] == 10


@pytest.mark.slow
def test_sigkill_learn_at_random_moments(base: Path, env: dict[str, str], tmp_path: Path, tiny_model: Path) -> None:
    """Same seed, same vectors: the 'after' of a killed learn is exactly the reference run's result."""
    probe = tmp_path / "probe.safetensors"
    write_embedding(probe, 8)
    args = [
        "learn",
        DATA / "astronaut.png",
        "--fast",
        "--steps",
        "2",
        "--model",
        tiny_model,
        "--name",
        "victim",
        "--force",
        "--quiet",
        "--seed",
        "3",
    ]
    counts = _random_kills(base, env, tmp_path, args, range(4), probe)
    assert counts["before"] + counts["after"] == 4


# ---- the catalog ------------------------------------------------------------------------------------


@pytest.mark.parametrize("catalog", ["stale", "damaged", "missing"])
def test_kill_list_while_it_mends_the_catalog(catalog: str, base: Path, env: dict[str, str], tmp_path: Path) -> None:
    """`list` writes too: it refreshes the rows of folders changed by hand and rebuilds a damaged or missing
    catalog. Killed before any of its file-system calls or catalog commits, the next `list` is still right."""
    import json

    from crossinit_cli.catalog import CATALOG

    entries = base / "identities"
    shutil.copytree(entries / "bystander", entries / "copied")  # a folder copied in by hand
    meta = entries / "copied" / "meta.toml"
    meta.write_text(meta.read_text().replace('name = "bystander"', 'name = "copied"'))
    meta = entries / "other" / "meta.toml"  # and one edited in place
    with open(meta, "r+", encoding="utf-8") as handle:
        text = handle.read().replace('notes = ""', 'notes = "edited by hand"')
        handle.seek(0)
        handle.write(text)
    if catalog == "damaged":
        (base / CATALOG).write_bytes(b"\x00garbage" * 512)
    elif catalog == "missing":
        (base / CATALOG).unlink()
    truth = snapshot(copy_library(base, tmp_path / "truth"))  # through list: mends the copy's catalog
    assert truth["other"]["notes"] == "edited by hand" and "copied" in truth

    reference = copy_library(base, tmp_path / "reference")
    calls = _count_calls(reference, ["list", "--json"], {**env, "CROSSINIT_HOME": str(reference)}, tmp_path / "log")
    assert any(" commit " in call for call in calls), calls

    def one(nth: int) -> None:
        home = copy_library(base, tmp_path / f"kill-{nth}")
        run_env = {**env, "CROSSINIT_HOME": str(home)}
        done = crossinit("list", "--json", env=fault_env(run_env, f"kill-before:{nth}", home))
        label = f"list killed before {calls[nth - 1].replace(str(reference), '<home>')}"
        assert done.returncode == -9, f"{label}: {done.returncode} {done.stderr}"
        after = crossinit("list", "--json", env=run_env)
        assert after.returncode == 0, f"{label}: {after.stderr}"
        assert [r["name"].casefold() for r in json.loads(after.stdout)] == sorted(truth), label
        assert_catalog_matches(home, label)
        assert snapshot(home) == truth, label
        shutil.rmtree(home)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(1, len(calls) + 1)))
    print(f"list mending a {catalog} catalog: {len(calls)} kill points")


@pytest.mark.slow  # the default suite stays under ~10 min; the README's test command runs it
def test_kill_export_to_a_tool_never_leaves_half_a_file(env: dict[str, str], tmp_path: Path, rhome: Path) -> None:
    """`export --all --to` killed before any of its file-system calls in the tool's folder: every file there
    with an embedding's extension is whole (the identity's exact vectors), and the next run completes it."""
    import numpy as np
    from safetensors.numpy import load_file

    library = Library(rhome)
    expected = {}
    for i, name in enumerate(("ann", "ben", "cy")):
        expected[name] = np.random.default_rng(i).standard_normal((2, 32)).astype(np.float32)
        library.add(Identity(name=name, tokens=2, width=32, family="sd2"), expected[name])
    tool = install(tmp_path / "webui", "a1111")  # AUTOMATIC1111's own layout (tests/test_tools.py)
    reference = copy_library(tool, tmp_path / "reference")
    calls = _count_calls(reference, ["export", "--all", "--to", reference], env, tmp_path / "calls.log")
    assert len(calls) >= 6, calls

    for nth in range(1, len(calls) + 1):
        target = copy_library(tool, tmp_path / f"kill-{nth}")
        done = crossinit("export", "--all", "--to", target, env=fault_env(env, f"kill-before:{nth}", target))
        assert done.returncode == -9, done.stderr
        for path in (target / "embeddings").glob("*.safetensors"):
            np.testing.assert_array_equal(load_file(str(path))["emb_params"], expected[path.stem])
        assert crossinit("export", "--all", "--to", target, env=env).returncode == 0
        assert sorted(p.name for p in (target / "embeddings").glob("*.safetensors")) == [
            "ann.safetensors",
            "ben.safetensors",
            "cy.safetensors",
        ]
        shutil.rmtree(target)
    print(f"export --all --to: {len(calls)} kill points, never half a file")
