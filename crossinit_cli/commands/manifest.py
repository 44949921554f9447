"""`generate --manifest FILE.jsonl`: many generations with different settings, one model load.

The engine (`generation_manifest`) reads and checks every line before the model loads and
`generation.LoadedRun.images` samples them; this module presents the run. A bad line is reported on
stderr with its number and skipped (`--on-error skip`: the run then ends with a summary line and exit
status 4) or ends the run with exit 1 (`--on-error stop`). One JSON object a line goes to stdout per
image, flushed as soon as the image is on disk, so a pipe sees progress.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

from crossinit_cli import generation, ui
from crossinit_cli.commands.common import (
    SamplingBar,
    generation_hooks,
    partial_failure,
    read_source,
    sampling_progress,
)
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError
from crossinit_cli.generation import GenerateHooks, LoadedRun, SamplingFlags
from crossinit_cli.generation_manifest import Line, plan_manifest
from crossinit_cli.store import Library

ON_ERROR = ("skip", "stop")


def generate_manifest(
    library: Library, source: str, *, defaults: SamplingFlags, run: RunOptions, on_error: str = "skip"
) -> int:
    if on_error not in ON_ERROR:
        raise CrossinitError(f"--on-error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    show = not run.quiet and ui.err().is_terminal
    heard = generation_hooks(show)
    text = read_source(source, "the manifest", "one JSON object a line")

    def on_bad(number: int, message: str) -> None:
        _bad_line(number, message, on_error)

    plan = plan_manifest(library, text, source, defaults, run, heard, on_bad)
    loaded = generation.load_run(plan.load, heard)  # one model load for the whole manifest
    skipped = plan.skipped
    images_written = lines_done = 0
    stdout = sys.stdout  # the real one: on a terminal the bar redirects sys.stdout above itself, onto stderr
    try:
        with sampling_progress(show, sum(len(line.choices.seeds) for line in plan.lines)) as bar:
            sampling = replace(heard, on_prompt=bar.start, on_step=bar.step)
            for line in plan.lines:
                try:
                    images_written += _run_line(loaded, line, sampling, bar, stdout)
                    lines_done += 1
                except CrossinitError as exc:  # out of memory at this size ...: the other lines may still run
                    _bad_line(line.number, str(exc), on_error)
                    skipped += 1
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; the {images_written} image(s) already written are complete") from None
    if not lines_done:
        raise CrossinitError(f"all {plan.total} line(s) of the manifest failed; nothing was written")
    ui.info(
        f"wrote {images_written} image{'s' if images_written != 1 else ''} from {lines_done} line(s) with one "
        f"model load ({loaded.placement.device})" + (f"; {skipped} line(s) skipped" if skipped else "")
    )
    return partial_failure(skipped, plan.total, "lines")


def _bad_line(number: int, message: str, on_error: str) -> None:
    if on_error == "stop":
        raise CrossinitError(f"line {number}: {message}")
    ui.warn(f"line {number}: {message}; skipped")


def _run_line(loaded: LoadedRun, line: Line, hooks: GenerateHooks, bar: SamplingBar, stdout: Any) -> int:
    """Sample one line's images, one pipeline call each, writing each and printing its JSON line as soon
    as it is on disk."""
    written = 0
    for image in loaded.images(line.job, line.choices, hooks, one_at_a_time=True):
        record = generation.write_image(image, line.out)
        stdout.write(json.dumps({"line": line.number, **record.to_json(image.record)}, ensure_ascii=False) + "\n")
        stdout.flush()
        bar.images_done(1)
        written += 1
    return written
