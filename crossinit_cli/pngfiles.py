"""Generated images as files: their names, their PNG metadata (A1111's `parameters` and crossinit's own),
the contact sheet, and saving under a unique name without ever overwriting or showing half a file.

Silent: values in, paths out, `CrossinitError` for a folder or file that cannot be written.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import devices, sample
from crossinit_cli._version import __version__
from crossinit_cli.atomic import TEMP_PREFIX, shared_mode
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, name_key

if TYPE_CHECKING:
    from PIL import Image

SLUG_CHARS = 48


@dataclass
class Written:
    """One file `generate` wrote, as `--json` reports it."""

    kind: str  # "image" or "grid"
    path: Path
    prompt: str
    negative_prompt: str
    seed: int
    identities: list[str]
    index: int | None = None
    images: list[str] = field(default_factory=list)

    def to_json(self, run: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "kind": self.kind,
            "path": str(self.path),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "identities": self.identities,
        }
        if self.kind == "image":
            record["index"] = self.index
        else:
            record["images"] = self.images
        return {**record, **run}


# ---- names --------------------------------------------------------------------------------------


def file_slug(prompt: str, identities: list[Identity]) -> str:
    """The file-name stem before `-<seed>-<index>`: the identities' names (joined by '+'), then a short ASCII
    slug of the prompt's own words (its `<name>`s left out, as they lead already), so prompts sampled with one
    seed stay apart: `alice-on-the-beach`. A prompt of nothing but names gives the names alone."""
    names = "+".join(i.name for i in identities)[:80]
    words = _words_slug(_refs_removed(prompt) if identities else prompt)
    if names:
        return f"{names}-{words}" if words else names
    return words or "image"


def _refs_removed(prompt: str) -> str:
    """`prompt` without its `<name>` references."""
    from crossinit_cli.sample import IDENTITY_REF

    return IDENTITY_REF.sub(" ", prompt)


def _words_slug(text: str) -> str:
    """Lower-case ASCII words joined by '-', cut at a word boundary to SLUG_CHARS."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if len(slug) > SLUG_CHARS:
        slug = slug[:SLUG_CHARS].rsplit("-", 1)[0]
    return slug


# ---- metadata -----------------------------------------------------------------------------------


def run_record(settings: sample.Settings, model: str, placement: devices.Placement) -> dict[str, Any]:
    """How images were sampled, as every image's PNG metadata and JSON record state it."""
    return {
        "steps": settings.steps,
        "guidance": settings.guidance,
        "scheduler": settings.scheduler,
        "sampler": sample.scheduler_choice(settings.scheduler).a1111,
        "width": settings.width,
        "height": settings.height,
        "clip_skip": settings.clip_skip,
        "model": model,
        "device": placement.device,
        "dtype": placement.dtype,
    }


def _quote(value: str) -> str:
    """A1111's infotext quoting: values with ',', ':' or newlines are JSON strings."""
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def a1111_parameters(prompt: str, negative: str, seed: int, run: dict[str, Any], identities: list[str]) -> str:
    """The `parameters` text chunk in AUTOMATIC1111's layout (read by A1111, ComfyUI, civitai, ...).

    `run` is the run's record: its steps, sampler, guidance, width, height and model."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = [
        f"Steps: {run['steps']}",
        f"Sampler: {run['sampler']}",
        f"CFG scale: {float(run['guidance'])}",
        f"Seed: {seed}",
        f"Size: {run['width']}x{run['height']}",
        f"Model: {_quote(run['model'])}",
    ]
    if run.get("clip_skip", 1) > 1:  # A1111 writes it only when it is not 1, and reads it back from here
        fields.append(f"Clip skip: {run['clip_skip']}")
    if identities:
        fields.append(f"Identities: {_quote(', '.join(identities))}")
    fields.append(f"Version: crossinit {__version__}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


@dataclass(frozen=True)
class ImageFacts:
    """What one image's metadata states beside the run's record."""

    prompt: str  # as written
    expanded: str  # with the identities' placeholder tokens
    negative: str  # as written
    seed: int
    batch_seed: int
    index: int | None  # None: the grid
    identities: tuple[Identity, ...] = ()


def png_metadata(facts: ImageFacts, run: dict[str, Any]) -> dict[str, Any]:
    """{"parameters": A1111's text, "crossinit": crossinit's own record} for one image (or grid)."""
    names = [i.name for i in facts.identities]
    parameters = a1111_parameters(facts.prompt, facts.negative, facts.seed, run, names)
    own = {
        "version": __version__,
        "prompt": facts.prompt,
        "expanded_prompt": facts.expanded,
        "negative_prompt": facts.negative,
        "seed": facts.seed,
        "batch_seed": facts.batch_seed,
        "index": facts.index,
        "identities": [
            {
                "name": i.name,
                "key": name_key(i.name),
                "strength": i.strength,
                "tokens": i.tokens,
                "width": i.width,
                "family": i.family,
                "base_model": i.base_model,
                "clip_skip": i.clip_skip,
            }
            for i in facts.identities
        ],
        **run,
    }
    return {"parameters": parameters, "crossinit": own}


# ---- files --------------------------------------------------------------------------------------


def prepare_out_dir(out: Path) -> Path:
    """Create the output folder and prove it is writable, before any model is loaded."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise CrossinitError(f"output folder {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CrossinitError(f"cannot write images to {out}: {exc.strerror or exc}") from None
    return out


def save_png(image: Image.Image, folder: Path, stem: str, meta: dict[str, Any]) -> Path:
    """Write `image` as `<stem>.png` (or `<stem>-1.png`, ... if taken) atomically; returns the path."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", meta["parameters"])
    info.add_text("crossinit", json.dumps(meta["crossinit"], ensure_ascii=False))
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".png", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, shared_mode())  # an image is for others to see: the umask's mode, not mkstemp's 0600
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        return _claim(tmp, folder, stem)
    except OSError as exc:
        raise CrossinitError(f"cannot write {folder / (stem + '.png')}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, folder: Path, stem: str) -> Path:
    """Give the finished temp file the first free name. A hard link fails if the name exists, so two
    processes writing into one folder can never overwrite each other's images."""
    counter = 0
    while True:
        target = folder / (f"{stem}-{counter}.png" if counter else f"{stem}.png")
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            counter += 1
        except OSError:
            # A filesystem without hard links (FAT, some network mounts): check-then-rename instead.
            if target.exists():
                counter += 1
                continue
            os.replace(tmp, target)
            return target


def contact_sheet(images: list[Image.Image]) -> Image.Image:
    """The batch on a near-square grid, in order, left to right."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return sheet
