"""`crossinit doctor --self-test`: the whole way of a photo through crossinit on a tiny model, offline,
in a throw-away library, through the CLI."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

STEPS = ["model", "detect", "learn", "generate", "export", "import", "remove"]


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder the self-test gets, to see that it leaves nothing behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _left(scratch: Path) -> list[str]:
    """What the self-test left in the temporary folder (torch keeps a cache of its own there)."""
    return [p.name for p in scratch.iterdir() if p.name.startswith("crossinit")]


def test_every_step_runs_offline_and_leaves_the_users_library_and_config_alone(
    cli, home: Path, tmp_path: Path, add_identity, library, network: list[Any], scratch: Path
) -> None:
    add_identity("alice")
    assert cli("config", "set", "output_dir", str(tmp_path / "my-images")).exit_code == 0
    config_before = (tmp_path / "config.toml").read_bytes()
    library_before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))

    result = cli("doctor", "--self-test")

    assert result.exit_code == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert "grace_hopper.jpg" in lines[0]
    assert [line.split()[1] for line in lines[1:-1]] == STEPS
    assert all(line.split()[0] == "ok" for line in lines[1:-1])
    assert "<self-test> learned in 4 steps on cpu (fp32)" in result.stdout
    assert lines[-1].startswith("the install works: 7 steps passed in ")
    assert result.stderr == ""
    assert network == []  # not one connection attempt
    assert (tmp_path / "config.toml").read_bytes() == config_before
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == library_before
    assert [i.name for i in library.list()] == ["alice"]
    assert not (tmp_path / "my-images").exists()
    assert _left(scratch) == []


def test_json_gives_the_steps_with_their_times(cli, home: Path, network: list[Any], scratch: Path) -> None:
    result = cli("doctor", "--self-test", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and [s["name"] for s in data["steps"]] == STEPS
    assert all(s["ok"] and s["seconds"] >= 0 and s["detail"] for s in data["steps"])
    # each figure is rounded to 0.01 s, so the steps' sum may pass the rounded total by half a unit each
    assert sum(s["seconds"] for s in data["steps"]) <= data["seconds"] + 0.005 * (len(STEPS) + 1)
    shipped = Path(data["photo"])
    assert shipped.name == "grace_hopper.jpg" and shipped.parent.name == "data"
    assert shipped.parent.parent.name == "crossinit_cli"
    assert shipped.read_bytes() == (Path(__file__).parent / "data" / "grace_hopper.jpg").read_bytes()
    assert network == [] and _left(scratch) == []


def test_a_failing_step_is_named_and_exits_1(
    cli, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> None:
    """A photo without a face: `detect` fails with the real detector's message; nothing after it runs."""
    from crossinit_cli import resources

    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (256, 256), "grey").save(blank)

    @contextmanager
    def no_face() -> Iterator[Path]:
        yield blank

    monkeypatch.setattr(resources, "sample_photo", no_face)
    result = cli("doctor", "--self-test")
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["ok", "model"], ["FAILED", "detect"]]
    assert "no face" in lines[-1]
    assert "the install works" not in result.stdout
    assert result.stderr.startswith("error: self-test failed at step 'detect': ") and "no face" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    data = json.loads(cli("doctor", "--self-test", "--json").stdout)
    assert data["ok"] is False and [(s["name"], s["ok"]) for s in data["steps"]] == [("model", True), ("detect", False)]
    assert _left(scratch) == []


def test_an_unexpected_exception_fails_its_step_with_its_type(
    cli, home: Path, monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> None:
    """Breakage in the install itself (not a user mistake) is reported as a failed step, not a traceback."""
    from crossinit_cli import synthetic

    def broken(folder: Path, **kwargs: Any) -> Path:
        raise ImportError("cannot import name 'UNet2DConditionModel'")

    monkeypatch.setattr(synthetic, "build_tiny_sd", broken)
    result = cli("doctor", "--self-test")
    assert result.exit_code == 1 and "Traceback" not in result.stdout + result.stderr
    assert "FAILED model" in " ".join(result.stdout.split())
    assert result.stderr.strip() == (
        "error: self-test failed at step 'model': ImportError: cannot import name 'UNet2DConditionModel'"
    )
