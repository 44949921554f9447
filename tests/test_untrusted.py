"""untrusted.py: what crossinit reads of files it did not write is bounded: regular files only, a size cap, read
once, and pickles screened before any unpickler sees them."""

from __future__ import annotations

import io
import os
import pickle
import time
from pathlib import Path

import pytest

from crossinit_cli import untrusted
from crossinit_cli.errors import CrossinitError
from tests.reliability.test_foreign_files import hash_bomb

OFFICIAL = Path("/work/shared/data/official-embeddings")


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1000)
    assert untrusted.read_bytes(path, 3000) == b"abc" * 1000
    with pytest.raises(untrusted.TooLarge, match="x.bin is 3 KiB; more than the 2 KiB") as caught:
        untrusted.read_bytes(path, 2048)
    assert caught.value.size == 3000


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "link to a device"])
def test_what_is_not_a_regular_file_is_refused_without_waiting(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "odd"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.symlink_to("/dev/zero")
    started = time.monotonic()
    with pytest.raises(untrusted.NotRegular, match="is not a regular file"):
        untrusted.read_bytes(path, 1 << 20)
    assert time.monotonic() - started < 2


def test_the_file_systems_own_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        untrusted.read_bytes(tmp_path / "nowhere", 10)


def test_a_file_that_shrinks_while_it_is_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read in chunks: the file is cut after the first one (as a writer truncating it would)."""
    path = tmp_path / "shrinks.bin"
    path.write_bytes(b"x" * 10_000)
    monkeypatch.setattr(untrusted, "_CHUNK", 1000)
    real_fdopen = os.fdopen

    class Cut(io.BufferedReader):
        cut = False

        def read(self, size: int = -1) -> bytes:  # type: ignore[override]
            data = super().read(size)
            if not Cut.cut:
                Cut.cut = True
                os.truncate(path, 1500)
            return data

    monkeypatch.setattr(untrusted.os, "fdopen", lambda fd, mode: Cut(real_fdopen(fd, mode, buffering=0)))
    with pytest.raises(CrossinitError, match=r"shrinks.bin changed while it was read \(10000 bytes, then \d+\)"):
        untrusted.read_bytes(path, 1 << 20)


def test_a_hash_bomb_is_refused_before_unpickling() -> None:
    bomb = hash_bomb()
    started = time.monotonic()
    with pytest.raises(CrossinitError, match="bomb.pt was refused: its pickle stands for more than 1,000,000 objects"):
        untrusted.screen_pickle(bomb, "bomb.pt")
    assert time.monotonic() - started < 2


def test_a_bomb_dropped_after_it_was_hashed_is_refused_too() -> None:
    """{bomb: 1} built, then popped off the stack: the unpickler hashed it all the same."""
    dropped = hash_bomb()[:-1] + b"0}."
    with pytest.raises(CrossinitError, match="hash bomb"):
        untrusted.screen_pickle(dropped, "dropped.pt")


def test_deep_nesting_and_endless_opcodes_are_refused() -> None:
    deep = b"\x80\x02)" + b"\x85" * 1000 + b"."  # a tuple in a tuple ... 1000 deep
    with pytest.raises(CrossinitError, match="nests objects more than 200 deep"):
        untrusted.screen_pickle(deep, "deep.pt")
    many = b"\x80\x02" + b"N0" * (untrusted.MAX_PICKLE_OPS // 2 + 1) + b"N."
    with pytest.raises(CrossinitError, match="more than 100,000 operations"):
        untrusted.screen_pickle(many, "many.pt")


def test_bytes_that_are_no_pickle_are_a_value_error_for_the_caller_to_word() -> None:
    with pytest.raises(ValueError, match="malformed pickle"):
        untrusted.screen_pickle(b"\x80\x02s.", "x")  # SETITEM on an empty stack
    with pytest.raises(ValueError, match="malformed pickle"):
        untrusted.screen_pickle(b"\x80\x02}K\x01", "x")  # no STOP


def test_real_pickles_pass_the_screen(tmp_path: Path) -> None:
    """Shared references of ordinary size (the same small tuple used twice, a list holding itself) are fine."""
    shared = (1, 2, 3)
    loop: list = []
    loop.append(loop)
    for value in ({"a": shared, "b": shared, shared: 1}, loop, {"emb_params": [0.5] * 768}):
        untrusted.screen_pickle(pickle.dumps(value, protocol=2), "ok")


def test_torch_files_pass_the_screen(tmp_path: Path) -> None:
    import zipfile

    import torch

    legacy = io.BytesIO()
    tensor = torch.ones(2, 768)
    torch.save(
        {"string_to_param": {"*": tensor}, "name": "x", "view": tensor[0]}, legacy, _use_new_zipfile_serialization=False
    )
    untrusted.screen_pickle(legacy.getvalue(), "legacy.pt", pickles=5)
    for path in sorted(OFFICIAL.glob("*.bin")) or []:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.filename.endswith(".pkl"):
                    untrusted.screen_pickle(archive.read(entry), path)
