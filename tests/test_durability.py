"""Durable writes: what a command publishes is flushed to disk (files, then the folders naming them) before
the rename that publishes it, and the folder holding the renamed name right after it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from crossinit_cli import atomic
from crossinit_cli.store import Identity, Library


@pytest.fixture()
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every fsync of a file or folder and every rename, in order (the real calls, recorded)."""
    seen: list[tuple[str, ...]] = []
    real_file, real_dir, real_rename, real_replace = atomic.fsync_file, atomic.fsync_dir, os.rename, os.replace

    def fsync_file(path):
        seen.append(("file", str(path)))
        real_file(path)

    def fsync_dir(path):
        seen.append(("dir", str(path)))
        real_dir(path)

    def rename(src, dst, *args, **kwargs):
        seen.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        seen.append(("rename", str(src), str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic, "fsync_file", fsync_file)
    monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def _published(events: list[tuple[str, ...]], target: Path) -> int:
    """The index of the rename that put something at `target`."""
    return next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target))


def test_import_flushes_every_file_and_folder_of_the_entry_before_publishing_it(
    cli, library: Library, tmp_path: Path, events: list
) -> None:
    file = tmp_path / "x.safetensors"
    save_file({"emb_params": np.ones((2, 32), np.float32)}, str(file))
    for replace in (False, True):  # a new entry, then a --force replace (two renames)
        events.clear()
        assert cli("import", file, "--name", "alice", *(["--force"] if replace else [])).exit_code == 0
        target = library.entries / "alice"
        commit = _published(events, target)
        stage = Path(events[commit][1])
        flushed_before = {e[1] for e in events[:commit] if e[0] in ("file", "dir")}
        for path in [stage, *stage.rglob("*")]:
            assert str(path) in flushed_before, f"{path} not flushed before the entry was published"
        assert ("dir", str(library.entries)) in events[commit + 1 :], "identities/ not flushed after the rename"


@pytest.mark.parametrize("args", [["--note", "x"], ["--rename", "Bob"]])
def test_edit_and_rename_flush_the_folder_after_the_rename(
    cli, library: Library, events: list, args: list[str]
) -> None:
    library.add(Identity(name="alice", tokens=2, width=32), np.ones((2, 32), np.float32))
    events.clear()
    assert cli("edit", "alice", *args).exit_code == 0
    if args[0] == "--note":
        meta = library.entries / "alice" / "meta.toml"
        commit = _published(events, meta)
        assert ("file", events[commit][1]) in events[:commit]  # the new metadata, before it replaces the old
        assert ("dir", str(meta.parent)) in events[commit + 1 :]
    else:
        commit = _published(events, library.entries / "bob")
        assert ("dir", str(library.entries)) in events[commit + 1 :], "the old name could come back"


def test_remove_flushes_the_folder(cli, library: Library, events: list) -> None:
    library.add(Identity(name="alice", tokens=2, width=32), np.ones((2, 32), np.float32))
    events.clear()
    assert cli("remove", "alice", "--yes").exit_code == 0
    gone = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1] == str(library.entries / "alice"))
    assert ("dir", str(library.entries)) in events[gone + 1 :]
