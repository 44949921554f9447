"""The commands that need no model: list, show, edit, remove, config, and the CLI's conventions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossinit_cli.store import Library


def test_list_json_is_the_only_stdout(add_identity, cli, library: Library) -> None:
    add_identity("alice", init=True)
    add_identity("bob", init=True)
    result = cli("list", "--json")
    assert result.exit_code == 0
    records = json.loads(result.stdout)
    assert [r["name"] for r in records] == ["alice", "bob"]
    assert records[0]["token"] == "<alice>" and records[0]["training"]["steps"] == 25
    assert records[0]["damaged"] is False


def test_list_human_and_empty(add_identity, cli, library: Library) -> None:
    result = cli("list")
    assert result.exit_code == 0 and "No identities yet" in result.stderr and result.stdout == ""
    add_identity("alice", init=True)
    result = cli("list")
    assert "alice" in result.stdout and "fast (25 steps)" in result.stdout


def test_list_reports_damaged_entries_and_keeps_going(add_identity, cli, library: Library) -> None:
    add_identity("alice", init=True)
    add_identity("broken", init=True)
    (library.path_of("broken") / "meta.toml").write_text("this is = = not toml")
    result = cli("list", "--json")
    assert result.exit_code == 0
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["broken"]["damaged"] is True and records["alice"]["damaged"] is False
    human = cli("list")
    assert "damaged" in human.stdout and "alice" in human.stdout and "1 damaged entry" in human.stderr


def test_show_json_has_training_record_and_norms(add_identity, cli, library: Library) -> None:
    add_identity("Alice", init=True)
    result = cli("show", "ALICE", "--json")
    record = json.loads(result.stdout)
    assert record["name"] == "Alice" and record["training"] == {"mode": "fast", "steps": 25}
    assert len(record["vector_norms"]) == 2 and len(record["init_norms"]) == 2
    assert record["path"].endswith("identities/alice")
    assert "training.mode" in cli("show", "alice").stdout


def test_unknown_identity_is_one_line_exit_1(cli) -> None:
    for args in (
        ["show", "nobody"],
        ["edit", "nobody", "--note", "x"],
        ["export", "nobody"],
        ["remove", "nobody", "--yes"],
    ):
        result = cli(*args)
        assert result.exit_code == 1, args
        assert result.stderr.count("\n") == 1 and "no identity named 'nobody'" in result.stderr
        assert result.stdout == ""


def test_usage_error_is_exit_2(cli) -> None:
    assert cli("list", "--bogus").exit_code == 2
    assert cli("export", "x", "--format", "jpeg").exit_code == 2


def test_edit_flags(add_identity, cli, library: Library) -> None:
    add_identity("alice", init=True)
    result = cli("edit", "alice", "--note", "from holiday", "--tag", "family", "--tag", "2026", "--strength", "0.7")
    assert result.exit_code == 0, result.stderr
    ident = library.get("alice")
    assert (ident.notes, ident.tags, ident.strength) == ("from holiday", ["family", "2026"], 0.7)
    assert cli("edit", "alice", "--untag", "2026", "--rename", "Alicia").exit_code == 0
    assert library.get("alicia").tags == ["family"] and not library.exists("alice")
    assert library.get("alicia").strength == 0.7


def test_strength_is_reversible(add_identity, cli, library: Library) -> None:
    add_identity("alice", init=True)
    learned = library.vectors("alice").learned
    cli("edit", "alice", "--strength", "0.3")
    assert not np.allclose(library.effective_vectors("alice"), learned)
    cli("edit", "alice", "--strength", "1")
    np.testing.assert_array_equal(library.effective_vectors("alice"), learned)


def test_edit_refusals(add_identity, cli, library: Library) -> None:
    add_identity("alice", init=True)
    add_identity("bob", init=True)
    add_identity("imported")
    cases = {
        ("edit", "alice", "--rename", "BOB"): "already exists",
        ("edit", "alice", "--rename", "../evil"): "may not contain",
        ("edit", "alice", "--strength", "-1"): "between 0",
        ("edit", "imported", "--strength", "0.5"): "no cross-init start",
        ("edit", "alice"): "$EDITOR is not set",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.exit_code == 1 and message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1
    assert library.get("alice").strength == 1.0 and library.exists("alice")


def _editor(tmp_path: Path, body: str) -> str:
    script = tmp_path / "editor.py"
    script.write_text(f"import sys, pathlib\np = pathlib.Path(sys.argv[1])\n{body}\n")
    return f"{sys.executable} {script}"


def test_edit_in_editor(add_identity, cli, library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_identity("alice", init=True)
    monkeypatch.setenv(
        "EDITOR", _editor(tmp_path, "p.write_text(p.read_text().replace('notes = \"\"', 'notes = \"edited\"'))")
    )
    result = cli("edit", "alice")
    assert result.exit_code == 0, result.stderr
    assert library.get("alice").notes == "edited"


def test_edit_in_editor_refuses_broken_toml(
    add_identity, cli, library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_identity("alice", init=True)
    meta = (library.path_of("alice") / "meta.toml").read_bytes()
    monkeypatch.setenv("EDITOR", _editor(tmp_path, "p.write_text('width = [')"))
    result = cli("edit", "alice")
    assert result.exit_code == 1 and "not valid TOML" in result.stderr
    monkeypatch.setenv("EDITOR", _editor(tmp_path, "p.write_text(p.read_text().replace('width = 32', 'width = 99'))"))
    assert cli("edit", "alice").exit_code == 1
    assert (library.path_of("alice") / "meta.toml").read_bytes() == meta


def test_remove_needs_confirmation(add_identity, cli, library: Library) -> None:
    add_identity("alice", init=True)
    result = cli("remove", "alice")  # CliRunner's stdin is not a TTY
    assert result.exit_code == 1 and "--yes" in result.stderr and library.exists("alice")
    assert cli("remove", "ALICE", "--yes").exit_code == 0
    assert library.list() == []


def test_config_set_show_unset(cli, home: Path, tmp_path: Path) -> None:
    assert cli("config", "set", "device", "cpu").exit_code == 0
    assert cli("config", "set", "model", "/models/sd21").exit_code == 0
    data = json.loads(cli("config", "--json").stdout)
    assert data["settings"]["device"] == "cpu" and data["settings"]["model"] == "/models/sd21"
    assert data["paths"] == {"library": str(home), "config": str(tmp_path / "config.toml")}
    assert 'device = "cpu"' in (tmp_path / "config.toml").read_text()
    assert cli("config", "unset", "device").exit_code == 0
    assert json.loads(cli("config", "--json").stdout)["settings"]["device"] == "auto"
    bad = cli("config", "set", "colour", "red")
    assert bad.exit_code == 1 and "unknown config key" in bad.stderr


def test_home_option_overrides_env(cli, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    result = cli("--home", other, "import", Path(__file__).parent / "data" / "official" / "28017.bin")
    assert result.exit_code == 0, result.stderr
    assert Library(other).exists("28017")


def test_read_only_library_gives_one_line(add_identity, cli, library: Library) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits")
    add_identity("alice", init=True)
    library.home.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = cli("edit", "alice", "--note", "x")
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
    finally:
        library.home.chmod(stat.S_IRWXU)


def _modules_after(args: list[str], env: dict[str, str]) -> set[str]:
    code = (
        "import sys, json\n"
        "from crossinit_cli.cli import app\n"
        "try:\n    app(" + repr(args) + ")\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["list"],
        ["list", "--json"],
        ["show", "alice"],
        ["edit", "alice", "--note", "n"],
        ["remove", "alice", "--yes"],
        ["config"],
        ["learn", "--help"],
        ["generate", "--help"],
    ],
)
def test_fast_paths_import_neither_torch_nor_typers_extras(add_identity, args: list[str], library: Library) -> None:
    add_identity("alice", init=True)
    modules = _modules_after(args, dict(os.environ))
    # pydantic (typer 0.2x's option coercion), markdown-it and pygments (its help formatter): crossinit_cli.typerfix
    heavy = {"torch", "diffusers", "transformers", "pydantic", "markdown_it", "pygments"} & modules
    assert not heavy, f"{args} imported {heavy}"


def test_console_script_runs_and_exits_cleanly(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", "show", "ghost"],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_COLOR="1"),
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == "error: no identity named 'ghost'; see `crossinit list`\n"
    assert "\x1b[" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["learn", str(Path(__file__).parent / "data" / "astronaut.png"), "--model", "/nonexistent/sd21"],
        ["learn", str(Path(__file__).parent / "data" / "grace_hopper.jpg"), "--model", "not-a-hub-id"],
        ["generate", "a cat", "--model", "./missing-model"],
    ],
)
def test_a_missing_model_path_fails_before_heavy_imports(args: list[str], home: Path) -> None:
    code = (
        "import sys\n"
        "from crossinit_cli.cli import app\n"
        "try:\n    app(" + repr(args) + ")\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["exit", "1", "False", "False"], done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "no such file or folder, and not a hub id" in done.stderr


DAMAGE = {
    "bad TOML": lambda entry: (entry / "meta.toml").write_text("this is = = not toml"),
    "invalid value": lambda entry: (entry / "meta.toml").write_text('name = "qtest"\ntokens = 99\nwidth = 32\n'),
    "missing vectors": lambda entry: (entry / "vectors.safetensors").unlink(),
    "bad vectors": lambda entry: (entry / "vectors.safetensors").write_bytes(b"\x00garbage, not safetensors"),
    "half-written (no metadata)": lambda entry: (entry / "meta.toml").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_remove_deletes_a_damaged_entry_by_its_name_alone(damage: str, add_identity, cli, library: Library) -> None:
    """The remedy `list` and docs/troubleshooting.md give for a damaged entry works for every kind of damage."""
    add_identity("alice", init=True)
    add_identity("qtest", init=True)
    DAMAGE[damage](library.path_of("qtest"))
    broken = cli("show", "qtest")
    listed = {r["name"]: r for r in json.loads(cli("list", "--json").stdout)}
    if damage != "bad vectors":  # list reads metadata only; show reads the vectors too
        assert listed["qtest"]["damaged"] is True
    assert broken.exit_code == 1 and "damaged" in broken.stderr

    removed = cli("remove", "qtest", "--yes")
    assert removed.exit_code == 0, removed.stderr
    assert removed.stderr.strip() == "removed qtest"
    assert not library.path_of("qtest").exists()
    assert [r["name"] for r in json.loads(cli("list", "--json").stdout)] == ["alice"]
    assert library.vectors("alice").learned.shape == (2, 32)  # the others untouched
    assert not [p for p in library.entries.iterdir() if p.name.startswith(".removed")]


def test_remove_clears_a_damaged_or_half_started_unfinished_run(cli, home: Path, library: Library) -> None:
    from crossinit_cli import checkpoint

    runs = home / checkpoint.FOLDER
    (runs / "bob" / "crops").mkdir(parents=True)  # killed before run.json was written
    (runs / "carol").mkdir()
    (runs / "carol" / checkpoint.RUN).write_text("{ not json")
    with pytest.raises(Exception, match="damaged"):
        checkpoint.find(home, "carol")
    for name in ("bob", "carol"):
        removed = cli("remove", name, "--yes")
        assert removed.exit_code == 0, removed.stderr
        assert f"removed the unfinished run of {name} (its settings were unreadable)" in removed.stderr
        assert not (runs / name).exists()
    assert not runs.exists()
    assert cli("remove", "bob", "--yes").exit_code == 1  # nothing left by that name


def test_an_unknown_name_suggests_the_closest_stored_ones_in_every_command(add_identity, cli) -> None:
    add_identity("mix")
    add_identity("Maxine")
    for args in (
        ["show", "mixx"],
        ["edit", "mixx", "--note", "x"],
        ["export", "mixx"],
        ["remove", "mixx", "--yes"],
        ["eval", "mixx"],
        ["generate", "a photo", "--identity", "mixx", "--model", "nowhere"],
    ):
        result = cli(*args)
        assert result.exit_code == 1, args
        assert result.stderr == (
            "error: no identity named 'mixx'; did you mean 'mix'? (`crossinit list` shows them all)\n"
        ), args
    assert "did you mean 'maxine'?" in cli("show", "MAXINEE").stderr  # matched case-insensitively


def test_edit_with_an_editor_that_changes_nothing_says_only_no_changes(
    add_identity, cli, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_identity("x", init=True)
    meta = (library.path_of("x") / "meta.toml").read_bytes()
    monkeypatch.setenv("EDITOR", "true")
    result = cli("edit", "x")
    assert result.exit_code == 0 and result.stderr == "no changes\n" and result.stdout == ""
    assert (library.path_of("x") / "meta.toml").read_bytes() == meta  # not even `modified` moved


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("strength = 1.0", 'strength = "strong"', "field 'strength' must be a number, not \"strong\""),
        ("tokens = 2", "tokens = 2.5", "field 'tokens' must be a whole number, not 2.5"),
        ('source = "learn"', "source = 3", "field 'source' must be text in quotes, not 3"),
        ("tags = []", "tags = [1, 2]", "field 'tags' must be a list of texts, not [1, 2]"),
        ("strength = 1.0", "strength = 9.0", "field 'strength' must be between 0 and 4, not 9"),
        ("width = 32", "width = 99", "'width' cannot be edited"),
    ],
)
def test_an_invalid_value_edited_in_the_editor_names_its_field(
    old: str, new: str, message: str, add_identity, cli, library: Library, tmp_path: Path, monkeypatch
) -> None:
    add_identity("alice", init=True)
    meta = (library.path_of("alice") / "meta.toml").read_bytes()
    assert old.encode() in meta
    monkeypatch.setenv("EDITOR", _editor(tmp_path, f"p.write_text(p.read_text().replace({old!r}, {new!r}))"))
    result = cli("edit", "alice")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert (library.path_of("alice") / "meta.toml").read_bytes() == meta
