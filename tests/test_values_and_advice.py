"""Issue 28's values and advice, through the CLI in-process: `remove` deletes only what it was told to (a name
that is both an identity and an unfinished run is never both by surprise), text from imported files is shown
with its control characters escaped, a file's base model is not used until the user names one, and every bad
value is one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossinit_cli import checkpoint, config, editing
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library

WIDTH = 32
ESCAPES = "evil/model\x1b]0;owned\x07\x1b[2J\u202e"


def _run_folder(home: Path, name: str, **train: object) -> Path:
    """An unfinished run of `name` at step 3 of 40, as `learn` leaves one when it is interrupted."""
    path = home / checkpoint.FOLDER / name
    (path / checkpoint.CROPS).mkdir(parents=True)
    settings = {"name": name, "step": 3, "train": {"steps": 40, **train}}
    (path / checkpoint.RUN).write_text(json.dumps(settings), encoding="utf-8")
    return path


def _one_line_error(result, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _embedding(path: Path, **metadata: str) -> Path:
    from safetensors.numpy import save_file

    vectors = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32)
    save_file({"emb_params": vectors}, str(path), metadata=metadata or None)
    return path


# ---- remove: the advice deletes only what it says --------------------------------------------------------


def test_remove_of_a_name_that_is_both_an_identity_and_an_unfinished_run_refuses_to_guess(
    cli, add_identity, home: Path, library: Library
) -> None:
    add_identity("alice")
    run = _run_folder(home, "alice")
    listed = cli("list")
    assert "crossinit remove alice --unfinished" in listed.stderr  # the hint deletes the run only

    both = cli("remove", "alice", "--yes")
    line = _one_line_error(both, "--unfinished", "--identity", "both a stored identity and an unfinished run")
    assert library.exists("alice") and run.is_dir(), line  # nothing removed

    only_run = cli("remove", "alice", "--unfinished", "--yes")
    assert only_run.exit_code == 0, only_run.stderr
    assert only_run.stderr.strip() == "removed the unfinished run of alice (step 3 of 40)"
    assert library.exists("alice") and not run.exists()  # the finished identity is kept

    _run_folder(home, "alice")
    only_identity = cli("remove", "alice", "--identity", "--yes")
    assert only_identity.exit_code == 0 and only_identity.stderr.strip() == "removed alice"
    assert not library.exists("alice") and checkpoint.find(home, "alice") is not None


def test_on_a_terminal_remove_asks_which_of_the_two_to_remove(
    cli, add_identity, home: Path, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from crossinit_cli.commands import library as command

    monkeypatch.setattr(command, "sys", types.SimpleNamespace(stdin=types.SimpleNamespace(isatty=lambda: True)))
    add_identity("alice")
    run = _run_folder(home, "alice")
    result = cli("remove", "alice", input="run\ny\n")
    assert result.exit_code == 0, result.stderr
    assert "alice is both a stored identity and an unfinished run at step 3 of 40" in result.stdout
    assert "Remove the unfinished run of alice?" in result.stdout
    assert library.exists("alice") and not run.exists()


def test_remove_flags_name_what_must_exist_and_both_flags_take_both(
    cli, add_identity, home: Path, library: Library
) -> None:
    add_identity("bob")
    _one_line_error(cli("remove", "bob", "--unfinished", "--yes"), "no unfinished run of 'bob'")
    _run_folder(home, "carol")
    _one_line_error(cli("remove", "carol", "--identity", "--yes"), "carol")
    assert library.exists("bob") and checkpoint.find(home, "carol") is not None
    _run_folder(home, "bob")
    both = cli("remove", "bob", "--identity", "--unfinished", "--yes")
    assert both.exit_code == 0, both.stderr
    assert both.stderr.splitlines() == ["removed bob", "removed the unfinished run of bob (step 3 of 40)"]
    assert not library.exists("bob") and checkpoint.find(home, "bob") is None


def test_an_interrupted_remove_says_exactly_what_went(
    cli, add_identity, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("alice", "carol", "dave"):
        add_identity(name)
    real = Library.remove

    def remove(self: Library, name: str) -> None:
        if name == "carol":
            raise KeyboardInterrupt  # Ctrl-C while carol is about to go
        real(self, name)

    monkeypatch.setattr(Library, "remove", remove)
    result = cli("remove", "alice", "carol", "dave", "--yes")
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["removed alice", "error: interrupted: removed alice; kept carol, dave"]
    assert [i.name for i in library.list()] == ["carol", "dave"]


def test_the_remove_engine_leaves_a_name_that_is_both_to_its_caller(add_identity, home: Path, library: Library) -> None:
    add_identity("alice")
    _run_folder(home, "alice")
    checked = editing.removal(library, ["alice"])
    assert checked.ambiguous == ["alice"]
    with pytest.raises(CrossinitError, match="--unfinished"):
        list(checked.run(library))
    checked.choose("alice", "run")
    assert [(r.name, r.run) for r in checked.run(library)] == [("alice", True)]
    assert library.exists("alice")


# ---- imported text and an imported file's base model ----------------------------------------------------


def test_text_from_an_imported_file_is_shown_with_its_control_characters_escaped(cli, tmp_path: Path) -> None:
    file = _embedding(tmp_path / "mallory.safetensors", base_model=ESCAPES)
    imported = cli("import", file)
    assert imported.exit_code == 0, imported.stderr
    for result in (imported, cli("show", "mallory"), cli("list")):
        text = result.stdout + result.stderr
        assert result.exit_code == 0 and "\x1b" not in text and "\x07" not in text and "\u202e" not in text, text
        assert "evil/model\\x1b]0;owned\\x07\\x1b[2J\\u202e" in text, text
    from crossinit_cli.errors import shown

    assert shown("a\tb\nc\x9b") == "a\\tb\\nc\\x9b" and shown("Zoë 山田") == "Zoë 山田"


def test_an_imported_files_base_model_is_reported_and_not_used_until_named(
    cli, tmp_path: Path, library: Library, loads: list, tiny_model: Path
) -> None:
    file = _embedding(tmp_path / "eve.safetensors", base_model="/nonexistent")
    imported = cli("import", file)
    assert imported.exit_code == 0, imported.stderr
    assert "its file names base model '/nonexistent'" in imported.stderr
    assert "crossinit edit eve --model /nonexistent (or generate and eval with --model)" in imported.stderr
    assert library.get("eve").base_model_claimed is True

    result = cli("generate", "<eve> on a beach", "--out", tmp_path / "out")
    _one_line_error(result, "'/nonexistent'", "crossinit edit eve --model", "--model")
    assert loads == [] and not (tmp_path / "out").exists()
    # The rule itself (config.identities_model): a named model wins; the claim alone never chooses.
    eve = library.get("eve")
    assert config.identities_model("owner/chosen", [eve]) == "owner/chosen"
    with pytest.raises(CrossinitError, match="names base model"):
        config.identities_model(None, [eve])
    # Named with edit --model (a path made absolute, checked to exist): from then on it is the identity's own.
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    _one_line_error(cli("edit", "eve", "--model", tmp_path / "nowhere"), "no such file or folder")
    assert cli("edit", "eve", "--model", model).exit_code == 0
    eve = library.get("eve")
    assert (eve.base_model, eve.base_model_claimed) == (str(model), None)
    assert config.identities_model(None, [eve]) == str(model)
    # An import that names its model (--model, checked against the vectors' width) trusts it: nothing claimed.
    from safetensors.numpy import save_file

    small = tmp_path / "eve-small.safetensors"
    rows = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    save_file({"emb_params": rows}, str(small), metadata={"base_model": "/nonexistent"})
    named = cli("import", small, "--name", "eve2", "--model", tiny_model)
    assert named.exit_code == 0 and "its file names" not in named.stderr, named.stderr
    assert library.get("eve2").base_model_claimed is None


# ---- every value error is one line, before any model loads ----------------------------------------------


@pytest.mark.parametrize("model", ["a/b c", "owner/-bad", "a/b..c", "/models", "x" * 50 + "/" + "y" * 50])
def test_a_model_that_is_neither_a_path_nor_a_hub_id_is_one_line(
    cli, add_identity, tmp_path: Path, model: str, loads: list
) -> None:
    add_identity("alice", base_model="owner/base")
    file = _embedding(tmp_path / "e.safetensors")
    for args in (
        ["generate", "<alice>", "--model", model, "--out", tmp_path / "out"],
        ["eval", "alice", "--model", model],  # before its CLIP model is even looked for
        ["edit", "alice", "--model", model],
    ):
        _one_line_error(cli(*args), model)
    imported = cli("import", file, "--model", model)  # a path is recorded as given (it may come later)
    if model.startswith("/"):
        assert imported.exit_code == 0, imported.stderr
        _one_line_error(cli("generate", "<e>", "--out", tmp_path / "out"), model, "no such file or folder")
    else:
        _one_line_error(imported, model, "not a valid Hugging Face hub id")
    assert loads == []


@pytest.mark.parametrize("claimed", ["/nonexistent", "a/b c", "/models"])
def test_an_sdxl_file_claiming_a_model_that_is_no_hub_id_imports(cli, tmp_path: Path, claimed: str) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    parts = {"clip_l": rng.standard_normal((2, 768)), "clip_g": rng.standard_normal((2, 1280))}
    file = tmp_path / "xl.safetensors"
    save_file({k: v.astype(np.float32) for k, v in parts.items()}, str(file), metadata={"base_model": claimed})
    imported = cli("import", file)
    assert imported.exit_code == 0 and "Traceback" not in imported.stderr, imported.stderr
    assert f"its file names base model '{claimed}'" in imported.stderr


@pytest.mark.parametrize("told", ["²", "٣", "9" * 5000, "0"])
def test_a_files_clip_skip_that_is_not_a_small_whole_number_is_one_line(cli, tmp_path: Path, told: str) -> None:
    file = _embedding(tmp_path / "odd.safetensors", clip_skip=told)
    _one_line_error(cli("import", file), "clip_skip")


def test_a_manifest_line_with_a_huge_number_is_one_line(
    cli, add_identity, tiny_model: Path, tmp_path: Path, loads: list
) -> None:
    add_identity("alice", base_model=str(tiny_model))
    for line in ('{"prompt": "<alice>", "seed": %s}' % ("9" * 5000), '{"prompt": "<alice>", "n": %s}' % ("7" * 4000)):
        manifest = tmp_path / "jobs.jsonl"
        manifest.write_text(line + "\n")
        result = cli("generate", "--manifest", manifest, "--on-error", "stop", "--out", tmp_path / "out")
        error = _one_line_error(result, "line 1:")
        assert len(error) < 300, error
    assert loads == []


def test_a_batch_row_with_an_extra_column_is_one_line(cli, tmp_path: Path) -> None:
    photos = tmp_path / "alice"
    photos.mkdir()
    manifest = tmp_path / "batch.csv"
    manifest.write_text("name,photos\nalice,alice\nbob,alice,extra\n")
    _one_line_error(cli("learn", "--batch", manifest, "--model", tmp_path / "nowhere"), "batch.csv:3", "1 more field")


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--seed", "99999999999999999999", ("--seed", "9223372036854775807")),
        ("--seed", "-1", ("--seed",)),
        ("--lr", "1e38", ("--lr",)),
        ("--lr", "nan", ("--lr",)),
        ("--lr", "inf", ("--lr",)),
        ("--lr", "0", ("--lr",)),
    ],
)
def test_learn_refuses_a_seed_or_rate_out_of_range_before_photos_or_model(
    cli, tmp_path: Path, flag: str, value: str, words: tuple[str, ...], loads: list
) -> None:
    from tests.reliability.harness import DATA

    result = cli("learn", DATA / "astronaut.png", flag, value, "--model", "owner/not-downloaded")
    _one_line_error(result, *words)
    assert loads == []


def test_resume_refuses_a_checkpoints_seed_out_of_range_before_the_model(cli, home: Path, loads: list) -> None:
    _run_folder(home, "zoe", seed=99999999999999999999, lr=0.005)
    # Refused by the run's own schema (a seed is a whole number in 0..2^63-1), in one line, before the model.
    _one_line_error(cli("learn", "--resume", "zoe"), "seed", "out of range", "unfinished run of 'zoe'")
    assert loads == []


def test_a_home_that_cannot_be_expanded_is_one_line(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSINIT_HOME", "~nosuchuser-crossinit/x")
    _one_line_error(cli("list"), "~nosuchuser-crossinit")
    monkeypatch.delenv("CROSSINIT_HOME")
    _one_line_error(cli("--home", "~nosuchuser-crossinit/x", "list"), "--home")
    monkeypatch.setenv("CROSSINIT_CONFIG", "~nosuchuser-crossinit/config.toml")
    _one_line_error(cli("config", "set", "device", "cpu"), "CROSSINIT_CONFIG")
