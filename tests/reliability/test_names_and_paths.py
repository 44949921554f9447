"""Hostile names and places: look-alike, reserved, very long and case-variant names; a symlinked, a
read-only and a full library. Each refusal is one line and exit 1; nothing stored is lost or half-written."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crossinit_cli.store import Library
from tests.reliability.harness import (
    DATA,
    assert_one_line_error,
    crossinit,
    fault_env,
    leftovers,
    snapshot,
    tree,
    write_embedding,
)

pytestmark = pytest.mark.reliability


@pytest.fixture()
def emb(tmp_path: Path):
    """emb(seed) -> path of an A1111-layout file of seeded [2, 32] vectors."""

    def make(seed: int) -> Path:
        path = tmp_path / f"emb-{seed}.safetensors"
        if not path.exists():
            write_embedding(path, seed)
        return path

    return make


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done


# ---- names ------------------------------------------------------------------------------------------

CONFUSABLES = [
    ("alice", "\u0430lice"),  # Cyrillic a
    ("alice", "\u0430l\u0456\u0441\u0435"),  # Cyrillic a, i, c, e: all of it looks Latin
    ("Olga", "\u039flga"),  # Greek capital omicron
    ("paypal", "p\u0430yp\u0430l"),
    ("bob", "\u0184ob"),  # Latin tone six, looks like b
    ("alice", "\u13aalice"),  # Cherokee letter go (issue 28: UTS #39's table, not a hand list)
    ("alice", "\ua4eelice"),  # Lisu letter a
    ("alice", "\u1d00lice"),  # Latin letter small capital a
]


@pytest.mark.parametrize(("original", "lookalike"), CONFUSABLES)
def test_lookalike_names_are_refused_pointing_at_the_original(
    original: str, lookalike: str, rhome: Path, env: dict[str, str], emb
) -> None:
    _ok(crossinit("import", emb(1), "--name", original, env=env))
    before = tree(rhome)
    for force in ([], ["--force"]):
        done = crossinit("import", emb(2), "--name", lookalike, *force, env=env)
        assert_one_line_error(done, "looks like", original)
    _ok(crossinit("import", emb(3), "--name", "carol", env=env))
    assert_one_line_error(crossinit("edit", "carol", "--rename", lookalike, env=env), "looks like", original)
    np.testing.assert_array_equal(Library(rhome).vectors(original).learned, np.asarray(_vectors(emb(1))))
    assert set(tree(rhome)) - set(before) == {p for p in tree(rhome) if p.startswith("identities/carol")}


def test_names_in_other_scripts_that_look_like_nothing_stored_are_fine(rhome: Path, env: dict[str, str], emb) -> None:
    for name in (
        "\u0431\u043e\u0440\u0438\u0441",
        "\u03b6\u03c9\u03ae",
        "\u5c71\u7530",
        "Zo\u00eb",
    ):  # борис ζωή 山田 Zoë
        _ok(crossinit("import", emb(1), "--name", name, env=env))
    assert len(Library(rhome).list()) == 4


def _vectors(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(path))["emb_params"]


@pytest.mark.parametrize(
    "name",
    [
        *("con", "NUL", "lpt1.txt", "com0", "Aux.", "alice.", "..", ".lock", "identities/x", "a" * 65, "x\u200by"),
        *("alice\u3164", "\u3164", "\uffa0bob"),  # Default_Ignorable letters: Hangul fillers (issue 28)
    ],
)
def test_reserved_and_malformed_names_are_refused(name: str, rhome: Path, env: dict[str, str], emb) -> None:
    assert_one_line_error(crossinit("import", emb(1), "--name", name, env=env), "name")
    assert_one_line_error(crossinit("learn", DATA / "astronaut.png", "--name", name, env=env), "name")
    assert not (rhome / "identities").exists() or not any((rhome / "identities").iterdir())


LONG = {
    "64 ascii": "a" * 64,
    "64 two-byte": "\u00e9" * 64,
    "64 three-byte": "\u5c71" * 64,
    "50 four-byte": "\U00020000" * 50,
    "64 four-byte": "\U00020000" * 64,
    "expands when case-folded": "\u0390" * 64,
}


@pytest.mark.parametrize("label", list(LONG))
def test_very_long_names_are_stored_or_refused_cleanly(label: str, rhome: Path, env: dict[str, str], emb) -> None:
    """Names are limited in characters and, as file names, in bytes: a name either works everywhere (import,
    show, export, rename, remove) or is refused with one line everywhere, never an OSError."""
    name = LONG[label]
    done = crossinit("import", emb(1), "--name", name, env=env)
    if done.returncode == 0:
        for args in (["show", name], ["export", name, "-o", str(rhome.parent) + "/"], ["list"]):
            _ok(crossinit(*args, env=env))
        _ok(crossinit("edit", name, "--rename", name.upper(), "--note", "n", env=env))
        _ok(crossinit("remove", name, "--yes", env=env))
    else:
        assert_one_line_error(done, "name")
        for args in (["show", name], ["export", name], ["remove", name, "--yes"], ["edit", name, "--note", "x"]):
            assert_one_line_error(crossinit(*args, env=env))
    assert leftovers(rhome) == []
    assert not (rhome / "identities").exists() or not any((rhome / "identities").iterdir())


def test_names_that_differ_only_by_case_are_one_identity(rhome: Path, env: dict[str, str], emb) -> None:
    _ok(crossinit("import", emb(1), "--name", "Alice", env=env))
    assert_one_line_error(crossinit("import", emb(2), "--name", "ALICE", env=env), "already exists", "--force")
    assert_one_line_error(crossinit("import", emb(2), "--name", "\uff21lice", env=env), "already exists")  # Ａlice
    np.testing.assert_array_equal(Library(rhome).vectors("alice").learned, _vectors(emb(1)))
    _ok(crossinit("import", emb(2), "--name", "ALICE", "--force", env=env))
    assert [e.name for e in Library(rhome).list()] == ["ALICE"]
    np.testing.assert_array_equal(Library(rhome).vectors("aLiCe").learned, _vectors(emb(2)))
    _ok(crossinit("edit", "alice", "--rename", "Alice", env=env))
    _ok(crossinit("import", emb(3), "--name", "bob", env=env))
    assert_one_line_error(crossinit("edit", "bob", "--rename", "ALICE", env=env), "already exists")
    assert sorted(e.name for e in Library(rhome).list()) == ["Alice", "bob"]


# ---- places -----------------------------------------------------------------------------------------


def test_a_symlinked_library_works(tmp_path: Path, env: dict[str, str], emb) -> None:
    real = tmp_path / "real-library"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    env = {**env, "CROSSINIT_HOME": str(link)}
    _ok(crossinit("import", emb(1), "--name", "alice", env=env))
    _ok(crossinit("import", emb(2), "--name", "alice", "--force", env=env))
    _ok(crossinit("edit", "alice", "--rename", "bob", "--tag", "t", env=env))
    _ok(crossinit("import", emb(3), "--name", "carol", env=env))
    _ok(crossinit("remove", "carol", "--yes", env=env))
    _ok(crossinit("export", "bob", "-o", str(tmp_path) + "/", env=env))
    assert link.is_symlink() and sorted(p.name for p in (real / "identities").iterdir()) == ["bob"]
    np.testing.assert_array_equal(_vectors(tmp_path / "bob.safetensors"), _vectors(emb(2)))
    assert leftovers(real) == []


def _can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


@contextlib.contextmanager
def _mounted(args: list[str], where: Path) -> Iterator[Path]:
    done = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


WRITES = [
    ["import", "{emb}", "--name", "newcomer"],
    ["import", "{emb}", "--name", "alice", "--force"],
    ["edit", "alice", "--note", "changed"],
    ["edit", "alice", "--rename", "renamed"],
    ["remove", "alice", "--yes"],
]


@contextlib.contextmanager
def _read_only(kind: str, home: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The library at `home` made read-only: a read-only bind mount, or (without mount rights) every
    write under it failing with EROFS through hooks/sitecustomize.py."""
    if kind == "simulated":
        yield fault_env(env, "errno:EROFS", home)
        return
    if not _can_mount():
        pytest.skip("needs root and mount")
    with _mounted(["--bind", str(home)], home):
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(home)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
        yield env


