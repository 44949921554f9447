"""`generate --manifest FILE.jsonl`: many generations with different settings, one model load.

Each line is a JSON object: `prompt` and any of `seed`, `n`, `size`, `steps`, `guidance`, `negative`,
`scheduler`, `out`; what a line leaves out comes from the command's own flags, then generate's defaults.
Every line is checked before the model loads (a typo costs nothing); a bad line is reported on stderr with
its number and skipped (`--on-error skip`: the run then ends with a summary line and exit status 4) or ends
the run with exit 1 (`--on-error stop`). One JSON object
a line goes to stdout per image, flushed as soon as the image is on disk, so a pipe sees progress.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from crossinit_cli import devices, sample, ui
from crossinit_cli.commands.common import partial_failure, read_source
from crossinit_cli.commands.generate import (
    PromptJob,
    SamplingFlags,
    Written,
    apply_template,
    choose_clip_skip,
    file_slug,
    hint_plain_names,
    loading_status,
    png_metadata,
    prepare_out_dir,
    resolve_identities,
    run_record,
    sampling_progress,
    save_png,
    warn_other_model,
)
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library

KEYS = ("prompt", "seed", "n", "size", "steps", "guidance", "negative", "scheduler", "out", "clip_skip")
ON_ERROR = ("skip", "stop")


@dataclass
class Line:
    """One manifest line, checked, with the command's flags filled in."""

    number: int
    job: PromptJob
    n: int
    seed: int
    size: tuple[int, int] | None
    steps: int
    guidance: float
    negative: str
    scheduler: str
    out: Path
    clip_skip: int = 1


