"""Delivery: `export` of several identities, `--to` a tool's install folder, and `import` of a folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from crossinit_cli import formats
from crossinit_cli.store import Identity, Library
from tests.conftest import OFFICIAL
from tests.factories import random_vectors, stock_alice_and_bob
from tests.test_formats import a1111_read, comfyui_read, invokeai_read
from tests.test_tools import install

WIDTH = 32


@pytest.fixture()
def stocked(library: Library) -> Library:
    stock_alice_and_bob(library, WIDTH)
    library.add(Identity(name="carol", tokens=2, width=WIDTH, tags=["fam"], family="sd2"), random_vectors(4))
    return library


def _install(root: Path, tool: str) -> Path:
    """An install folder laid out as `tool`'s own (tests/test_tools.py has each layout and its sources)."""
    return install(root, tool)


def _delivered(folder: Path) -> list[str]:
    """The folder's files but the placeholder its tool ships there ("Place Textual Inversion embeddings here")."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors") or name.startswith("."))


EMBEDDINGS = {
    "a1111": ("embeddings", a1111_read),
    "forge": ("embeddings", a1111_read),
    "sdnext": ("models/embeddings", a1111_read),
    "comfyui": ("models/embeddings", comfyui_read),
    "invokeai": ("crossinit-embeddings", invokeai_read),
}


@pytest.mark.parametrize("tool", list(EMBEDDINGS))
def test_export_all_to_a_tool_writes_what_it_reads_and_rewrites_only_changes(
    tool: str, cli, stocked: Library, tmp_path: Path
) -> None:
    root = _install(tmp_path / tool, tool)
    result = cli("export", "--all", "--to", root, "--json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["name"], r["status"], r["tool"]) for r in records] == [
        ("alice", "written", tool),
        ("Bob", "written", tool),
        ("carol", "written", tool),
    ]
    folder, read = EMBEDDINGS[tool]
    for record in records:
        path = Path(record["path"])
        assert path == root / folder / f"{record['name']}.safetensors"
        expected = stocked.effective_vectors(record["name"])
        np.testing.assert_array_equal(read(path).numpy(), expected)  # the tool's own loading logic
    assert _delivered(root / folder) == ["Bob.safetensors", "alice.safetensors", "carol.safetensors"]

    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / folder).iterdir()}
    again = cli("export", "--all", "--to", root)
    assert again.exit_code == 0 and "3 unchanged" in again.stderr and "written" not in again.stderr
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / folder).iterdir()} == before

    stocked.modify("alice", lambda ident: setattr(ident, "strength", 0.5))
    third = json.loads(cli("export", "--all", "--to", root, "--json").stdout)
    assert [r["status"] for r in third] == ["written", "unchanged", "unchanged"]
    np.testing.assert_allclose(read(root / folder / "alice.safetensors").numpy(), stocked.effective_vectors("alice"))
    assert {p.name for p in (root / folder).iterdir()} == set(before)  # no temp file left beside them


def test_export_to_names_the_tool_and_how_to_use_it(cli, stocked: Library, tmp_path: Path) -> None:
    root = _install(tmp_path / "ComfyUI", "comfyui")
    result = cli("export", "alice", "--to", root)
    assert result.exit_code == 0, result.stderr
    assert "ComfyUI at" in result.stderr and "embedding:alice" in result.stderr
    assert (root / "models" / "embeddings" / "alice.safetensors").is_file()
    assert not (root / "models" / "embeddings" / "Bob.safetensors").exists()


def test_a_folder_that_is_no_tool_is_refused_with_what_was_looked_for(cli, stocked: Library, tmp_path: Path) -> None:
    folder = tmp_path / "random"
    (folder / "embeddings").mkdir(parents=True)  # embeddings/ alone is not A1111
    result = cli("export", "--all", "--to", folder)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    for marker in (
        "webui.py + launch.py + modules/",
        "main.py + folder_paths.py + comfy/",
        "invokeai.yaml",
        "installer.py",
    ):
        assert marker in result.stderr
    assert os.listdir(folder / "embeddings") == []
    assert "is not a folder" in cli("export", "--all", "--to", tmp_path / "nope").stderr


def test_a_file_crossinit_did_not_write_is_kept_unless_force(cli, stocked: Library, tmp_path: Path) -> None:
    root = _install(tmp_path / "webui", "a1111")
    theirs = root / "embeddings" / "alice.safetensors"
    save_file({"emb_params": np.ones((1, WIDTH), np.float32)}, str(theirs))
    kept = theirs.read_bytes()
    result = cli("export", "--all", "--to", root)
    assert result.exit_code == 1  # the others were delivered; the refusal is reported
    assert "skipped alice" in result.stderr and "not crossinit's export" in result.stderr
    assert theirs.read_bytes() == kept and (root / "embeddings" / "carol.safetensors").is_file()
    assert cli("export", "alice", "--to", root, "--force").exit_code == 0
    np.testing.assert_array_equal(a1111_read(theirs).numpy(), random_vectors(1))


def test_each_family_goes_in_the_layout_the_tool_reads_or_is_skipped_with_a_reason(
    cli, library: Library, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(9)
    xl = {"clip_l": rng.standard_normal((2, 768)).astype(np.float32), "clip_g": rng.standard_normal((2, 1280))}
    xl["clip_g"] = xl["clip_g"].astype(np.float32)
    library.add(Identity(name="xl", tokens=2, width=768, family="sdxl"), xl)
    library.add(Identity(name="one", tokens=2, width=WIDTH, family="sd1"), random_vectors(6))
    library.add(Identity(name="odd", tokens=2, width=WIDTH), random_vectors(7))  # no family known
    comfy = _install(tmp_path / "ComfyUI", "comfyui")
    records = {r["name"]: r for r in json.loads(cli("export", "--all", "--to", comfy, "--json").stdout)}
    assert records["one"]["status"] == records["xl"]["status"] == "written"
    assert "cannot deliver unknown-family identities to comfyui" in records["odd"]["reason"]
    again = {r["name"]: r["status"] for r in json.loads(cli("export", "xl", "one", "--to", comfy, "--json").stdout)}
    assert again == {"xl": "unchanged", "one": "unchanged"}  # an SDXL file too is left as it is
    written = load_file(records["xl"]["path"])  # SDXL: the clip_l + clip_g layout ComfyUI reads
    assert sorted(written) == ["clip_g", "clip_l"]
    np.testing.assert_array_equal(written["clip_g"], xl["clip_g"])
    sdnext = _install(tmp_path / "sdnext", "sdnext")
    records = {r["name"]: r for r in json.loads(cli("export", "xl", "one", "--to", sdnext, "--json").stdout)}
    assert records["one"]["status"] == records["xl"]["status"] == "written"  # SD.Next matches by width
    assert sorted(load_file(records["xl"]["path"])) == ["clip_g", "clip_l"]
    assert (
        formats.format_for_tool("comfyui", "sd2") == "a1111"
        and formats.format_for_tool("invokeai", "sd1") == "invokeai"
    )


def test_a_failed_write_leaves_nothing_half_written_in_the_tool_folder(
    cli, stocked: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _install(tmp_path / "webui", "a1111")
    real_replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("carol.safetensors"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    result = cli("export", "--all", "--to", root)
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert _delivered(root / "embeddings") == ["Bob.safetensors", "alice.safetensors"]


def test_a_killed_exports_temp_file_is_cleared_by_the_next_export_to(cli, stocked: Library, tmp_path: Path) -> None:
    root = _install(tmp_path / "webui", "a1111")
    left = root / "embeddings" / ".crossinit-tmp-killed"
    left.write_bytes(b"half an embed")
    an_hour_ago = left.stat().st_mtime - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))
    live = root / "embeddings" / ".crossinit-tmp-live"  # another process's write in progress
    live.write_bytes(b"being written")
    assert cli("export", "--all", "--to", root).exit_code == 0
    assert _delivered(root / "embeddings") == [
        ".crossinit-tmp-live",
        "Bob.safetensors",
        "alice.safetensors",
        "carol.safetensors",
    ]


def test_export_of_several_names_a_tag_or_all_into_a_folder(cli, stocked: Library, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("export", "alice", "bob", "-o", f"{out}/", "-f", "a1111-pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [Path(r["path"]).name for r in json.loads(result.stdout)] == ["alice.pt", "Bob.pt"]
    tagged = json.loads(cli("export", "--tag", "FAM", "-o", tmp_path / "tagged", "--json").stdout)
    assert [r["name"] for r in tagged] == ["alice", "carol"]
    again = cli("export", "--all", "-o", tmp_path / "tagged")
    assert again.exit_code == 1 and "already exists (2 in all)" in again.stderr
    assert not (tmp_path / "tagged" / "Bob.safetensors").exists()  # nothing written when one is refused
    assert cli("export", "--all", "-o", tmp_path / "tagged", "--force").exit_code == 0
    assert cli("export", "--tag", "nobody").stderr.strip() == "error: no identities with tag 'nobody'"
    both = cli("export", "alice", "--all")
    assert both.exit_code == 2 and "one of the three" in both.stderr  # a usage mistake
    assert "drop -o/--format" in cli("export", "--all", "--to", tmp_path, "-f", "a1111").stderr


def test_import_of_a_folder_says_what_it_skipped_and_why(cli, library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "downloads"
    folder.mkdir()
    save_file({"emb_params": random_vectors(7)}, str(folder / "dave.safetensors"))
    shutil.copy(OFFICIAL[0], folder / OFFICIAL[0].name)
    (folder / "readme.txt").write_text("hello")
    (folder / "broken.pt").write_bytes(b"\x80garbage")
    (folder / "nested").mkdir()
    (folder / ".hidden.safetensors").write_bytes(b"")
    library.add(Identity(name="eve", tokens=2, width=WIDTH), random_vectors(8))
    save_file({"emb_params": random_vectors(9)}, str(folder / "eve.safetensors"))
    result = cli("import", folder)
    assert result.exit_code == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == 4, result.stderr
    reasons = dict(line.removeprefix("warning: skipped ").split(": ", 1) for line in skipped)
    assert "not a readable torch file" in reasons["broken.pt"]
    assert "already exists" in reasons["eve.safetensors"]
    assert "not an embedding file" in reasons["readme.txt"] and "folder" in reasons["nested"]
    np.testing.assert_array_equal(library.vectors("dave").learned, random_vectors(7))
    assert library.get(OFFICIAL[0].stem).width == 1024
    np.testing.assert_array_equal(library.vectors("eve").learned, random_vectors(8))  # kept
    assert "imported 2, skipped 4" in result.stderr

    document = json.loads(cli("import", folder, "--force", "--json").stdout)
    assert {r["name"] for r in document["imported"]} == {"dave", "eve", OFFICIAL[0].stem}
    assert {Path(s["file"]).name for s in document["skipped"]} == {"broken.pt", "readme.txt", "nested"}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("")
    result = cli("import", empty)
    assert result.exit_code == 1 and "nothing imported" in result.stderr
    assert "--name does not apply" in cli("import", folder, "--name", "x").stderr
    assert torch.is_tensor(torch.load(OFFICIAL[0], weights_only=True)[f"{OFFICIAL[0].stem}_v0"])


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_exports_and_deliveries_get_the_umasks_mode(mask: int, umask, cli, stocked: Library, tmp_path: Path) -> None:
    umask(mask)
    expected = 0o666 & ~mask  # 0644 under the usual 022: a tool running as another user can read it
    assert cli("export", "alice", "-o", tmp_path / "one.safetensors").exit_code == 0
    assert cli("export", "--all", "-o", tmp_path / "many", "-f", "a1111-pt").exit_code == 0
    root = _install(tmp_path / "webui", "a1111")
    assert cli("export", "--all", "--to", root).exit_code == 0
    files = [tmp_path / "one.safetensors", *(tmp_path / "many").iterdir(), *(root / "embeddings").glob("*.safetensors")]
    assert len(files) == 7 and {oct(f.stat().st_mode & 0o777) for f in files} == {oct(expected)}


def test_a_private_file_an_older_export_left_is_made_readable_without_a_rewrite(
    umask, cli, stocked: Library, tmp_path: Path
) -> None:
    umask(0o022)
    root = _install(tmp_path / "webui", "a1111")
    assert cli("export", "--all", "--to", root).exit_code == 0
    alice = root / "embeddings" / "alice.safetensors"
    alice.chmod(0o600)  # what crossinit wrote before it followed the umask
    before = alice.stat()
    again = cli("export", "--all", "--to", root)
    assert again.exit_code == 0 and "3 unchanged" in again.stderr
    after = alice.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_mode & 0o777) == (before.st_ino, before.st_mtime_ns, 0o644)
