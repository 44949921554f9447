"""The VAE's latents of each face crop, kept between runs under the library's `.cache/latents/`.

Encoding a crop and its mirror image is most of `learn`'s fixed cost on a CPU without native bf16 (two SD
VAE encodes at 512 px: ~20 s of ~31 s on 2 AVX2 cores, docs/performance.md). Learning the same photo again
on the same model (another mode, `--force`, another name, a batch row) reads them instead. A file is named
`<crop>-<encoder>.safetensors`: the crop's pixels, then what else the numbers depend on (the VAE encoder's
weights, the precision, the device and the size); `forget` finds a removed identity's files by its crops.
The cache is recomputable: a damaged file is encoded again and overwritten, an unwritable one is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.atomic import remove_stale_temps, write_atomic
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import torch
    from PIL import Image

VERSION = 1
"""Bump when what a file holds, or how it is computed, changes: older files are then never read."""


def folder(home: Path) -> Path:
    """The cache's folder in the library at `home`."""
    return Path(home) / ".cache" / "latents"


def crop_digest(image: Image.Image) -> str:
    """The crop's RGB pixels and size, hashed: the part of a file's name its photo gives."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:24]


def encoder_key(vae: Any, dtype: torch.dtype, device: str, size: int) -> str:
    """What else the latents depend on: the VAE encoder's weights (a strided sample of every parameter of the
    encoder and its quant conv, as the cross init's cache key samples the text encoder's), the precision
    and device they were computed in, and the image size."""
    from crossinit_cli.crossinit import hash_weights

    digest = hashlib.sha256(f"v{VERSION}:{dtype}:{device}:{size}:{type(vae).__name__}".encode())
    quant = getattr(vae, "quant_conv", None)
    for prefix, module in (("encoder", vae.encoder), ("quant_conv", quant)):
        if module is not None:  # sampled in the encode precision: the same key whether the VAE is cast yet or not
            hash_weights(digest, module, f"{prefix}.", dtype)
    return digest.hexdigest()[:24]


def path(cache_dir: Path, crop: Image.Image, key: str) -> Path:
    return Path(cache_dir) / f"{crop_digest(crop)}-{key}.safetensors"


def read(file: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std), each [2, channels, h, w] (the crop, then its mirror image), or None when absent or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        found = load_file(str(file))
        mean, std = found["mean"], found["std"]
    except (OSError, KeyError, SafetensorError):
        return None
    if mean.ndim != 4 or mean.shape[0] != 2 or mean.shape != std.shape:
        return None
    return mean, std


def write(file: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Keep (mean, std) in `file`, atomically; a read-only or full library must not stop training."""
    from safetensors.torch import save_file

    tensors = {"mean": mean.detach().float().cpu().contiguous(), "std": std.detach().float().cpu().contiguous()}
    if Path(file).parent.is_symlink():  # the library's cache is its own folder, never written through a link
        return
    with contextlib.suppress(CrossinitError):
        write_atomic(file, lambda tmp: save_file(tensors, str(tmp)))


def forget(cache_dir: Path, crops: Iterable[Path], *, keep: Iterable[Image.Image] = ()) -> None:
    """Delete the cached latents of these crop files (an identity being removed or replaced, a failed
    run's), whatever model or precision they were computed for, except those of the crops in `keep` (the
    entry replacing them learned from the same photo). Also deletes the temp files an interrupted write
    left here (older than atomic.STALE_TEMP_S: a live write takes seconds). Best effort: an unreadable crop
    leaves its files, which hold no more than the crop did."""
    from PIL import Image, UnidentifiedImageError

    digests = []
    for crop in crops:
        try:
            with Image.open(crop) as image:
                digests.append(crop_digest(image))
        except (OSError, UnidentifiedImageError, ValueError):
            continue
    kept = {crop_digest(image) for image in keep}
    _delete(cache_dir, [digest for digest in digests if digest not in kept])


def forget_images(cache_dir: Path | None, images: Iterable[Image.Image]) -> None:
    """Delete the cached latents of these crops (a run that failed: nothing stored keeps them)."""
    if cache_dir is not None:
        _delete(cache_dir, [crop_digest(image) for image in images if hasattr(image, "convert")])


def _delete(cache_dir: Path, digests: Iterable[str]) -> None:
    """Delete every file of these crop digests, and what interrupted writes left, in the cache folder."""
    if not Path(cache_dir).is_dir() or Path(cache_dir).is_symlink():  # a link: never deleted through
        return
    remove_stale_temps(Path(cache_dir))
    for digest in digests:
        for file in Path(cache_dir).glob(f"{digest}-*.safetensors"):
            with contextlib.suppress(OSError):
                file.unlink(missing_ok=True)
