"""Who reads what: for each export format and model family, which tools' own loaders read it fully or partly,
and where each tool sets clip skip. The "fits ..." line after an export, `--format`'s help, `export --json`'s
`read_by`, the clip-skip hints and docs/formats.md's two tables all come from these tables, which were checked
against the tools' own code (tests/test_readers.py runs each tool's loader, transcribed, on every format).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossinit_cli import families
from crossinit_cli.formats import FORMATS, REGISTRY, Imported

# ---- Who reads what -------------------------------------------------------------------------------------------
# One table, checked against each tool's own loader (docs/formats.md cites the code): the "fits" line after an
# export, `--format`'s help, `export --json`'s `read_by` and docs/formats.md's table all come from it.

TOOL_LABELS: dict[str, str] = {
    "a1111": "A1111",
    "forge": "Forge",
    "comfyui": "ComfyUI",
    "invokeai": "InvokeAI",
    "sdnext": "SD.Next",
    "diffusers": "diffusers",
    "official": "the official Cross Init code",
}
FULL, PARTIAL = "full", "partial"
_ALL = ("sd1", "sd2", "sdxl")
_ONE_ENCODER = ("sd1", "sd2")


@dataclass(frozen=True)
class Reader:
    """One tool's own loader reading a format: fully, or only partly (`note` says what it does instead)."""

    tool: str  # a TOOL_LABELS key
    level: str = FULL  # FULL or PARTIAL
    families: tuple[str, ...] = _ALL  # the identities' families it reads the format for
    note: str = ""  # for PARTIAL: what the tool does with the file
    qualifier: str = ""  # which of the tool's variants, where not all of them read it


_SAFETENSORS_READERS = (
    Reader("a1111"),
    Reader("forge"),
    Reader("comfyui"),
    Reader("invokeai"),
    Reader("sdnext"),
    Reader("diffusers"),
)
_OFFICIAL_PARTLY = "only its first vector, without a word"
INVOKEAI_TWO_TOKENS = (
    "not InvokeAI: its probe refuses a diffusers-layout file holding 2 or more tokens (NotAMatchError: "
    "unrecognized token dimension); for InvokeAI use --format invokeai (or a1111)"
)

READERS: dict[str, tuple[Reader, ...]] = {
    # {"emb_params"} / {"clip_l", "clip_g"}: every tool's safetensors branch.
    "a1111": _SAFETENSORS_READERS,
    "invokeai": _SAFETENSORS_READERS,
    # the .pt dict with string_to_param: A1111/Forge/InvokeAI/SD.Next/diffusers by that key, ComfyUI likewise.
    "a1111-pt": tuple(Reader(r.tool, families=_ONE_ENCODER) for r in _SAFETENSORS_READERS),
    # {"<name>": [k, width]}: one tensor, so A1111/Forge ("diffuser concepts"), ComfyUI and SD.Next read it;
    # InvokeAI's probe takes shape[0] (k) for the token width and refuses it. SDXL's is {"clip_l", "clip_g"}.
    "diffusers": (
        Reader("a1111"),
        Reader("forge"),
        Reader("comfyui"),
        Reader("invokeai", families=("sdxl",)),
        Reader("sdnext"),
        Reader("diffusers"),
    ),
    # {"<name>_v0": [width], "<name>_v1": ...}: A1111/Forge assert one term; diffusers refuses the state dict;
    # SD.Next lists .safetensors/.pt only; ComfyUI and InvokeAI take the first value.
    "official": (
        Reader("official", families=("sd2",)),
        Reader("comfyui", PARTIAL, _ONE_ENCODER, _OFFICIAL_PARTLY),
        Reader("invokeai", PARTIAL, _ONE_ENCODER, _OFFICIAL_PARTLY),
    ),
    # The sd-ti-embedding text chunk (or coded edges): A1111's and Forge's load_from_file only.
    # (Forge Neo's load_from_file takes .bin/.pt/.safetensors/.sft only.)
    "a1111-png": (Reader("a1111"), Reader("forge", qualifier="lllyasviel's, not Forge Neo")),
}


def readers(fmt: str, family: str = "") -> list[Reader]:
    """The tools whose own loaders read a `fmt` file of a `family` identity ("": of any family), full ones first."""
    found = [r for r in READERS.get(fmt, ()) if not family or family in r.families]
    return sorted(found, key=lambda r: r.level != FULL)


def read_by(fmt: str, family: str = "") -> list[str]:
    """The tools (TOOL_LABELS keys) that read a `fmt` file of a `family` identity fully."""
    return [r.tool for r in readers(fmt, family) if r.level == FULL]


def read_partly_by(fmt: str, family: str = "") -> list[dict[str, str]]:
    """The tools that load a `fmt` file of a `family` identity only partly, each with what it does instead."""
    return [{"tool": r.tool, "note": r.note} for r in readers(fmt, family) if r.level != FULL]


