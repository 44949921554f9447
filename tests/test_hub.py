"""Models from the Hugging Face cache (hf.py): a cached model loads with no network call at all; without
network, an uncached one costs one attempt and one line, never huggingface_hub's minute of retries.

The cache is a folder of the hub's own layout (`models--owner--name/snapshots/<commit>/`, `refs/main`)
holding the tiny models, HF_HUB_OFFLINE is off, and the network is gone (`network` fixture): every
lookup and connection fails at once and is counted, so a retry would show as a second attempt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from crossinit_cli import hf
from crossinit_cli.store import Library

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAST = ("--steps", "2", "-n", "1", "--quiet")


def cache_model(cache: Path, repo_id: str, folder: Path) -> None:
    """Put a model folder into a hub cache as `hf download repo_id` would leave it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tiny_clip: Path) -> Path:
    """A hub cache holding tiny-org/tiny-sd and tiny-org/tiny-clip, with offline mode off."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache_model(cache, "tiny-org/tiny-sd", tiny_model)
    cache_model(cache, "tiny-org/tiny-clip", tiny_clip)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # unroutable, should anything get past `network`
    # huggingface_hub reads these once, at import (conftest turned offline mode on for every other test).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return cache


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of {}\n", encoding="utf-8")
    return path


def test_a_cached_model_and_clip_load_with_no_network_call(
    cli, hub_cache: Path, network: list[Any], prompts: Path, add_identity
) -> None:
    add_identity("alice", seed=1, scale=5, base_model="tiny-org/tiny-sd")
    result = cli("eval", "alice", "--prompts", prompts, "--clip-model", "tiny-org/tiny-clip", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["settings"]["model"] == "tiny-org/tiny-sd"  # the identity's own model, from the cache
    assert record["fidelity"]["available"] is True and record["fidelity"]["clip_score"] is not None
    assert network == []
    assert "Retrying" not in result.stderr


def test_without_network_an_uncached_clip_model_costs_one_attempt_and_one_line(
    cli, hub_cache: Path, network: list[Any], prompts: Path, add_identity, library: Library
) -> None:
    from crossinit_cli import faces

    face = faces.align_face(Path(__file__).parent / "data" / "astronaut.png", 256).image  # likeness is measured
    add_identity("alice", seed=1, scale=5, base_model="tiny-org/tiny-sd", crops=[face])
    result = cli("eval", "alice", "--prompts", prompts, "--clip-model", "nobody/not-cached-clip", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert len(network) == 1  # one request to the Hub, no retry (before: five a file, ~45 s of "Retrying in 8s")
    assert "Retrying" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "not-cached-clip" in line]
    assert len(lines) == 1 and "not in the local Hugging Face cache and the Hub cannot be reached" in lines[0]
    assert "prompt fidelity is left out" in lines[0]
    (record,) = json.loads(result.stdout)
    assert record["fidelity"]["available"] is False
    assert library.get("alice").evaluation["settings"]["model"] == "tiny-org/tiny-sd"  # eval went on


def test_without_network_an_uncached_base_model_fails_at_once_in_one_line(
    cli, hub_cache: Path, network: list[Any], add_identity, tmp_path: Path
) -> None:
    add_identity("alice", seed=1, scale=5, base_model="nobody/not-cached-sd")
    result = cli("generate", "<alice>", "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "error: model 'nobody/not-cached-sd' is not in the local Hugging Face cache and the Hub cannot be reached"
    )
    assert "hf download nobody/not-cached-sd" in result.stderr
    assert "or pass --model with a local folder" in result.stderr  # names the flag that takes one
    assert len(result.stderr.strip().splitlines()) == 1 and len(network) == 1
    assert not list((tmp_path / "out").glob("*.png"))


def test_offline_mode_or_a_cached_model_makes_no_request(
    hub_cache: Path, network: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = hub_cache / "models--tiny-org--tiny-sd" / "snapshots" / COMMIT
    assert hf.hub_source("tiny-org/tiny-sd", "model_index.json") == str(snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hf.hub_source("nobody/not-cached", "config.json") == "nobody/not-cached"  # the loader says: not cached
    assert network == []
    assert hf.is_hub_id("tiny-org/tiny-sd") and not hf.is_hub_id("./tiny-org/tiny-sd")
    assert not hf.is_hub_id(str(hub_cache))


def test_an_incomplete_cached_model_is_fetched_and_without_network_fails_in_one_line(
    cli, hub_cache: Path, network: list[Any], add_identity, tmp_path: Path, tiny_model: Path
) -> None:
    """A download cut off leaves a snapshot without some weights: it is then fetched as usual, which needs
    the Hub; without network that is one attempt and one line, as for a model not cached at all."""
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    for weights in (partial / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    cache_model(hub_cache, "tiny-org/partial", partial)
    add_identity("alice", seed=1, scale=5, base_model="tiny-org/partial")
    result = cli("generate", "<alice>", "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "'tiny-org/partial' is not in the local Hugging Face cache and the Hub cannot be reached" in result.stderr
    assert len(network) == 1
