"""`generate --manifest FILE.jsonl` as the engine sees it: the lines parsed and checked, every one before
the model loads (a typo costs nothing), with what a line leaves out taken from the command's flags.

Each line is a JSON object: `prompt` and any of `seed`, `n`, `size`, `steps`, `guidance`, `negative`,
`scheduler`, `out`, `clip_skip`. A bad line goes to the caller's `on_bad(number, message)`, which skips it
or raises; the lines then run through `generation.LoadedRun.images`, one pipeline call per image.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossinit_cli import devices, pngfiles, sample
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError
from crossinit_cli.generation import (
    Choices,
    GenerateHooks,
    LoadRequest,
    PromptJob,
    SamplingFlags,
    apply_template,
    check_one_family,
    choose_clip_skip,
    hint_plain_names,
    resolve_identities,
    warn_other_model,
)
from crossinit_cli.store import Identity, Library

KEYS = ("prompt", "seed", "n", "size", "steps", "guidance", "negative", "scheduler", "out", "clip_skip")
OnBad = Callable[[int, str], None]


@dataclass
class Line:
    """One manifest line, checked, with the command's flags filled in."""

    number: int
    job: PromptJob
    choices: Choices
    out: Path


@dataclass
class ManifestPlan:
    """The lines that can run, and what loading the model for them takes."""

    lines: list[Line]
    skipped: int  # lines refused before the model loads
    total: int  # every line of the manifest
    load: LoadRequest


