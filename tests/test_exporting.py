"""`exporting`, the engine of `export` and `import`, from Python: silent, one call each, the same files as the
commands, records instead of lines, and `CrossinitError` instead of an exit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from crossinit_cli import exporting
from crossinit_cli.errors import CrossinitError
from crossinit_cli.exporting import Selection
from crossinit_cli.store import Library
from tests.factories import random_vectors, stock_alice_and_bob
from tests.test_tools import install

WIDTH = 32


@pytest.fixture()
def stocked(library: Library) -> Library:
    stock_alice_and_bob(library, WIDTH)
    return library


def test_export_to_a_file_returns_its_path_prints_nothing_and_writes_the_clis_bytes(
    cli, stocked: Library, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = exporting.export(stocked, Selection(["alice"]), fmt="a1111", output=tmp_path / "api.safetensors")
    assert capsys.readouterr() == ("", "")
    assert done.paths == [tmp_path / "api.safetensors"]
    (file,) = done.files
    assert (file.name, file.format, file.status) == ("alice", "a1111", "written")
    assert file.shapes == {"clip_h": [2, WIDTH]}  # SD 2.x: one encoder, OpenCLIP ViT-H
    assert cli("export", "alice", "-o", tmp_path / "cli.safetensors").exit_code == 0
    assert (tmp_path / "api.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()


def test_export_refusals_are_errors_and_write_nothing(stocked: Library, tmp_path: Path) -> None:
    (tmp_path / "alice.safetensors").write_bytes(b"mine")
    with pytest.raises(CrossinitError, match="already exists"):
        exporting.export(stocked, Selection(["alice"]), output=tmp_path / "alice.safetensors")
    assert (tmp_path / "alice.safetensors").read_bytes() == b"mine"
    with pytest.raises(CrossinitError, match="one of the three"):
        exporting.export(stocked, Selection([], every=True, tag="fam"))
    with pytest.raises(CrossinitError, match="no identity named 'nobody'"):
        exporting.export(stocked, Selection(["nobody"]), output=tmp_path)


def test_export_to_a_tool_says_per_identity_what_happened(
    stocked: Library, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = install(tmp_path / "a1111", "a1111")
    first = exporting.export(stocked, Selection([], every=True), to=root)
    again = exporting.export(stocked, Selection([], every=True), to=root)
    assert capsys.readouterr() == ("", "")
    assert first.tool is not None and first.tool.key == "a1111"
    assert [(f.name, f.status) for f in first.files] == [("alice", "written"), ("Bob", "written")]
    assert [(f.name, f.status) for f in again.files] == [("alice", "unchanged"), ("Bob", "unchanged")]
    assert all(path.parent == first.tool.embeddings and path.is_file() for path in first.paths)


def test_import_of_a_folder_returns_a_record_per_file_and_nothing_imported_is_an_error(
    library: Library, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": random_vectors(5)}, str(folder / "dora.safetensors"))
    (folder / "notes.txt").write_text("not an embedding")
    done = exporting.import_(library, folder)
    assert capsys.readouterr() == ("", "")
    assert done.folder and [f.name for f in done.imported] == ["dora"]
    assert [(f.file.name, f.reason is not None) for f in done.skipped] == [("notes.txt", True)]
    np.testing.assert_array_equal(library.effective_vectors("dora"), random_vectors(5))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(exporting.NothingImported) as refused:
        exporting.import_(library, empty)
    assert [f.file.name for f in refused.value.skipped] == ["notes.txt"]
