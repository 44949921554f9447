"""The command line's own conventions: usage mistakes exit 2 with the usage line (docs/exit-codes.md), the
global options work before and after the command name, and flags look like flags in --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossinit_cli import ui
from crossinit_cli.store import Library

PHOTO = str(Path(__file__).parent / "data" / "astronaut.png")

# Each command's missing required arguments and options that exclude each other, with what the error says.
USAGE_MISTAKES = [
    (("learn",), "give one or more photos"),
    (("learn", PHOTO, "--fast", "--full"), "--fast and --full cannot be used together"),
    (("learn", PHOTO, "--resume", "alice"), "give only the name"),
    (("learn", "--resume", "alice", "--name", "bob"), "give only the name"),
    (("learn", "--resume", "alice", "--batch", "people.csv"), "give only the name"),
    (("learn", "--resume", "alice", "--clip-skip", "2"), "--clip-skip cannot change a resumed run"),
    (("learn", PHOTO, "--batch", "people.csv"), "--batch takes its photos"),
    (("learn", "--name", "bob", "--batch", "people.csv"), "--batch takes its photos"),
    (("generate",), "no prompt given"),
    (("generate", "  "), "no prompt given"),
    (("generate", "<alice>", "--prompts", "prompts.txt"), "not both"),
    (("generate", "<alice>", "--manifest", "jobs.jsonl"), "not both"),
    (("generate", "--prompts", "prompts.txt", "--manifest", "jobs.jsonl"), "not both"),
    (("generate", "--manifest", "jobs.jsonl", "--grid"), "--grid is not available with --manifest"),
    (("eval",), "Missing argument"),
    (("eval", "alice", "--compare"), "--compare needs at least two identities"),
    (("eval", "alice", "bob", "--snapshots"), "one identity"),
    (("eval", "alice", "bob", "--pick-best"), "one identity"),
    (("eval", "alice", "bob", "--compare", "--snapshots"), "one identity"),
    (("eval", "alice", "--snapshots", "--fail-below", "0.5"), "--fail-below gates identities"),
    (("eval", "alice", "--pick-best", "--fail-below", "0.5"), "--fail-below gates identities"),
    (("export",), "one of the three"),
    (("export", "alice", "--all"), "one of the three"),
    (("export", "alice", "--tag", "family"), "one of the three"),
    (("export", "--all", "--tag", "family"), "one of the three"),
    (("export", "alice", "--to", ".", "-o", "alice.pt"), "drop -o/--format"),
    (("export", "alice", "--to", ".", "--format", "a1111"), "drop -o/--format"),
    (("show",), "Missing argument"),
    (("edit",), "Missing argument"),
    (("remove",), "Missing argument"),
    (("import",), "Missing argument"),
    (("config", "set"), "Missing argument"),
    (("config", "set", "model"), "Missing argument"),
    (("config", "unset"), "Missing argument"),
    (("list", "--sort", "size"), "--sort"),
    (("list", "--bogus"), "No such option"),
    (("list", "--limit", "x"), "--limit"),
    (("list", "--limit", "-1"), "--limit"),
    (("learn", PHOTO, "--steps", "0"), "--steps"),
    (("learn", PHOTO, "--lr", "fast"), "--lr"),
    (("generate", "<alice>", "-n", "1.5"), "-n"),
    (("generate", "<alice>", "--device", "gpu"), "--device"),
    (("export", "alice", "--format", "jpeg"), "--format"),
    (("--json", "remove", "alice"), "--json"),
    (("--quiet", "list"), "--quiet"),
    (("--json", "config", "set", "device", "cpu"), "--json"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES])
def test_usage_mistakes_exit_2_with_the_usage_line(cli, args: tuple[str, ...], message: str, home: Path) -> None:
    result = cli(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Usage: ") and message in " ".join(result.stderr.replace("│", " ").split())
    assert result.stdout == ""
    assert not (home / "identities").exists() or not list((home / "identities").iterdir())


def test_a_usage_mistake_prints_usage_on_stderr_in_a_real_process(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "crossinit_cli", "generate"],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_COLOR="1"),
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "Usage: " in done.stderr and "generate [OPTIONS]" in done.stderr and "no prompt given" in done.stderr


def test_json_and_verbose_after_the_command_mean_what_they_mean_before_it(
    add_identity, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_identity("alice")
    from crossinit_cli.commands import library

    listing = library.list_identities

    def timed_listing(*args, **kwargs):  # a phase timing, as learn and generate report under --verbose
        ui.timing("listing", 0.25)
        return listing(*args, **kwargs)

    monkeypatch.setattr(library, "list_identities", timed_listing)
    after, before = cli("list", "--json", "--verbose"), cli("--verbose", "--json", "list")
    assert after.exit_code == before.exit_code == 0, after.stderr
    assert [e["name"] for e in json.loads(after.stdout)] == [e["name"] for e in json.loads(before.stdout)] == ["alice"]
    assert after.stderr == before.stderr == "time listing: 0.25 s\n"
    assert cli("list", "-v").stderr == "time listing: 0.25 s\n"
    assert cli("list").stderr == ""  # the flag of one run does not stick to the next


def test_home_after_the_command_is_the_library_it_names(cli, tmp_path: Path, add_identity) -> None:
    add_identity("alice")  # in the default library of this test
    other = tmp_path / "elsewhere"
    Library(other)  # an empty library
    assert json.loads(cli("list", "--json", "--home", other).stdout) == []
    assert json.loads(cli("--home", other, "list", "--json").stdout) == []
    assert json.loads(cli("--home", other, "list", "--json", "--home", other.parent / "nowhere").stdout) == []
    imported = cli("import", Path(__file__).parent / "data" / "official" / "28017.bin", "--home", other)
    assert imported.exit_code == 0, imported.stderr
    assert Library(other).exists("28017")
    assert cli("show", "28017", "--home", other).exit_code == 0
    assert cli("show", "28017").exit_code == 1  # not in the default library
    learn = cli("learn", PHOTO, "--home", other, "--model", "/nonexistent/sd21")
    assert learn.exit_code == 1 and "no such file or folder" in learn.stderr  # parsed; failed on the model


def test_quiet_and_json_before_the_command_reach_it(cli, monkeypatch: pytest.MonkeyPatch, add_identity) -> None:
    from crossinit_cli.commands import generate

    seen = []
    monkeypatch.setattr(generate, "generate_images", lambda library, text, **kw: seen.append(kw["run"]) or 0)
    assert cli("--quiet", "--json", "generate", "<alice>").exit_code == 0
    assert cli("generate", "<alice>", "-q", "--json").exit_code == 0
    assert cli("generate", "<alice>").exit_code == 0
    assert [(run.quiet, run.as_json) for run in seen] == [(True, True), (True, True), (False, False)]


@pytest.mark.parametrize(
    "command", [[], ["list"], ["learn"], ["generate"], ["eval"], ["export"], ["config"], ["config", "set"]]
)
def test_help_shows_flags_as_flags_and_the_global_options(cli, command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    assert "--verbose" in result.stdout and "--home" in result.stdout


def test_option_values_reach_the_command_converted(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """typer's own conversion is bypassed for plain values (crossinit_cli.typerfix): the types still arrive."""
    from crossinit_cli.commands import generate

    seen = []
    monkeypatch.setattr(generate, "generate_images", lambda library, text, **kw: seen.append(kw) or 0)
    args = ["-n", "3", "--seed", "-7", "--guidance", "5.5", "--out", tmp_path, "--device", "cpu", "--clip-skip", "2"]
    assert cli("generate", "<alice>", "at", "sea", *args).exit_code == 0
    flags, run = seen[0]["flags"], seen[0]["run"]
    assert (flags.n, flags.seed, flags.guidance, flags.out, flags.clip_skip) == (3, -7, 5.5, tmp_path, 2)
    assert type(flags.n) is int and type(flags.guidance) is float and isinstance(flags.out, Path)
    assert run.device == "cpu" and run.output_dir == str(tmp_path) and seen[0]["prompts"] is None
