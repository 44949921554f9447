"""Data (paper step 5): every face crop and its mirror image through the VAE, once per run.

`encode_crops` gives the latent distributions (`Latents`) the loop samples from, read from or written to
the library's latent cache (latents.py) when it has one; `encode_dtype` says in which precision the VAE
runs; `photo_time_ids` are SDXL's size conditions of each latent row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import devices, latents
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from crossinit_cli.devices import Placement
    from crossinit_cli.families import SizeCondition


@dataclass(frozen=True)
class Latents:
    """Every crop and its mirror image as the VAE's latent distribution (mean and std), encoded once."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling: float
    photos: int  # row i + photos is photo i mirrored
    time_ids: torch.Tensor | None = None  # SDXL: each row's time ids [2 * photos, 6] (`photo_time_ids`)


def encode_dtype(placement: Placement) -> torch.dtype:
    """The VAE encodes in bf16 when training in bf16 where bf16 convolutions are native (CUDA; a CPU with
    AVX512-BF16 or AMX, which oneDNN uses), else in fp32: without them PyTorch runs a bf16 convolution
    through its slow reference path, ~100x an fp32 one on an AVX2 CPU (docs/performance.md), and fp16
    overflows in SD's VAE. bf16 keeps fp32's range; the latents differ from fp32's by well under the
    sampling noise (tests/test_precision.py)."""
    import torch

    if placement.dtype != "bf16":
        return torch.float32
    if placement.device != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if devices.cpu_bf16()[0] else torch.float32


def encode_crops(
    vae: Any, crops: Sequence[Image.Image], placement: Placement, size: int, cache_dir: Path | None = None
) -> Latents:
    """Data (paper step 5): every crop and its mirror image through the VAE once (the random flip's two
    sides), in `encode_dtype`, channels-last; the latent mean and std are kept in fp32.

    Each crop goes through with its mirror image as one batch of two, so that its latents do not depend on
    the other photos; with `cache_dir` (the library's `.cache/latents/`, latents.py) they are kept there and
    a crop encoded before on the same VAE, precision, device and size is read instead (the same numbers)."""
    import torch

    dtype = encode_dtype(placement)
    device = torch.device(placement.device)
    files: list[Path | None] = [None] * len(crops)
    if cache_dir is not None:
        key = latents.encoder_key(vae, dtype, device.type, size)
        files = [latents.path(cache_dir, crop, key) for crop in crops]
    pairs = [latents.read(file) if file is not None else None for file in files]
    if any(pair is None for pair in pairs):
        vae.requires_grad_(False).eval().to(device, memory_format=torch.channels_last)
        if vae.dtype != dtype:
            vae.to(dtype=dtype)
    for i, (crop, file) in enumerate(zip(crops, files)):
        if pairs[i] is None:
            pairs[i] = _encode_pair(vae, crop, size, device, dtype)
            if file is not None:
                latents.write(file, *pairs[i])
    means = [pair[0].to(device) for pair in pairs]
    stds = [pair[1].to(device) for pair in pairs]
    mean = torch.cat([m[:1] for m in means] + [m[1:] for m in means])  # row i + len(crops): crop i mirrored
    std = torch.cat([s[:1] for s in stds] + [s[1:] for s in stds])
    return Latents(mean, std, vae.config.scaling_factor, len(crops))


def _encode_pair(
    vae: Any, crop: Image.Image, size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the crop and its mirror image, each [2, channels, h, w] in fp32."""
    import torch

    pixels = _pixels(crop, size)
    pixels = torch.stack([pixels, pixels.flip(-1)]).to(device, dtype=dtype)
    with torch.inference_mode():
        dist = vae.encode(pixels.contiguous(memory_format=torch.channels_last)).latent_dist
        mean, std = dist.mean.float().contiguous(), dist.std.float().contiguous()
    return mean.clone(), std.clone()  # out of inference mode: the loop's autograd may read them


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float in [-1, 1], resized bicubically as the official dataset does."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), PILImage.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def photo_time_ids(sizes: Sequence[SizeCondition] | None, photos: int, size: int) -> list[list[int]]:
    """SDXL's time ids of each latent row (`Latents`: the photos, then their mirror images): every photo's
    own `SizeCondition`, kept by its mirror image; without `sizes`, the pipeline's default for all."""
    from crossinit_cli.families import SizeCondition

    if sizes is not None and len(sizes) != photos:
        raise CrossinitError(f"{len(sizes)} size conditions for {photos} photos")
    conditions = list(sizes) if sizes is not None else [SizeCondition.native(size)] * photos
    each = [c.time_ids(size) for c in conditions]
    return each + each


def precision(placement: Placement) -> dict[str, str]:
    """Each part's precision in a training run on `placement`, as the identity's record states it: the text
    encoders (and so the cross init and the learned rows) in fp32, the frozen UNet in the compute dtype, the
    VAE in the dtype it encodes the crops in (encode_dtype)."""
    import torch

    names = {getattr(torch, v): k for k, v in devices.DTYPE_NAMES.items()}
    return {
        "text_encoders": devices.TEXT_ENCODER_DTYPE,
        "unet": placement.dtype,
        "vae": names[encode_dtype(placement)],
    }
