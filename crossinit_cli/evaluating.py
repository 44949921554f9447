"""One `eval` run, whole: the options checked, the identities (or one identity's snapshots) scored by
`scoring`, each result stored with its identity, pick-best applied, and the --fail-below gate decided.

`commands/evaluate.py` reads the prompts, shows the progress and prints what comes back; nothing here
prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossinit_cli import fidelity, sample
from crossinit_cli import scoring as engine
from crossinit_cli import snapshots as snapshot_scores
from crossinit_cli.errors import CrossinitError
from crossinit_cli.generation import naming_origin
from crossinit_cli.store import Identity, Library


@dataclass(frozen=True)
class EvalOptions:
    """What `crossinit eval` asked for, beyond the names, merged with the configuration by the CLI.

    `model` is --model, else the configured model; None runs each identity on the model it was learned on
    (`config.identities_model`, the rule every command that uses identities follows)."""

    compare: bool = False
    prompts: str | None = None
    n: int = engine.DEFAULT_N
    seed: int = engine.DEFAULT_SEED
    steps: int | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    clip_model: str | None = None
    fail_below: float | None = None
    snapshots: bool = False
    pick_best: bool = False
    quiet: bool = False
    as_json: bool = False
    model_origin: str = ""  # where `model` came from (generation.model_origin); "" when it is the identities' own


def model_origin(library: Library, names: list[str], options: EvalOptions) -> str:
    """Where the model an error is about came from, and how to change it: the flag or the config
    (options.model_origin), else the identities' records."""
    if options.model_origin or options.model:
        return options.model_origin
    from crossinit_cli.config import RunOptions
    from crossinit_cli.generation import model_origin as origin_of

    none = RunOptions(model="", device="auto", dtype="auto", output_dir="")
    return origin_of(none, [library.get(name) for name in names])


def check_options(names: list[str], options: EvalOptions) -> None:
    """The flags that contradict themselves, refused before anything is read."""
    fail_below = options.fail_below
    if fail_below is not None and not fail_below >= 0:
        raise CrossinitError(f"--fail-below must be a likeness of 0 or more, not {fail_below:g}")
    if options.compare and len(names) < 2:
        raise CrossinitError("--compare needs at least two identities, e.g. crossinit eval alice bob --compare")


def request(
    library: Library, names: list[str], options: EvalOptions, templates: Sequence[str] | None = None
) -> engine.EvalRequest:
    """The scoring engine's request: every name known (an error before anything loads), and with
    --snapshots the steps of the one identity's snapshots. `templates`: the prompts (default: the built-in)."""
    templates = fidelity.DEFAULT_PROMPTS if templates is None else templates
    for name in names:
        library.get(name)
    snapshot_steps = _snapshot_steps(library, names, templates, options) if options.snapshots else None
    return engine.EvalRequest(
        templates=templates,
        n=options.n,
        seed=options.seed,
        steps=sample.DEFAULT_STEPS if options.steps is None else options.steps,
        model=options.model,
        device=options.device or "auto",
        dtype=options.dtype or "auto",
        clip_model=options.clip_model or fidelity.DEFAULT_CLIP_MODEL,
        snapshot_steps=snapshot_steps,
    )


def _snapshot_steps(library: Library, names: list[str], templates: Sequence[str], options: EvalOptions) -> list[int]:
    if len(names) != 1 or options.compare:
        raise CrossinitError("--snapshots and --pick-best score the snapshots of one identity; name one")
    if options.fail_below is not None:
        raise CrossinitError("--fail-below gates identities, not snapshots; run it without --snapshots/--pick-best")
    if any(fidelity.group_names(t) for t in templates):
        raise CrossinitError("--snapshots takes prompts with {} only (not prompts naming several identities)")
    ident = library.get(names[0])
    steps = [int(s["step"]) for s in ident.snapshots]
    if not steps:
        raise CrossinitError(
            f"identity {ident.name!r} kept no snapshots; learn it with --snapshot-every N (full mode: every 40)"
        )
    return steps


def image_count(names: list[str], req: engine.EvalRequest) -> int:
    """How many images the run makes (the length of a progress bar)."""
    runs = len(req.snapshot_steps) if req.snapshot_steps else len(names)
    return fidelity.image_count(req.templates, runs, req.n)


# ---- identities ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One identity's evaluation, stored with it: what is printed and stored (`record`), and its contact sheet."""

    name: str
    record: dict[str, Any]
    sheet: Path


