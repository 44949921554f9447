"""Embedding files in and out: the layouts A1111/ComfyUI/Forge, InvokeAI, diffusers and the official code read.

Export writes the identity's effective vectors (the learned ones at its stored `--strength`) as float32.
Import recognises every layout by its content, never by its extension, and loads pickles only through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.atomic import write_bytes_atomic
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import MAX_TOKENS, check_vectors

if TYPE_CHECKING:
    import numpy as np

FORMATS = ("a1111", "a1111-pt", "diffusers", "official", "invokeai")
# A1111's own placeholder token id in its .pt files (the id of "*" in the SD 1.x CLIP vocabulary).
A1111_STAR_TOKEN = 265
MAX_IMPORT_BYTES = 64 * 1024 * 1024
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class FormatInfo:
    suffix: str
    description: str


INFO = {
    "a1111": FormatInfo(".safetensors", 'safetensors {"emb_params": [k, width]}: A1111, ComfyUI, Forge'),
    "a1111-pt": FormatInfo(".pt", "torch pickle with string_to_param: A1111's classic .pt"),
    "diffusers": FormatInfo(".diffusers.safetensors", 'safetensors {"<name>": [k, width]}: load_textual_inversion'),
    "official": FormatInfo(".bin", 'torch pickle {"<name>_v0": [width], ...}: the official Cross Init code'),
    "invokeai": FormatInfo(".safetensors", "A1111 layout, named <name>.safetensors for InvokeAI's embedding folder"),
}


def default_filename(name: str, fmt: str) -> str:
    return f"{name}{INFO[fmt].suffix}"


# What each tool's embeddings folder reads, per model family (tools.py finds the folder). A family that
# is missing here cannot be delivered to that tool yet; SDXL entries go here when its export lands.
TOOL_FORMATS: dict[tuple[str, str], str] = {
    (tool, family): "a1111" if tool != "invokeai" else "invokeai"
    for tool in ("a1111", "forge", "comfyui", "invokeai", "sdnext")
    for family in ("sd1", "sd2")
}


def format_for_tool(tool: str, family: str) -> str:
    """The export format `tool`'s embeddings folder reads for an identity of model `family`."""
    fmt = TOOL_FORMATS.get((tool, family))
    if fmt is None:
        raise CrossinitError(f"crossinit cannot deliver {family or 'unknown-family'} identities to {tool} yet")
    return fmt


def encode(vectors: np.ndarray, name: str, fmt: str, *, base_model: str = "", steps: int = 0) -> bytes:
    """The bytes of an export of `vectors` [k, width] in format `fmt` (the same bytes for the same input)."""
    import numpy as np

    if fmt not in FORMATS:
        raise CrossinitError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if fmt in ("a1111", "invokeai", "diffusers"):
        from safetensors.numpy import save

        key = "emb_params" if fmt != "diffusers" else f"<{name}>"
        return save({key: vectors}, metadata={"crossinit_name": name, "base_model": base_model})

    import torch

    tensor = torch.from_numpy(vectors.copy())
    if fmt == "a1111-pt":
        payload: dict[str, Any] = {
            "string_to_token": {"*": A1111_STAR_TOKEN},
            "string_to_param": {"*": tensor},
            "name": name,
            "step": int(steps),
            "sd_checkpoint": None,
            "sd_checkpoint_name": base_model or None,
        }
    else:
        payload = {f"{name}_v{i}": tensor[i].clone() for i in range(tensor.shape[0])}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def export_vectors(
    vectors: np.ndarray, name: str, fmt: str, path: Path, *, base_model: str = "", steps: int = 0
) -> Path:
    """Write `vectors` [k, width] to `path` in format `fmt` (atomically); returns the path."""
    write_bytes_atomic(path, encode(vectors, name, fmt, base_model=base_model, steps=steps))
    return path


@dataclass
class Imported:
    vectors: np.ndarray
    layout: str
    suggested_name: str | None
    base_model: str | None = None
    steps: int | None = None


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_FOLDER_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")


def is_embedding_folder(path: Path) -> bool:
    """A diffusers textual-inversion output folder (one identity), as opposed to a folder of files."""
    return any((path / name).is_file() for name in _FOLDER_FILES)


