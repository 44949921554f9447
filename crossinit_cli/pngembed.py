"""AUTOMATIC1111's PNG embeddings: an embedding carried by a picture, written and read as its
modules/textual_inversion/image_embedding.py does.

A1111 has two carriers for the same data (the dict its `.pt` files hold, each tensor written in JSON as
`{"TORCHTENSOR": nested lists}`):
- the `sd-ti-embedding` text chunk: base64 of that JSON (`embedding_to_b64` / `embedding_from_b64`);
- in its training previews, the JSON zlib-compressed and coded into the low nibbles of two blocks at the
  picture's left and right edges, xor-ed with its LCG (`insert_image_data_embed` /
  `extract_image_data_embed`), which A1111 reads when the picture has no text chunk.
crossinit writes both, as A1111's own embedding pictures carry both: the text chunk (A1111 reads it first) and
the coded edges, so that the picture still holds the embedding once an image host or editor strips its text
chunks. It reads both; the edges' decoding holds one strip of rows at a time besides the decoded picture, and
only the two edge blocks whole (a 6300x6300 picture stays well under 768 MiB). numpy and Pillow only.
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
MAX_CODED_BYTES = 16 * 1024 * 1024  # the edges' compressed data: an embedding's is a few hundred KiB at most
_STRIP_ROWS = 256  # rows of a picture looked at at once while finding its edges
_DEPTH = 3  # A1111 codes 3 nibbles per pixel (RGB)
_TENSOR = "TORCHTENSOR"
# A1111's lcg(): seed = (a * seed + c) % m, yielding seed % 255, from seed 0.
_LCG_M, _LCG_A, _LCG_C = 2**32, 1664525, 1013904223


def _json(data: dict[str, Any]) -> bytes:
    """The JSON of `data` as A1111's EmbeddingEncoder writes it: numpy arrays as {"TORCHTENSOR": lists}."""

    def tensor(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return {_TENSOR: value.tolist()}
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return json.dumps(data, default=tensor).encode()


def encode_text(data: dict[str, Any]) -> str:
    """`embedding_to_b64`: base64 of the JSON of `data`, numpy arrays written as {"TORCHTENSOR": lists}."""
    return base64.b64encode(_json(data)).decode("ascii")


def write(picture: Any, data: dict[str, Any], extra: dict[str, str]) -> bytes:
    """The PNG bytes of `picture` (a PIL image) with `data` coded in blocks at its left and right edges (as
    A1111's `insert_image_data_embed`) and in its `sd-ti-embedding` chunk, then each of `extra`'s text chunks
    (in key order). Nothing in them depends on the time: the same input, the same bytes."""
    from PIL.PngImagePlugin import PngInfo

    framed = insert_edges(picture.convert("RGB"), data)
    info = PngInfo()
    info.add_text(TEXT_KEY, encode_text(data))
    for key in sorted(extra):
        info.add_text(key, extra[key])
    buffer = io.BytesIO()
    framed.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def _style(block_shape: tuple[int, ...], sequence: np.ndarray) -> np.ndarray:
    """The high nibbles of a data block: 8x8 tiles shaded along `sequence` (the embedding's first row), never
    0, so that every coded pixel is non-black in all three channels (A1111's `crop_black` keeps it)."""
    rows, cols = block_shape[0], block_shape[1]
    tiles = (np.arange(rows)[:, None] // 8) * ((cols + 7) // 8) + np.arange(cols)[None, :] // 8
    shades = (sequence[tiles % len(sequence)] & 0xF0) | 0x10
    return np.repeat(shades[:, :, None], block_shape[2], axis=2).astype(np.uint8)


def insert_edges(picture: Any, data: dict[str, Any]) -> Any:
    """`picture` (RGB) with `data` coded as A1111's `insert_image_data_embed` codes it: the zlib-compressed JSON's
    low and high nibbles, each repeated to fill whole 3-channel columns of the picture's height and xor-ed with
    its LCG, in a block left (low) and right (high) of the picture, one black column between each block and
    the picture. A1111's `extract_image_data_embed` reads it back (checked here: a picture whose own columns
    would confuse the reader is refused rather than written)."""
    from PIL import Image

    compressed = np.frombuffer(zlib.compress(_json(data), level=9), np.uint8)
    width, height = picture.size
    size = compressed.shape[0] + (height - compressed.shape[0] % height)
    size += height * _DEPTH - size % (height * _DEPTH)
    first = np.asarray(next(iter(_tensors(data))), dtype=np.float64).reshape(-1)[:1024]
    peak = float(np.max(np.abs(first))) or 1.0
    sequence = (np.abs(first) / peak * 255).astype(np.uint8)
    blocks = []
    for nibbles, shades in ((compressed & 0x0F, sequence), (compressed >> 4, sequence[::-1])):
        block = np.resize(nibbles, size).reshape((height, -1, _DEPTH))
        blocks.append(_xor_block(block | _style(block.shape, shades)))
    low, high = blocks
    canvas = np.zeros((height, low.shape[1] + width + high.shape[1] + 2, 3), dtype=np.uint8)
    canvas[:, : low.shape[1]] = low
    canvas[:, low.shape[1] + 1 : low.shape[1] + 1 + width] = np.asarray(picture, dtype=np.uint8)
    canvas[:, low.shape[1] + 2 + width :] = high
    framed = Image.fromarray(canvas, "RGB")
    if edge_bytes(framed, Path("<export>")) != _json(data):
        raise CrossinitError("the picture's own columns would hide the data coded in its edges; not written")
    return framed


def _tensors(data: dict[str, Any]) -> list[np.ndarray]:
    """The arrays of an embedding's dict (string_to_param's, else its own values), in order."""
    params = data.get("string_to_param")
    values = params.values() if isinstance(params, dict) else data.values()
    return [v for v in values if isinstance(v, np.ndarray)] or [np.ones(1)]


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
                data = extract_edges(image, path)
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
    at a time: the seed `block` steps on is A^block * seed + C_block (mod 2^32), for a whole block at once. Only
    one block of seeds is held: the result is `count` bytes."""
    block = 4096
    seeds = np.empty(block, dtype=np.uint64)
    seed = 0
    for i in range(block):
        seed = (_LCG_A * seed + _LCG_C) % _LCG_M
        seeds[i] = seed
    jump_a, jump_c = 1, 0
    for _ in range(block):  # compose the step `block` times: x -> jump_a * x + jump_c
        jump_a, jump_c = (_LCG_A * jump_a) % _LCG_M, (_LCG_A * jump_c + _LCG_C) % _LCG_M
    out = np.empty(count, dtype=np.uint8)
    for start in range(0, count, block):
        stop = min(start + block, count)
        out[start:stop] = seeds[: stop - start] % np.uint64(255)
        seeds = (np.uint64(jump_a) * seeds + np.uint64(jump_c)) & np.uint64(_LCG_M - 1)
    return out


def _xor_block(block: np.ndarray) -> np.ndarray:
    """A1111's `xor_block`: the low nibble of its LCG stream xor-ed over the block."""
    noise = lcg_stream(int(np.prod(block.shape))).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), noise & 0x0F)


