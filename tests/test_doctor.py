"""`crossinit doctor` reports what it would run with and exits 1 with advice when something is wrong."""

from __future__ import annotations

import json
from pathlib import Path


def _checks(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_healthy_setup_exits_0(cli, tiny_model: Path, home: Path) -> None:
    assert cli("config", "set", "model", str(tiny_model)).exit_code == 0
    result = cli("doctor", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["ok"] is True
    assert data["device"] == "cpu" and data["library"] == str(home)
    assert data["packages"]["torch"] and data["packages"]["diffusers"]
    assert _checks(result)["model"]["ok"] is True


def test_uncached_model_and_unwritable_library_are_reported(cli, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CROSSINIT_HOME", str(blocker / "library"))
    result = cli("doctor", "--json")
    checks = _checks(result)
    assert result.exit_code == 1
    assert checks["model"]["ok"] is False and "hf download" in checks["model"]["advice"]
    assert checks["library"]["ok"] is False and "--home" in checks["library"]["advice"]
    human = cli("doctor")
    assert human.exit_code == 1 and "fix:" in human.stdout and human.stderr.startswith("error:")
