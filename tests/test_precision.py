"""Precision by capability (docs/method.md#device-and-precision): `--dtype auto` on the CPU computes in bf16 where
the CPU has native bf16 and in fp32 elsewhere, says why, and bf16 learns the same identity as fp32.

tests/conftest.py pins CROSSINIT_CPU_BF16=0 for the rest of the suite; the tests here clear it and point the
detector at CPU flags of their own, so both sides of the rule are covered on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossinit_cli import crossinit, devices, encoding, sample, train
from crossinit_cli.devices import Placement, load_pipeline
from crossinit_cli.errors import CrossinitError

DATA = Path(__file__).parent / "data"
# The `flags` line of a Sapphire Rapids Xeon (abridged) and of an AVX2-only EPYC (this project's CI machine).
XEON_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ZEN4_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16"
AVX2_FLAGS = "fpu vme sse sse2 avx avx2 fma f16c"
# A Skylake-X/Cascade Lake Xeon: AVX512 (oneDNN calls bf16 "supported" there) but no native bf16.
SKYLAKE_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512dq avx512vl avx512_vnni"


@pytest.fixture()
def cpu_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """cpu_with(flags): the detector reads a cpuinfo with these flags (None: no cpuinfo), no override set."""
    monkeypatch.delenv(devices.CPU_BF16_ENV, raising=False)

    def use(flags: str | None) -> None:
        path = tmp_path / "cpuinfo"
        if flags is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        monkeypatch.setattr(devices, "CPUINFO", path)

    return use


@pytest.mark.parametrize(
    ("flags", "dtype", "why"),
    [
        (XEON_FLAGS, "bf16", "this CPU has AMX-BF16"),
        (ZEN4_FLAGS, "bf16", "this CPU has AVX512-BF16"),
        (AVX2_FLAGS, "fp32", "this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16)"),
        (None, "fp32", "the CPU's flags are unreadable"),
    ],
)
def test_auto_on_the_cpu_follows_its_native_bf16(cpu_with, flags: str | None, dtype: str, why: str) -> None:
    cpu_with(flags)
    for training in (True, False):  # learn and generate follow the same rule
        placement = devices.resolve("cpu", "auto", training=training)
        assert placement.dtype == dtype and placement.dtype_reason.startswith(why)
    # An explicit --dtype is kept whatever the CPU has: fp32 trains exactly as before.
    assert devices.resolve("cpu", "fp32", training=True).dtype == "fp32"
    assert devices.resolve("cpu", "bf16", training=True).dtype == "bf16"


def test_the_environment_switch_overrides_the_detection(cpu_with, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_with(XEON_FLAGS)
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    assert (devices.resolve("cpu").dtype, devices.resolve("cpu").dtype_reason) == ("fp32", "CROSSINIT_CPU_BF16=0")
    cpu_with(AVX2_FLAGS)
    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")
    assert (devices.resolve("cpu").dtype, devices.resolve("cpu").dtype_reason) == ("bf16", "CROSSINIT_CPU_BF16=1")
    monkeypatch.setenv(devices.CPU_BF16_ENV, "yes")
    with pytest.raises(CrossinitError, match="CROSSINIT_CPU_BF16 must be 0 or 1, not 'yes'"):
        devices.resolve("cpu")


def test_doctor_says_which_precision_and_why(cli, cpu_with) -> None:
    cpu_with(XEON_FLAGS)
    data = json.loads(cli("doctor", "--json").stdout)
    assert (data["dtype"], data["dtype_reason"]) == ("bf16", "this CPU has AMX-BF16")
    (device,) = [c for c in data["checks"] if c["name"] == "device"]
    assert device["detail"].startswith("cpu (bf16): ") and device["detail"].endswith(
        "bf16 because this CPU has AMX-BF16"
    )
    cpu_with(AVX2_FLAGS)
    data = json.loads(cli("doctor", "--json").stdout)
    assert (data["dtype"], data["dtype_reason"]) == ("fp32", "this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16)")


def test_the_training_record_says_which_precision_and_why(cli, library, cpu_with, tiny_model: Path) -> None:
    cpu_with(XEON_FLAGS)
    args = ("--steps", "1", "--batch-size", "1", "--model", tiny_model, "--json")
    result = cli("learn", DATA / "astronaut.png", "--name", "auto", *args)
    assert result.exit_code == 0, result.stderr
    training = json.loads(result.stdout)["training"]
    assert (training["dtype"], training["dtype_reason"]) == ("bf16", "this CPU has AMX-BF16")
    assert library.get("auto").training["dtype_reason"] == "this CPU has AMX-BF16"
    result = cli("learn", DATA / "astronaut.png", "--name", "asked", "--dtype", "fp32", *args)
    training = json.loads(result.stdout)["training"]
    assert training["dtype"] == "fp32" and "--dtype fp32" in training["dtype_reason"]


def _learn(model: Path, crops: list, dtype: str, seed: int = 3) -> tuple[train.TrainResult, object]:
    pipe = load_pipeline(str(model))
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    config = train.TrainConfig(steps=12, batch_size=2, seed=seed)
    result = train.run(train.ModelParts.of_pipeline(pipe), crops, init, config, Placement("cpu", dtype, "tests"))
    return result, pipe


def test_bf16_learns_the_same_identity_as_fp32(tiny_model: Path) -> None:
    """The quality guard: the same identity, seed and steps in fp32 and in bf16 (autocast, UNet weights in bf16
    and channels-last, rows and AdamW in fp32). Measured on the tiny model: every step's loss within 0.04%,
    the two results 1-4% of the rows' movement apart; a run with another seed differs by 4% in loss and by
    45% of the movement, so the tolerances (0.2% and 10%) tell a precision change from a different run."""
    from crossinit_cli.faces import align_faces

    crops = [c.image for c in align_faces([DATA / "astronaut.png", DATA / "grace_hopper.jpg"], 64)]
    full, _ = _learn(tiny_model, crops, "fp32")
    half, pipe = _learn(tiny_model, crops, "bf16")
    other, _ = _learn(tiny_model, crops, "fp32", seed=4)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert half.learned.dtype == np.float32 and half.dtype == "bf16"

    def loss_gap(a: train.TrainResult, b: train.TrainResult) -> float:
        return float(np.max(np.abs(np.array(a.losses) - np.array(b.losses)) / np.array(a.losses)))

    def row_gap(a: train.TrainResult, b: train.TrainResult) -> float:
        moved = np.linalg.norm(a.learned - a.init, axis=1)
        return float(np.max(np.linalg.norm(a.learned - b.learned, axis=1) / moved))

    assert np.array_equal(full.init, half.init)
    assert loss_gap(full, half) < 0.002 and row_gap(full, half) < 0.10
    assert loss_gap(full, other) > 0.002 and row_gap(full, other) > 0.10  # the tolerances can fail


@pytest.mark.parametrize(
    ("flags", "native"),
    [(XEON_FLAGS, True), (ZEN4_FLAGS, True), (AVX2_FLAGS, False), (SKYLAKE_FLAGS, False), (None, False)],
)
def test_vae_encodes_in_bf16_exactly_where_the_cpu_trains_in_bf16(cpu_with, flags: str | None, native: bool) -> None:
    """bf16 training encodes in bf16 where bf16 convolutions are native (CUDA; a CPU with AVX512-BF16 or AMX-BF16,
    devices.cpu_bf16) and in fp32 elsewhere, by the same rule `--dtype auto` follows, on any machine.

    Not by oneDNN's own `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: that is true on any AVX512 CPU (Skylake-X
    runs bf16 through avx512_core conversions, not natively), and the rest of the suite pins CROSSINIT_CPU_BF16=0,
    so on an AVX512-BF16 CPU it disagreed with the rule the code follows (the test failed on such a machine)."""
    cpu_with(flags)
    bf16 = Placement("cpu", "bf16", "t")
    chosen = native and torch.backends.mkldnn.is_available()
    assert encoding.encode_dtype(bf16) == (torch.bfloat16 if chosen else torch.float32)
    assert devices.cpu_bf16()[0] is chosen  # the VAE follows the training precision's own rule
    assert encoding.encode_dtype(Placement("cpu", "fp32", "t")) == torch.float32  # fp32 training: always fp32
    assert encoding.encode_dtype(Placement("cuda", "bf16", "t")) == torch.bfloat16
    assert encoding.encode_dtype(Placement("cuda", "fp16", "t")) == torch.float32  # SD's VAE overflows in fp16


def test_vae_encodes_in_bf16_when_training_in_bf16_within_a_stated_tolerance_of_fp32(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the VAE encodes in bf16 (the test above), bf16 keeps 8 bits of mantissa: the latent means move by
    about 1% of their size on average (at most 0.02 here), far less than the VAE's own sampling noise (its std)
    that every step adds to them."""
    from crossinit_cli.faces import align_faces

    crops = [c.image for c in align_faces([DATA / "astronaut.png", DATA / "grace_hopper.jpg"], 64)]
    latents = {}
    for dtype in ("fp32", "bf16"):
        pipe = load_pipeline(str(tiny_model))
        # The encode as it runs where bf16 is native (CUDA, AVX512-BF16), on this CPU: the numbers are the same.
        placement = Placement("cpu", dtype, "tests")
        setup = train._setup(train.ModelParts.of_pipeline(pipe), train.TrainConfig(), placement)
        monkeypatch.setattr(
            encoding, "encode_dtype", lambda p: {"fp32": torch.float32, "bf16": torch.bfloat16}[p.dtype]
        )
        latents[dtype] = encoding.encode_crops(pipe.vae, crops, setup.placement, setup.size)
        assert pipe.vae.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert latents[dtype].mean.dtype == latents[dtype].std.dtype == torch.float32  # sampled in fp32
    full, half = latents["fp32"], latents["bf16"]
    moved = (half.mean - full.mean).abs()
    assert moved.mean().item() < 0.02 * full.mean.abs().mean().item()
    assert moved.max().item() < 0.05 * full.std.median().item()
    assert torch.allclose(half.std, full.std, rtol=0.03)
    assert not torch.equal(half.mean, full.mean)  # it did encode in bf16


