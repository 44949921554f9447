"""The library's SQLite catalog: `list` answers from it, and it always agrees with the folders (the truth)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from crossinit_cli.catalog import CATALOG
from crossinit_cli.store import Damaged, Identity, Library


def _add(library: Library, name: str, **fields) -> None:
    rng = np.random.default_rng(len(name))
    library.add(Identity(name=name, tokens=2, width=32, **fields), rng.standard_normal((2, 32)).astype(np.float32))


def _names(cli, *args: str) -> list[str]:
    result = cli("list", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return [r["name"] for r in json.loads(result.stdout)]


def _same(library: Library) -> None:
    """What `list` says equals what the folders hold, entry for entry."""

    def plain(entries):
        return [e.to_dict() if isinstance(e, Identity) else ("damaged", e.name, e.reason) for e in entries]

    assert plain(library.list()) == plain(library.scan())


def test_writes_keep_the_catalog_current_and_list_reads_no_entry(
    cli, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    _add(library, "Alice", notes="first", tags=["x"])
    _add(library, "bob")
    library.modify("alice", lambda ident: setattr(ident, "notes", "second"))
    library.rename("bob", "Robert")
    _add(library, "carol")
    library.remove("carol")
    assert (library.home / CATALOG).is_file()
    state = library.catalog_state()
    assert state["state"] == "fresh" and state["entries"] == 2, state

    def no_reads(*args, **kwargs):
        raise AssertionError("list read an entry's metadata although the catalog was current")

    monkeypatch.setattr(Library, "_read_meta", no_reads)
    records = json.loads(cli("list", "--json").stdout)
    assert [(r["name"], r["notes"], r["damaged"]) for r in records] == [
        ("Alice", "second", False),
        ("Robert", "", False),
    ]
    assert records[0]["token"] == "<Alice>" and records[0]["path"] == str(library.entries / "alice")


def test_folders_copied_in_or_edited_by_hand_are_picked_up(cli, library: Library) -> None:
    _add(library, "alice", notes="as learned")
    _add(library, "bob")
    cli("list")
    # Copied in from another library: a new folder the catalog has never seen.
    shutil.copytree(library.entries / "bob", library.entries / "dave")
    meta = library.entries / "dave" / "meta.toml"
    meta.write_text(meta.read_text().replace('name = "bob"', 'name = "dave"'))
    # Edited in place (same inode, same folder): only the file's own stamp changes.
    meta = library.entries / "alice" / "meta.toml"
    with open(meta, "r+", encoding="utf-8") as handle:
        text = handle.read().replace("as learned", "by hand!!")
        handle.seek(0)
        handle.write(text)
    # Deleted by hand: the folder goes, its row must go too.
    shutil.rmtree(library.entries / "bob")
    assert library.catalog_state()["state"] == "stale"
    assert _names(cli) == ["alice", "dave"]
    assert json.loads(cli("list", "--json").stdout)[0]["notes"] == "by hand!!"
    assert library.catalog_state()["state"] == "fresh"
    _same(library)


def test_a_file_removed_by_hand_makes_the_entry_damaged_in_the_listing(cli, library: Library) -> None:
    _add(library, "alice")
    _add(library, "bob")
    cli("list")
    (library.entries / "bob" / "vectors.safetensors").unlink()
    records = {r["name"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert records["bob"]["damaged"] is True and "vectors.safetensors is missing" in records["bob"]["reason"]
    assert records["alice"]["damaged"] is False
    _same(library)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted", "foreign table", "old schema", "bad row"])
def test_a_missing_or_damaged_catalog_is_rebuilt(cli, library: Library, damage: str) -> None:
    import sqlite3

    for name in ("alice", "bob", "carol"):
        _add(library, name, tags=["t"])
    path = library.home / CATALOG
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1500])
    elif damage == "deleted":
        path.unlink()
    else:
        db = sqlite3.connect(path)
        if damage == "foreign table":
            db.execute("DROP TABLE entries")
            db.execute("CREATE TABLE entries (x)")
        elif damage == "old schema":
            db.execute("PRAGMA user_version = 0")
        else:  # a row whose record is not JSON, with the right stamp: only reading it tells
            db.execute("UPDATE entries SET record = '{not json' WHERE key = 'bob'")
        db.commit()
        db.close()
    expected = "missing" if damage == "deleted" else "damaged"
    if damage in ("foreign table", "old schema", "bad row"):
        expected = library.catalog_state()["state"]  # readable by SQLite: doctor cannot tell without reading rows
    doctor = json.loads(cli("doctor", "--json").stdout)
    assert doctor["catalog"]["state"] == expected
    assert _names(cli) == ["alice", "bob", "carol"]
    assert _names(cli, "--tag", "t") == ["alice", "bob", "carol"]
    _same(library)
    assert library.catalog_state()["state"] == "fresh"


def test_a_write_that_dies_before_its_catalog_update_is_caught_by_the_next_list(
    cli, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    _add(library, "alice", notes="old")
    _add(library, "bob")
    cli("list")
    with monkeypatch.context() as patch:  # as if killed right after the folder's commit
        patch.setattr(Library, "_index", lambda self, *keys: None)
        library.modify("alice", lambda ident: setattr(ident, "notes", "new"))
        library.rename("bob", "robert")
        _add(library, "carol")
    assert library.catalog_state()["state"] == "stale"
    records = json.loads(cli("list", "--json").stdout)
    assert [(r["name"], r["notes"]) for r in records] == [("alice", "new"), ("carol", ""), ("robert", "")]
    _same(library)


def test_dot_folders_are_not_entries(cli, library: Library) -> None:
    _add(library, "alice")
    (library.entries / ".snapshots").mkdir()
    (library.entries / ".snapshots" / "meta.toml").write_text('name = "ghost"\ntokens = 2\nwidth = 32\n')
    (library.home / ".resume" / "run1").mkdir(parents=True)
    (library.entries / "alice" / "snapshots").mkdir()  # inside an entry: the entry stays one entry
    (library.entries / "stray.txt").write_text("not an entry")
    assert _names(cli) == ["alice"]
    _same(library)


def test_damaged_entries_are_listed_with_and_without_the_catalog(cli, library: Library) -> None:
    _add(library, "alice")
    _add(library, "broken")
    (library.entries / "broken" / "meta.toml").write_text("not = = toml")
    entries = library.list()
    assert isinstance(entries[1], Damaged) and entries[1].name == "broken"
    human = cli("list")
    assert "broken" in human.stdout and "damaged:" in human.stdout and "1 damaged entry" in human.stderr
    _same(library)


def test_an_unwritable_catalog_still_gives_a_correct_listing(
    cli, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only library cannot have its catalog refreshed: the listing comes from one built in memory."""
    from crossinit_cli import catalog

    _add(library, "alice")
    cli("list")
    shutil.copytree(library.entries / "alice", library.entries / "alice2")
    meta = library.entries / "alice2" / "meta.toml"
    meta.write_text(meta.read_text().replace('name = "alice"', 'name = "alice2"'))
    real_open = catalog.Catalog._open

    def read_only(self):
        if self.path is None:
            return real_open(self)
        import sqlite3

        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)

    monkeypatch.setattr(catalog.Catalog, "_open", read_only)
    assert _names(cli) == ["alice", "alice2"]
    assert library.catalog_state()["state"] == "stale"  # nothing was written


