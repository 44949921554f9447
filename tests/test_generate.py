"""`crossinit generate` through the CLI on the tiny model: files, metadata, JSON, scripts, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from crossinit_cli import sample
from crossinit_cli.store import Library

STEPS = ("--steps", "2")


@pytest.fixture(params=["sd2", "sd1"])
def tiny_model(request: pytest.FixtureRequest, tiny_model: Path, tiny_sd1: Path) -> Path:
    """Every test here runs on the tiny SD 2.x model and on the tiny SD 1.x one (SD 1.x is first-class)."""
    return tiny_model if request.param == "sd2" else tiny_sd1


@pytest.fixture()
def gen(cli, tiny_model: Path, tmp_path: Path):
    """Run `generate` on the tiny model into tmp/out with 2 steps; extra args are appended."""
    out = tmp_path / "out"

    def run(*args: str, input: str | None = None):
        return cli("generate", *args, "--model", str(tiny_model), "--out", str(out), *STEPS, input=input)

    run.out = out  # type: ignore[attr-defined]
    return run


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_prompts_from_stdin_load_the_pipeline_once_and_json_matches_disk(
    gen, tiny_model: Path, loads: list[Any], add_identity
) -> None:
    add_identity("Alice", seed=1, scale=5, base_model=str(tiny_model))
    add_identity("bob", seed=2, scale=5, base_model=str(tiny_model))
    lines = "a red car, at night\n\n# a comment\n<alice> smiling\n   \n<ALICE> and <bob> at the beach\n"
    result = gen("--prompts", "-", "--seed", "3", "--json", input=lines)
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1
    records = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert [r["prompt"] for r in records] == [
        "a red car, at night",
        "<alice> smiling",
        "<ALICE> and <bob> at the beach",
    ]
    assert [r["identities"] for r in records] == [[], ["Alice"], ["Alice", "bob"]]
    assert [r["seed"] for r in records] == [3, 3, 3]
    assert {r["kind"] for r in records} == {"image"}
    assert [Path(r["path"]).name for r in records] == [
        "a-red-car-at-night-3-0.png",
        "Alice-smiling-3-0.png",
        "Alice+bob-and-at-the-beach-3-0.png",
    ]
    assert sorted(Path(r["path"]).name for r in records) == _files(gen.out)  # nothing else, no temp files
    for record in records:
        assert Image.open(record["path"]).size == (64, 64)


def test_png_metadata_is_a1111_parameters_plus_crossinit_keys(
    gen, library: Library, tiny_model: Path, add_identity
) -> None:
    add_identity("alice", seed=1, init=True, scale=5, base_model=str(tiny_model))
    assert library.modify("alice", lambda ident: setattr(ident, "strength", 0.75))
    result = gen("<alice> as an astronaut, oil painting", "--seed", "123", "--negative", "blurry", "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    image = Image.open(record["path"])
    lines = image.text["parameters"].splitlines()
    assert lines[0] == "<alice> as an astronaut, oil painting"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        f"Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 123, Size: 64x64, Model: {tiny_model}, Identities: alice"
    )
    own = json.loads(image.text["crossinit"])
    assert own["seed"] == 123 and own["steps"] == 2 and own["guidance"] == 7.5 and own["scheduler"] == "dpm++"
    assert own["expanded_prompt"] == "<crossinit:alice:0> <crossinit:alice:1> as an astronaut, oil painting"
    assert own["identities"][0]["name"] == "alice" and own["identities"][0]["strength"] == 0.75
    assert own["model"] == str(tiny_model) and own["device"] == "cpu"


def test_same_seed_same_pixels_different_seed_different(gen, tiny_model: Path, add_identity) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    arrays = []
    for seed in ("11", "11", "12"):
        result = gen("<alice> smiling", "--seed", seed, "--json")
        assert result.exit_code == 0, result.stderr
        arrays.append(np.asarray(Image.open(json.loads(result.stdout)[0]["path"])))
    np.testing.assert_array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], arrays[2])
    assert _files(gen.out) == ["alice-smiling-11-0-1.png", "alice-smiling-11-0.png", "alice-smiling-12-0.png"]


def test_n_images_are_one_batched_call(
    gen, tiny_model: Path, loads: list[Any], monkeypatch: pytest.MonkeyPatch, add_identity
) -> None:
    from diffusers import StableDiffusionPipeline

    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    calls: list[dict[str, Any]] = []
    real_call = StableDiffusionPipeline.__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    result = gen("<alice>", "-n", "3", "--seed", "7", "--grid", "--scheduler", "euler-a", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 1 and calls[0]["num_images_per_prompt"] == 3 and len(calls[0]["generator"]) == 3
    assert type(loads[0].scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    records = json.loads(result.stdout)
    images = [r for r in records if r["kind"] == "image"]
    assert [(r["seed"], r["index"]) for r in images] == [(7, 0), (8, 1), (9, 2)]
    (grid,) = [r for r in records if r["kind"] == "grid"]
    assert grid["images"] == [r["path"] for r in images]
    assert Image.open(grid["path"]).size == (128, 128)
    assert _files(gen.out) == ["alice-7-0.png", "alice-7-1.png", "alice-7-2.png", "alice-7-grid.png"]
    parameters = [Image.open(r["path"]).text["parameters"] for r in images]
    assert "Seed: 7," in parameters[0] and "Seed: 8," in parameters[1]
    assert "Sampler: Euler a," in parameters[2]


def test_the_pipeline_sees_the_vectors_at_the_stored_strength(
    cli, gen, library: Library, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, add_identity
) -> None:
    add_identity("alice", seed=1, init=True, scale=5, base_model=str(tiny_model))
    assert cli("edit", "alice", "--strength", "0.5").exit_code == 0
    vectors = library.vectors("alice")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    mappings: list[dict[str, sample.IdentityTokens]] = []
    real_add = sample.add_identities

    def spying(pipe: Any, identities: Any, **kwargs: Any) -> Any:
        mappings.append(real_add(pipe, identities, **kwargs))
        table = pipe.text_encoder.get_input_embeddings()  # after the resize: the table prompts use
        table.register_forward_hook(lambda mod, args, out: seen.append((args[0], out.detach())))
        return mappings[-1]

    monkeypatch.setattr(sample, "add_identities", spying)
    result = gen("<alice> smiling", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    ids = list(mappings[0]["alice"].ids)
    rows = [out[0, pos] for input_ids, out in seen for pos, i in enumerate(input_ids[0].tolist()) if i in ids]
    assert len(rows) == 2
    expected = vectors.init + 0.5 * (vectors.learned - vectors.init)
    np.testing.assert_allclose(torch.stack(rows).numpy(), expected, rtol=0, atol=1e-6)


def test_file_names_tell_prompts_of_one_seed_apart_and_json_keeps_prompt_and_seed(
    gen, tiny_model: Path, add_identity
) -> None:
    """A shell loop of prompts with one --seed: each name carries the prompt's words (A1111's default pattern)."""
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    prompts = ["<alice> on the beach", "<alice> in Paris, oil painting", "a portrait of <alice> smiling"]
    records = []
    for prompt in prompts:
        result = gen(prompt, "--seed", "11", "--json")
        assert result.exit_code == 0, result.stderr
        records += json.loads(result.stdout)
    names = [
        "alice-on-the-beach-11-0.png",
        "alice-in-paris-oil-painting-11-0.png",
        "alice-a-portrait-of-smiling-11-0.png",
    ]
    assert [Path(r["path"]).name for r in records] == names and _files(gen.out) == sorted(names)
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, 11) for p in prompts]
    result = gen("-i", "alice", "at night", "--seed", "11", "--json")  # --identity: named by the user's own words
    assert Path(json.loads(result.stdout)[0]["path"]).name == "alice-at-night-11-0.png"


def test_identity_option_templates_plain_prompts(gen, tiny_model: Path, add_identity) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    add_identity("bob", seed=2, scale=5, base_model=str(tiny_model))
    result = gen("-i", "alice", "--prompts", "-", "--seed", "0", "--json", input="smiling\n<bob> waving\n")
    assert result.exit_code == 0, result.stderr
    assert [r["prompt"] for r in json.loads(result.stdout)] == ["a photo of a <alice> person, smiling", "<bob> waving"]
    result = gen("--identity", "ALICE", "--seed", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["prompt"] == "a photo of a <alice> person"


def test_existing_files_are_never_overwritten_and_paths_go_to_stderr(gen, tiny_model: Path, add_identity) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    gen.out.mkdir()
    (gen.out / "alice-5-0.png").write_bytes(b"someone else's file")
    result = gen("<alice>", "--seed", "5", "-n", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # without --json, stdout stays clean for scripts
    assert str(gen.out / "alice-5-0-1.png") in result.stderr and str(gen.out / "alice-5-1.png") in result.stderr
    assert (gen.out / "alice-5-0.png").read_bytes() == b"someone else's file"
    assert _files(gen.out) == ["alice-5-0-1.png", "alice-5-0.png", "alice-5-1.png"]


def test_ctrl_c_keeps_finished_files_and_leaves_no_partial_one(
    gen, library: Library, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sample.sample
    calls: list[int] = []

    def interrupted_second_time(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sample", interrupted_second_time)
    result = gen("--prompts", "-", "--seed", "1", "--json", input="first\nsecond\n")
    assert result.exit_code == 130
    assert result.stdout == ""
    assert "1 file(s) already written" in result.stderr
    assert _files(gen.out) == ["first-1-0.png"]
    Image.open(gen.out / "first-1-0.png").load()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown", "no identity named <carol>"),
        ("width", "'wide' has 48-wide vectors but model"),
        ("width-after-load", "'wide' has 48-wide vectors but model"),
        ("size", "--size '100x7'"),
        ("size-abc", "--size 'abc' is not WIDTHxHEIGHT"),
        ("out-under-file", "cannot write images to"),
        ("empty-prompts", "no prompts in stdin"),
        ("scheduler", "unknown scheduler 'lms'"),
        ("guidance-nan", "--guidance must be a finite number, not nan"),
        ("guidance-inf", "--guidance must be a finite number, not -inf"),
    ],
)
def test_user_errors_exit_1_with_one_line_and_no_file(
    case: str,
    message: str,
    cli,
    tiny_model: Path,
    tmp_path: Path,
    loads: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    add_identity,
) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    add_identity("wide", seed=2, width=48, scale=5, base_model=str(tiny_model))
    out = tmp_path / "out"
    args = ["<alice> smiling"]
    stdin = None
    if case == "unknown":
        args = ["<alice> and <carol>"]
    elif case.startswith("width"):
        args = ["<wide>"]
        if case == "width-after-load":  # a model whose config cannot be peeked at: caught after loading
            monkeypatch.setattr(sample, "peek_model", lambda model: None)
    elif case == "size":
        args += ["--size", "100x7"]
    elif case == "size-abc":
        args += ["--size", "abc"]
    elif case == "out-under-file":
        (tmp_path / "regular").write_text("x")
        out = tmp_path / "regular" / "out"
    elif case == "empty-prompts":
        args, stdin = ["--prompts", "-"], "\n# only a comment\n"
    elif case == "scheduler":
        args += ["--scheduler", "lms"]
    elif case.startswith("guidance"):  # a NaN or infinite scale makes NaN latents: black images, no error
        args += ["--guidance", "nan" if case == "guidance-nan" else "-inf"]
    result = cli("generate", *args, "--model", str(tiny_model), "--out", str(out), *STEPS, input=stdin)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not list(tmp_path.rglob("*.png"))
    if case != "width-after-load":
        assert not out.exists()  # the output folder is created only once everything else checked out
    assert len(loads) == (1 if case == "width-after-load" else 0)  # cheap checks come before the model


def test_prompt_and_prompts_file_together_is_an_error(gen, tmp_path: Path) -> None:
    listing = tmp_path / "prompts.txt"
    listing.write_text("a\n")
    result = gen("a prompt", "--prompts", str(listing))
    assert result.exit_code == 2 and "not both" in result.stderr  # a usage mistake


def test_file_slug() -> None:
    from crossinit_cli.pngfiles import file_slug

    assert file_slug("A Red Car, at Night!", []) == "a-red-car-at-night"
    assert file_slug("Zoë's café", []) == "zoe-s-cafe"
    assert file_slug("!!!", []) == "image"
    assert len(file_slug("word " * 40, [])) <= 48


def test_images_get_the_umasks_mode(gen, umask, tiny_model: Path, add_identity) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    umask(0o027)
    result = gen("<alice>", "--seed", "5", "-n", "2", "--grid")
    assert result.exit_code == 0, result.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in gen.out.iterdir()}
    assert len(modes) == 3 and set(modes.values()) == {oct(0o640)}, modes  # mkstemp alone would give 0600


def test_an_identity_name_without_brackets_gets_a_hint_on_stderr_only(gen, add_identity, tiny_model: Path) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model))
    result = gen("alice on a beach", "--seed", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert [r["identities"] for r in json.loads(result.stdout)] == [[]]  # stdout: the JSON document only
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint:")]
    assert hints == [
        "hint: 'alice' in prompt \"alice on a beach\" is plain text; write <alice> to use the stored identity"
    ]
    named = gen("<alice> and alice on a beach", "--seed", "1")
    assert named.exit_code == 0 and "hint:" not in named.stderr  # written once with <>: meant as the person


def test_an_unknown_name_in_brackets_suggests_the_closest_stored_ones(cli, add_identity, loads: list[Any]) -> None:
    add_identity("alice")
    add_identity("alicia")
    add_identity("bob")
    result = cli("generate", "<alic> on a beach", "--model", "nowhere")
    assert result.exit_code == 1 and not loads
    assert result.stderr == (
        "error: no identity named <alic> (in prompt \"<alic> on a beach\"); did you mean 'alice' or 'alicia'? "
        "(`crossinit list` shows them all)\n"
    )
    far = cli("generate", "<2801> on a beach", "--model", "nowhere")
    assert far.stderr == 'error: no identity named <2801> (in prompt "<2801> on a beach"); see `crossinit list`\n'


def test_model_errors_name_where_the_model_came_from_and_families_do_not_mix(
    cli, library: Library, tiny_model: Path, tiny_sdxl: Path, tmp_path: Path, loads: list[Any]
) -> None:
    from crossinit_cli import families
    from crossinit_cli.store import Identity

    rng = np.random.default_rng(0)
    parts = {"clip_l": rng.standard_normal((2, 32)), "clip_g": rng.standard_normal((2, 64))}
    library.add(Identity(name="xl", tokens=2, width=32, family="sdxl", base_model=str(tiny_sdxl)), parts)
    family = families.peek(str(tiny_model)).family.name
    library.add(Identity(name="ann", tokens=2, width=32, family=family, base_model=str(tiny_model)), parts["clip_l"])
    out = ("--out", tmp_path / "out")

    assert cli("config", "set", "model", tiny_model).exit_code == 0
    configured = cli("generate", "<xl>", *out)
    assert configured.exit_code == 1 and len(configured.stderr.strip().splitlines()) == 1, configured.stderr
    assert "the model comes from your config (`crossinit config set model ...`" in configured.stderr
    assert "pass --model to override" in configured.stderr
    flag = cli("generate", "<xl>", "--model", tiny_model, *out)
    assert flag.exit_code == 1 and "the model comes from --model" in flag.stderr

    assert cli("config", "unset", "model").exit_code == 0
    mixed = cli("generate", "<xl> and <ann>", *out)
    assert mixed.exit_code == 1 and len(mixed.stderr.strip().splitlines()) == 1, mixed.stderr
    assert "cannot be combined" in mixed.stderr and "pass --model" not in mixed.stderr
    assert f"SDXL: xl; {families.get(family).title}: ann" in mixed.stderr
    manifest = tmp_path / "prompts.jsonl"  # --manifest: a line that mixes is a bad line; lines that mix, a bad run
    manifest.write_text('{"prompt": "<xl> and <ann>"}\n')
    line = cli("generate", "--manifest", manifest, "--model", tiny_model, *out)
    assert line.exit_code == 1 and "line 1: identities of different model families cannot be combined" in line.stderr
    manifest.write_text('{"prompt": "<xl> on a beach"}\n{"prompt": "<ann> on a beach"}\n')
    lines = cli("generate", "--manifest", manifest, "--model", tiny_model, *out)
    assert lines.exit_code == 1 and len(lines.stderr.strip().splitlines()) == 1, lines.stderr
    assert f"cannot be combined in one prompt or run (SDXL: xl; {families.get(family).title}: ann)" in lines.stderr
    assert loads == []