def test_sampling_follows_the_rule(tiny_model: Path, cpu_with) -> None:
    """generate on a CPU with native bf16 runs the whole pipeline in bf16 (UNet channels-last); its images stay
    close to fp32's (the tiny model's are compared here, the full-size ones in docs/performance.md)."""
    cpu_with(XEON_FLAGS)
    half = sample.load(str(tiny_model), devices.resolve("cpu"))
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    assert half.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    full = sample.load(str(tiny_model), devices.resolve("cpu", "fp32"))
    settings = sample.Settings(width=64, height=64, steps=4)
    a, b = (np.asarray(sample.sample(p, "a photo", [7], settings)[0]).astype(float) for p in (full, half))
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 30, psnr


@pytest.mark.parametrize(("release", "bf16"), [("14.5", True), ("15.1", True), ("13.6.1", False), ("", False)])
def test_mps_trains_in_bf16_from_macos_14(monkeypatch: pytest.MonkeyPatch, release: str, bf16: bool) -> None:
    """On paper (no Mac here): torch's MPS backend has bf16 from macOS 14; before, training keeps fp32."""
    monkeypatch.setattr(devices.platform, "mac_ver", lambda: (release, ("", "", ""), ""))
    chosen, why = devices.mps_bf16()
    assert chosen is bf16 and ("supports bf16" in why if bf16 else "from macOS 14 only" in why)


def test_bf16_training_casts_the_text_encoder_once_to_the_same_rows(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text encoders' Linear weights are cast to bf16 once per run instead of by autocast at every call
    (train._linears_cast_once): the same rows bit for bit, and the fp32 weights back afterwards."""
    import contextlib

    from crossinit_cli.faces import align_faces

    crops = [c.image for c in align_faces([DATA / "astronaut.png"], 64)]
    once, pipe = _learn(tiny_model, crops, "bf16")
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())  # put back
    monkeypatch.setattr(train, "_linears_cast_once", lambda slots, setup: contextlib.nullcontext())
    every_call, _ = _learn(tiny_model, crops, "bf16")
    assert np.array_equal(once.learned, every_call.learned) and once.losses == every_call.losses
    assert not np.array_equal(once.learned, once.init)
