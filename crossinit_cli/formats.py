"""Embedding files in and out: the layouts A1111/ComfyUI/Forge, InvokeAI, diffusers and the official code read.

Export writes the identity's effective vectors (the learned ones at its stored `--strength`) as float32.
Import recognises every layout by its content, never by its extension, and loads pickles only through
`torch.load(weights_only=True)`.

SDXL identities have vectors per text encoder: every safetensors format writes them as
`{"clip_l": [k, 768], "clip_g": [k, 1280]}`, the layout A1111, Forge, ComfyUI and InvokeAI read for
SDXL (diffusers: one `load_textual_inversion` call per encoder). The pickle formats hold one encoder's
vectors, so they are refused for SDXL. Every safetensors export records its family, base model and clip
skip in the file's metadata (the PNG embedding in its `crossinit` text chunk), and import reads them back.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import families, untrusted
from crossinit_cli.atomic import write_bytes_atomic
from crossinit_cli.entries import LEGACY_FAMILIES, MAX_TOKENS, check_vectors
from crossinit_cli.errors import CrossinitError, library_text

if TYPE_CHECKING:
    import numpy as np

# A1111's own placeholder token id in its .pt files (the id of "*" in the SD 1.x CLIP vocabulary).
A1111_STAR_TOKEN = 265
MAX_IMPORT_BYTES = 64 * 1024 * 1024
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Export:
    """What a writer turns into a file's bytes: nothing else (no clock, no host) goes in, so the same export
    gives the same bytes every time."""

    parts: list[np.ndarray]  # float32 [k, width] per text encoder
    name: str
    base_model: str = ""
    steps: int = 0
    family: str = ""
    picture: Path | None = None  # the identity's aligned face crop, for formats that are pictures
    clip_skip: int | None = 1  # the text-encoder layer it was learned at (A1111's Clip skip); None: unknown


Writer = Callable[[Export], bytes]


def _stable_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose header has its keys sorted: the writer's own header comes from a hash map whose
    order changes from process to process, and with it the file's bytes and hash (which A1111 records)."""
    import json

    from safetensors.numpy import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data that follows stays 8-byte aligned, as the writer keeps it
    return len(header).to_bytes(8, "little") + header + data[8 + size :]


def _metadata(export: Export) -> dict[str, str]:
    """What a file records about its identity besides the vectors (safetensors metadata holds only text)."""
    return {
        "crossinit_name": export.name,
        "base_model": export.base_model,
        "family": export.family,
        "clip_skip": CLIP_SKIP_UNKNOWN if export.clip_skip is None else str(int(export.clip_skip)),
    }


CLIP_SKIP_UNKNOWN = "unknown"
"""The metadata's clip_skip of an identity imported from a file that could not record it."""


def _safetensors(single_key: Callable[[str], str]) -> Writer:
    """A safetensors writer: one encoder's vectors under `single_key(name)`, SDXL's under clip_l/clip_g."""

    def write(export: Export) -> bytes:
        parts, family = export.parts, export.family
        if len(parts) > 1:
            keys = [e.key for e in families.get(family).encoders]
            tensors = dict(zip(keys, parts))
        else:
            tensors = {single_key(export.name): parts[0]}
        return _stable_safetensors(tensors, _metadata(export))

    return write


def _torch_bytes(payload: dict[str, Any]) -> bytes:
    """torch.save into memory: its zip has fixed record names and dates, so equal payloads give equal bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _a1111_dict(export: Export, tensor: Any) -> dict[str, Any]:
    """The dict A1111's `Embedding.save` pickles (its .pt) and its PNG embeddings carry as JSON."""
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": tensor},
        "name": export.name,
        "step": int(export.steps),
        "sd_checkpoint": None,
        "sd_checkpoint_name": export.base_model or None,
    }


def _write_a1111_pt(export: Export) -> bytes:
    import torch

    return _torch_bytes(_a1111_dict(export, torch.from_numpy(export.parts[0].copy())))


def _write_official(export: Export) -> bytes:
    import torch

    tensor = torch.from_numpy(export.parts[0].copy())
    return _torch_bytes({f"{export.name}_v{i}": tensor[i].clone() for i in range(tensor.shape[0])})