def _labels(keys: list[str], fmt: str = "") -> str:
    """The tools' names in words; with `fmt`, each with its qualifier for that format."""
    qualified = {r.tool: r.qualifier for r in READERS.get(fmt, ()) if r.qualifier}
    names = [TOOL_LABELS[k] + (f" ({qualified[k]})" if k in qualified else "") for k in keys]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def fits(fmt: str, family: str) -> str | None:
    """The "fits ..." line after an export: the checkpoints it fits and the tools that read this file."""
    if family not in families.FAMILIES:
        return None
    line = families.get(family).checkpoints
    full, partial = read_by(fmt, family), read_partly_by(fmt, family)
    if full:
        line += f" in {_labels(full, fmt)}"
    for note in dict.fromkeys(p["note"] for p in partial):
        line += f"; partly in {_labels([p['tool'] for p in partial if p['note'] == note])} ({note})"
    if fmt == "diffusers" and "invokeai" not in full:
        line += f"; {INVOKEAI_TWO_TOKENS}"
    return line


def format_help() -> str:
    """`export --format`'s help: each format with the tools that read it."""
    lines = []
    for name in FORMATS:
        own = _ONE_ENCODER if REGISTRY[name].single_encoder else _ALL
        narrower = [r for r in readers(name) if r.level == FULL and set(r.families) < set(own)]
        full = [r.tool for r in readers(name) if r.level == FULL and r not in narrower]
        partial = [p["tool"] for p in read_partly_by(name)]
        who = [_labels(full, name)] if full else []
        who += [
            f"{TOOL_LABELS[r.tool]} for {', '.join(families.get(f).title for f in r.families)} only" for r in narrower
        ]
        if partial:
            who.append(f"{_labels(partial)} partly")
        lines.append(f"{name} ({'; '.join(who)})")
    return "File layout: " + ", ".join(lines) + " (docs/formats.md; default: what -o's suffix names, else a1111)."


def identity_clip_skip(ident: Any) -> int | None:
    """A library identity's clip skip, None where it is unknown (store.Identity.clip_skip_unknown)."""
    return None if getattr(ident, "clip_skip_unknown", None) else ident.clip_skip


def export_facts(fmt: str, family: str, clip_skip: int | None) -> dict[str, Any]:
    """What `export --json` says about a `fmt` file of a `family` identity besides where it went: the checkpoints
    and tools it fits, the tools that read it fully (`read_by`) and partly, and its clip skip (None: unknown)."""
    return {
        "fits": fits(fmt, family),
        "read_by": read_by(fmt, family),
        "read_partly_by": read_partly_by(fmt, family),
        "clip_skip": clip_skip,
    }


def import_note(found: Imported, path: Path) -> str | None:
    """The one line an import prints about what the file could not tell (None: nothing to say)."""
    if found.clip_skip is None:
        return (
            f"{path.name} cannot record clip skip (a pickle has no metadata): recorded as unknown; set your tool's "
            "clip skip as the embedding's author says"
        )
    return None


# ---- Where each tool sets clip skip ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSkipSetting:
    """Where a tool sets clip skip, what it calls crossinit's clip skip N, and whether it applies it to SD 2.x
    and SDXL models (checked against its code; docs/formats.md cites it)."""

    tool: str  # a TOOL_LABELS key
    where: str  # the setting, in the tool's words; {value} is what to set it to
    value: Callable[[str, int], str]  # (family, N) -> the value to set there
    sd2: bool  # applies it to SD 2.x models
    sdxl: str  # how it treats SDXL models, in words
    source: str  # the code it was read from
    sd2_how: str = "yes, as SD 1.x"  # how it applies it to SD 2.x, in words (docs/formats.md)

    def setting(self, family: str, clip_skip: int) -> str:
        """The setting for an identity of `family` learned at `clip_skip`, with its value."""
        return self.where.format(value=self.value(family, clip_skip))


