"""Issue 28's library problems 2, 3, 4, 11 and 15: a library that trusts only itself (its marker, no symlink
followed for a delete or a write, no export into it), integrity you can see (each entry's vectors recorded by
size and sha256), metadata validated at the edge (one schema for meta.toml, catalog rows and run.json), and
latents that go with their face. In-process through the `cli` fixture: each case is a few hundred ms."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from crossinit_cli import latents
from crossinit_cli.atomic import TEMP_PREFIX
from crossinit_cli.store import Damaged, Identity, Library
from tests.reliability.harness import tree, write_embedding

MARKER = ".crossinit-library"  # librarylock.MARKER, spelled out: this suite also runs against older code

pytestmark = pytest.mark.reliability


def one_line_error(result: Any, *words: str) -> None:
    """Exit 1, one `error:` line on stderr naming `words`, no traceback."""
    where = f"rc={result.exit_code} stderr={result.stderr!r}"
    assert result.exit_code == 1, where
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and "Traceback" not in result.stderr, where
    assert sum(line.startswith("error:") for line in lines) == 1, where
    for word in words:
        assert word in result.stderr, where


def listed(cli: Any, *options: str) -> dict[str, dict[str, Any]]:
    result = cli(*options, "list", "--json")
    assert result.exit_code == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


# ---- problem 2: --home on a folder that is not a library --------------------------------------------------


def foreign_folder(tmp_path: Path) -> Path:
    """A user's folder with files of its own, among them a `.staging/` and a `.trash/` crossinit would empty."""
    folder = tmp_path / "projects"
    (folder / ".staging" / "draft").mkdir(parents=True)
    (folder / ".staging" / "draft" / "chapter1.txt").write_text("mine")
    (folder / ".trash" / "old").mkdir(parents=True)
    (folder / ".trash" / "old" / "photo.jpg").write_bytes(b"\xff\xd8 keep me")
    (folder / "notes.txt").write_text("not crossinit's")
    return folder