def read_embedding_file(path: Path) -> Imported:
    """Read any supported embedding file into [k, width] float32 vectors, or refuse with one line."""
    path = Path(path)
    if path.is_dir():
        for candidate in _FOLDER_FILES:
            if (path / candidate).is_file():
                return read_embedding_file(path / candidate)
        raise CrossinitError(f"{path} is a folder without learned_embeds.safetensors or learned_embeds.bin")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CrossinitError(f"{path}: no such file") from None
    except OSError as exc:
        raise CrossinitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):  # opening a FIFO waits for a writer forever; /dev/zero never ends
        raise CrossinitError(f"{path} is not a regular file (a device, FIFO or socket)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise CrossinitError(f"{path}: no such file") from None
    except OSError as exc:
        raise CrossinitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise CrossinitError(f"{path} is empty")
    if size > MAX_IMPORT_BYTES:
        raise CrossinitError(f"{path} is {size >> 20} MiB; an embedding file is a few KiB (is it a model checkpoint?)")
    if head[:2] == b"PK" or head[:1] == b"\x80":
        state, meta = _load_pickle(path), {}
    elif len(head) >= 9 and head[8:9] == b"{":
        state, meta = _load_safetensors(path, size, int.from_bytes(head[:8], "little"))
    else:
        raise CrossinitError(f"{path} is neither a safetensors file nor a torch pickle")
    return _interpret(state, meta, path)


def _load_safetensors(path: Path, size: int, header_len: int) -> tuple[dict[str, Any], dict[str, str]]:
    import numpy as np
    from safetensors import SafetensorError, safe_open

    if header_len > min(size - 8, _SAFETENSORS_MAX_HEADER):
        raise CrossinitError(f"{path} is not a valid safetensors file (header length {header_len} > file size)")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            state = {key: np.asarray(handle.get_tensor(key)) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CrossinitError(f"{path} is not a valid safetensors file ({_first_line(exc)})") from None
    return state, meta


def _load_pickle(path: Path) -> dict[str, Any]:
    import pickle
    import zipfile

    import torch

    if zipfile.is_zipfile(path):
        # torch.load inflates every record in memory: 64 MiB of deflated zeros would be ~64 GiB.
        try:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CrossinitError(f"{path} is not a readable torch file ({_first_line(exc)[:160]})") from None
        if unpacked > MAX_IMPORT_BYTES:
            raise CrossinitError(
                f"{path} unpacks to {unpacked >> 20} MiB; an embedding file is a few KiB (refused: a zip bomb?)"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CrossinitError(
            f"{path} was refused: it is a pickle that needs more than plain tensors to load "
            f"(possibly code); {_first_line(exc)[:120]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise CrossinitError(f"{path} is not a readable torch file ({_first_line(exc)[:160]})") from None
    if not isinstance(state, dict):
        raise CrossinitError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def _as_array(value: Any, what: str) -> np.ndarray:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return value.detach().to(torch.float32).cpu().numpy()
        return value.detach().cpu().numpy()
    raise CrossinitError(f"{what} is a {type(value).__name__}, not a tensor")


def _interpret(state: dict[str, Any], meta: dict[str, str], path: Path) -> Imported:
    where = str(path)
    if "clip_l" in state or "clip_g" in state:
        raise CrossinitError(f"{where} is an SDXL embedding (clip_l/clip_g); crossinit supports SD 1.x/2.x for now")
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CrossinitError(f"{where}: string_to_param must hold exactly one tensor")
        vectors = _as_array(next(iter(params.values())), where)
        name = state.get("name") if isinstance(state.get("name"), str) else None
        step = state.get("step") if isinstance(state.get("step"), int) else None
        model = state.get("sd_checkpoint_name") if isinstance(state.get("sd_checkpoint_name"), str) else None
        return Imported(check_vectors(vectors, where), "a1111-pt", name, model, step)
    if "emb_params" in state:
        if len(state) != 1:
            raise CrossinitError(f"{where}: an A1111 embedding holds one tensor, this one holds {len(state)}")
        vectors = check_vectors(_as_array(state["emb_params"], where), where)
        return Imported(vectors, "a1111", meta.get("crossinit_name"), meta.get("base_model") or None)
    official = _official_keys(state)
    if official:
        stem, keys = official
        rows = [check_vectors(_as_array(state[k], where), where) for k in keys]
        if len({r.shape for r in rows}) != 1 or rows[0].shape[0] != 1:
            raise CrossinitError(f"{where}: the _v0, _v1 ... vectors must each be one row of the same width")
        import numpy as np

        return Imported(np.concatenate(rows), "official", stem)
    if len(state) == 1:
        key, value = next(iter(state.items()))
        vectors = check_vectors(_as_array(value, where), where)
        stem = key[1:-1] if key.startswith("<") and key.endswith(">") else key
        return Imported(vectors, "diffusers", stem or None, meta.get("base_model") or None)
    raise CrossinitError(f"{where}: unrecognised embedding layout (keys: {', '.join(sorted(map(str, state))[:6])})")


def _official_keys(state: dict[str, Any]) -> tuple[str, list[str]] | None:
    """`{"<name>_v0": ..., "<name>_v1": ...}` -> (name, keys in order), else None."""
    matches = [re.fullmatch(r"(.+)_v(\d+)", str(k)) for k in state]
    if not state or not all(matches):
        return None
    stems = {m.group(1) for m in matches if m}
    indices = sorted(int(m.group(2)) for m in matches if m)
    if len(stems) != 1 or indices != list(range(len(indices))) or len(indices) > MAX_TOKENS:
        return None
    stem = stems.pop()
    return stem, [f"{stem}_v{i}" for i in indices]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
