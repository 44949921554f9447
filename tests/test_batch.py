"""`learn --batch`: manifests, one process, and two processes under `accelerate launch`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossinit_cli.batches import BatchEntry, read_manifest
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
DEFAULTS = BatchEntry(mode="fast", seed=0, align=True)


def _people(root: Path, names: dict[str, str]) -> Path:
    for name, photo in names.items():
        (root / name).mkdir(parents=True)
        shutil.copy(DATA / photo, root / name / photo)
    return root


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_csv_manifest_rows_override_defaults(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    manifest = tmp_path / "people.csv"
    manifest.write_text("name,photos,mode,steps,seed,align\nalice,a.jpg;b.jpg,full,7,3,false\nbob,pics,,,,\n")
    alice, bob = read_manifest(manifest, DEFAULTS)
    assert (alice.name, alice.mode, alice.steps, alice.seed, alice.align) == ("alice", "full", 7, 3, False)
    assert alice.photos == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert (bob.mode, bob.steps, bob.seed, bob.align, bob.photos) == ("fast", None, 0, True, [tmp_path / "pics"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,photos\n", "no rows"),
        ("name\nalice\n", "missing column(s) photos"),
        ("name,photos,colour\nalice,a.jpg,red\n", "unknown column(s) colour"),
        ("name,photos,steps\nalice,a.jpg,many\n", "people.csv:2: steps must be a number"),
        ("name,photos\nalice,a.jpg\nALICE,b.jpg\n", "appears twice"),
        ("name,photos\n../evil,a.jpg\n", "may not contain"),
        ("name,photos\nalice,\n", "no photos"),
        ("name,photos,mode\nalice,a.jpg,slow\n", "mode must be fast or full"),
    ],
)
def test_bad_manifests_are_refused_before_anything_runs(tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "people.csv"
    manifest.write_text(content)
    with pytest.raises(CrossinitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(manifest, DEFAULTS)


def test_batch_in_one_process_learns_skips_and_reports(cli, tiny_model: Path, library: Library, tmp_path: Path) -> None:
    people = _people(tmp_path / "people", {"astro": "astronaut.png", "grace": "grace_hopper.jpg"})
    (people / "blank").mkdir()
    Image.new("RGB", (256, 256), (90, 120, 200)).save(people / "blank" / "sky.png")
    Image.new("RGB", (256, 256), "grey").save(people / "astro" / "wall.png")  # beside a usable photo: skipped
    args = ["learn", "--batch", people, "--fast", "--steps", "2", "--model", tiny_model, "--quiet", "--json"]
    first = cli(*args)
    assert first.exit_code == 4  # one identity failed, the others were learned (docs/exit-codes.md)
    assert "warning: 1 of 3 identities failed (exit status 4" in first.stderr
    assert "warning: astro: skipped 1 file: " in first.stderr and "wall.png (no face found)" in first.stderr
    assert len(library.crops("astro")) == 1  # the usable photo alone
    results = {r["name"]: r for r in json.loads(first.stdout)}
    assert results["astro"]["status"] == results["grace"]["status"] == "learned"
    assert results["blank"]["status"] == "failed" and "no face found" in results["blank"]["detail"]
    assert {e.name for e in library.list()} == {"astro", "grace"}
    assert library.get("grace").training["steps"] == 2 and len(library.crops("grace")) == 1
    learned = library.vectors("astro").learned
    (people / "blank").rename(tmp_path / "blank")
    again = cli(*args)
    assert again.exit_code == 0
    assert {r["status"] for r in json.loads(again.stdout)} == {"skipped"}
    np.testing.assert_array_equal(library.vectors("astro").learned, learned)


def test_batch_refuses_photos_beside_it(cli, tmp_path: Path) -> None:
    result = cli("learn", "photo.jpg", "--batch", tmp_path)
    assert result.exit_code == 2 and "--batch takes its photos" in result.stderr  # a usage mistake


@pytest.mark.slow
def test_batch_spreads_over_two_accelerate_processes(tiny_model: Path, home: Path, tmp_path: Path) -> None:
    people = _people(
        tmp_path / "people",
        {"a1": "astronaut.png", "g1": "grace_hopper.jpg", "a2": "astronaut.png", "g2": "grace_hopper.jpg"},
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "crossinit_cli", "learn", "--batch", str(people), "--fast", "--steps", "2",
        "--model", str(tiny_model), "--quiet", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert sorted(r["name"] for r in results) == ["a1", "a2", "g1", "g2"]
    assert {r["status"] for r in results} == {"learned"}
    assert {r["process"] for r in results} == {0, 1}
    library = Library(home)
    assert sorted(e.name for e in library.list()) == ["a1", "a2", "g1", "g2"]
    assert all(library.vectors(n).learned.shape == (2, 32) for n in ("a1", "a2", "g1", "g2"))


@pytest.mark.slow  # the default suite stays under ~10 min; the README's test command runs it
def test_batch_shows_one_overall_bar_on_a_terminal_and_json_stays_clean(
    tiny_model: Path, home: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    people = _people(tmp_path / "people", {"astro": "astronaut.png", "grace": "grace_hopper.jpg"})
    args = ["learn", "--batch", str(people), "--fast", "--steps", "1", "--model", str(tiny_model), "--json"]
    # FORCE_COLOR makes rich treat stderr as a terminal, as it is for a user at a shell.
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "160"}
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in json.loads(done.stdout)] == ["learned", "learned"]  # stdout: the JSON only
    assert "identities" in done.stderr and "eta" in done.stderr and "2/2" in done.stderr
    quiet = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", *args, "--force", "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert quiet.returncode == 0 and "eta" not in quiet.stderr


def test_the_overall_count_includes_what_other_processes_finished(library: Library, tmp_path: Path) -> None:
    """The main process's bar counts every identity of the batch in the library since it began (another
    process adds its own), plus the failures it saw; entries older than the batch do not count."""
    import os
    import time

    from crossinit_cli.batches import _Overall
    from crossinit_cli.store import Identity

    old = np.ones((2, 32), np.float32)
    library.add(Identity(name="before", tokens=2, width=32), old)
    stale = time.time_ns() - 60 * 10**9
    os.utime(library.entries / "before", ns=(stale, stale))  # learned long before this batch
    overall = _Overall(library, ["before", "mine", "theirs", "failed"])
    library.add(Identity(name="mine", tokens=2, width=32), old)
    assert overall.finished(failed=False) == 1
    library.add(Identity(name="theirs", tokens=2, width=32), old)  # as another process would
    assert overall.finished(failed=True) == 3


def test_batch_warns_about_mixed_photos_and_strict_fails_that_identity(
    cli, tiny_model: Path, library: Library, tmp_path: Path
) -> None:
    people = _people(tmp_path / "people", {"astro": "astronaut.png", "mixed": "astronaut.png"})
    shutil.copy(DATA / "grace_hopper.jpg", people / "mixed" / "grace_hopper.jpg")
    args = ["learn", "--batch", people, "--fast", "--steps", "1", "--model", tiny_model, "--quiet", "--json"]
    strict = cli(*args, "--strict")
    assert strict.exit_code == 4, strict.stderr  # one identity failed, the other was learned
    results = {r["name"]: r for r in json.loads(strict.stdout)}
    assert results["astro"]["status"] == "learned" and results["mixed"]["status"] == "failed"
    assert "do not look like the same person (face distance 0.7" in results["mixed"]["detail"]  # measured 0.70
    assert {e.name for e in library.list()} == {"astro"}

    lenient = cli(*args)
    assert lenient.exit_code == 0, lenient.stderr
    assert "do not look like the same person" in lenient.stderr and library.exists("mixed")