def _write_a1111_png(export: Export) -> bytes:
    """AUTOMATIC1111's PNG embedding on the identity's face crop with its name on it. SD 1.x/2.x: its .pt
    dict; SDXL: exactly {"clip_l", "clip_g"} (A1111's SDXL branch converts every value, so nothing else)."""
    from crossinit_cli import pngembed

    if len(export.parts) > 1:
        keys = [e.key for e in families.get(export.family).encoders]
        data: dict[str, Any] = dict(zip(keys, export.parts))
    else:
        data = _a1111_dict(export, export.parts[0])
    extra = {"crossinit": json.dumps(_metadata(export), sort_keys=True)}
    return pngembed.write(_name_card(export), data, extra)


def _name_card(export: Export) -> Any:
    """The identity's first aligned face crop (a plain card for an identity without crops, e.g. imported) with
    its name drawn along the bottom, so that a person sees whose embedding the picture carries."""
    from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

    size = 512
    if export.picture is not None:
        try:
            with Image.open(export.picture) as crop:
                picture = crop.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError) as exc:
            raise CrossinitError(f"cannot read the face crop {export.picture} ({library_text(exc)})") from None
    else:
        picture = Image.new("RGB", (size, size), (48, 48, 56))
    width, height = picture.size
    draw = ImageDraw.Draw(picture, "RGBA")
    points = max(12, height // 12)
    font = ImageFont.load_default(size=points)
    while points > 8 and draw.textlength(export.name, font=font) > width * 0.9:
        points -= 2
        font = ImageFont.load_default(size=points)
    band = int(points * 1.6)
    draw.rectangle((0, height - band, width, height), fill=(0, 0, 0, 160))
    draw.text((width / 2, height - band / 2), export.name, font=font, fill=(255, 255, 255), anchor="mm")
    return picture


@dataclass(frozen=True)
class Format:
    """One export format: all that the CLI's choice, export, its hints and `export --to` know about it.

    Import does not dispatch on it: it recognises a file by its content (`_interpret`), and a new layout
    needs a branch there too.
    """

    name: str
    suffix: str
    description: str
    write: Writer
    hint: str  # how to use an exported file; {stem}, {name} and {path} are filled in
    sdxl_hint: str = ""  # the hint for an identity with vectors per text encoder, where it differs
    single_encoder: str = ""  # why it cannot hold an SDXL identity; "" when it can
    tools: tuple[str, ...] = ()  # the tools (tools.Tool.key) whose embeddings folder `export --to` fills with it
    picture: bool = False  # drawn on the identity's face crop: export passes the crop's path

    def usage(self, path: Path, name: str, stem: str, parts: int) -> str:
        template = self.sdxl_hint if parts > 1 and self.sdxl_hint else self.hint
        return template.format(stem=stem, name=name, path=path)


_SDXL_DIFFUSERS_HINT = (
    'state = safetensors.torch.load_file("{path}"); '
    'pipe.load_textual_inversion(state["clip_l"], token="<{name}>", text_encoder=pipe.text_encoder, '
    "tokenizer=pipe.tokenizer); "
    'pipe.load_textual_inversion(state["clip_g"], token="<{name}>", text_encoder=pipe.text_encoder_2, '
    "tokenizer=pipe.tokenizer_2); "
    "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id  "
    "(else transformers pools text_encoder_2 at <{name}>, not at the end token: docs/formats.md)"
)

REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "a1111",
            ".safetensors",
            'safetensors {"emb_params": [k, width]}: A1111, ComfyUI, Forge',
            _safetensors(lambda name: "emb_params"),
            "A1111/Forge: put it in stable-diffusion-webui/embeddings/ and write `{stem}` in a prompt; "
            "ComfyUI: models/embeddings/, prompt `embedding:{stem}`",
            tools=("a1111", "forge", "comfyui", "sdnext"),
        ),
        Format(
            "a1111-pt",
            ".pt",
            "torch pickle with string_to_param: A1111's classic .pt",
            _write_a1111_pt,
            "A1111: put it in stable-diffusion-webui/embeddings/ and write `{stem}` in a prompt",
            single_encoder="A1111's .pt layout holds one text encoder's vectors",
        ),
        Format(
            "diffusers",
            ".diffusers.safetensors",
            'safetensors {"<name>": [k, width]}: load_textual_inversion (not InvokeAI: use invokeai there)',
            _safetensors(lambda name: f"<{name}>"),
            'pipe.load_textual_inversion("{path}", token="<{name}>"), then write <{name}> in a prompt',
            sdxl_hint=_SDXL_DIFFUSERS_HINT,
        ),
        Format(
            "official",
            ".bin",
            'torch pickle {"<name>_v0": [width], ...}: the official Cross Init code',
            _write_official,
            "the official Cross Initialization code's test scripts load it as learned embeddings",
            single_encoder="the official Cross Initialization code runs SD 2.1 only (one text encoder)",
        ),
        Format(
            "invokeai",
            ".safetensors",
            "A1111 layout, named <name>.safetensors for InvokeAI's embedding folder",
            _safetensors(lambda name: "emb_params"),
            "InvokeAI: put it in its models folder (or Model Manager > Add) and write <{stem}> in a prompt",
            tools=("invokeai",),
        ),
        Format(
            "a1111-png",
            ".png",
            "AUTOMATIC1111's PNG embedding (sd-ti-embedding text chunk) on the face crop, name drawn on it",
            _write_a1111_png,
            "A1111/Forge: put it in stable-diffusion-webui/embeddings/ and write `{name}` in a prompt; "
            "it is also a picture of whom it holds, to share",
            sdxl_hint="A1111/Forge: put it in stable-diffusion-webui/embeddings/ and write `{stem}` in a prompt; "
            "it is also a picture of whom it holds, to share",
            picture=True,
        ),
    )
}
FORMATS = tuple(REGISTRY)
# Every suffix an export can end in, longest first (a file's stem drops the first that matches).
EXPORT_SUFFIXES = tuple(sorted({f.suffix for f in REGISTRY.values()}, key=len, reverse=True))


