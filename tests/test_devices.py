"""Device and precision choice, and model loading errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossinit_cli import devices
from crossinit_cli.errors import CrossinitError


def test_auto_on_a_cpu_machine_is_cpu_fp32() -> None:
    placement = devices.resolve("auto", "auto")
    assert (placement.device, placement.dtype) == ("cpu", "fp32")
    assert "no CUDA" in placement.reason


def test_unavailable_devices_are_user_errors() -> None:
    for device in ("cuda", "mps"):
        with pytest.raises(CrossinitError, match=f"--device {device}"):
            devices.resolve(device)
    with pytest.raises(CrossinitError, match="fp16 is not supported on the CPU"):
        devices.resolve("cpu", "fp16")
    assert devices.resolve("cpu", "bf16").dtype == "bf16"


def test_local_diffusers_folder_loads(tiny_model: Path) -> None:
    pipe = devices.load_pipeline(str(tiny_model))
    assert devices.text_width(pipe.text_encoder) == 32


def test_training_load_takes_what_training_uses_in_its_dtype(tiny_model: Path, tiny_sdxl: Path) -> None:
    import torch

    pipe = devices.load_pipeline(str(tiny_model))
    parts = devices.load_for_training(str(tiny_model), devices.Placement("cpu", "bf16", "tests"))
    assert parts.family.name == "sd2" and parts.vae.decoder is None and parts.vae.post_quant_conv is None
    assert parts.unet.dtype == torch.bfloat16 and parts.text_encoder.dtype == parts.vae.dtype == torch.float32
    for ours, theirs in ((parts.unet, pipe.unet), (parts.text_encoder, pipe.text_encoder), (parts.vae, pipe.vae)):
        expected = {k: v.to(ours.dtype) for k, v in theirs.state_dict().items()}
        assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())
    assert parts.tokenizer("a photo").input_ids == pipe.tokenizer("a photo").input_ids
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert parts.scheduler.config[key] == pipe.scheduler.config[key]
    assert devices.load_for_training(str(tiny_model), devices.Placement("cpu", "fp32", "t")).unet.dtype == torch.float32
    xl = devices.load_for_training(str(tiny_sdxl), devices.Placement("cpu", "fp32", "tests"))
    assert xl.family.name == "sdxl" and xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    assert xl.text_encoder_2.text_model.eos_token_id == xl.tokenizer_2.eos_token_id  # families.pool_at_eos


def test_missing_models_give_actionable_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CrossinitError) as info:
        devices.load_pipeline("stabilityai/stable-diffusion-2-1-base")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "hf download stabilityai/stable-diffusion-2-1-base" in message
    assert "\n" not in message
    with pytest.raises(CrossinitError, match="no such file or folder"):
        devices.load_pipeline(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossinitError, match="no model_index.json"):
        devices.load_pipeline(str(tmp_path / "empty"))


def test_width_mismatch_names_both_widths() -> None:
    with pytest.raises(CrossinitError, match="1024-wide vectors .* 768-wide text encoder"):
        devices.check_width("alice", 1024, "sd15", 768)