def identities(
    library: Library,
    names: list[str],
    req: engine.EvalRequest,
    hooks: engine.EvalHooks = engine.EvalHooks(),
    *,
    model_origin: str = "",
) -> list[Scored]:
    """Score the identities and store each evaluation and contact sheet with its identity (an error about
    the model ends with `model_origin`, evaluating.model_origin)."""
    with naming_origin(model_origin):
        results = engine.evaluate(library, names, req, hooks)
    scored = []
    for result in results:
        sheet = engine.save(library, result)
        scored.append(Scored(result.name, {"name": result.name, **result.record(), "contact_sheet": str(sheet)}, sheet))
    return scored


def failing(records: list[dict[str, Any]], fail_below: float | None) -> list[dict[str, Any]]:
    """The records that fail `--fail-below`: likeness below it, or not measured (none without the flag)."""
    if fail_below is None:
        return []
    return [r for r in records if r.get("likeness") is None or r["likeness"] < fail_below]


# ---- one identity's snapshots -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotScores:
    """Each snapshot's numbers (`records`: step, calibrated scores, loss, active), stored with the identity;
    with pick-best, the step made active (`picked`), or why none was (`not_picked`)."""

    identity: Identity
    records: list[dict[str, Any]]
    picked: int | None
    not_picked: str | None
    last: int
    active: int


def snapshots(
    library: Library,
    name: str,
    req: engine.EvalRequest,
    hooks: engine.EvalHooks = engine.EvalHooks(),
    *,
    pick_best: bool = False,
    model_origin: str = "",
) -> SnapshotScores:
    """Score one identity's snapshots (`req.snapshot_steps`), store the scores, and with `pick_best` make the
    best likeness / prompt-fidelity trade-off the active vectors."""
    if pick_best:  # likeness is what it picks on: known before anything is generated
        why = unmeasurable_likeness(library, name)
        if why is not None:
            raise CrossinitError(f"{why}, so likeness cannot be measured and --pick-best has nothing to pick on")
    with naming_origin(model_origin):
        results = engine.evaluate(library, [name], req, hooks)
    _refuse_nothing_measured(results)
    records = [{"step": r.step, **r.calibrated()} for r in results]
    picked = snapshot_scores.pick_best(records) if pick_best else None
    unmeasured = snapshot_scores.nothing_measured(records) if pick_best and picked is None else None
    ident = snapshot_scores.save_snapshot_scores(library, name, results, picked)
    losses = {int(s["step"]): s.get("loss") for s in ident.snapshots}
    last = max(losses)
    active = ident.active_step or last
    for record in records:
        record["loss"] = losses.get(record["step"])
        record["active"] = record["step"] == active
    return SnapshotScores(ident, records, picked, unmeasured, last, active)


# ---- what can be measured ---------------------------------------------------------------------------------


def unmeasurable_likeness(library: Library, name: str) -> str | None:
    """Why likeness cannot be measured for `name` (no stored crops, or no face the detector finds in them,
    faces.no_face_reason); None when it can. Reads the crops and runs the face detector, nothing else."""
    from PIL import Image

    ident = library.get(name)
    paths = library.crops(ident.name)
    if not paths:
        return f"identity {ident.name!r} has no stored face crops (imported?)"
    crops = []
    for path in paths:
        with Image.open(path) as image:
            crops.append(image.convert("RGB"))
    if engine.reference_descriptors(crops):
        return None
    from crossinit_cli.faces import no_face_reason

    return no_face_reason(ident.name, [c.size for c in crops], ident.training.get("aligned"))


def nothing_measured(records: Sequence[dict[str, Any]]) -> str | None:
    """Why nothing could be measured in the stored evaluations `records` (neither likeness nor prompt
    fidelity for any identity: `eval` then exits 1 after its report); None when something was."""
    if not records or any(r["identity"]["available"] or r["fidelity"]["available"] for r in records):
        return None
    first = records[0]
    return f"nothing could be measured: {first['identity']['reason']}; {first['fidelity']['reason']}"


def _refuse_nothing_measured(results: Sequence[engine.Evaluation]) -> None:
    """An evaluation in which nothing was measured (no likeness, no prompt fidelity) is an error, with why."""
    measured = [r for r in results if (r.has_identity and r.reference is not None) or r.has_fidelity]
    if results and not measured:
        first = results[0]
        raise CrossinitError(
            f"nothing could be measured: {first.identity_note or 'no likeness'}; "
            f"{first.fidelity_note or 'no prompt fidelity'}"
        )
