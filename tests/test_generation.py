"""The generation engine from Python: the command's images without files, silently, one load for many prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from crossinit_cli import generation
from crossinit_cli.config import Config, RunOptions
from crossinit_cli.generation import Choices, SamplingFlags
from crossinit_cli.store import Library


def _run(model: Path, out: Path) -> RunOptions:
    return RunOptions.merged(Config(), model=str(model), device="cpu", output_dir=out)


def test_the_engine_gives_the_commands_pngs_pixels_and_metadata_without_writing_or_printing(
    cli, library: Library, tiny_model: Path, tmp_path: Path, add_identity, capfd: pytest.CaptureFixture[str]
) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    prompt = "<alice> at the beach"
    result = cli("generate", prompt, "-n", "2", "--seed", "5", "--steps", "2", "--model", tiny_model,
                 "--out", tmp_path / "cli", "--negative", "blurry", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    written = json.loads(result.stdout)
    capfd.readouterr()

    flags = SamplingFlags(n=2, seed=5, steps=2, negative="blurry")
    images = generation.generate(library, prompt, flags, _run(tiny_model, tmp_path / "api"))

    assert capfd.readouterr() == ("", "")
    assert not (tmp_path / "api").exists()
    assert [(i.seed, i.index) for i in images] == [(5, 0), (6, 1)]
    for image, record in zip(images, written, strict=True):
        with Image.open(record["path"]) as png:
            np.testing.assert_array_equal(np.asarray(image.image), np.asarray(png.convert("RGB")))
            assert image.metadata["parameters"] == png.text["parameters"]
            assert image.metadata["crossinit"] == json.loads(png.text["crossinit"])
        assert Path(record["path"]).name == f"{image.stem}.png"


def test_one_loaded_run_samples_many_prompts_with_their_own_settings(
    library: Library, tiny_model: Path, tmp_path: Path, loads: list[Any], add_identity
) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    plan = generation.plan_run(library, "<alice>", None, SamplingFlags(seed=3, steps=2), _run(tiny_model, tmp_path))
    loaded = generation.load_plan(plan)
    first = list(loaded.images(plan.jobs[0], plan.choices))
    other = Choices(seeds=[3], steps=2, guidance=3.0, negative="", scheduler="euler", size=(64, 72), clip_skip=1)
    second = list(loaded.images(plan.jobs[0], other))
    again = list(loaded.images(plan.jobs[0], plan.choices))
    assert len(loads) == 1
    assert second[0].image.size == (64, 72) and second[0].record["sampler"] == "Euler"
    np.testing.assert_array_equal(np.asarray(first[0].image), np.asarray(again[0].image))


def test_warnings_and_hints_go_to_the_callers_hooks(
    library: Library, tiny_model: Path, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", base_model="some/other-model", clip_skip=2)
    add_identity("bob", base_model=str(tiny_model))
    heard: list[str] = []
    hooks = generation.GenerateHooks(warn=heard.append, hint=heard.append)
    plan = generation.plan_run(
        library, "<alice> with bob", None, SamplingFlags(seed=1, clip_skip=1), _run(tiny_model, tmp_path), hooks
    )
    assert plan.choices.clip_skip == 1
    assert heard == [
        "hint: 'bob' in prompt \"<alice> with bob\" is plain text; write <bob> to use the stored identity",
        "identity 'alice' was learned at clip skip 2; generating at clip skip 1",
        f"identity 'alice' was learned on some/other-model; generating with {tiny_model}",
    ]