# ---- finding things -------------------------------------------------------------------------------


@pytest.fixture()
def stocked(library: Library) -> Library:
    _add(library, "alice", tags=["Family", "2024"], notes="my sister", family="sd2", base_model="sd21-base")
    _add(library, "bob", tags=["work"], notes="colleague from Berlin", family="sd1", base_model="runwayml/sd15")
    _add(library, "carol", tags=["family"], family="sdxl", base_model="SDXL-base-1.0", evaluation={"likeness": 0.41})
    _add(library, "dave", notes="", family="sd2", base_model="sd21-base", evaluation={"likeness": 0.77})
    for name, created in (
        ("alice", "2026-01-03"),
        ("bob", "2026-01-01"),
        ("carol", "2026-01-04"),
        ("dave", "2026-01-02"),
    ):
        library.modify(name, lambda ident, when=created: setattr(ident, "created", f"{when}T00:00:00+00:00"))
    return library


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["alice", "bob", "carol", "dave"]),
        (["--tag", "family"], ["alice", "carol"]),  # tags match ignoring case
        (["--tag", "nobody"], []),
        (["--family", "sd2"], ["alice", "dave"]),
        (["--family", "SDXL"], ["carol"]),
        (["--model", "SD21"], ["alice", "dave"]),  # a part of the base model, ignoring case
        (["--search", "BERLIN"], ["bob"]),  # notes
        (["--search", "aro"], ["carol"]),  # names
        (["--sort", "created"], ["carol", "alice", "dave", "bob"]),  # newest first
        (["--sort", "likeness"], ["dave", "carol", "alice", "bob"]),  # best first, unscored last (by name)
        (["--sort", "created", "--limit", "2"], ["carol", "alice"]),
        (["--limit", "0"], []),
        (["--tag", "family", "--family", "sd2", "--search", "sister"], ["alice"]),
    ],
)
def test_list_filters_sorts_and_limits(cli, stocked: Library, args: list[str], expected: list[str]) -> None:
    assert _names(cli, *args) == expected
    human = cli("list", *args)
    assert human.exit_code == 0
    shown = [line.split()[0] for line in human.stdout.splitlines()[1:]]
    assert shown == expected
    if not expected:
        assert "No identities match" in human.stderr


