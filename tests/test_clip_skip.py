"""Clip skip (A1111's "Clip skip N": the text encoder's layer -N through its final layer norm) for SD 1.x/2.x:
the cross init taken there, training and generation reading it, the store, exports and imports keeping it,
and SDXL refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from crossinit_cli import crossinit, families, sample, train
from crossinit_cli.devices import load_pipeline
from crossinit_cli.store import Identity, Library
from tests.test_crossinit import _reference_init

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
CHEAP = ("--steps", "2", "--batch-size", "1")
SUFFIXES = {"a1111": ".safetensors", "diffusers": ".diffusers.safetensors", "a1111-png": ".png"}


@pytest.fixture(params=["sd2", "sd1"])
def tiny_model(request: pytest.FixtureRequest, tiny_model: Path, tiny_sd1: Path) -> Path:
    """Every test here runs on the tiny SD 2.x model and on the tiny SD 1.x one (3 text layers each)."""
    return tiny_model if request.param == "sd2" else tiny_sd1


def _layer_minus(text_encoder: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    """A1111's sd_hijack_clip.py, written out: `hidden_states[-n]` of transformers' CLIP, then its final layer
    norm (n = 1: last_hidden_state)."""
    outputs = text_encoder(input_ids=ids, output_hidden_states=True)
    if n == 1:
        return outputs.last_hidden_state
    # transformers 5 puts CLIPTextModel's parts on the model itself; 4.x (and WithProjection) under text_model.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(outputs.hidden_states[-n])


# ---- the start (paper steps 1-2) at layer -2 -----------------------------------------------------


@torch.no_grad()
def test_the_start_at_clip_skip_2_equals_an_independent_computation(tiny_model: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    # The reference's "one layer fewer, then the final norm" is what A1111 calls clip skip 2 (hidden_states[-2]
    # through final_layer_norm): on a prompt, the same encoder without its last layer gives it as its output.
    ids = tokenizer("a photo of a person", padding="max_length", max_length=77, return_tensors="pt").input_ids
    at_2 = _layer_minus(encoder, ids, 2)
    stack = getattr(encoder, "text_model", encoder).encoder
    layers = stack.layers
    stack.layers = layers[:-1]
    torch.testing.assert_close(encoder(input_ids=ids).last_hidden_state, at_2)
    stack.layers = layers

    expected = _reference_init(tokenizer, encoder, skip=2)
    got = crossinit.cross_init(tokenizer, encoder, tmp_path, clip_skip=2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    last = crossinit.cross_init(tokenizer, encoder, tmp_path)
    torch.testing.assert_close(last, _reference_init(tokenizer, encoder), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, last, atol=1e-3)  # another layer, another start
    # Cached per clip skip: two files, and each read back as itself.
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(crossinit.cross_init(tokenizer, encoder, tmp_path, clip_skip=2), got)
    assert torch.equal(crossinit.cross_init(tokenizer, encoder, tmp_path), last)


# ---- training ------------------------------------------------------------------------------------


def test_training_feeds_the_unet_layer_minus_2(tiny_model: Path) -> None:
    """What the UNet is given at each step is layer -2's output through the final norm, not the last layer's."""
    from crossinit_cli import devices

    pipe = load_pipeline(str(tiny_model))
    family = families.of_pipeline(pipe)
    slots = families.slots(pipe, family)
    init = crossinit.cross_init_slots(slots, None, clip_skip=2)
    crops = [Image.open(ASTRONAUT).convert("RGB").resize((64, 64))]
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    ids: list[torch.Tensor] = []
    busy = [False]

    def caption_ids(module: Any, args: Any, kwargs: Any) -> None:
        if not busy[0]:
            ids.append(args[0] if args else kwargs["input_ids"])

    def unet_input(module: Any, args: Any, kwargs: Any) -> None:
        busy[0] = True  # the text encoder runs below (with the step's rows spliced in) without being recorded
        with torch.no_grad():
            at_2, at_1 = _layer_minus(pipe.text_encoder, ids[-1], 2), _layer_minus(pipe.text_encoder, ids[-1], 1)
        busy[0] = False
        seen.append((args[2].detach(), at_2, at_1))

    pipe.text_encoder.register_forward_pre_hook(caption_ids, with_kwargs=True)
    pipe.unet.register_forward_pre_hook(unet_input, with_kwargs=True)
    config = train.TrainConfig(steps=2, batch_size=2, clip_skip=2)
    parts = train.ModelParts.of_pipeline(pipe, family, slots)
    result = train.run(parts, crops, init, config, devices.resolve("cpu", "fp32", training=True))
    assert len(seen) == 2 and np.isfinite(result.final_loss)
    np.testing.assert_allclose(result.init, init[0].numpy())
    for given, at_2, at_1 in seen:
        # Each batch item is one of the step's distinct captions, encoded at layer -2.
        distance = (given[:, None] - at_2[None]).abs().amax(dim=(-1, -2))
        assert distance.amin(dim=1).max() < 1e-5
        assert (given[:, None] - at_1[None]).abs().amax(dim=(-1, -2)).amin(dim=1).min() > 1e-3


def test_learn_clip_skip_2_stores_it_and_starts_at_layer_minus_2(cli, library: Library, tiny_model: Path) -> None:
    result = cli("learn", ASTRONAUT, "--fast", *CHEAP, "--model", tiny_model, "--clip-skip", "2", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["clip_skip"] == 2 and library.get("astronaut").clip_skip == 2
    pipe = load_pipeline(str(tiny_model))
    with torch.no_grad():
        expected = _reference_init(pipe.tokenizer, pipe.text_encoder, skip=2)
    np.testing.assert_allclose(library.vectors("astronaut").init, expected.numpy(), atol=1e-5)
    (listed,) = json.loads(cli("list", "--json").stdout)
    assert listed["clip_skip"] == 2
    shown = cli("show", "astronaut")
    assert "clip_skip" in shown.stdout and "2" in shown.stdout.split("clip_skip", 1)[1].splitlines()[0]
    assert json.loads(cli("show", "astronaut", "--json").stdout)["clip_skip"] == 2


def test_older_entries_and_older_catalog_rows_read_as_clip_skip_1(cli, library: Library, add_identity) -> None:
    add_identity("alice")
    meta = library.path_of("alice") / "meta.toml"
    text = meta.read_text(encoding="utf-8")
    assert "clip_skip = 1" in text
    meta.write_text(text.replace("clip_skip = 1\n", ""), encoding="utf-8")  # as written before clip skip
    (listed,) = json.loads(cli("list", "--json").stdout)
    assert listed["clip_skip"] == 1 and library.get("alice").clip_skip == 1


def test_a_catalog_of_the_previous_schema_is_rebuilt_with_clip_skip(cli, library: Library, add_identity) -> None:
    """A catalog row written before clip skip existed lacks it: an older catalog is read again from the folders."""
    import sqlite3

    add_identity("alice", clip_skip=2)
    assert json.loads(cli("list", "--json").stdout)[0]["clip_skip"] == 2
    db = sqlite3.connect(library.home / "catalog.sqlite")
    (text,) = db.execute("SELECT record FROM entries").fetchone()
    old = {k: v for k, v in json.loads(text).items() if k != "clip_skip"}
    db.execute("UPDATE entries SET record = ?", (json.dumps(old),))
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    assert json.loads(cli("list", "--json").stdout)[0]["clip_skip"] == 2


# ---- generation ----------------------------------------------------------------------------------


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_reads_the_identitys_clip_skip_for_prompt_and_negative(
    cli, library: Library, tiny_model: Path, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", seed=1, scale=5, base_model=str(tiny_model), clip_skip=2)
    out = tmp_path / "out"
    args = ("--model", tiny_model, "--out", out, "--steps", "2", "--seed", "5", "--negative", "blurry", "--json")
    result = cli("generate", "<alice> smiling", *args)
    assert result.exit_code == 0, result.stderr
    assert "clip skip" not in result.stderr  # the identity's own: nothing to warn about
    (record,) = json.loads(result.stdout)
    image = Image.open(record["path"])
    assert "Clip skip: 2" in image.text["parameters"]
    own = json.loads(image.text["crossinit"])
    assert own["clip_skip"] == 2 and own["identities"][0]["clip_skip"] == 2

    # The same image, made by hand: both the prompt and the negative prompt encoded at layer -2.
    pipe = sample.load(str(tiny_model), sample.devices.resolve("cpu", "fp32"))
    mapping = sample.add_identities(pipe, {"alice": library.effective_parts("alice")})
    expanded = sample.expand_prompt("<alice> smiling", mapping)
    sample.use_scheduler(pipe, "dpm++")

    def embeds(text: str, n: int = 2) -> torch.Tensor:
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return _layer_minus(pipe.text_encoder, ids.input_ids, n)

    def draw(**texts: Any) -> np.ndarray:
        generator = [torch.Generator("cpu").manual_seed(5)]
        made = pipe(**texts, num_inference_steps=2, guidance_scale=7.5, width=64, height=64, generator=generator)
        return np.asarray(made.images[0].convert("RGB"))

    by_hand = draw(prompt_embeds=embeds(expanded), negative_prompt_embeds=embeds("blurry"))
    np.testing.assert_array_equal(_pixels(record["path"]), by_hand)
    # What diffusers' own clip_skip would do (1 there is A1111's 2): the negative prompt left at the last layer.
    assert not np.array_equal(by_hand, draw(prompt_embeds=embeds(expanded), negative_prompt_embeds=embeds("blurry", 1)))

    # --clip-skip 1 overrides it, with a warning, and gives another image.
    other = cli("generate", "<alice> smiling", *args, "--clip-skip", "1")
    assert other.exit_code == 0, other.stderr
    assert "identity 'alice' was learned at clip skip 2; generating at clip skip 1" in other.stderr
    (record_1,) = json.loads(other.stdout)
    assert "Clip skip" not in Image.open(record_1["path"]).text["parameters"]
    assert not np.array_equal(_pixels(record_1["path"]), by_hand)


def test_identities_that_disagree_are_sampled_at_1_with_a_warning(
    cli, tiny_model: Path, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", base_model=str(tiny_model), clip_skip=2)
    add_identity("bob", base_model=str(tiny_model))
    args = ("--model", tiny_model, "--out", tmp_path / "out", "--steps", "1", "--seed", "1", "--json")
    result = cli("generate", "<alice> and <bob>", *args)
    assert result.exit_code == 0, result.stderr
    assert "identity 'alice' was learned at clip skip 2; generating at clip skip 1 (the identities disagree" in (
        result.stderr
    )
    assert "'bob'" not in result.stderr
    (record,) = json.loads(result.stdout)
    assert json.loads(Image.open(record["path"]).text["crossinit"])["clip_skip"] == 1
    # A manifest line may choose its own.
    line = json.dumps({"prompt": "<alice> and <bob>", "clip_skip": 2})
    manifest = cli("generate", "--manifest", "-", *args[:-1], input=line + "\n")
    assert manifest.exit_code == 0, manifest.stderr
    assert "line 1: identity 'bob' was learned at clip skip 1; generating at clip skip 2" in manifest.stderr
    assert json.loads(manifest.stdout.splitlines()[0])["clip_skip"] == 2


def test_a_clip_skip_beyond_the_text_encoders_layers_is_one_line(
    cli, tiny_model: Path, tmp_path: Path, loads: list[Any]
) -> None:
    result = cli("learn", ASTRONAUT, "--fast", *CHEAP, "--model", tiny_model, "--clip-skip", "4")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "--clip-skip 4 is more than this model's text encoder has layers (3); choose 1 to 3" in result.stderr
    gen = cli("generate", "a cat", "--model", tiny_model, "--out", tmp_path / "out", "--clip-skip", "4")
    assert gen.exit_code == 1 and "has layers (3)" in gen.stderr
    assert loads == []  # both refused from the model's configs, before it loads


# ---- exports and imports -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["a1111", "diffusers", "a1111-png"])
def test_exports_carry_the_clip_skip_and_import_reads_it_back(
    fmt: str, cli, library: Library, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", width=768, family="sd1", clip_skip=2)
    path = tmp_path / f"alice{SUFFIXES[fmt]}"
    result = cli("export", "alice", "--format", fmt, "-o", path)
    assert result.exit_code == 0, result.stderr
    assert "learned at clip skip 2: A1111: Settings > Stable Diffusion > Clip skip 2" in result.stderr
    assert "Forge: Clip skip slider 2" in result.stderr
    if fmt != "a1111-png":  # ComfyUI and SD.Next do not read PNG embeddings: no setting for them
        assert "ComfyUI: CLIP Set Last Layer -2" in result.stderr and "SD.Next:" in result.stderr
    else:
        assert "ComfyUI" not in result.stderr.split("learned at")[1] and "SD.Next" not in result.stderr
    if fmt == "a1111-png":
        assert json.loads(Image.open(path).text["crossinit"])["clip_skip"] == "2"
    else:
        with safe_open(str(path), framework="numpy") as handle:
            assert handle.metadata()["clip_skip"] == "2"
    imported = cli("import", path, "--name", "alice2", "--json")
    assert imported.exit_code == 0, imported.stderr
    assert json.loads(imported.stdout)["clip_skip"] == 2 and library.get("alice2").clip_skip == 2


def test_an_sd2_export_tells_comfyuis_count_and_a_file_without_it_imports_as_1(
    cli, library: Library, tmp_path: Path, add_identity
) -> None:
    add_identity("alice", width=1024, family="sd2", clip_skip=2)
    result = cli("export", "alice", "-o", tmp_path / "alice.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["clip_skip"] == 2
    human = cli("export", "alice", "-o", tmp_path / "again.safetensors")
    assert "ComfyUI: CLIP Set Last Layer -3" in human.stderr and "A1111 applies no clip skip to SD 2.x" in human.stderr
    # Forge applies it to SD 2.x (hidden_states[-N] through the final layer norm), as SD.Next does; InvokeAI
    # removes N - 1 layers
    assert "Forge: Clip skip slider 2" in human.stderr and "InvokeAI: Generate > Advanced > CLIP Skip 1" in human.stderr
    assert "Forge apply no" not in human.stderr and "SD.Next: Settings > Pipeline Modifiers" in human.stderr
    from safetensors.numpy import save_file

    save_file({"emb_params": np.ones((2, 1024), np.float32)}, str(tmp_path / "plain.safetensors"))
    assert cli("import", tmp_path / "plain.safetensors").exit_code == 0
    assert library.get("plain").clip_skip == 1
    save_file({"emb_params": np.ones((2, 1024), np.float32)}, str(tmp_path / "odd.safetensors"), {"clip_skip": "x"})
    bad = cli("import", tmp_path / "odd.safetensors")
    assert bad.exit_code == 1 and "clip_skip must be a whole number" in bad.stderr


# ---- SDXL ----------------------------------------------------------------------------------------


def test_sdxl_refuses_a_clip_skip_in_one_line_before_loading(
    cli, library: Library, tiny_sdxl: Path, tmp_path: Path, loads: list[Any]
) -> None:
    learn = cli("learn", ASTRONAUT, "--fast", *CHEAP, "--model", tiny_sdxl, "--clip-skip", "2")
    assert learn.exit_code == 1 and len(learn.stderr.strip().splitlines()) == 1
    assert "--clip-skip is for SD 1.x and SD 2.x; SDXL reads each text encoder's hidden_states[-2]" in learn.stderr
    manifest = tmp_path / "people.csv"
    manifest.write_text(f"name,photos,clip_skip\nann,{ASTRONAUT},2\n", encoding="utf-8")
    batch = cli("learn", "--batch", manifest, "--model", tiny_sdxl)
    assert batch.exit_code == 1 and "--clip-skip is for SD 1.x and SD 2.x" in batch.stderr
    rng = np.random.default_rng(0)
    parts = {"clip_l": rng.standard_normal((2, 32)), "clip_g": rng.standard_normal((2, 64))}
    library.add(Identity(name="xl", tokens=2, width=32, family="sdxl", base_model=str(tiny_sdxl)), parts)
    gen = cli("generate", "<xl>", "--out", tmp_path / "out", "--clip-skip", "2")
    assert gen.exit_code == 1 and len(gen.stderr.strip().splitlines()) == 1 and "SD 1.x and SD 2.x" in gen.stderr
    assert loads == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_batch_row_takes_its_own_clip_skip(
    cli, library: Library, tiny_sd1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row's init at its own clip skip; the token table is hashed once for both (the init cache's key)."""
    manifest = tmp_path / "people.csv"
    manifest.write_text(f"name,photos,clip_skip\nann,{ASTRONAUT},2\nbea,{ASTRONAUT},\n", encoding="utf-8")
    args = ("learn", "--batch", manifest, "--fast", *CHEAP, "--model", tiny_sd1, "--quiet", "--json")
    hashed: list[str] = []
    fingerprint = crossinit.encoder_fingerprint
    monkeypatch.setattr(crossinit, "encoder_fingerprint", lambda e: (hashed.append(fingerprint(e)), hashed[-1])[1])
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert len(hashed) == 1
    assert [r["status"] for r in json.loads(result.stdout)] == ["learned", "learned"]
    assert (library.get("ann").clip_skip, library.get("bea").clip_skip) == (2, 1)
    pipe = load_pipeline(str(tiny_sd1))
    with torch.no_grad():
        at_2, at_1 = (_reference_init(pipe.tokenizer, pipe.text_encoder, skip=n).numpy() for n in (2, 1))
    np.testing.assert_allclose(library.vectors("ann").init, at_2, atol=1e-5)
    np.testing.assert_allclose(library.vectors("bea").init, at_1, atol=1e-5)