COMMANDS = [("list",), ("list", "--json"), ("remove", "x", "--yes"), ("edit", "x", "--note", "n")]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_home_that_is_not_a_library_is_refused_and_left_untouched(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    folder = foreign_folder(tmp_path)
    before = tree(folder)
    one_line_error(cli("--home", folder, *command), "not a crossinit library")
    assert tree(folder) == before
    monkeypatch.setenv("CROSSINIT_HOME", str(folder))
    one_line_error(cli(*command), "not a crossinit library")
    assert tree(folder) == before


def test_a_new_library_is_marked_and_an_old_one_is_adopted(cli: Any, add_identity: Any, home: Path) -> None:
    add_identity("alice")
    assert (home / MARKER).is_file()
    (home / MARKER).unlink()  # a library made before the marker: its layout is enough, and it gets the marker
    assert set(listed(cli)) == {"alice"}
    assert cli("edit", "alice", "--note", "adopted").exit_code == 0
    assert (home / MARKER).is_file()


# ---- problem 3: nothing is followed through a symlink for a delete or a write -------------------------------


def test_a_symlinked_trash_deletes_nothing_it_points_to(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path
) -> None:
    add_identity("alice")
    victim = tmp_path / "victim"
    for sub in ("a", "b"):
        (victim / sub).mkdir(parents=True)
        (victim / sub / "file.txt").write_text(sub)
    before = tree(victim)
    (home / ".trash").symlink_to(victim, target_is_directory=True)
    for command in (("list",), ("list", "--json"), ("edit", "alice", "--note", "x"), ("remove", "alice", "--yes")):
        one_line_error(cli(*command), ".trash", "symbolic link")
    assert tree(victim) == before


def test_a_symlinked_catalog_leaves_the_database_it_points_to_alone(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path
) -> None:
    add_identity("alice")
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE entries (precious TEXT)")
    db.execute("INSERT INTO entries VALUES ('keep')")
    db.commit()
    db.close()
    before = other.read_bytes()
    (home / "catalog.sqlite").unlink()
    (home / "catalog.sqlite").symlink_to(other)
    one_line_error(cli("list", "--json"), "catalog.sqlite", "symbolic link")
    assert other.read_bytes() == before


def test_an_entry_folder_that_is_a_symlink_is_not_written_through(
    add_identity: Any, library: Library, home: Path, tmp_path: Path, cli: Any
) -> None:
    add_identity("alice")
    elsewhere = tmp_path / "elsewhere"
    (home / "identities" / "alice").rename(elsewhere)
    (home / "identities" / "alice").symlink_to(elsewhere, target_is_directory=True)
    before = tree(elsewhere)
    one_line_error(cli("edit", "alice", "--note", "through the link"), "symbolic link")
    assert tree(elsewhere) == before
    assert cli("remove", "alice", "--yes").exit_code == 0  # the link goes, never what it points to
    assert tree(elsewhere) == before
    assert not os.path.lexists(home / "identities" / "alice")
    assert not [p for p in (home / "identities").iterdir() if p.is_symlink()]


# ---- problem 4: exports into the library, and vectors that no longer match their entry ---------------------


def test_an_export_into_the_library_is_refused(cli: Any, add_identity: Any, home: Path) -> None:
    add_identity("alice")
    add_identity("bob")
    target = home / "identities" / "alice" / "vectors.safetensors"
    before = target.read_bytes()
    one_line_error(cli("export", "bob", "-o", target, "--force"), "inside the library")
    one_line_error(cli("export", "--all", "-o", f"{home}/", "--force"), "inside the library")
    assert target.read_bytes() == before
    assert listed(cli)["alice"]["damaged"] is False


@pytest.mark.parametrize("change", ["truncated", "swapped", "emptied"])
def test_vectors_that_no_longer_match_are_damaged_everywhere(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path, change: str
) -> None:
    add_identity("alice")
    add_identity("bob", seed=7)
    vectors = home / "identities" / "alice" / "vectors.safetensors"
    if change == "truncated":
        vectors.write_bytes(vectors.read_bytes()[:10])
    elif change == "swapped":  # a whole, valid file: only its record tells it is not alice's
        vectors.write_bytes((home / "identities" / "bob" / "vectors.safetensors").read_bytes())
    else:
        vectors.write_bytes(b"")
    entry = listed(cli)["alice"]
    assert entry["damaged"] is True and "vectors.safetensors" in entry["reason"]
    one_line_error(cli("show", "alice"), "damaged")
    out = tmp_path / "out.safetensors"
    one_line_error(cli("export", "alice", "-o", out), "damaged")
    assert not out.exists()
    doctor = cli("doctor", "--json")
    assert doctor.exit_code == 1
    assert [d["name"] for d in json.loads(doctor.stdout)["damaged"]] == ["alice"]
    assert listed(cli)["bob"]["damaged"] is False


def test_an_entry_without_a_record_is_read_and_gets_one_on_its_next_edit(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path
) -> None:
    add_identity("alice")
    meta = home / "identities" / "alice" / "meta.toml"
    text = meta.read_text()
    old = "\n".join(line for line in text.splitlines() if "integrity" not in line and "sha256" not in line)
    old = "\n".join(line for line in old.splitlines() if not line.startswith("size ="))
    meta.write_text(old + "\n")
    assert "sha256" not in meta.read_text()
    assert listed(cli)["alice"]["damaged"] is False
    assert cli("export", "alice", "-o", tmp_path / "a.safetensors").exit_code == 0
    assert cli("edit", "alice", "--note", "adopt").exit_code == 0
    assert "sha256" in meta.read_text()


def test_a_hand_edited_nan_strength_never_exports_nan(cli: Any, add_identity: Any, home: Path, tmp_path: Path) -> None:
    add_identity("alice")
    meta = home / "identities" / "alice" / "meta.toml"
    meta.write_text(meta.read_text().replace("strength = 1.0", "strength = nan"))
    out = tmp_path / "alice.safetensors"
    one_line_error(cli("export", "alice", "-o", out), "strength")
    assert not out.exists()
    assert "strength" in listed(cli)["alice"]["reason"]


# ---- problem 11: metadata that takes the library down -------------------------------------------------------


BAD_META = ["likeness nan", "lr nan", "snapshots [1]", "training text", "tags of tables", "width text"]


def _corrupt(meta: Path, case: str) -> str:
    """meta.toml of one entry changed by hand as `case` says; returns the field the error must name."""
    import tomli_w
    import tomllib

    raw = tomllib.loads(meta.read_text())
    field = {
        "likeness nan": "evaluation.likeness",
        "lr nan": "training.lr",
        "snapshots [1]": "snapshots",
        "training text": "training",
        "tags of tables": "tags",
        "width text": "width",
    }[case]
    if case == "likeness nan":
        raw["evaluation"] = {"likeness": math.nan}
    elif case == "lr nan":
        raw["training"] = {**raw.get("training", {}), "lr": math.nan}
    elif case == "snapshots [1]":
        raw["snapshots"] = [1]
    elif case == "training text":
        raw["training"] = "x"
    elif case == "tags of tables":
        raw["tags"] = [{"a": 1}]
    else:
        raw["width"] = "wide"
    meta.write_text(tomli_w.dumps(raw))
    return field


@pytest.mark.parametrize("case", BAD_META)
def test_a_bad_meta_toml_is_one_damaged_entry_and_the_rest_works(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path, case: str
) -> None:
    add_identity("bob")
    add_identity("good", seed=3)
    field = _corrupt(home / "identities" / "bob" / "meta.toml", case)
    entries = listed(cli)
    assert entries["bob"]["damaged"] is True and repr(field) in entries["bob"]["reason"]
    assert entries["good"]["damaged"] is False
    assert cli("list").exit_code == 0
    assert cli("show", "good").exit_code == 0
    done = cli("export", "--all", "-o", f"{tmp_path}/out/")
    assert done.exit_code == 0, done.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.safetensors"]
    one_line_error(cli("show", "bob"), field)
    one_line_error(cli("edit", "bob", "--note", "x"), field)
    assert cli("remove", "bob", "--yes").exit_code == 0
    assert set(listed(cli)) == {"good"}


def _editor(tmp_path: Path, code: str) -> str:
    """An $EDITOR that changes the TOML it is given with `code` (raw: the parsed table)."""
    script = tmp_path / "editor.py"
    script.write_text(
        "import sys, math, tomllib, tomli_w\n"
        "path = sys.argv[1]\n"
        "raw = tomllib.loads(open(path).read())\n"
        f"{code}\n"
        "open(path, 'w').write(tomli_w.dumps(raw))\n"
    )
    return f"{sys.executable} {script}"


@pytest.mark.parametrize(
    ("code", "field"),
    [
        ("raw.setdefault('evaluation', {})['likeness'] = math.nan", "evaluation.likeness"),
        ("raw.setdefault('training', {})['lr'] = math.nan", "training.lr"),
        ("raw['snapshots'] = [1]", "snapshots"),
        ("raw['training'] = 'x'", "training"),
        ("raw['strength'] = math.inf", "strength"),
    ],
)
def test_edit_refuses_an_invalid_result_before_writing_and_names_the_field(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, field: str
) -> None:
    add_identity("bob")
    meta = home / "identities" / "bob" / "meta.toml"
    before = meta.read_bytes()
    monkeypatch.setenv("EDITOR", _editor(tmp_path, code))
    one_line_error(cli("edit", "bob"), field)
    assert meta.read_bytes() == before
    assert listed(cli)["bob"]["damaged"] is False
    assert cli("export", "--all", "-o", f"{tmp_path}/out/").exit_code == 0


@pytest.mark.parametrize("text", ["{}", "[]", '{"name": 5, "train": {}}', '{"name": "x", "train": {"steps": "many"}}'])
def test_a_bad_run_json_does_not_take_list_down(cli: Any, add_identity: Any, home: Path, text: str) -> None:
    add_identity("good")
    run = home / ".unfinished" / "x"
    run.mkdir(parents=True)
    (run / "run.json").write_text(text)
    assert cli("list").exit_code == 0
    assert set(listed(cli)) == {"good"}


def test_a_hand_edited_catalog_row_is_not_trusted(cli: Any, add_identity: Any, home: Path) -> None:
    add_identity("alice")
    add_identity("good", seed=3)
    listed(cli)
    db = sqlite3.connect(home / "catalog.sqlite")
    db.execute("UPDATE entries SET record = '{\"name\": 5}' WHERE key = 'alice'")
    db.execute("UPDATE entries SET summary = 'a\tb' WHERE key = 'good'")
    db.commit()
    db.close()
    entries = listed(cli)
    assert {name: entry["damaged"] for name, entry in entries.items()} == {"alice": False, "good": False}
    assert entries["alice"]["name"] == "alice"
    assert cli("list").exit_code == 0


# ---- problem 15: latents go with their face -----------------------------------------------------------------


def _crop(shade: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8), (shade, shade, shade))