def test_list_refuses_an_unknown_family_or_sort(cli, stocked: Library) -> None:
    bad = cli("list", "--family", "sd3")
    assert bad.exit_code == 1 and "unknown family 'sd3'" in bad.stderr and "sd1, sd2, sdxl" in bad.stderr
    assert cli("list", "--sort", "size").exit_code == 2
    assert cli("list", "--limit", "-1").exit_code == 2


def test_damaged_entries_are_kept_by_name_filters_and_sort_last(cli, stocked: Library) -> None:
    (stocked.entries / "bob" / "meta.toml").write_text("broken = = =")
    records = json.loads(cli("list", "--json", "--sort", "likeness").stdout)
    assert [(r["name"], r["damaged"]) for r in records][-1] == ("bob", True)
    assert _names(cli, "--search", "bo") == ["bob"]
    assert "bob" not in _names(cli, "--tag", "work")  # nothing is known about it but its name


def test_list_json_escapes_what_json_must_escape(cli, tmp_path: Path) -> None:
    """`list --json` writes most of each line without json.dumps: quotes, backslashes and controls in a home
    path or a hand-made folder name must still come out as valid JSON."""
    home = tmp_path / 'my "library" \\ here'
    library = Library(home)
    _add(library, "alice")
    (library.entries / 'we"ird\\\tname').mkdir()  # not an entry crossinit could write: listed as damaged
    result = cli("--home", home, "list", "--json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["name"], r["damaged"]) for r in records] == [("alice", False), ('we"ird\\\tname', True)]
    assert records[0]["path"] == str(library.entries / "alice") and records[0]["token"] == "<alice>"
    assert records[1]["path"] == str(library.entries / 'we"ird\\\tname')


def test_a_damaged_page_found_while_reading_is_rebuilt(cli, library: Library) -> None:
    """A catalog whose header is fine but whose table pages are not: found by the query, not by the open."""
    for i in range(300):  # enough rows for the entries table to span many pages
        _add(library, f"person-{i:03d}", notes="x" * 200)
    path = library.home / CATALOG
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(2 * page, len(data), page):  # every page after the schema's, overwritten
        data[start : start + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    assert len(_names(cli)) == 300
    _same(library)
    assert library.catalog_state()["state"] == "fresh"
    library.modify(
        "person-000", lambda ident: setattr(ident, "notes", "after")
    )  # a write that finds it damaged does not fail either
    assert json.loads(cli("list", "--json", "--limit", "1").stdout)[0]["notes"] == "after"


def test_list_fits_a_narrow_terminal_without_cutting_names(library: Library) -> None:
    import re
    import subprocess
    import sys

    long_model = "stabilityai/stable-diffusion-2-1-base-with-a-long-suffix"
    _add(library, "a-long-identity-name", base_model=long_model, notes="n" * 80, tags=["t" * 30])
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "80"}  # rich then treats stdout as an 80-column terminal
    done = subprocess.run([sys.executable, "-m", "crossinit_cli", "list"], env=env, capture_output=True, text=True)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in done.stdout.splitlines()]
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith("a-long-identity-name  ") and "…" in lines[1]
    piped = subprocess.run([sys.executable, "-m", "crossinit_cli", "list"], capture_output=True, text=True)
    assert long_model in piped.stdout and "n" * 80 in piped.stdout  # piped: whole lines, for grep


def test_a_vectors_file_changed_in_place_is_verified_again_and_unchanged_ones_are_not_hashed(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crossinit_cli import entries

    _add(library, "alice")
    _add(library, "bob")
    assert all(isinstance(e, Identity) for e in library.list())
    hashed: list[int] = []
    real = entries.fingerprint
    monkeypatch.setattr(entries, "fingerprint", lambda data: hashed.append(len(data)) or real(data))
    assert all(isinstance(e, Identity) for e in library.list())
    assert hashed == []  # stamps unchanged: nothing read, nothing hashed
    vectors = library.path_of("alice") / "vectors.safetensors"
    vectors.write_bytes(vectors.read_bytes()[:-4] + b"    ")  # same size, other bytes
    os.utime(vectors, ns=(1, 1))
    found = {e.name: e for e in library.list()}
    assert isinstance(found["alice"], Damaged) and "sha256" in found["alice"].reason
    assert isinstance(found["bob"], Identity)
    assert len(hashed) == 1


def test_a_row_edited_behind_the_catalogs_back_is_rebuilt_from_the_folders(library: Library) -> None:
    import sqlite3

    _add(library, "alice", notes="truth")
    library.list()
    db = sqlite3.connect(library.home / CATALOG)
    db.execute("""UPDATE entries SET record = '{"name": "alice", "notes": "lie"}', name = 'mallory'""")
    db.commit()
    db.close()
    (entry,) = library.list()
    assert isinstance(entry, Identity) and entry.name == "alice" and entry.notes == "truth"
    _same(library)