@pytest.mark.parametrize("kind", ["mount", "simulated"])
def test_read_only_library_refuses_writes_and_still_reads(
    kind: str, rhome: Path, env: dict[str, str], emb, tmp_path: Path
) -> None:
    _ok(crossinit("import", emb(1), "--name", "alice", env=env))
    _ok(crossinit("edit", "alice", "--note", "kept", env=env))
    before, files = snapshot(rhome, times=True), tree(rhome)
    with _read_only(kind, rhome, env) as ro_env:
        for args in WRITES:
            done = crossinit(*[a.format(emb=emb(2)) for a in args], env=ro_env)
            assert_one_line_error(done)
            assert "read-only" in done.stderr.lower(), done.stderr
        for args in (["list", "--json"], ["show", "alice"], ["export", "alice", "-o", str(tmp_path) + "/"]):
            _ok(crossinit(*args, env=ro_env))
        assert tree(rhome) == files
    assert snapshot(rhome, times=True) == before
    _ok(crossinit("edit", "alice", "--note", "writable again", env=env))


@contextlib.contextmanager
def _full(kind: str, home: Path, env: dict[str, str], size_kib: int = 512) -> Iterator[dict[str, str]]:
    """A full disk under the library: a small tmpfs filled to the last byte, or ENOSPC from every write."""
    if kind == "simulated":
        yield fault_env(env, "errno:ENOSPC", home, ops="create,mkdir")
        return
    if not _can_mount():
        pytest.skip("needs root and mount")
    with _mounted(["-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs"], home):
        yield env


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