def _cached(home: Path, crop: Any) -> Path:
    file = latents.path(latents.folder(home), crop, "k")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"latents of a face")
    return file


def test_replacing_an_identity_forgets_the_old_faces_latents(add_identity: Any, home: Path) -> None:
    old, kept, new = _crop(10), _crop(20), _crop(30)
    add_identity("alice", crops=[old, kept])
    old_file, kept_file, new_file = _cached(home, old), _cached(home, kept), _cached(home, new)
    add_identity("alice", crops=[kept, new], force=True)  # learn --force with another photo (and one the same)
    assert not old_file.exists()
    assert kept_file.exists() and new_file.exists()


def test_import_force_over_a_learned_identity_forgets_its_latents(
    cli: Any, add_identity: Any, home: Path, tmp_path: Path
) -> None:
    face = _crop(40)
    add_identity("alice", crops=[face])
    file = _cached(home, face)
    emb = tmp_path / "alice.safetensors"
    write_embedding(emb, 5)
    done = cli("import", emb, "--name", "alice", "--force")
    assert done.exit_code == 0, done.stderr
    assert not file.exists()


def test_a_failed_runs_latents_and_interrupted_writes_are_cleaned(home: Path) -> None:
    face = _crop(50)
    file = _cached(home, face)
    stale = latents.folder(home) / f"{TEMP_PREFIX}abc"
    stale.write_bytes(b"half a latent")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    live = latents.folder(home) / f"{TEMP_PREFIX}live"
    live.write_bytes(b"being written now")
    latents.forget_images(latents.folder(home), [face])  # what learn does when its run fails (learning._train)
    assert not file.exists() and not stale.exists()
    assert live.exists()


