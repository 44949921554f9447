"""`eval`: the CLI around `crossinit_cli.evaluating`: prompts read, a progress bar, tables or one JSON document out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.markup import escape
from rich.table import Table

from crossinit_cli import evaluating, likeness, snapshots, ui
from crossinit_cli import fidelity as prompts_engine
from crossinit_cli import scoring as engine
from crossinit_cli.commands.common import read_source, stderr_progress
from crossinit_cli.evaluating import EvalOptions
from crossinit_cli.store import Identity, Library

__all__ = ["EvalOptions", "evaluate_command", "verdict"]


def evaluate_command(library: Library, names: list[str], options: EvalOptions) -> int:
    """`eval NAMES`: score the identities (or one's snapshots) with a progress bar, then report."""
    evaluating.check_options(names, options)
    templates = None if options.prompts is None else _read_templates(options.prompts)
    request = evaluating.request(library, names, options, templates)
    total = evaluating.image_count(names, request)
    origin = evaluating.model_origin(library, names, options)
    if request.snapshot_steps is not None:
        with _progress(options.quiet, total) as bar:
            scores = evaluating.snapshots(
                library, names[0], request, bar.hooks(), pick_best=options.pick_best, model_origin=origin
            )
        return _snapshot_report(scores, as_json=options.as_json)
    with _progress(options.quiet, total) as bar:
        scored = evaluating.identities(library, names, request, bar.hooks(), model_origin=origin)
    records = [s.record for s in scored]
    code = _identity_report(records, options)
    unmeasured = evaluating.nothing_measured(records)
    if code == 0 and unmeasured is not None:  # the report is printed; a script still learns nothing was measured
        ui.error(unmeasured)
        return 1
    return code


def _identity_report(records: list[dict[str, Any]], options: EvalOptions) -> int:
    """The tables and verdicts of the stored evaluations, and the --fail-below gate."""
    if options.as_json:
        ui.print_json(records)
        return _gate(records, options.fail_below)
    if options.compare:
        ui.out().print(_compare_table(records))
    else:
        for record in records:
            ui.out().print(_identity_table(record))
    for record in records:
        for line in verdict(record):
            ui.out().print(escape(line))
    for record in records:
        ui.info(f"contact sheet of [bold]{escape(record['name'])}[/]: {escape(record['contact_sheet'])}")
    ui.info("stored with each identity; see `crossinit show NAME` and docs/eval.md for what each number means")
    return _gate(records, options.fail_below)


def _snapshot_report(scores: evaluating.SnapshotScores, *, as_json: bool) -> int:
    ident, records, picked, unmeasured = scores.identity, scores.records, scores.picked, scores.not_picked
    if as_json:
        report = {"name": ident.name, "snapshots": records, "active_step": ident.active_step, "picked": picked}
        if unmeasured:
            report["not_picked"] = unmeasured
        ui.print_json(report)
        if unmeasured:
            _nothing_picked(ident, unmeasured)
        return 0
    table = Table(title=f"snapshots of <{escape(ident.name)}>", title_justify="left")
    for column in ("step", "loss", "faces found", "same person", "likeness", "CLIP score", ""):
        table.add_column(column, justify="right" if column else "left", no_wrap=not column)
    for record in records:
        step = record["step"]
        mark = "picked, active" if step == picked else ("active" if record["active"] else "")
        table.add_row(
            f"{step}" + (" (final)" if step == scores.last else ""),
            _num(record["loss"]),
            _share(record["face_rate"]),
            _share(record["same_person_rate"]),
            _num(record["likeness"]),
            _num(record["prompt_fidelity"]),
            mark,
        )
    ui.out().print(table)
    if picked is not None:
        which = "the final vectors" if picked == scores.last else f"the snapshot at step {picked}"
        ui.info(
            f"[bold]{escape(ident.name)}[/] now uses {which} (best trade-off: likeness within "
            f"{snapshots.LIKENESS_KEEP:.0%} of the best, then prompt fidelity); undo: crossinit edit "
            f"{escape(ident.name)} --use-snapshot final"
        )
    elif unmeasured:
        _nothing_picked(ident, unmeasured)
    else:
        ui.info(f"stored with each snapshot; make one active: crossinit edit {escape(ident.name)} --use-snapshot STEP")
    return 0


def _nothing_picked(ident: Identity, why: str) -> None:
    """`--pick-best` with nothing measured: say that it changed nothing, and why."""
    which = f"the snapshot at step {ident.active_step}" if ident.active_step else "the final vectors"
    ui.warn(f"--pick-best changed nothing: {why}; {ident.name} still uses {which}")


EXIT_BELOW = 3
"""`eval --fail-below X`: some identity's likeness is below X (docs/exit-codes.md)."""


def _gate(records: list[dict[str, Any]], fail_below: float | None) -> int:
    """Exit status 3 when an identity's likeness is below `--fail-below` (or could not be measured)."""
    failed = evaluating.failing(records, fail_below)
    for record in failed:
        likeness = record.get("likeness")
        if likeness is None:
            ui.error(f"likeness of <{record['name']}> could not be measured, so it cannot pass --fail-below")
        else:
            ui.error(f"likeness of <{record['name']}> is {likeness:.2f}, below --fail-below {fail_below:g}")
    return EXIT_BELOW if failed else 0


def verdict(record: dict[str, Any]) -> list[str]:
    """The evaluation of one identity in words a person reads: does it look like them, and how much."""
    name = record["name"]
    ident = record["identity"]
    if not ident.get("available"):
        lines = [f"<{name}>: likeness not measured ({ident.get('reason')})"]
    else:
        images, faces, same = ident["images"], ident["faces"], ident["same_person"]
        reference = ident.get("reference") or {}
        if not faces:
            lines = [
                f"<{name}>: no face found in any of the {images} images, so nothing looks like {name} (likeness 0)"
            ]
        else:
            lines = [
                f"<{name}>: looks like {name} in {same} of {images} images "
                f"(a face in {faces}; same person by dlib's {likeness.SAME_PERSON_DISTANCE} distance)"
            ]
            if reference.get("kind") == "threshold":
                lines.append(
                    f"  likeness {record['likeness']:.2f}: 1.0 is dlib's same-person threshold (only one photo of "
                    f"{name} has a face, so there is no pair to measure {name}'s own ceiling; learn from more photos)"
                )
            else:
                lines.append(
                    f"  likeness {record['likeness']:.2f}: the generated faces are {record['likeness']:.0%} as "
                    f"similar to {name}'s photos as those {reference.get('photos')} photos are to each other"
                )
        if record.get("crossover"):
            lines.append(
                f"  {record['crossover']} face(s) in pictures with other identities look more like one of them "
                f"than like {name} (crossover)"
            )
    fidelity = record.get("prompt_fidelity")
    if fidelity is None:
        lines.append("  prompt fidelity: not measured (no CLIP model)")
    else:
        lines.append(f"  prompt fidelity (CLIP, identity word left out): {fidelity:.3f} (0.2 to 0.35 is usual)")
    return lines


def _read_templates(prompts: str) -> list[str]:
    text = read_source(prompts, "prompts", "one a line, {} where the identity goes")
    return prompts_engine.read_prompts(text, "stdin" if prompts == "-" else prompts)


# ---- tables -------------------------------------------------------------------------------------


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def _identity_table(record: dict[str, Any]) -> Table:
    ident, fidelity = record["identity"], record["fidelity"]
    settings = record["settings"]
    table = Table(
        title=f"<{escape(record['name'])}>  ·  {escape(str(settings['model']))}  ·  n={settings['n']} "
        f"seed={settings['seed']} steps={settings['steps']}",
        title_justify="left",
    )
    table.add_column("prompt", overflow="fold")
    table.add_column("faces", justify="right")
    table.add_column("looks like them", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("CLIP score", justify="right")
    for entry in record["prompts"]:
        faces = "—" if entry["faces"] is None else f"{entry['faces']}/{entry['images']}"
        same = "—" if entry.get("same_person") is None else f"{entry['same_person']}/{entry['images']}"
        if entry.get("crossover"):
            same += f" ({entry['crossover']} crossed)"
        table.add_row(
            escape(prompts_engine.fill(entry["prompt"], record["name"])),
            faces,
            same,
            _num(entry.get("similarity")),
            _num(entry["clip_score"]),
        )
    faces = f"{ident['faces']}/{ident['images']}" if ident["available"] else "—"
    same = f"{ident['same_person']}/{ident['images']}" if ident["available"] else "—"
    table.add_row(
        "[bold]all[/]",
        f"[bold]{faces}[/]",
        f"[bold]{same}[/]",
        f"[bold]{_num(ident.get('similarity'))}[/]",
        f"[bold]{_num(fidelity.get('clip_score'))}[/]",
        end_section=True,
    )
    if record.get("likeness") is not None:
        table.add_row(
            f"likeness (÷ {_num(record['reference_similarity'])}, {escape(record['name'])}'s own ceiling)",
            "",
            "",
            f"[bold]{record['likeness']:.2f}[/]",
            "",
        )
    return table


def _compare_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="side by side (same prompts, same seeds)", title_justify="left")
    table.add_column("")
    for record in records:
        table.add_column(f"<{escape(record['name'])}>", justify="right", overflow="fold")

    def row(label: str, values: list[str], **kwargs: Any) -> None:
        table.add_row(label, *values, **kwargs)

    row("base model", [escape(str(r["settings"]["model"])) for r in records])
    row("strength", [f"{r['settings']['strength']:g}" for r in records])
    row("faces found", [_share(r["identity"].get("face_rate")) for r in records])
    row("likeness (1.0 = own ceiling)", [_num(r.get("likeness")) for r in records])
    row("identity similarity", [_num(r.get("identity_similarity")) for r in records])
    row("reference (ceiling)", [_num(r.get("reference_similarity")) for r in records])
    row("identity cosine", [_num(r["identity"].get("cosine")) for r in records])
    row("dlib distance", [_num(r["identity"].get("distance")) for r in records])
    row(f"same person (< {likeness.SAME_PERSON_DISTANCE})", [_share(r.get("same_person_rate")) for r in records])
    row("prompt fidelity (CLIP)", [_num(r["fidelity"].get("clip_score")) for r in records], end_section=True)
    # A prompt naming several identities is in the records of those it names only.
    prompts = list(dict.fromkeys(p["prompt"] for r in records for p in r["prompts"]))
    for prompt in prompts:
        cells = []
        for record in records:
            other = next((p for p in record["prompts"] if p["prompt"] == prompt), None)
            cells.append(
                "—" if other is None else f"sim {_num(other.get('similarity'))} · CLIP {_num(other['clip_score'])}"
            )
        row(escape(prompt), cells)
    return table


def _share(value: Any) -> str:
    return "—" if value is None else f"{value:.0%}"


# ---- progress -----------------------------------------------------------------------------------


class _ImageProgress:
    """The eval progress bar: one tick per generated image, the model being loaded as its description."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("images", total=total) if progress else None

    @contextmanager
    def loading(self, what: str) -> Iterator[None]:
        if self.progress is None:
            yield
            return
        self.progress.update(self.task, description=f"loading {escape(what)}")
        yield

    def hooks(self) -> engine.EvalHooks:
        """What the engine calls: warnings on stderr, a tick per image, the model loading as the description."""
        return engine.EvalHooks(notify=ui.warn, on_image=self.image, on_load=self.loading)

    def image(self, name: str, prompt: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=escape(prompt[:40]))


@contextmanager
def _progress(quiet: bool, total: int) -> Iterator[_ImageProgress]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    progress = stderr_progress(
        quiet,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    if progress is None:
        yield _ImageProgress(None, total)
        return
    with progress:
        yield _ImageProgress(progress, total)
