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