def manifest_lines(text: str, source: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank, non-# line of the manifest's `text`."""
    found = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
    found = [(i, line) for i, line in found if line and not line.startswith("#")]
    if not found:
        raise CrossinitError(f"no lines in manifest {'stdin' if source == '-' else source}")
    return found


def _shown(value: Any, limit: int = 60) -> str:
    """A value as the line wrote it, for an error: cut to `limit` characters (a 4,000-digit number, a list
    of thousands); a huge integer by its size (json.dumps itself refuses one past 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return "a number of more than 60 digits"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CrossinitError(f"{key!r} must be a whole number from {low} to {high}, not {_shown(value)}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise CrossinitError(f"{key!r} must be a string, not {_shown(value)}")
    return value


def _object(text: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CrossinitError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError:  # an integer past Python's 4,300-digit limit for reading one
        raise CrossinitError("a number with thousands of digits; no value here needs more than 20") from None
    except RecursionError:
        raise CrossinitError("nested too deeply to read") from None
    if not isinstance(raw, dict):
        raise CrossinitError('a line must be a JSON object such as {"prompt": "<alice> at the beach"}')
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise CrossinitError(f"unknown key(s) {', '.join(map(repr, unknown))}; a line may hold {', '.join(KEYS)}")
    if "prompt" not in raw:
        raise CrossinitError("no 'prompt'")
    return raw


@dataclass(frozen=True)
class LineContext:
    """What every line is read against: the flags, the library, the default folder, where warnings go."""

    defaults: SamplingFlags
    library: Library
    fallback_out: Path
    warn: Callable[[str], None] | None = None


def parse_line(number: int, text: str, context: LineContext) -> Line:
    """One line as a Line, or a CrossinitError saying what is wrong with it (without its number)."""
    raw = _object(text)
    defaults, library = context.defaults, context.library
    default = library.get(defaults.identity) if defaults.identity else None
    prompt = apply_template(_text(raw["prompt"], "prompt").strip(), default)
    if not prompt:
        raise CrossinitError("'prompt' is empty")
    negative = _text(raw.get("negative", defaults.negative or ""), "negative")
    known = resolve_identities(library, [prompt, negative])
    check_one_family(known.values())
    named = [known[sample.ref_key(r)] for r in sample.identity_refs(prompt)]
    n = _int(raw.get("n", defaults.n), "n", 1, 10_000)
    seed = raw.get("seed", defaults.seed)
    seed = secrets.randbelow(2**32) if seed is None else _int(seed, "seed", 0, sample.MAX_SEED - (n - 1))
    size = raw.get("size", defaults.size)
    steps = _int(raw.get("steps", defaults.steps or sample.DEFAULT_STEPS), "steps", 1, 10_000)
    guidance = raw.get("guidance", sample.DEFAULT_GUIDANCE if defaults.guidance is None else defaults.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise CrossinitError(f"'guidance' must be a number, not {_shown(guidance)}")
    scheduler = _text(raw.get("scheduler", defaults.scheduler or sample.DEFAULT_SCHEDULER), "scheduler")
    sample.scheduler_choice(scheduler)
    out = Path(_text(raw["out"], "out")).expanduser() if "out" in raw else defaults.out or context.fallback_out
    given = raw.get("clip_skip", defaults.clip_skip)
    given = None if given is None else _int(given, "clip_skip", 1, 1000)
    choices = Choices(
        seeds=[seed + i for i in range(n)],
        steps=steps,
        guidance=float(guidance),
        negative=negative,
        scheduler=scheduler.strip().lower(),
        size=None if size is None else sample.parse_size(_text(size, "size")),
        clip_skip=choose_clip_skip(given, known.values(), f"line {number}: ", warn=context.warn),
    )
    return Line(number, PromptJob(prompt, named, pngfiles.file_slug(prompt, named), number), choices, out)


def plan_manifest(
    library: Library, text: str, source: str, flags: SamplingFlags, run: RunOptions, hooks: GenerateHooks, on_bad: OnBad
) -> ManifestPlan:
    """Every line of the manifest's `text` parsed and checked before the model loads; each bad one goes to
    `on_bad` (which skips it or raises). A CrossinitError when none can run."""
    context = LineContext(flags, library, Path(run.output_dir).expanduser(), hooks.warn)
    lines, skipped = _parsed_lines(manifest_lines(text, source), context, hooks, on_bad)
    named = _named(library, lines)
    check_one_family(named)  # one model for every line, as for generate's prompts
    model = run.model_for(named)
    total = len(lines) + skipped
    devices.check_model_reference(model)
    placement = devices.resolve(run.device, run.dtype)
    checked, unrunnable = _runnable_lines(lines, model, on_bad)
    skipped += unrunnable
    if not checked:
        raise CrossinitError(f"none of the {skipped} line(s) of the manifest can be run")
    identities = _named(library, checked)
    warn_other_model(identities, model, hooks.warn)
    vectors = {i.name: library.effective_parts(i.name) for i in identities}
    return ManifestPlan(checked, skipped, total, LoadRequest(model, placement, vectors))


def _named(library: Library, lines: list[Line]) -> list[Identity]:
    """Every identity the lines name, in their prompts or negative prompts."""
    named = {i.name: i for line in lines for i in line.job.identities}
    for line in lines:
        named.update({i.name: i for i in resolve_identities(library, [line.choices.negative]).values()})
    return list(named.values())


def _parsed_lines(
    numbered: list[tuple[int, str]], context: LineContext, hooks: GenerateHooks, on_bad: OnBad
) -> tuple[list[Line], int]:
    """Every line parsed and checked, before the model loads; and how many were skipped."""
    lines: list[Line] = []
    skipped = 0
    for number, text in numbered:
        try:
            line = parse_line(number, text, context)
        except CrossinitError as exc:
            on_bad(number, str(exc))
            skipped += 1
            continue
        lines.append(line)
    hint_plain_names(context.library, [line.job.prompt for line in lines], hooks.hint)  # one listing for all
    return lines, skipped


def _runnable_lines(lines: list[Line], model: str, on_bad: OnBad) -> tuple[list[Line], int]:
    """The lines whose identities fit the model's text encoder and whose output folder is writable."""
    width = sample.peek_text_width(model)
    checked: list[Line] = []
    skipped = 0
    for line in lines:
        try:
            sample.check_clip_skip(model, line.choices.clip_skip)
            for ident in line.job.identities:
                if width is not None:
                    devices.check_width(ident.name, ident.width, model, width)
            pngfiles.prepare_out_dir(line.out)
        except CrossinitError as exc:
            on_bad(line.number, str(exc))
            skipped += 1
            continue
        checked.append(line)
    return checked, skipped
