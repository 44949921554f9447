"""`editing`, the engine of `edit` and `remove`, from Python: silent, one call each, refusals as errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossinit_cli import editing
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library

WIDTH = 32


@pytest.fixture()
def stocked(library: Library) -> Library:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((2, WIDTH)).astype(np.float32) for _ in range(3)]
    library.add(Identity(name="alice", tokens=2, width=WIDTH, tags=["fam"], family="sd2"), vectors[0], vectors[1])
    library.add(Identity(name="Bob", tokens=2, width=WIDTH, family="sd1"), vectors[2])
    return library


def test_edit_and_remove_from_python(stocked: Library, capsys: pytest.CaptureFixture[str]) -> None:
    edited = editing.edit(stocked, "alice", editing.Edits(rename="alicia", note="hi", tags=["x"], strength=0.5))
    assert (edited.name, edited.notes, edited.strength) == ("alicia", "hi", 0.5)
    assert edited.tags == ["fam", "x"] and stocked.get("alicia").tags == ["fam", "x"]
    with pytest.raises(CrossinitError, match="between 0 and 4"):
        editing.edit(stocked, "alicia", editing.Edits(strength=9.0))
    with pytest.raises(CrossinitError):
        editing.remove(stocked, ["alicia", "nobody"])  # every name checked before anything goes
    assert stocked.exists("alicia")
    assert editing.remove(stocked, ["alicia", "Bob"]) == [editing.Removed("alicia"), editing.Removed("Bob")]
    assert stocked.list() == []
    assert capsys.readouterr() == ("", "")


def test_an_invalid_editor_result_is_kept_in_a_file_the_error_names(stocked: Library) -> None:
    editor = 'sh -c \'printf "notes = \\"my long note\\"\\nbroken = = \\n" > "$0"\''
    with pytest.raises(CrossinitError, match="not valid TOML") as refused:
        editing.edit_in_editor(stocked, "alice", editor=editor)
    message = str(refused.value)
    assert "nothing changed" in message and "your edit is kept in " in message
    kept = Path(message.rsplit("your edit is kept in ", 1)[1])
    try:
        assert "my long note" in kept.read_text(encoding="utf-8")
    finally:
        kept.unlink()
    assert stocked.get("alice").notes == ""


def test_tags_and_untags_apply_in_command_line_order(stocked: Library, cli) -> None:
    assert cli("edit", "alice", "--tag", "x", "--tag", "y", "--untag", "x").exit_code == 0
    assert stocked.get("alice").tags == ["fam", "y"]
    assert cli("edit", "alice", "--untag", "y", "--tag=y", "--untag", "fam").exit_code == 0
    assert stocked.get("alice").tags == ["y"]
    assert editing.tag_order(["--tag", "a", "--note", "n", "--untag=a"]) == [("tag", "a"), ("untag", "a")]
