"""The identity library: layout, validation, atomicity, damaged entries."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Damaged, Identity, Library, name_key, validate_name
from tests.factories import random_vectors


def test_add_writes_entry_with_vectors_init_crops_and_meta(library: Library) -> None:
    learned, init = random_vectors(1), random_vectors(2)
    crop = Image.new("RGB", (64, 64), (200, 10, 10))
    path = library.add(Identity(name="Alice", tokens=2, width=32), learned, init, crops=[crop, crop])
    assert path == library.home / "identities" / "alice"
    assert sorted(p.name for p in path.iterdir()) == ["crops", "meta.toml", "vectors.safetensors"]
    assert [p.name for p in library.crops("alice")] == ["000.png", "001.png"]
    assert Image.open(library.crops("alice")[0]).getpixel((3, 3)) == (200, 10, 10)
    vectors = library.vectors("ALICE")
    np.testing.assert_array_equal(vectors.learned, learned)
    np.testing.assert_array_equal(vectors.init, init)
    ident = library.get("alice")
    assert (ident.name, ident.tokens, ident.width, ident.has_init, ident.schema) == ("Alice", 2, 32, True, 1)
    assert "schema = 1" in (path / "meta.toml").read_text()


def test_names_match_case_insensitively_and_refuse_duplicates(add_identity, library: Library) -> None:
    add_identity("Bob")
    assert library.exists("bob") and library.exists("BOB")
    with pytest.raises(CrossinitError, match="already exists"):
        add_identity("BOB")
    add_identity("BOB", seed=5, force=True)
    np.testing.assert_array_equal(library.vectors("bob").learned, random_vectors(5))
    assert [e.name for e in library.list()] == ["BOB"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../x",
        "a/b",
        "a\\b",
        "..",
        ".hidden",
        "a..b",
        "x" * 300,
        "tab\there",
        "nul\x00",
        "bell\x07",
        "con",
        "LPT1.txt",
        "zero\u200bwidth",
        "sp ace",
        "-dash",
    ],
)
def test_hostile_names_are_refused_with_one_line(add_identity, bad: str, library: Library) -> None:
    with pytest.raises(CrossinitError) as info:
        validate_name(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(CrossinitError):
        add_identity(bad)
    assert not (library.home / "identities").exists() or not any((library.home / "identities").iterdir())


def test_unicode_names_are_normalised() -> None:
    assert validate_name("Ｚoë") == "Zoë"  # fullwidth Z folds (NFKC)
    assert name_key("ÉMILE") == name_key("émile")


def test_damaged_entries_are_listed_not_fatal(add_identity, library: Library) -> None:
    add_identity("good")
    add_identity("broken")
    add_identity("novectors")
    (library.path_of("broken") / "meta.toml").write_text("name = [unclosed")
    (library.path_of("novectors") / "vectors.safetensors").unlink()
    entries = {e.name: e for e in library.list()}
    assert isinstance(entries["good"], Identity)
    assert isinstance(entries["broken"], Damaged) and "damaged" in entries["broken"].reason
    assert isinstance(entries["novectors"], Damaged) and "vectors" in entries["novectors"].reason


def test_update_rename_remove(add_identity, library: Library) -> None:
    add_identity("carol")
    library.modify("carol", lambda ident: ident.__dict__.update(notes="hi", tags=["a"], strength=0.5))
    assert (library.get("carol").notes, library.get("carol").tags, library.get("carol").strength) == ("hi", ["a"], 0.5)
    library.rename("carol", "Caroline")
    assert not library.exists("carol") and library.get("caroline").name == "Caroline"
    assert library.get("caroline").notes == "hi"
    add_identity("dave")
    with pytest.raises(CrossinitError, match="already exists"):
        library.rename("caroline", "DAVE")
    library.remove("dave")
    assert [e.name for e in library.list()] == ["Caroline"]
    with pytest.raises(CrossinitError, match="no identity named"):
        library.remove("dave")


def test_strength_scales_offset_from_init(library: Library) -> None:
    learned, init = random_vectors(1), random_vectors(2)
    library.add(Identity(name="e", tokens=2, width=32), learned, init)
    library.modify("e", lambda ident: setattr(ident, "strength", 0.25))
    np.testing.assert_allclose(library.effective_vectors("e"), init + 0.25 * (learned - init), rtol=1e-6)
    library.modify("e", lambda ident: setattr(ident, "strength", 1.0))
    np.testing.assert_array_equal(library.effective_vectors("e"), learned)


def test_nan_vectors_are_refused(library: Library) -> None:
    bad = random_vectors()
    bad[0, 3] = np.nan
    with pytest.raises(CrossinitError, match="NaN"):
        library.add(Identity(name="nan", tokens=2, width=32), bad)
    assert library.list() == []


def test_leftovers_of_a_killed_writer_are_recovered(add_identity, library: Library) -> None:
    """A process killed mid-replace leaves the old entry in .trash: the next write restores it."""
    add_identity("frank", seed=3)
    trash = library.home / ".trash"
    trash.mkdir()
    (library.path_of("frank")).rename(trash / "frank~deadbeef")
    staging = library.home / ".staging" / "x~1"
    staging.mkdir(parents=True)
    add_identity("other")
    np.testing.assert_array_equal(library.vectors("frank").learned, random_vectors(3))
    assert not any(trash.iterdir())
    assert not any((library.home / ".staging").iterdir())


def test_schema_from_the_future_is_damaged(add_identity, library: Library) -> None:
    add_identity("g")
    meta = library.path_of("g") / "meta.toml"
    meta.write_text(meta.read_text().replace("schema = 1", "schema = 99"))
    [entry] = library.list()
    assert isinstance(entry, Damaged) and "newer" in entry.reason


@pytest.mark.parametrize(("width", "family"), [(768, "sd1"), (1024, "sd2"), (32, "")])
def test_entries_written_without_a_family_get_it_from_their_width(library: Library, width: int, family: str) -> None:
    path = library.add(Identity(name="old", tokens=2, width=width), random_vectors(width=width))
    meta = path / "meta.toml"
    meta.write_text("\n".join(line for line in meta.read_text().splitlines() if not line.startswith("family")))
    assert "family" not in meta.read_text()
    assert library.get("old").family == family


def test_effective_vectors_of_an_sdxl_identity_are_both_encoders_rows(library: Library) -> None:
    """SDXL: clip_l's rows and clip_g's, each at the stored strength (not clip_l's alone); one encoder: one array."""
    rng = np.random.default_rng(7)
    learned = {
        "clip_l": rng.normal(size=(2, 32)).astype(np.float32),
        "clip_g": rng.normal(size=(2, 64)).astype(np.float32),
    }
    init = {key: np.zeros_like(rows) for key, rows in learned.items()}
    library.add(Identity(name="xl", tokens=2, width=32, family="sdxl", widths=[32, 64], strength=0.5), learned, init)
    got = library.effective_vectors("xl")
    assert isinstance(got, list) and [a.shape for a in got] == [(2, 32), (2, 64)]
    for rows, key in zip(got, ("clip_l", "clip_g")):
        np.testing.assert_allclose(rows, 0.5 * learned[key], rtol=1e-6)
    for a, b in zip(got, library.effective_parts("xl")):
        np.testing.assert_array_equal(a, b)
    library.add(Identity(name="sd", tokens=2, width=32), learned["clip_l"], init["clip_l"])
    one = library.effective_vectors("sd")
    assert isinstance(one, np.ndarray) and one.shape == (2, 32)
