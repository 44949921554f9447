"""fp32 where the record says fp32, on every load path: a model saved in fp16 and loaded for training through the
folder path or through `load_pipeline` (a single-file checkpoint, a hub id not fully cached) starts at the same
cross init, computed in fp32; the init cache tells the encoder's dtype and the load path apart."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def half_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved with torch_dtype=float16, as most community checkpoints are."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny-fp16")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model), torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(folder))
    return folder


def _start(parts) -> object:
    from crossinit_cli import crossinit, families

    return crossinit.cross_init_slots(families.slots(parts, parts.family))[0]


def test_an_fp16_saved_model_gives_the_fp32_start_through_the_folder_and_the_pipeline_path(
    half_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from crossinit_cli import devices, families

    placement = devices.Placement("cpu", "fp32", "test")
    folder = devices.load_for_training(str(half_model), placement)
    assert folder.loader == devices.LOAD_FOLDER and folder.text_encoder.dtype == torch.float32
    # The reference: the same (fp16-rounded) weights, upcast and computed in fp32 by hand.
    reference = _start(folder)

    monkeypatch.setattr(families, "peek", lambda model: None)  # what a single file / an uncached hub id meets
    piped = devices.load_for_training(str(half_model), devices.Placement("cpu", "bf16", "test"))
    assert piped.loader == devices.LOAD_PIPELINE
    assert piped.text_encoder.dtype == torch.float32  # transformers 5 would keep the saved fp16 unless told
    assert piped.unet.dtype == torch.bfloat16  # the UNet as --dtype says, as on the folder path
    start = _start(piped)
    assert start.dtype == torch.float32
    assert torch.allclose(start, reference, rtol=0, atol=1e-6), (start - reference).abs().max()


def test_the_init_cache_keeps_apart_encoder_dtypes_and_load_paths(tiny_model: Path, tmp_path: Path) -> None:
    import copy

    import torch

    from crossinit_cli import crossinit, devices, families

    parts = devices.load_for_training(str(tiny_model), devices.Placement("cpu", "fp32", "test"))
    slot = families.slots(parts, parts.family)[0]
    cache = tmp_path / "init"
    fp32 = crossinit.cross_init(slot.tokenizer, slot.text_encoder, cache, loader="folder")
    crossinit.cross_init(slot.tokenizer, slot.text_encoder, cache, loader="pipeline")
    assert len(list(cache.glob("*.safetensors"))) == 2
    half_encoder = copy.deepcopy(slot.text_encoder).to(torch.float16)
    half = crossinit.cross_init(slot.tokenizer, half_encoder, cache, loader="folder")
    assert len(list(cache.glob("*.safetensors"))) == 3  # an fp16 start is never read back for fp32, nor the reverse
    assert not torch.equal(half, fp32)
    assert torch.equal(crossinit.cross_init(slot.tokenizer, slot.text_encoder, cache, loader="folder"), fp32)


def test_the_record_states_each_parts_precision() -> None:
    from crossinit_cli import devices, encoding

    assert encoding.precision(devices.Placement("cpu", "fp32", "t")) == {
        "text_encoders": "fp32",
        "unet": "fp32",
        "vae": "fp32",
    }
    assert encoding.precision(devices.Placement("cuda", "bf16", "t")) == {
        "text_encoders": "fp32",
        "unet": "bf16",
        "vae": "bf16",
    }


def test_a_learned_identitys_record_states_each_parts_precision_and_the_load_path(
    cli, library, tiny_model: Path
) -> None:
    import json

    from tests.conftest import DATA

    args = ("--steps", "1", "--batch-size", "1", "--model", tiny_model, "--dtype", "fp32", "--json")
    result = cli("learn", DATA / "astronaut.png", "--name", "alice", *args)
    assert result.exit_code == 0, result.stderr
    expected = {"text_encoders": "fp32", "unet": "fp32", "vae": "fp32", "loader": "folder"}
    assert json.loads(result.stdout)["training"]["precision"] == expected
    assert library.get("alice").training["precision"] == expected