CLIP_SKIP_SETTINGS: tuple[ClipSkipSetting, ...] = (
    ClipSkipSetting(
        "a1111",
        "Settings > Stable Diffusion > Clip skip {value}",
        lambda family, n: str(n),
        False,
        "only with Settings > Stable Diffusion > Clip skip SDXL on, and only to clip_l",
        "modules/sd_hijack_clip.py, modules/sd_hijack_open_clip.py",
        "no: its OpenCLIP encode_with_transformers leaves CLIP_stop_at_last_layers unused",
    ),
    ClipSkipSetting(
        "forge",
        "Clip skip slider {value} (top of the page)",
        lambda family, n: str(n),
        True,
        "from 3 up (its SDXL engines read at least layer -2: 1 and 2 are the same)",
        "backend/text_processing/classic_engine.py, backend/diffusion_engine/sd20.py and sdxl.py",
        "yes, as SD 1.x: hidden_states[-N] through the final layer norm",
    ),
    ClipSkipSetting(
        "comfyui",
        "CLIP Set Last Layer {value}",
        lambda family, n: str(-(n + 1) if family == "sd2" else -n),
        True,
        "yes, to both encoders (-2 is SDXL's own layer)",
        "comfy/sd1_clip.py, comfy/sd2_clip.py, comfy/sdxl_clip.py",
        "yes, at -(N+1): its SD 2.x encoder keeps the 24th layer SD 2.x leaves out",
    ),
    ClipSkipSetting(
        "invokeai",
        "Generate > Advanced > CLIP Skip {value}",
        lambda family, n: str(n - 1),
        True,
        "no (its SDXL graph adds no clip_skip node)",
        "invokeai/backend/model_patcher.py apply_clip_skip (removes that many last layers), "
        "frontend buildSD1Graph.ts (SD 1.x and 2.x), buildSDXLGraph.ts",
    ),
    ClipSkipSetting(
        "sdnext",
        "Settings > Pipeline Modifiers > CLiP skip enabled, then Advanced > CLiP skip {value}",
        lambda family, n: str(n),
        True,
        "yes, counted from SDXL's own penultimate layer (its N reads hidden_states[-(N+1)])",
        "modules/prompt_parser_diffusers.py (prepare_embedding_providers, compel_hijack), modules/ui_sections.py",
    ),
)


def clip_skip_hint(family: str, clip_skip: int | None, tools: Iterable[str] | None = None) -> str | None:
    """How to sample an identity learned at `clip_skip` > 1 in `tools` (default: every tool in the table):
    each tool's setting and value, or that it applies none to that family. None at clip skip 1; for an
    unknown clip skip (an import from a file that cannot record it), a line saying so."""
    if clip_skip is None:
        return (
            "clip skip unknown: it was imported from a file that cannot record it; set your tool's clip skip as "
            "the embedding's author says"
        )
    if clip_skip <= 1:
        return None
    wanted = set(tools) if tools is not None else None
    settings = [s for s in CLIP_SKIP_SETTINGS if wanted is None or s.tool in wanted]
    if not settings:
        return None
    parts, without = [], []
    for setting in settings:
        if family == "sd2" and not setting.sd2:
            without.append(TOOL_LABELS[setting.tool])
            continue
        parts.append(f"{TOOL_LABELS[setting.tool]}: {setting.setting(family, clip_skip)}")
    if without:
        parts.append(f"{' and '.join(without)} {'applies' if len(without) == 1 else 'apply'} no clip skip to SD 2.x")
    return f"learned at clip skip {clip_skip}: " + "; ".join(parts)


# What each tool's embeddings folder reads, per model family (tools.py finds the folder): the format whose
# `tools` name it. SDXL identities go as the A1111 layout's SDXL form, {"clip_l", "clip_g"}, which A1111,
# Forge, ComfyUI, InvokeAI and SD.Next read (SD.Next matches each tensor to a text encoder by width; see
# docs/formats.md).
# ---- docs/formats.md's tables, generated (tests/test_readers.py checks the doc holds them as written here) ------


def readers_table() -> str:
    """The per-format readers table of docs/formats.md, in Markdown."""
    tools = [t for t in TOOL_LABELS if any(r.tool == t for rs in READERS.values() for r in rs)]
    rows = ["| format | " + " | ".join(TOOL_LABELS[t] for t in tools) + " |", "| --- |" + " --- |" * len(tools)]
    for name in FORMATS:
        cells = []
        for tool in tools:
            found = [r for r in READERS[name] if r.tool == tool]
            if not found:
                cells.append("no")
                continue
            reader = found[0]
            scope = "" if reader.families == _ALL else f" ({', '.join(families.get(f).title for f in reader.families)})"
            qualifier = f" ({reader.qualifier})" if reader.qualifier else ""
            cells.append(("yes" if reader.level == FULL else f"partly: {reader.note}") + scope + qualifier)
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def clip_skip_table() -> str:
    """The per-tool clip-skip table of docs/formats.md, in Markdown (N: the identity's clip skip)."""
    rows = [
        "| tool | where (for clip skip N) | SD 1.x | SD 2.x | SDXL | read in |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in CLIP_SKIP_SETTINGS:
        where = s.where.format(value=_symbolic(s))
        rows.append(f"| {TOOL_LABELS[s.tool]} | {where} | yes | {s.sd2_how} | {s.sdxl} | {s.source} |")
    return "\n".join(rows)


def _symbolic(setting: ClipSkipSetting) -> str:
    """A setting's value for clip skip N, written with N (from its values at 2 and 3)."""
    two, three = int(setting.value("sd1", 2)), int(setting.value("sd1", 3))
    sign = "-" if three < two else ""
    offset = abs(two) - 2
    return f"{sign}N" + (f" {'+' if offset > 0 else '-'} {abs(offset)}" if offset else "")