def default_filename(name: str, fmt: str) -> str:
    return f"{name}{REGISTRY[fmt].suffix}"


TOOL_FORMATS: dict[tuple[str, str], str] = {
    (tool, family): fmt.name for fmt in REGISTRY.values() for tool in fmt.tools for family in families.FAMILIES
}


def format_for_tool(tool: str, family: str) -> str:
    """The export format `tool`'s embeddings folder reads for an identity of model `family`."""
    fmt = TOOL_FORMATS.get((tool, family))
    if fmt is None:
        raise CrossinitError(f"crossinit cannot deliver {family or 'unknown-family'} identities to {tool} yet")
    return fmt


def check_format(fmt: str, family: str) -> None:
    """Refuse, in one line, a format that cannot hold an identity of `family`."""
    if fmt not in REGISTRY:
        raise CrossinitError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    why = REGISTRY[fmt].single_encoder
    if family in families.FAMILIES and families.get(family).multi and why:
        raise CrossinitError(
            f"format {fmt!r} cannot hold an SDXL identity: {why}; use --format a1111 (clip_l + clip_g)"
        )


def encode(
    vectors: np.ndarray | list[np.ndarray],
    name: str,
    fmt: str,
    *,
    base_model: str = "",
    steps: int = 0,
    family: str = "",
    picture: Path | None = None,
    clip_skip: int | None = 1,
) -> bytes:
    """The bytes of an export of `vectors` [k, width] (SDXL: one array per encoder) in format `fmt`;
    `picture` is the face crop a picture format is drawn on, `clip_skip` the layer it was learned at."""
    import numpy as np

    parts = [np.ascontiguousarray(v, dtype=np.float32) for v in (vectors if isinstance(vectors, list) else [vectors])]
    layer = None if clip_skip is None else int(clip_skip)
    return encode_export(Export(parts, name, base_model, int(steps), family, picture, layer), fmt)


def encode_export(export: Export, fmt: str) -> bytes:
    """The bytes of `export` (float32 parts) in format `fmt`, once the format is known to hold its family."""
    check_format(fmt, export.family)
    return REGISTRY[fmt].write(export)


