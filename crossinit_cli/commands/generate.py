"""`generate`: prompts naming stored identities in, PNGs that record how they were made out.

The work is the engine's (`generation`: the checks before any model load, the pipeline loaded once for all
prompts, the images; `pngfiles`: names, metadata, saving without overwriting). This module presents it:
the spinner and progress bar, warnings and hints on stderr, each path as it is written, the summary line
or `--json`, and the message of a Ctrl-C that leaves finished files behind.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from crossinit_cli import generation, ui
from crossinit_cli.commands.common import generation_hooks, read_source, sampling_progress
from crossinit_cli.config import RunOptions
from crossinit_cli.generation import GeneratedImage, Plan, SamplingFlags
from crossinit_cli.pngfiles import Written
from crossinit_cli.store import Library

__all__ = ["SamplingFlags", "generate_images"]


def generate_images(
    library: Library, prompt: str | None, *, prompts: str | None, flags: SamplingFlags, run: RunOptions, grid: bool
) -> int:
    show = not run.quiet and ui.err().is_terminal
    heard = replace(generation_hooks(show), read=lambda source: read_source(source, "prompts", "one a line"))
    plan = generation.plan_run(library, prompt, prompts, flags, run, heard)
    loaded = generation.load_plan(plan, heard)
    written: list[Written] = []
    record: dict[str, Any] = {}
    try:
        with sampling_progress(show, len(plan.jobs) * len(plan.choices.seeds)) as bar:
            sampling = replace(heard, on_prompt=bar.start, on_step=bar.step)
            for job in plan.jobs:
                images: list[GeneratedImage] = []
                for image in loaded.images(job, plan.choices, sampling):
                    _written(generation.write_image(image, _folder(plan)), written, run)
                    images.append(image)
                record = images[0].record
                bar.images_done(len(images))
                if grid:
                    sheet = generation.write_grid(images, written[-len(images) :], _folder(plan))
                    _written(sheet, written, run)
    except KeyboardInterrupt:
        if written:
            raise KeyboardInterrupt(
                f"interrupted; the {len(written)} file(s) already written to {plan.out_dir} are complete"
            ) from None
        raise
    if run.as_json:
        ui.print_json([w.to_json(record) for w in written])
    else:
        _summary(plan, written)
    return 0


def _written(record: Written, written: list[Written], run: RunOptions) -> None:
    """Keep the record of a file just written, and say its path on stderr (unless --json)."""
    written.append(record)
    if not run.as_json:
        ui.err().print(escape(str(record.path)), soft_wrap=True)


def _folder(plan: Plan) -> Path:
    assert plan.out_dir is not None  # plan_run(write=True) made it
    return plan.out_dir


def _summary(plan: Plan, written: list[Written]) -> None:
    choices = plan.choices
    images_written = sum(w.kind == "image" for w in written)
    seeds = f"{choices.base_seed}{f'..{choices.seeds[-1]}' if len(choices.seeds) > 1 else ''}"
    ui.info(
        f"wrote {images_written} image{'s' if images_written != 1 else ''} to {escape(str(plan.out_dir))} "
        f"(seed {seeds}, {choices.steps} steps, {choices.sampler}, {plan.placement.device})"
    )
