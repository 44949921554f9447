"""config.py: the one default-model rule of every command that uses identities, and model paths stored
absolute (`config set model`, `--model`, `import --model`, learn's base model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from crossinit_cli import config
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library

PHOTO = Path(__file__).parent / "data" / "grace_hopper.jpg"
QUICK = ("-n", "1", "--steps", "2", "--seed", "1")


def _ident(name: str, base_model: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, base_model=base_model)


def test_the_rule_flag_or_config_then_the_identities_then_the_default() -> None:
    a, b, bare = _ident("a", "/models/x"), _ident("b", "/models/y"), _ident("c", "")
    assert config.identities_model("/chosen", [a, b]) == "/chosen"  # --model or the configured one wins
    assert config.identities_model(None, [a, bare, a]) == "/models/x"  # theirs; one that records none has no say
    assert config.identities_model(None, [bare]) == config.DEFAULT_MODEL
    assert config.identities_model(None, []) == config.DEFAULT_MODEL
    with pytest.raises(CrossinitError) as caught:
        config.identities_model(None, [a, b])
    assert str(caught.value) == (
        "these identities were learned on different base models (a on /models/x; b on /models/y); pass --model"
    )


def test_only_a_configured_model_other_than_the_default_counts_as_chosen() -> None:
    plain = config.RunOptions.merged(config.Config())
    assert plain.model == config.DEFAULT_MODEL and plain.chosen_model is None
    saved = config.RunOptions.merged(config.Config(model="/models/mine"))
    assert saved.chosen_model == "/models/mine" and saved.model == "/models/mine"
    flag = config.RunOptions.merged(config.Config(model="/models/mine"), model="/models/flag")
    assert flag.chosen_model == "/models/flag" and flag.configured_model == "/models/mine"


def test_relative_paths_are_made_absolute_and_hub_ids_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd").mkdir(parents=True)
    assert config.model_reference("./tiny-sd2") == str(tmp_path / "tiny-sd2")  # a path, even before it exists
    assert config.model_reference("models/sd") == str(tmp_path / "models" / "sd")  # on disk: a path
    assert config.model_reference("stabilityai/stable-diffusion-2-1-base") == "stabilityai/stable-diffusion-2-1-base"
    assert config.RunOptions.merged(config.Config(), model="../x").explicit_model == str(tmp_path.parent / "x")


def test_generate_uses_the_model_the_identity_was_learned_on_from_any_folder(
    cli, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: Library
) -> None:
    """The issue's first hour: `learn --model ./tiny-sd2`, then `generate "<alice> ..."` with no --model."""
    shutil.copytree(tiny_model, tmp_path / "tiny-sd2")
    shutil.copy(PHOTO, tmp_path / "alice.jpg")
    monkeypatch.chdir(tmp_path)
    learned = cli("learn", "alice.jpg", "--fast", "--steps", "2", "--model", "./tiny-sd2")
    assert learned.exit_code == 0, learned.stderr
    assert library.get("alice").base_model == str(tmp_path / "tiny-sd2")
    assert "--model" not in learned.stderr  # the next: hint needs none
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("generate", "<alice> as an astronaut", *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    (image,) = json.loads(result.stdout)
    assert image["model"] == str(tmp_path / "tiny-sd2") and Path(image["path"]).is_file()
    assert "warning" not in result.stderr


def test_identities_on_different_models_are_one_line_naming_them(
    cli, tiny_model: Path, tmp_path: Path, add_identity, loads: list
) -> None:
    other = tmp_path / "other"
    other.symlink_to(tiny_model, target_is_directory=True)
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    add_identity("bob", seed=2, scale=5, base_model=str(other))
    result = cli("generate", "<alice> and <bob>", *QUICK, "-o", tmp_path / "out")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"alice on {tiny_model}" in result.stderr and f"bob on {other}" in result.stderr
    assert "pass --model" in result.stderr and loads == []
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"prompt": "<alice>"}\n{"prompt": "<bob>"}\n', encoding="utf-8")
    lines = cli("generate", "--manifest", manifest, "-o", tmp_path / "out", "--quiet")
    assert lines.exit_code == 1 and "learned on different base models" in lines.stderr and loads == []
    chosen = cli("generate", "<alice> and <bob>", *QUICK, "-o", tmp_path / "out", "--model", other, "--json")
    assert chosen.exit_code == 0, chosen.stderr
    assert json.loads(chosen.stdout)[0]["model"] == str(other)
    assert f"identity 'alice' was learned on {tiny_model}; generating with {other}" in chosen.stderr


def test_manifest_and_eval_default_to_the_identities_model_and_a_configured_one_wins(
    cli, tiny_model: Path, tiny_clip: Path, tmp_path: Path, add_identity, library: Library, loads: list
) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"prompt": "<alice>", "steps": 2, "seed": 1}\n', encoding="utf-8")
    result = cli("generate", "--manifest", manifest, "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["model"] == str(tiny_model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}\n", encoding="utf-8")
    clip = ("--clip-model", tiny_clip)  # something measured (alice has no crops): eval exits 0
    evaluated = cli("eval", "alice", "--prompts", prompts, "--steps", "2", "-n", "1", "--quiet", "--json", *clip)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)[0]["settings"]["model"] == str(tiny_model)

    configured = tmp_path / "configured"
    configured.symlink_to(tiny_model, target_is_directory=True)
    assert cli("config", "set", "model", configured).exit_code == 0
    again = cli("eval", "alice", "--prompts", prompts, "--steps", "2", "-n", "1", "--quiet", "--json", *clip)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)[0]["settings"]["model"] == str(configured)
    image = cli("generate", "<alice>", *QUICK, "-o", tmp_path / "out", "--json")
    assert json.loads(image.stdout)[0]["model"] == str(configured)
    assert len(loads) == 4  # manifest, eval, eval, generate: each one load


def test_config_set_model_stores_a_relative_path_absolute_and_doctor_finds_it_elsewhere(
    cli, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_model, tmp_path / "tiny-sd2")
    monkeypatch.chdir(tmp_path)
    set_result = cli("config", "set", "model", "./tiny-sd2")
    assert set_result.exit_code == 0 and str(tmp_path / "tiny-sd2") in set_result.stderr
    assert f'model = "{tmp_path / "tiny-sd2"}"' in (tmp_path / "config.toml").read_text()
    monkeypatch.chdir(tmp_path.parent)
    doctor = json.loads(cli("doctor", "--json").stdout)
    model = next(c for c in doctor["checks"] if c["name"] == "model")
    assert model["ok"] is True and "diffusers folder" in model["detail"]


def test_doctor_does_not_suggest_hf_download_for_a_missing_path(cli, tmp_path: Path) -> None:
    assert cli("config", "set", "model", str(tmp_path / "gone")).exit_code == 0
    result = cli("doctor", "--json")
    model = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "model")
    assert result.exit_code == 1 and model["ok"] is False
    assert "no such file or folder" in model["detail"]
    assert "hf download" not in model["advice"] and "config set model" in model["advice"]


def test_import_records_a_relative_model_path_absolute(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: Library
) -> None:
    official = Path(__file__).parent / "data" / "official" / "28017.bin"
    monkeypatch.chdir(tmp_path)
    result = cli("import", official, "--name", "celeb", "--model", "./sd21")
    assert result.exit_code == 0, result.stderr
    assert library.get("celeb").base_model == os.path.join(tmp_path, "sd21")