def test_a_failed_training_run_forgets_its_latents(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """learning._train: a run that fails (diverged) leaves no latents of its faces."""
    from crossinit_cli import learning, train
    from crossinit_cli.errors import CrossinitError

    face = _crop(60)
    file = _cached(home, face)

    class Trainer:
        pipe, family, slots, init, placement = None, None, None, None, None
        latent_cache = latents.folder(home)

    class Parts:
        @staticmethod
        def of_pipeline(*_: Any) -> None:
            return None

    def diverge(*_: Any, **__: Any) -> None:
        raise CrossinitError("training diverged")

    monkeypatch.setattr(train, "ModelParts", Parts)
    monkeypatch.setattr(train, "run", diverge)

    class Job:
        snapshot_every = None
        train_config = None
        micro_batch = None
        checkpointing = "auto"

    from contextlib import nullcontext

    class Hooks:
        on_progress = on_micro_batch = None

        @staticmethod
        def phase(_: str) -> Any:
            return nullcontext()

    with pytest.raises(CrossinitError):
        learning._train(Trainer(), Job(), ([face], None), None, None, Hooks())
    assert not file.exists()


def test_the_stored_record_matches_the_file(add_identity: Any, library: Library, home: Path) -> None:
    import hashlib

    ident = add_identity("alice")
    data = (home / "identities" / "alice" / "vectors.safetensors").read_bytes()
    assert ident.integrity == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert isinstance(library.list()[0], Identity)
    assert not isinstance(library.list()[0], Damaged)
    assert stat.S_ISREG(os.lstat(home / MARKER).st_mode)


def test_a_home_that_cannot_be_expanded_is_one_line(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSINIT_HOME", "~nouser-crossinit-test/x")
    for command in (("list",), ("doctor",)):
        one_line_error(cli(*command), "cannot expand")