def export_vectors(export: Export, fmt: str, path: Path) -> Path:
    """Write `export` to `path` in format `fmt` (atomically, with the umask's mode: an export is for other
    programs to read)."""
    write_bytes_atomic(path, encode_export(export, fmt), shared=True)
    return path


def _extension(suffix: str) -> str:
    return suffix[suffix.rfind(".") :].lower() if "." in suffix else ""


def format_for_file(path: Path, fmt: str | None) -> str:
    """The format an export to the file `path` is written in: the one its name's suffix names (`.pt`:
    a1111-pt, `.bin`: official, `.safetensors`: a1111, `.diffusers.safetensors`: diffusers, `.png`:
    a1111-png), or `fmt` when given, which must write files of that extension. A name without an
    extension takes `fmt` (default a1111) and its suffix (`export_path`); any other extension is refused,
    so no tool is handed a file its name misdescribes."""
    name, ext = path.name.lower(), _extension(path.name) if _has_extension(path.name) else ""
    named = next(
        (f.name for f in sorted(REGISTRY.values(), key=lambda f: -len(f.suffix)) if name.endswith(f.suffix)), None
    )
    if fmt is None:
        if ext and named is None:
            known = ", ".join(sorted({f.suffix for f in REGISTRY.values()}))
            raise CrossinitError(
                f"-o {path.name}: {ext} is not an export file suffix ({known}); use one, or a folder (-o DIR/)"
            )
        return named or "a1111"
    if fmt not in REGISTRY:
        raise CrossinitError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    wanted = _extension(REGISTRY[fmt].suffix)
    if ext and ext != wanted:
        raise CrossinitError(
            f"-o {path.name} is a {ext} file but --format {fmt} writes {wanted} files; "
            f"drop --format{f' (the name picks {named})' if named else ''} or name it *{wanted}"
        )
    return fmt


def _has_extension(name: str) -> bool:
    return "." in name.lstrip(".")


def export_path(path: Path, fmt: str) -> Path:
    """The file an export to `-o path` writes: `path`, or with `fmt`'s suffix added when its name has no
    extension (`-o alice` writes `alice.safetensors`). No tool reads an embedding file without one:
    A1111, Forge and SD.Next pick their files by extension, and ComfyUI reads any other name as a pickle."""
    return path if _has_extension(path.name) else path.with_name(path.name + REGISTRY[fmt].suffix)


def names_a_file(output: str) -> bool:
    """Whether `-o output` names one export file (an export suffix, not an existing folder or a path ending
    in a separator), which several identities cannot share."""
    path = Path(output).expanduser()
    if path.is_dir() or output.endswith(("/", "\\")):
        return False
    return any(path.name.lower().endswith(_extension(f.suffix)) for f in REGISTRY.values())


@dataclass
class Imported:
    vectors: np.ndarray  # the (first) encoder's [k, width]
    layout: str
    suggested_name: str | None
    base_model: str | None = None
    steps: int | None = None
    family: str = ""  # from the file's metadata or layout; "" when it cannot be told
    parts: dict[str, np.ndarray] | None = None  # SDXL: {"clip_l": ..., "clip_g": ...}
    clip_skip: int | None = 1  # from crossinit's metadata; other tools' safetensors read as 1; a pickle: None
    family_inferred: bool = False  # told from the width alone (768 SD 1.x, 1024 SD 2.x): no metadata, no model

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[1]) for v in (self.parts or {"": self.vectors}).values()]


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".png")
_FOLDER_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")


def is_embedding_folder(path: Path) -> bool:
    """A diffusers textual-inversion output folder (one identity), as opposed to a folder of files."""
    return any((path / name).is_file() for name in _FOLDER_FILES)