def read_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank, non-# line of FILE or stdin ('-')."""
    text = read_source(source, "the manifest", "one JSON object a line")
    found = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
    found = [(i, line) for i, line in found if line and not line.startswith("#")]
    if not found:
        raise CrossinitError(f"no lines in manifest {'stdin' if source == '-' else source}")
    return found


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CrossinitError(f"{key!r} must be a whole number from {low} to {high}, not {json.dumps(value)}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise CrossinitError(f"{key!r} must be a string, not {json.dumps(value)}")
    return value


def parse_line(number: int, text: str, defaults: SamplingFlags, library: Library, fallback_out: Path) -> Line:
    """One line as a Line, or a CrossinitError saying what is wrong with it (without its number)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CrossinitError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise CrossinitError('a line must be a JSON object such as {"prompt": "<alice> at the beach"}')
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise CrossinitError(f"unknown key(s) {', '.join(map(repr, unknown))}; a line may hold {', '.join(KEYS)}")
    if "prompt" not in raw:
        raise CrossinitError("no 'prompt'")
    default = library.get(defaults.identity) if defaults.identity else None
    prompt = apply_template(_text(raw["prompt"], "prompt").strip(), default)
    if not prompt:
        raise CrossinitError("'prompt' is empty")
    negative = _text(raw.get("negative", defaults.negative or ""), "negative")
    known = resolve_identities(library, [prompt, negative])
    named = [known[sample.ref_key(r)] for r in sample.identity_refs(prompt)]
    n = _int(raw.get("n", defaults.n), "n", 1, 10_000)
    seed = raw.get("seed", defaults.seed)
    seed = secrets.randbelow(2**32) if seed is None else _int(seed, "seed", 0, sample.MAX_SEED - (n - 1))
    size = raw.get("size", defaults.size)
    steps = _int(raw.get("steps", defaults.steps or sample.DEFAULT_STEPS), "steps", 1, 10_000)
    guidance = raw.get("guidance", sample.DEFAULT_GUIDANCE if defaults.guidance is None else defaults.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise CrossinitError(f"'guidance' must be a number, not {json.dumps(guidance)}")
    scheduler = _text(raw.get("scheduler", defaults.scheduler or sample.DEFAULT_SCHEDULER), "scheduler")
    sample.scheduler_choice(scheduler)
    out = Path(_text(raw["out"], "out")).expanduser() if "out" in raw else defaults.out or fallback_out
    given = raw.get("clip_skip", defaults.clip_skip)
    given = None if given is None else _int(given, "clip_skip", 1, 1000)
    return Line(
        number=number,
        job=PromptJob(prompt, named, file_slug(prompt, named)),
        n=n,
        seed=seed,
        size=None if size is None else sample.parse_size(_text(size, "size")),
        steps=steps,
        guidance=float(guidance),
        negative=negative,
        scheduler=scheduler.strip().lower(),
        out=out,
        clip_skip=choose_clip_skip(given, known.values(), f"line {number}: "),
    )


def _bad_line(number: int, message: str, on_error: str) -> None:
    if on_error == "stop":
        raise CrossinitError(f"line {number}: {message}")
    ui.warn(f"line {number}: {message}; skipped")


def generate_manifest(
    library: Library, source: str, *, defaults: SamplingFlags, run: RunOptions, on_error: str = "skip"
) -> int:
    if on_error not in ON_ERROR:
        raise CrossinitError(f"--on-error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    lines, skipped = _parsed_lines(library, source, defaults, Path(run.output_dir).expanduser(), on_error)
    model = run.model_for(_named(library, lines))
    total_lines = len(lines) + skipped
    devices.check_model_reference(model)
    placement = devices.resolve(run.device, run.dtype)
    checked, unrunnable = _runnable_lines(lines, model, on_error)
    skipped += unrunnable
    if not checked:
        raise CrossinitError(f"none of the {skipped} line(s) of the manifest can be run")
    identities = _named(library, checked)
    warn_other_model(identities, model)
    vectors = {i.name: library.effective_vectors(i.name) for i in identities}

    # ---- one model load for the whole manifest -------------------------------------------------
    show = not run.quiet and ui.err().is_terminal
    with (
        loading_status(show, f"loading {escape(model)} on {placement.device} ({placement.dtype})"),
        ui.timed("model load"),
    ):
        pipe = sample.load(model, placement)
    mapping = sample.add_identities(pipe, vectors, model=model)
    native = sample.native_size(pipe)
    total = sum(line.n for line in checked)
    images_written = lines_done = 0
    stdout = sys.stdout  # the real one: on a terminal the bar redirects sys.stdout above itself, onto stderr
    try:
        with sampling_progress(show, total) as bar:
            for line in checked:
                try:
                    images_written += _run_line(pipe, line, mapping, native, model, placement, bar, stdout)
                    lines_done += 1
                except CrossinitError as exc:  # out of memory at this size ...: the other lines may still run
                    _bad_line(line.number, str(exc), on_error)
                    skipped += 1
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; the {images_written} image(s) already written are complete") from None
    if not lines_done:
        raise CrossinitError(f"all {total_lines} line(s) of the manifest failed; nothing was written")
    ui.info(
        f"wrote {images_written} image{'s' if images_written != 1 else ''} from {lines_done} line(s) with one "
        f"model load ({placement.device})" + (f"; {skipped} line(s) skipped" if skipped else "")
    )
    return partial_failure(skipped, total_lines, "lines")


def _named(library: Library, lines: list[Line]) -> list[Identity]:
    """Every identity the lines name, in their prompts or negative prompts."""
    named = {i.name: i for line in lines for i in line.job.identities}
    for line in lines:
        named.update({i.name: i for i in resolve_identities(library, [line.negative]).values()})
    return list(named.values())


def _parsed_lines(
    library: Library, source: str, defaults: SamplingFlags, fallback_out: Path, on_error: str
) -> tuple[list[Line], int]:
    """Every line parsed and checked, before the model loads; and how many were skipped."""
    lines: list[Line] = []
    skipped = 0
    for number, text in read_lines(source):
        try:
            line = parse_line(number, text, defaults, library, fallback_out)
        except CrossinitError as exc:
            _bad_line(number, str(exc), on_error)
            skipped += 1
            continue
        lines.append(line)
    hint_plain_names(library, [line.job.prompt for line in lines])  # one listing of the library for all
    return lines, skipped


def _runnable_lines(lines: list[Line], model: str, on_error: str) -> tuple[list[Line], int]:
    """The lines whose identities fit the model's text encoder and whose output folder is writable."""
    width = sample.peek_text_width(model)
    checked: list[Line] = []
    skipped = 0
    for line in lines:
        try:
            sample.check_clip_skip(model, line.clip_skip)
            for ident in line.job.identities:
                if width is not None:
                    devices.check_width(ident.name, ident.width, model, width)
            prepare_out_dir(line.out)
        except CrossinitError as exc:
            _bad_line(line.number, str(exc), on_error)
            skipped += 1
            continue
        checked.append(line)
    return checked, skipped


def _run_line(
    pipe: Any,
    line: Line,
    mapping: dict[str, Any],
    native: tuple[int, int],
    model: str,
    placement: devices.Placement,
    bar: Any,
    stdout: Any,
) -> int:
    """Sample one line's images, writing each and printing its JSON line as soon as it is on disk."""
    width, height = line.size or native
    sample.check_clip_skip(model, line.clip_skip, pipe)
    settings = sample.Settings(
        width=width,
        height=height,
        steps=line.steps,
        guidance=line.guidance,
        negative=sample.expand_prompt(line.negative, mapping),
        scheduler=line.scheduler,
        clip_skip=line.clip_skip,
    )
    run = run_record(settings, model, placement)
    expanded = sample.expand_prompt(line.job.prompt, mapping)
    for name in sample.truncated_identities(pipe, expanded, mapping):
        ui.warn(f"line {line.number}: <{name}> falls in the part of the prompt the text encoder cuts off")
    seeds = [line.seed + i for i in range(line.n)]
    bar.start(line.job.prompt, settings.steps)
    names = [i.name for i in line.job.identities]
    written = 0
    # One pipeline call per image, so that each image reaches the pipe the moment it exists.
    for i, seed in enumerate(seeds):
        with ui.timed(f"line {line.number}, image {i}"):
            (image,) = sample.sample(pipe, expanded, [seed], settings, on_step=bar.step)
        meta = png_metadata(line.job, expanded, line.negative, seed, line.seed, i, run)
        path = save_png(image, line.out, f"{line.job.slug}-{line.seed}-{i}", meta)
        record = Written("image", path, line.job.prompt, line.negative, seed, names, index=i)
        stdout.write(json.dumps({"line": line.number, **record.to_json(run)}, ensure_ascii=False) + "\n")
        stdout.flush()
        bar.images_done(1)
        written += 1
    return written