@pytest.mark.parametrize("kind", ["tmpfs", "simulated"])
def test_full_disk_fails_cleanly_and_loses_nothing(kind: str, rhome: Path, env: dict[str, str], emb) -> None:
    rhome.mkdir()
    with _full(kind, rhome, env) as full_env:
        _ok(crossinit("import", emb(1), "--name", "alice", env=env))
        _ok(crossinit("import", emb(3), "--name", "spare", env=env))
        filler = _fill(rhome) if kind == "tmpfs" else None
        before = snapshot(rhome, times=True)
        for args in WRITES[:4]:
            done = crossinit(*[a.format(emb=emb(2)) for a in args], env=full_env)
            if done.returncode == 0:  # a rename needs no new space on some file systems
                assert args[:3] == ["edit", "alice", "--rename"], args
                _ok(crossinit("edit", "renamed", "--rename", "alice", env=full_env))
                continue
            assert_one_line_error(done, "no space left")
        assert snapshot(rhome, times=True) == before
        assert leftovers(rhome) == []
        # Removing is how a user makes room: it must work on a full disk.
        _ok(crossinit("remove", "spare", "--yes", env=full_env))
        if filler is not None:
            filler.unlink()
        _ok(crossinit("import", emb(2), "--name", "newcomer", env=env))
        assert sorted(snapshot(rhome)) == ["alice", "newcomer"]
        assert leftovers(rhome) == []


def test_learn_on_a_full_disk_fails_cleanly(rhome: Path, env: dict[str, str], tiny_model: Path, emb) -> None:
    """The cross-init cache and the entry are both written by safetensors, whose writer raises its own
    error type on ENOSPC, not OSError."""
    rhome.mkdir()
    with _full("tmpfs", rhome, env):
        _ok(crossinit("import", emb(1), "--name", "alice", env=env))
        _fill(rhome)
        before = tree(rhome)
        args = ["learn", DATA / "astronaut.png", "--fast", "--steps", "1", "--model", tiny_model, "--quiet"]
        assert_one_line_error(crossinit(*args, "--name", "alice", "--force", env=env, timeout=300), "no space left")
        assert {k: v for k, v in tree(rhome).items() if not k.startswith(".cache")} == before
        assert leftovers(rhome) == []
