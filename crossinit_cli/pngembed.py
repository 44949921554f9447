"""AUTOMATIC1111's PNG embeddings: an embedding carried by a picture, written and read as its
modules/textual_inversion/image_embedding.py does.

A1111 has two carriers for the same data (the dict its `.pt` files hold, each tensor written in JSON as
`{"TORCHTENSOR": nested lists}`):
- the `sd-ti-embedding` text chunk: base64 of that JSON (`embedding_to_b64` / `embedding_from_b64`);
- in its training previews, the JSON zlib-compressed and coded into the low nibbles of two blocks at the
  picture's left and right edges, xor-ed with its LCG (`insert_image_data_embed` /
  `extract_image_data_embed`), which A1111 reads when the picture has no text chunk.
crossinit writes the text chunk (A1111 reads it first) and reads both. numpy and Pillow only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from crossinit_cli.errors import CrossinitError, library_text

TEXT_KEY = "sd-ti-embedding"
MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 40_000_000  # an embedding picture is a few hundred thousand pixels; more is refused unread
MAX_JSON_BYTES = 64 * 1024 * 1024
_TENSOR = "TORCHTENSOR"
# A1111's lcg(): seed = (a * seed + c) % m, yielding seed % 255, from seed 0.
_LCG_M, _LCG_A, _LCG_C = 2**32, 1664525, 1013904223


def encode_text(data: dict[str, Any]) -> str:
    """`embedding_to_b64`: base64 of the JSON of `data`, numpy arrays written as {"TORCHTENSOR": lists}."""

    def tensor(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return {_TENSOR: value.tolist()}
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return base64.b64encode(json.dumps(data, default=tensor).encode()).decode("ascii")


def write(picture: Any, data: dict[str, Any], extra: dict[str, str]) -> bytes:
    """The PNG bytes of `picture` (a PIL image) carrying `data` in its `sd-ti-embedding` chunk, then each of
    `extra`'s text chunks (in key order). Nothing in them depends on the time: the same input, the same bytes."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TEXT_KEY, encode_text(data))
    for key in sorted(extra):
        info.add_text(key, extra[key])
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The embedding data a PNG carries (text chunk first, else its coded edges, as A1111 reads them) and its
    other text chunks; a one-line CrossinitError when it carries none or is not a readable PNG."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise CrossinitError(f"{path} is not a PNG picture")
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise CrossinitError(
                    f"{path} is a {image.size[0]}x{image.size[1]} picture; too large to be an embedding"
                )
            texts = {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
            if TEXT_KEY in texts:
                data = _from_json(_b64decode(texts.pop(TEXT_KEY)), path)
            else:
                data = extract_edges(image.convert("RGB"), path)
    except CrossinitError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
        raise CrossinitError(f"{path} is not a readable PNG picture ({library_text(exc)})") from None
    if data is None:
        raise CrossinitError(f"{path} is a picture without an embedding (no {TEXT_KEY} text, no data in its edges)")
    if not isinstance(data, dict):
        raise CrossinitError(f"{path}: its embedding data is a {type(data).__name__}, not a dict of tensors")
    return data, texts


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text)  # as A1111: characters outside the alphabet are skipped
    except (binascii.Error, ValueError) as exc:
        raise CrossinitError(f"its {TEXT_KEY} text is not base64 ({library_text(exc)})") from None


def _from_json(raw: bytes, path: Path) -> Any:
    """`json.loads(raw, cls=EmbeddingDecoder)`: every object with a TORCHTENSOR key becomes an array."""

    def hook(obj: dict[str, Any]) -> Any:
        if _TENSOR not in obj:
            return obj
        try:
            return np.array(obj[_TENSOR], dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise CrossinitError(f"{path}: a TORCHTENSOR there is not a rectangular array of numbers") from None

    try:
        return json.loads(raw, object_hook=hook)
    except (ValueError, RecursionError) as exc:
        raise CrossinitError(f"{path}: its embedding data is not JSON ({library_text(exc, 120)})") from None


def lcg_stream(count: int) -> np.ndarray:
    """The first `count` values of A1111's `lcg()` (seed % 255 of the 32-bit LCG from seed 0), computed a block
    at a time: the seed `block` steps on is A^block * seed + C_block (mod 2^32), for a whole block at once."""
    block = 4096
    seeds = np.empty(max(count, block), dtype=np.uint64)
    seed = 0
    for i in range(block):
        seed = (_LCG_A * seed + _LCG_C) % _LCG_M
        seeds[i] = seed
    jump_a, jump_c = 1, 0
    for _ in range(block):  # compose the step `block` times: x -> jump_a * x + jump_c
        jump_a, jump_c = (_LCG_A * jump_a) % _LCG_M, (_LCG_A * jump_c + _LCG_C) % _LCG_M
    for start in range(block, count, block):
        stop = min(start + block, count)
        previous = seeds[start - block : stop - block]
        seeds[start:stop] = (np.uint64(jump_a) * previous + np.uint64(jump_c)) & np.uint64(_LCG_M - 1)
    return (seeds[:count] % np.uint64(255)).astype(np.uint8)


def _xor_block(block: np.ndarray) -> np.ndarray:
    """A1111's `xor_block`: the low nibble of its LCG stream xor-ed over the block."""
    noise = lcg_stream(int(np.prod(block.shape))).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), noise & 0x0F)


def _crop_black(img: np.ndarray, tol: int = 0) -> np.ndarray:
    """A1111's `crop_black`: the picture without its all-black border rows and columns."""
    mask = (img > tol).all(2)
    mask0, mask1 = mask.any(0), mask.any(1)
    col_start, col_end = mask0.argmax(), mask.shape[1] - mask0[::-1].argmax()
    row_start, row_end = mask1.argmax(), mask.shape[0] - mask1[::-1].argmax()
    return img[row_start:row_end, col_start:col_end]


def extract_edges(image: Any, path: Path) -> Any:
    """A1111's `extract_image_data_embed` on an RGB picture: None when it has no coded edges."""
    pixels = np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], 3)
    outarr = _crop_black(pixels) & 0x0F
    black_cols = np.where(np.sum(outarr, axis=(0, 2)) == 0)
    if black_cols[0].shape[0] < 2:
        return None
    lower = _xor_block(outarr[:, : black_cols[0].min(), :].astype(np.uint8))
    upper = _xor_block(outarr[:, black_cols[0].max() + 1 :, :].astype(np.uint8))
    if lower.shape != upper.shape:
        raise CrossinitError(f"{path}: the data blocks in its edges differ in size ({lower.shape} and {upper.shape})")
    coded = ((upper << 4) | lower).flatten().tobytes()
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(coded, MAX_JSON_BYTES)
    except zlib.error as exc:
        raise CrossinitError(f"{path}: no embedding in its edges ({library_text(exc, 120)})") from None
    if inflater.unconsumed_tail:
        raise CrossinitError(f"{path}: the data in its edges unpacks to over {MAX_JSON_BYTES >> 20} MiB")
    return _from_json(data, path)