def _rgb(image: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """The RGB pixels of `box` (left, top, right, bottom) of `image`, as A1111's `image.convert('RGB')` has them."""
    return np.asarray(image.crop(box).convert("RGB"), dtype=np.uint8).reshape(box[3] - box[1], box[2] - box[0], 3)


def edge_bytes(image: Any, path: Path) -> bytes | None:
    """The data A1111's `extract_image_data_embed` finds in a picture's edges, decompressed (the JSON's bytes):
    None when it has no coded edges. Its steps, a strip of rows at a time: `crop_black` (the box of rows and
    columns holding a pixel non-black in all three channels), the columns whose low nibbles are all 0 in that
    box, and the blocks left of the first and right of the last; only those two blocks are held whole."""
    width, height = image.size
    col_any, row_any = np.zeros(width, dtype=bool), np.zeros(height, dtype=bool)
    for top in range(0, height, _STRIP_ROWS):
        lit = (_rgb(image, (0, top, width, min(top + _STRIP_ROWS, height))) > 0).all(2)
        col_any |= lit.any(0)
        row_any[top : top + lit.shape[0]] = lit.any(1)
    left, right = int(col_any.argmax()), width - int(col_any[::-1].argmax())
    top, bottom = int(row_any.argmax()), height - int(row_any[::-1].argmax())
    sums = np.zeros(right - left, dtype=np.int64)
    for row in range(top, bottom, _STRIP_ROWS):
        sums += (_rgb(image, (left, row, right, min(row + _STRIP_ROWS, bottom))) & 0x0F).sum(
            axis=(0, 2), dtype=np.int64
        )
    black = np.flatnonzero(sums == 0)
    if black.shape[0] < 2:
        return None
    lower_box = (left, top, left + int(black.min()), bottom)
    upper_box = (left + int(black.max()) + 1, top, right, bottom)
    sizes = [(box[2] - box[0]) * (box[3] - box[1]) * 3 for box in (lower_box, upper_box)]
    if sizes[0] != sizes[1]:
        shapes = [(box[3] - box[1], box[2] - box[0], 3) for box in (lower_box, upper_box)]
        raise CrossinitError(f"{path}: the data blocks in its edges differ in size ({shapes[0]} and {shapes[1]})")
    if sizes[0] > MAX_CODED_BYTES:
        raise CrossinitError(f"{path}: the data blocks in its edges hold {sizes[0] >> 20} MiB; not an embedding's")
    lower = _xor_block(_rgb(image, lower_box) & 0x0F)
    upper = _xor_block(_rgb(image, upper_box) & 0x0F)
    coded = ((upper << 4) | lower).tobytes()
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(coded, MAX_JSON_BYTES)
    except zlib.error as exc:
        raise CrossinitError(f"{path}: no embedding in its edges ({library_text(exc, 120)})") from None
    if inflater.unconsumed_tail:
        raise CrossinitError(f"{path}: the data in its edges unpacks to over {MAX_JSON_BYTES >> 20} MiB")
    return data


def extract_edges(image: Any, path: Path) -> Any:
    """A1111's `extract_image_data_embed` on a picture: its decoded data, None when it has no coded edges."""
    data = edge_bytes(image, path)
    return None if data is None else _from_json(data, path)