def read_embedding_file(path: Path, model: str | None = None) -> Imported:
    """Read any supported embedding file into [k, width] float32 vectors, or refuse with one line.

    `model` (else the base model the file's metadata names, else the released SDXL widths) is what an
    SDXL file's clip_l/clip_g widths must match.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in _FOLDER_FILES:
            if (path / candidate).is_file():
                return read_embedding_file(path / candidate, model)
        raise CrossinitError(f"{path} is a folder without learned_embeds.safetensors or learned_embeds.bin")
    try:
        data = untrusted.read_bytes(path, MAX_IMPORT_BYTES)
    except untrusted.TooLarge as exc:
        raise CrossinitError(
            f"{path} is {exc.size >> 20} MiB; an embedding file is a few KiB (is it a model checkpoint?)"
        ) from None
    except FileNotFoundError:
        raise CrossinitError(f"{path}: no such file") from None
    except OSError as exc:
        raise CrossinitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise CrossinitError(f"{path} is empty")
    head = data[:16]
    layout = None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        state, meta = _load_pickle(data, path), {"clip_skip": CLIP_SKIP_UNKNOWN}  # a pickle has no room to record it
    elif len(head) >= 9 and head[8:9] == b"{":
        state, meta = _load_safetensors(data, path)
    elif head.startswith(PNG_MAGIC):
        state, meta, layout = *_load_png(path), "a1111-png"
    else:
        raise CrossinitError(f"{path} is neither a safetensors file, a torch pickle nor a PNG embedding")
    found = _interpret(state, meta, path, model)
    found.layout = layout or found.layout
    if not found.family:
        found.family = _family_of(found, meta, model)
        found.family_inferred = bool(found.family) and meta.get("family") != found.family and _peek(model) is None
    found.clip_skip = _clip_skip_of(meta, found.family, path)
    return found


def _clip_skip_of(meta: dict[str, str], family: str, path: Path) -> int | None:
    """The clip skip a file's metadata records (1 when it records none; None when unknown: a pickle, or an
    export of an identity imported from one), checked as `learn --clip-skip` is."""
    told = meta.get("clip_skip", "1").strip()
    if told == CLIP_SKIP_UNKNOWN:  # an SDXL identity takes no clip skip: nothing is unknown about it
        return 1 if family in families.FAMILIES and families.get(family).multi else None
    if not (told.isascii() and told.isdigit()) or len(told) > 4 or int(told) < 1:  # not "²" or 10^5000
        raise CrossinitError(f"{path}: its metadata's clip_skip must be a whole number of at least 1, not {told!r}")
    clip_skip = int(told)
    if clip_skip > 1 and family in families.FAMILIES and families.get(family).multi:
        raise CrossinitError(f"{path}: its metadata records clip skip {clip_skip}, but an SDXL identity takes none")
    return clip_skip


def _family_of(found: Imported, meta: dict[str, str], model: str | None) -> str:
    """A single-encoder file's family: its metadata's, else the model's, else its width's (768, 1024)."""
    told = meta.get("family", "")
    if told in families.FAMILIES and not families.get(told).multi:
        return told
    peeked = _peek(model)
    if peeked is not None and not peeked.family.multi:
        return peeked.family.name
    return LEGACY_FAMILIES.get(found.widths[0], "")


def _peek(model: str | None) -> families.Peeked | None:
    if not model:
        return None
    try:
        return families.peek(model)
    except CrossinitError:
        return None


def _sdxl(state: dict[str, Any], meta: dict[str, str], where: str, model: str | None) -> Imported:
    """An SDXL embedding: clip_l [k, width 1] and clip_g [k, width 2], nothing else, the same k."""
    import numpy as np

    family = families.get("sdxl")
    keys = [e.key for e in family.encoders]
    if set(map(str, state)) != set(keys):
        found = ", ".join(sorted(map(str, state)))[:200]
        raise CrossinitError(f"{where}: an SDXL embedding holds exactly clip_l and clip_g, this one has {found}")
    parts = {k: check_vectors(_as_array(state[k], f"{where} ({k})"), f"{where} ({k})") for k in keys}
    counts = {k: v.shape[0] for k, v in parts.items()}
    if len(set(counts.values())) != 1:
        raise CrossinitError(f"{where}: clip_l has {counts['clip_l']} vectors but clip_g has {counts['clip_g']}")
    peeked = _peek(model or meta.get("base_model"))
    expected = peeked.widths if peeked is not None and peeked.family.multi and peeked.widths else family.real_widths
    widths = tuple(v.shape[1] for v in parts.values())
    if widths != tuple(expected):
        raise CrossinitError(
            f"{where}: clip_l/clip_g are {widths[0]}/{widths[1]} wide; an SDXL model's encoders are "
            f"{expected[0]}/{expected[1]}"
        )
    return Imported(
        np.asarray(parts["clip_l"]),
        "sdxl",
        meta.get("crossinit_name"),
        meta.get("base_model") or None,
        family="sdxl",
        parts=parts,
    )


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_png(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """AUTOMATIC1111's PNG embedding: its data (the .pt dict, or SDXL's clip_l/clip_g) and, for crossinit's
    own exports, the metadata its `crossinit` text chunk records."""
    import json

    from crossinit_cli import pngembed

    state, texts = pngembed.read(path)
    try:
        told = json.loads(texts.get("crossinit", "{}"))
    except ValueError:
        told = {}
    meta = {k: v for k, v in told.items() if isinstance(v, str)} if isinstance(told, dict) else {}
    return state, meta


def _load_safetensors(data: bytes, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A safetensors file's tensors (numpy) and metadata, from its bytes (read once: nothing is mapped)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, _SAFETENSORS_MAX_HEADER):
        raise CrossinitError(f"{path} is not a valid safetensors file (header length {header_len} > file size)")
    try:
        state = load(data)  # checks the header (offsets, dtypes, shapes, metadata all strings) before any tensor
        told = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise CrossinitError(f"{path} is not a valid safetensors file ({library_text(exc)})") from None
    meta = {str(k): str(v) for k, v in told.items()} if isinstance(told, dict) else {}
    return state, meta


def _load_pickle(data: bytes, path: Path) -> dict[str, Any]:
    """A torch file's (zip or legacy) or a bare pickle's dict, from its bytes: each pickle in it is screened
    (`untrusted.screen_pickle`) before torch's weights-only unpickler reads it."""
    import pickle
    import zipfile

    import torch

    if data[:2] == b"PK":
        # torch.load inflates every record in memory: 64 MiB of deflated zeros would be ~64 GiB.
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                records = archive.infolist()
                unpacked = sum(entry.file_size for entry in records)
                if unpacked > MAX_IMPORT_BYTES:
                    raise CrossinitError(
                        f"{path} unpacks to {unpacked >> 20} MiB; an embedding file is a few KiB (refused: a zip bomb?)"
                    )
                for entry in records:  # torch unpickles <archive>/data.pkl; every .pkl is screened
                    if entry.filename.endswith(".pkl"):
                        untrusted.screen_pickle(archive.read(entry), path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
            raise CrossinitError(f"{path} is not a readable torch file ({library_text(exc)})") from None
    else:  # torch's legacy format: five pickles one after another (magic, protocol, system, data, storages)
        try:
            untrusted.screen_pickle(data, path, pickles=5)
        except ValueError as exc:
            raise CrossinitError(f"{path} is not a readable torch file ({library_text(exc)})") from None
    try:
        # Original textual-inversion and older A1111 files pickle string_to_param as a ParameterDict: torch's
        # own allow-list admits that one class (rebuilt from plain data by nn.Module's __setstate__), nothing more.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CrossinitError(
            f"{path} was refused: it is a pickle that needs more than plain tensors to load "
            f"(possibly code); {library_text(exc, 120, prefer='GLOBAL')}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise CrossinitError(f"{path} is not a readable torch file ({library_text(exc)})") from None
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


def _interpret(state: dict[str, Any], meta: dict[str, str], path: Path, model: str | None = None) -> Imported:
    where = str(path)
    if "clip_l" in state or "clip_g" in state:
        return _sdxl(state, meta, where, model)
    if "string_to_param" in state:
        params = _parameters(state["string_to_param"])
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


def _parameters(params: Any) -> Any:
    """A ParameterDict's own dict of tensors, as A1111 reads it (`getattr(param_dict, '_parameters', ...)`:
    a ParameterDict pickled by torch 1.11 has no `_keys` and cannot be iterated by later versions)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return params
    if isinstance(params, torch.nn.ParameterDict):
        return vars(params).get("_parameters")
    return params


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
