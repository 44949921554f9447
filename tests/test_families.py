"""Model families through the CLI: SDXL and SD 1.x learned, generated, exported, imported; other models refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from crossinit_cli import crossinit, families, sample
from crossinit_cli.devices import load_pipeline
from crossinit_cli.store import Identity, Library
from tests.test_crossinit import _reference_init

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
GRACE = DATA / "grace_hopper.jpg"
CHEAP = ("--steps", "2", "--batch-size", "1", "--quiet")
NO_CLIP = "crossinit-tests/clip-that-is-not-cached"  # HF_HUB_OFFLINE is on: prompt fidelity is left out


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture()
def xl_alice(cli, library: Library, tiny_sdxl: Path) -> Path:
    result = cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_sdxl, *CHEAP)
    assert result.exit_code == 0, result.stderr
    return tiny_sdxl


# ---- detection and refusals ---------------------------------------------------------------------


def test_each_family_is_detected_from_its_configs(tiny_model: Path, tiny_sd1: Path, tiny_sdxl: Path) -> None:
    found = {
        name: families.peek(str(path)) for name, path in (("sd2", tiny_model), ("sd1", tiny_sd1), ("sdxl", tiny_sdxl))
    }
    assert {name: (p.family.name, p.widths) for name, p in found.items()} == {
        "sd2": ("sd2", (32,)),
        "sd1": ("sd1", (32,)),
        "sdxl": ("sdxl", (32, 64)),
    }
    pipe = load_pipeline(str(tiny_sdxl))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and families.of_pipeline(pipe).name == "sdxl"
    assert [s.spec.key for s in families.slots(pipe)] == ["clip_l", "clip_g"] and families.widths(pipe) == (32, 64)


def _folder(tmp_path: Path, name: str, index: dict[str, Any]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    ("index", "named"),
    [
        (
            {
                "_class_name": "StableDiffusion3Pipeline",
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            },
            "StableDiffusion3Pipeline",
        ),
        ({"_class_name": "FluxPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}, "FluxPipeline"),
        (
            {
                "_class_name": "StableDiffusionXLImg2ImgPipeline",
                "text_encoder": [None, None],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            },
            "without a text encoder",
        ),
    ],
)
def test_other_models_are_refused_in_one_line_naming_what_was_found(
    cli, home: Path, tmp_path: Path, index: dict[str, Any], named: str
) -> None:
    model = _folder(tmp_path, "model", index)
    for args in (
        ("learn", ASTRONAUT, "--model", model),
        ("generate", "a cat", "--model", model, "--out", tmp_path / "o"),
    ):
        assert named in _one_line_error(cli(*args))
    assert not (home / "identities").exists() or not list((home / "identities").iterdir())


def test_single_file_checkpoints_are_told_apart_by_their_tensors(cli, home: Path, tmp_path: Path) -> None:
    flux = tmp_path / "flux.safetensors"
    save_numpy({"double_blocks.0.img_attn.qkv.weight": np.zeros((2, 2), np.float32)}, str(flux))
    assert "a Flux checkpoint" in _one_line_error(cli("learn", ASTRONAUT, "--model", flux))
    xl = tmp_path / "xl.safetensors"
    save_numpy(
        {
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": np.zeros(
                (4, 768), np.float32
            ),
            "conditioner.embedders.1.model.token_embedding.weight": np.zeros((4, 1280), np.float32),
        },
        str(xl),
    )
    peeked = families.peek(str(xl))
    assert peeked is not None and (peeked.family.name, peeked.widths) == ("sdxl", (768, 1280))


def test_a_hub_id_in_the_cache_is_told_apart_before_loading(
    cli, library: Library, tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-xl"
    shutil.copytree(tiny_sdxl, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    sd3 = cache / "models--someone--sd3" / "snapshots" / "def456"
    sd3.mkdir(parents=True)
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (sd3.parent.parent / "refs").mkdir()
    (sd3.parent.parent / "refs" / "main").write_text("def456")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    peeked = families.peek("someone/tiny-xl")
    assert peeked is not None and (peeked.family.name, peeked.widths) == ("sdxl", (32, 64))
    assert families.peek("someone/not-cached") is None
    assert "is a StableDiffusion3Pipeline" in _one_line_error(cli("learn", ASTRONAUT, "--model", "someone/sd3"))
    library.add(Identity(name="carol", tokens=2, width=1024, family="sd2"), np.ones((2, 1024), np.float32))
    message = _one_line_error(cli("generate", "<carol>", "--model", "someone/tiny-xl", "--out", tmp_path / "o"))
    assert "'carol' was learned on an SD 2.x model, but 'someone/tiny-xl' is SDXL" in message


# ---- SDXL: learn, init, generate ----------------------------------------------------------------


@torch.no_grad()
def test_sdxl_init_per_encoder_equals_an_independent_computation(tiny_sdxl: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_sdxl))
    got = crossinit.cross_init_slots(families.slots(pipe), tmp_path / "cache")
    expected = [
        _reference_init(pipe.tokenizer, pipe.text_encoder, penultimate=True),
        _reference_init(pipe.tokenizer_2, pipe.text_encoder_2, penultimate=True),
    ]
    assert [tuple(g.shape) for g in got] == [(2, 32), (2, 64)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # hidden_states[-2] is not the last layer's normalised output: the SD rule would give other vectors.
    assert not torch.allclose(got[0], _reference_init(pipe.tokenizer, pipe.text_encoder, penultimate=False), atol=1e-3)
    # Cached per encoder: a second call reads both back unchanged.
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    again = crossinit.cross_init_slots(families.slots(pipe), tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(again, got))


@torch.no_grad()
def test_sd1_init_equals_an_independent_computation(tiny_sd1: Path) -> None:
    pipe = load_pipeline(str(tiny_sd1))
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id  # SD 1.x pads with EOS
    (got,) = crossinit.cross_init_slots(families.slots(pipe))
    expected = _reference_init(pipe.tokenizer, pipe.text_encoder, penultimate=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdxl_learn_fast_trains_both_encoders_from_their_starts(cli, library: Library, tiny_sdxl: Path) -> None:
    result = cli("learn", ASTRONAUT, "--fast", "--batch-size", "1", "--model", tiny_sdxl, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["family"], record["widths"], record["tokens"], record["width"]) == ("sdxl", [32, 64], 2, 32)
    assert record["training"]["steps"] == 25 and record["training"]["resolution"] == 64
    assert set(record["encoder_norms"]) == {"clip_l", "clip_g"}
    assert "SDXL at 64 px" in result.stderr

    vectors = library.vectors("astronaut")
    assert list(vectors.parts) == ["clip_l", "clip_g"]
    pipe = load_pipeline(str(tiny_sdxl))
    with torch.no_grad():
        starts = [
            _reference_init(pipe.tokenizer, pipe.text_encoder, penultimate=True),
            _reference_init(pipe.tokenizer_2, pipe.text_encoder_2, penultimate=True),
        ]
    for (learned, init), start in zip(vectors.parts.values(), starts):
        np.testing.assert_allclose(init, start.numpy(), atol=1e-5)
        assert learned.shape == init.shape and not np.allclose(learned, init)  # the gradient reached it
    # Stored per encoder, in a layout the releases before SDXL report as newer rather than misread.
    with safe_open(str(library.path_of("astronaut") / "vectors.safetensors"), "numpy") as handle:
        assert sorted(handle.keys()) == ["init.clip_g", "init.clip_l", "learned.clip_g", "learned.clip_l"]
    assert library.get("astronaut").schema == 2
    assert "SDXL" in cli("list").stdout
    shown = cli("show", "astronaut").stdout
    assert "family" in shown and "SDXL" in shown


@pytest.mark.slow  # the default suite stays under ~10 min; the README's test command runs it
def test_out_of_memory_says_what_to_change(cli, home: Path, tiny_sdxl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import UNet2DConditionModel

    def exhausted(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet2DConditionModel, "forward", exhausted)
    message = _one_line_error(cli("learn", ASTRONAUT, "--resolution", "512", "--model", tiny_sdxl, *CHEAP))
    # At batch 1 there is no smaller batch to suggest: the size, or the CPU.
    assert (
        "out of memory on cpu at batch size 1 and 512 px; try --checkpointing on (same result), --resolution 256, "
        "or --device cpu" in message
    )
    assert not (home / "identities").exists() or not list((home / "identities").iterdir())


@torch.no_grad()
def test_sdxl_training_conditioning_is_what_the_sdxl_pipeline_feeds_its_unet(tiny_sdxl: Path) -> None:
    pipe = load_pipeline(str(tiny_sdxl))
    family, slots = families.of_pipeline(pipe), families.slots(pipe)
    caption = "a photo of the face of person"
    ids = [
        s.tokenizer(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        for s in slots
    ]
    states, added = families.conditioning(family, list(zip(slots, ids)), 64)
    embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(states, embeds)  # both encoders' hidden_states[-2], side by side: 32 + 64
    torch.testing.assert_close(added["text_embeds"], pooled)
    projection = pipe.text_encoder_2.config.projection_dim
    expected_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), embeds.dtype, projection)
    torch.testing.assert_close(added["time_ids"], expected_ids)


@torch.no_grad()
def test_the_pooled_embedding_is_taken_at_the_end_token_with_added_tokens(tiny_sdxl: Path) -> None:
    pipe = load_pipeline(str(tiny_sdxl))
    encoder, tokenizer = pipe.text_encoder_2, pipe.tokenizer_2
    encoder.text_model.eos_token_id = encoder.config.eos_token_id = 2  # as SDXL base's config ships
    families.pool_at_eos(pipe)
    mapping = sample.add_identities(pipe, {"alice": [np.ones((2, 32), np.float32), np.ones((2, 64), np.float32)]})
    ids = tokenizer(
        sample.expand_prompt("a photo of <alice>", mapping), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    assert int(ids[0].argmax()) != eos  # the placeholder has the highest id: the stale rule would pool there
    output = encoder(ids, output_hidden_states=True)
    torch.testing.assert_close(output.text_embeds[0], encoder.text_projection(output.last_hidden_state[0, eos]))


def test_resolution_option_is_checked_and_used(cli, library: Library, tiny_sdxl: Path) -> None:
    for bad in ("100", "32"):  # the least a model takes is its own (test_learn_cli: half its size)
        assert "--resolution must be a multiple of 64" in _one_line_error(
            cli("learn", ASTRONAUT, "--resolution", bad, "--model", tiny_sdxl, *CHEAP)
        )
    result = cli("learn", ASTRONAUT, "--resolution", "256", "--model", tiny_sdxl, *CHEAP)
    assert result.exit_code == 0, result.stderr
    assert library.get("astronaut").training["resolution"] == 256
    (crop,) = library.crops("astronaut")
    with Image.open(crop) as image:
        assert image.size == (256, 256)


def test_sdxl_generate_puts_each_encoders_rows_in_and_is_reproducible(
    cli, library: Library, xl_alice: Path, tmp_path: Path
) -> None:
    assert cli("learn", GRACE, "--name", "bob", "--model", xl_alice, *CHEAP).exit_code == 0
    out = tmp_path / "out"
    runs = [
        cli(
            "generate",
            "<alice> and <bob> at the beach",
            "--model",
            xl_alice,
            "--steps",
            "2",
            "--seed",
            "3",
            "--out",
            out,
            "--json",
        )
        for _ in range(2)
    ]
    assert all(r.exit_code == 0 for r in runs), runs[0].stderr
    first, second = (Path(json.loads(r.stdout)[0]["path"]) for r in runs)
    with Image.open(first) as a, Image.open(second) as b:
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
        meta = json.loads(a.text["crossinit"])
        assert "Seed: 3" in a.text["parameters"] and 'Identities: "alice, bob"' in a.text["parameters"]
    assert [(i["name"], i["family"]) for i in meta["identities"]] == [("alice", "sdxl"), ("bob", "sdxl")]

    pipe = sample.load(str(xl_alice), sample.devices.resolve("cpu"))
    mapping = sample.add_identities(pipe, {"alice": library.effective_parts("alice")})
    (learned_l, _), (learned_g, _) = library.vectors("alice").parts.values()
    ids_l = mapping["alice"].ids
    ids_g = pipe.tokenizer_2.convert_tokens_to_ids(list(mapping["alice"].tokens))
    np.testing.assert_array_equal(
        pipe.text_encoder.get_input_embeddings().weight[list(ids_l)].detach().numpy(), learned_l
    )
    np.testing.assert_array_equal(pipe.text_encoder_2.get_input_embeddings().weight[ids_g].detach().numpy(), learned_g)


def test_sdxl_manifest_generates_with_both_encoders_rows(cli, library: Library, xl_alice: Path, tmp_path: Path) -> None:
    """`generate --manifest` takes an identity's vectors from `Library.effective_vectors`: for SDXL, both
    encoders' rows, so it draws what a plain `generate` of the same prompt and seed draws."""
    args = ("--model", xl_alice, "--steps", "2", "--seed", "3", "--json")
    line = json.dumps({"prompt": "<alice> at the beach"}) + "\n"
    manifest = cli("generate", "--manifest", "-", *args, "-o", tmp_path / "m", input=line)
    assert manifest.exit_code == 0, manifest.stderr
    plain = cli("generate", "<alice> at the beach", *args, "-o", tmp_path / "p")
    assert plain.exit_code == 0, plain.stderr
    made = [
        Path(json.loads(r.stdout.splitlines()[0])["path"] if r is manifest else json.loads(r.stdout)[0]["path"])
        for r in (manifest, plain)
    ]
    with Image.open(made[0]) as a, Image.open(made[1]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sdxl_strength_scales_both_encoders(cli, library: Library, xl_alice: Path) -> None:
    assert cli("edit", "alice", "--strength", "0.5").exit_code == 0
    parts = library.effective_parts("alice")
    for got, (learned, init) in zip(parts, library.vectors("alice").parts.values()):
        np.testing.assert_allclose(got, init + 0.5 * (learned - init), atol=1e-6)


def test_sdxl_eval_runs_on_the_model_it_was_learned_on(cli, library: Library, xl_alice: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}\n", encoding="utf-8")
    args = ("-n", "1", "--steps", "1", "--prompts", prompts, "--clip-model", NO_CLIP)
    result = cli("eval", "alice", *args, "--json")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["settings"]["model"] == str(xl_alice) and record["settings"]["size"] == [64, 64]
    assert library.get("alice").evaluation["settings"]["steps"] == 1


# ---- family and width mismatches ----------------------------------------------------------------


@pytest.fixture()
def moved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every pipeline moved to a device (the moment model weights would go to a GPU)."""
    from diffusers import DiffusionPipeline

    calls: list[str] = []
    real = DiffusionPipeline.to

    def spying(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "to", spying)
    return calls


def test_an_identity_of_another_family_is_refused_before_weights_move(
    cli,
    library: Library,
    xl_alice: Path,
    tiny_model: Path,
    tiny_sd1: Path,
    tmp_path: Path,
    moved: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli("learn", ASTRONAUT, "--name", "carol", "--model", tiny_model, *CHEAP).exit_code == 0
    out = tmp_path / "out"
    xl_on_sd2 = _one_line_error(cli("generate", "<alice>", "--model", tiny_model, "--out", out))
    assert "'alice' was learned on an SDXL model" in xl_on_sd2 and "is SD 2.x" in xl_on_sd2
    sd2_on_xl = _one_line_error(cli("generate", "<carol>", "--model", xl_alice, "--out", out))
    assert "'carol' was learned on an SD 2.x model" in sd2_on_xl and "is SDXL" in sd2_on_xl
    assert "SDXL" in _one_line_error(cli("eval", "alice", "--model", tiny_model, "--clip-model", NO_CLIP))
    sd2_on_sd1 = _one_line_error(cli("generate", "<carol>", "--model", tiny_sd1, "--out", out))
    assert "'carol' was learned on an SD 2.x model" in sd2_on_sd1 and "is SD 1.x" in sd2_on_sd1  # same width, 32
    # A model whose configs cannot be read ahead: caught once loaded, still before it moves to the device.
    monkeypatch.setattr(sample, "peek_model", lambda model: None)
    late = cli("generate", "<alice>", "--model", tiny_model, "--out", out)
    assert late.exit_code == 1 and "Traceback" not in late.stderr  # after the learned-elsewhere warning:
    assert late.stderr.splitlines()[-1].startswith("error: identity 'alice' was learned on an SDXL model")
    assert moved == [] and not list(out.rglob("*.png"))
    assert cli("generate", "<alice>", "--model", xl_alice, "--steps", "1", "--out", out).exit_code == 0
    assert moved == ["StableDiffusionXLPipeline"]  # the spy sees a pipeline that does move


def test_an_identity_of_another_width_names_both_widths(cli, library: Library, tiny_sdxl: Path, tmp_path: Path) -> None:
    wide = {"clip_l": np.ones((2, 768), np.float32), "clip_g": np.ones((2, 1280), np.float32)}
    library.add(Identity(name="real", tokens=2, width=768, family="sdxl"), wide)
    message = _one_line_error(cli("generate", "<real>", "--model", tiny_sdxl, "--out", tmp_path / "o"))
    assert "'real' has 768+1280-wide vectors" in message and "32+64-wide" in message


# ---- export and import ----------------------------------------------------------------------------


def test_sdxl_export_is_clip_l_clip_g_and_diffusers_loads_it_with_two_calls(
    cli, library: Library, xl_alice: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    result = cli("export", "alice", "-o", tmp_path / "alice.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "fits SDXL checkpoints" in result.stderr
    path = tmp_path / "alice.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]
        meta = handle.metadata()
    assert meta["family"] == "sdxl" and meta["base_model"] == str(xl_alice) and meta["crossinit_name"] == "alice"
    state = load_file(str(path))
    assert (tuple(state["clip_l"].shape), tuple(state["clip_g"].shape)) == ((2, 32), (2, 64))

    diff = cli("export", "alice", "--format", "diffusers", "-o", tmp_path, "--json")
    assert diff.exit_code == 0, diff.stderr
    exported = json.loads(diff.stdout)
    assert exported["family"] == "sdxl" and exported["shapes"] == {"clip_l": [2, 32], "clip_g": [2, 64]}
    assert "text_encoder_2" in exported["usage"]

    # What docs/formats.md tells diffusers users to do: one load_textual_inversion per encoder.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(xl_alice))
    state = load_file(exported["path"])
    pipe.load_textual_inversion(
        state["clip_l"], token="<alice>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="<alice>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    expected = library.effective_parts("alice")
    for tokenizer, encoder, rows in (
        (pipe.tokenizer, pipe.text_encoder, expected[0]),
        (pipe.tokenizer_2, pipe.text_encoder_2, expected[1]),
    ):
        ids = tokenizer.convert_tokens_to_ids(["<alice>", "<alice>_1"])
        np.testing.assert_array_equal(encoder.get_input_embeddings().weight[ids].detach().numpy(), rows)

    for fmt, suffix in (("official", ".bin"), ("a1111-pt", ".pt")):
        message = _one_line_error(cli("export", "alice", "--format", fmt, "-o", tmp_path / f"x{suffix}"))
        assert f"format {fmt!r} cannot hold an SDXL identity" in message
        assert not (tmp_path / f"x{suffix}").exists()
        message = _one_line_error(cli("export", "alice", "-o", tmp_path / f"x{suffix}"))  # the suffix picks it
        assert f"format {fmt!r} cannot hold an SDXL identity" in message


def test_sdxl_import_round_trip_is_identical(cli, library: Library, xl_alice: Path, tmp_path: Path) -> None:
    assert cli("export", "alice", "-o", tmp_path / "a.safetensors").exit_code == 0
    result = cli("import", tmp_path / "a.safetensors", "--name", "copy", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["family"], record["widths"]) == ("sdxl", [32, 64])
    for got, want in zip(library.effective_parts("copy"), library.effective_parts("alice")):
        np.testing.assert_array_equal(got, want)
    # A file from A1111/ComfyUI (no metadata) must have the released SDXL widths.
    real = tmp_path / "civitai.safetensors"
    save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280) * 2}, str(real))
    assert cli("import", real, "--name", "civitai").exit_code == 0
    assert library.get("civitai").family == "sdxl" and library.get("civitai").widths == [768, 1280]
    bad = tmp_path / "tiny-widths.safetensors"
    save_file({"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 64)}, str(bad))
    assert "clip_l/clip_g are 32/64 wide; an SDXL model's encoders are 768/1280" in _one_line_error(
        cli("import", bad, "--name", "bad")
    )
    assert cli("import", bad, "--name", "fits", "--model", xl_alice).exit_code == 0  # with the model they fit


def test_sd1_export_import_round_trip_records_the_family(cli, library: Library, tiny_sd1: Path, tmp_path: Path) -> None:
    assert cli("learn", ASTRONAUT, "--name", "one", "--model", tiny_sd1, *CHEAP).exit_code == 0
    assert library.get("one").family == "sd1"
    result = cli("export", "one", "-o", tmp_path / "one.safetensors")
    assert result.exit_code == 0 and "fits SD 1.x checkpoints" in result.stderr
    with safe_open(str(tmp_path / "one.safetensors"), "np") as handle:
        assert list(handle.keys()) == ["emb_params"] and handle.metadata()["family"] == "sd1"
    assert cli("import", tmp_path / "one.safetensors", "--name", "back").exit_code == 0
    assert library.get("back").family == "sd1"
    np.testing.assert_array_equal(library.effective_parts("back")[0], library.effective_parts("one")[0])
    # An A1111 file of SD 1.x's width, without metadata, is SD 1.x; SD 2.x's width, SD 2.x.
    for width, family in ((768, "sd1"), (1024, "sd2")):
        path = tmp_path / f"w{width}.safetensors"
        save_file({"emb_params": torch.ones(2, width)}, str(path))
        assert cli("import", path, "--name", f"w{width}").exit_code == 0
        assert library.get(f"w{width}").family == family


# ---- the store: today's entries --------------------------------------------------------------------


def test_an_entry_in_todays_layout_loads_unchanged(cli, library: Library, tiny_model: Path, tmp_path: Path) -> None:
    """An entry as the release before families wrote it: no family, one learned/init pair."""
    entry = library.home / "identities" / "old"
    (entry / "crops").mkdir(parents=True)
    rng = np.random.default_rng(0)
    learned, init = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((2, 32)).astype(np.float32)
    save_numpy({"learned": learned, "init": init}, str(entry / "vectors.safetensors"))
    (entry / "meta.toml").write_text(
        f'name = "old"\ntokens = 2\nwidth = 32\nbase_model = "{tiny_model}"\nencoder_fingerprint = ""\n'
        'has_init = true\nstrength = 1.0\nnotes = ""\ntags = []\nsource = "learn"\n'
        'created = "2026-01-01T00:00:00+00:00"\nmodified = "2026-01-01T00:00:00+00:00"\nschema = 1\n\n'
        "[training]\nsteps = 25\n\n[evaluation]\n"
    )
    before = {p.name: p.read_bytes() for p in entry.iterdir() if p.is_file()}
    shown = json.loads(cli("show", "old", "--json").stdout)
    assert (shown["family"], shown["widths"]) == ("", [32])
    assert "?" in cli("list").stdout
    result = cli("generate", "<old> smiling", "--model", tiny_model, "--steps", "1", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    assert cli("export", "old", "-o", tmp_path / "old.safetensors").exit_code == 0
    np.testing.assert_array_equal(load_file(str(tmp_path / "old.safetensors"))["emb_params"].numpy(), learned)
    assert {p.name: p.read_bytes() for p in entry.iterdir() if p.is_file()} == before  # nothing rewritten
    assert cli("edit", "old", "--note", "kept").exit_code == 0
    assert (entry / "vectors.safetensors").read_bytes() == before["vectors.safetensors"]
    assert "schema = 1" in (entry / "meta.toml").read_text()


def test_the_sdxl_base_builder_has_sdxl_bases_exact_sizes() -> None:
    """What `bench_learn.py --full-size --family sdxl` times: counted on the meta device (no memory)."""
    from types import SimpleNamespace

    from crossinit_cli.synthetic import sdxl_base_modules

    with torch.device("meta"):
        modules = sdxl_base_modules(SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    # stabilityai/stable-diffusion-xl-base-1.0's parameter counts, component by component.
    assert sizes == {"unet": 2567463684, "text_encoder": 123060480, "text_encoder_2": 694659840, "vae": 83653863}
    assert modules["text_encoder_2"].get_input_embeddings().weight.shape == (49408, 1280)
    assert modules["unet"].config.addition_embed_type == "text_time"


def test_real_sdxl_widths_learn_export_and_import_without_a_model(cli, library: Library, tmp_path: Path) -> None:
    """SDXL base's encoder widths (768, 1280) in a small model: the file is what A1111/ComfyUI get."""
    from crossinit_cli.synthetic import build_tiny_sdxl

    model = build_tiny_sdxl(tmp_path / "wide-xl", widths=(768, 1280))
    result = cli("learn", ASTRONAUT, "--name", "wide", "--model", model, *CHEAP)
    assert result.exit_code == 0, result.stderr
    assert library.get("wide").widths == [768, 1280]
    assert cli("export", "wide", "-o", tmp_path / "wide.safetensors").exit_code == 0
    state = load_file(str(tmp_path / "wide.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    # As a file from another tool: no metadata, and the model it names is not on this machine.
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert cli("import", tmp_path / "plain.safetensors", "--name", "plain").exit_code == 0
    assert (library.get("plain").family, library.get("plain").widths) == ("sdxl", [768, 1280])
    out = tmp_path / "out"
    assert cli("generate", "<plain>", "--model", model, "--steps", "1", "--out", out).exit_code == 0
    assert len(list(out.glob("*.png"))) == 1
