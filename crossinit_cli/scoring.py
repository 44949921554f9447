"""The paper's two numbers for stored identities, measured: generate, then score (`crossinit eval`).

Cross Initialization (like Celeb Basis, whose protocol it follows) judges a personalised identity on two
axes: *reconstruction* (do generated faces keep the person's identity? likeness.py) and *editability*
(do they follow the rest of the prompt? fidelity.py). This module runs an evaluation: it checks the
request, plans which identity runs on which base model (or one identity's snapshots, snapshots.py),
generates every prompt's images, scores them into `Evaluation`s (evalresult.py) and saves each with its
contact sheet (contactsheet.py).

Usable from Python without the CLI:

    from crossinit_cli import scoring
    from crossinit_cli.store import Library

    lib = Library(home)
    request = scoring.EvalRequest(model="stabilityai/stable-diffusion-2-1-base")
    results = scoring.evaluate(lib, ["alice"], request)
    for result in results:
        scoring.save(lib, result)   # metadata `evaluation` + eval/contact-sheet.png
        print(result.record()["identity"])

The pipeline is loaded once per base model for all prompts and identities of a run (identities learned
on different base models are grouped, one model after the other); CLIP is loaded once. Nothing is
written to the library before every number is computed.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import config, devices, sample
from crossinit_cli.atomic import write_bytes_atomic
from crossinit_cli.contactsheet import contact_sheet
from crossinit_cli.errors import CrossinitError
from crossinit_cli.evalresult import SHEET_PATH, Evaluation, PromptResult
from crossinit_cli.fidelity import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_PROMPTS,
    ClipScorer,
    ClipUnavailable,
    ClipUnreachable,
    check_templates,
    clip_text,
    fill,
    group_names,
)
from crossinit_cli.likeness import assign_faces, faces_in, match_face, reference_descriptors, reference_of
from crossinit_cli.snapshots import snapshot_variants
from crossinit_cli.store import Identity, Library, name_key

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    from PIL import Image

DEFAULT_N = 4
DEFAULT_SEED = 0


# ---- one evaluation run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation runs: prompts, images per prompt, sampling settings, models, and (optionally) the
    snapshots of one identity's run instead of the identities' current vectors.

    `model` runs every identity on that base model; otherwise each runs on the model it was learned on
    (`base_model`), or the built-in default when that is not recorded (`config.identities_model`).
    `clip_model=None` skips prompt fidelity. `snapshot_steps` evaluates the snapshots of one identity's run
    (0: the final vectors), all on one pipeline load; each result's `step` says which."""

    templates: Sequence[str] = DEFAULT_PROMPTS
    n: int = DEFAULT_N
    seed: int = DEFAULT_SEED
    steps: int = sample.DEFAULT_STEPS
    guidance: float = sample.DEFAULT_GUIDANCE
    scheduler: str = sample.DEFAULT_SCHEDULER
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    clip_model: str | None = DEFAULT_CLIP_MODEL
    snapshot_steps: Sequence[int] | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def checked(self) -> EvalRequest:
        """The request with its templates checked; a bad count, seed or scheduler is an error here."""
        templates = check_templates(self.templates)
        if self.n < 1:
            raise CrossinitError(f"-n must be at least 1, not {self.n}")
        if self.steps < 1:
            raise CrossinitError(f"--steps must be at least 1, not {self.steps}")
        sample.check_seed_range(self.seed, self.n)
        sample.scheduler_choice(self.scheduler)
        return replace(self, templates=templates)


@dataclass(frozen=True)
class EvalHooks:
    """What a caller hears: `notify(message)` about a metric that is unavailable, `on_image(name, prompt)`
    about every image made; `on_load(model)` returns a context manager held while a model loads."""

    notify: Callable[[str], None] | None = None
    on_image: Callable[[str, str], None] | None = None
    on_load: Callable[[str], Any] | None = None

    def say(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)


@dataclass
class _Plan:
    """An evaluation once every cheap check has passed: which identity runs on which model, with which
    vectors, scored against whose crops."""

    identities: dict[str, Identity]  # result key -> identity (a snapshot's pseudo-identity with --snapshots)
    vectors: dict[str, list[np.ndarray]]
    library_name: dict[str, str]  # result key -> the identity whose crops it is scored against
    step_of: dict[str, int | None]
    groups: dict[str, list[Identity]]  # base model -> identities run on it
    together: dict[str, list[tuple[str, list[str]]]]  # base model -> templates naming several identities


def evaluate(
    library: Library, names: Sequence[str], request: EvalRequest = EvalRequest(), hooks: EvalHooks = EvalHooks()
) -> list[Evaluation]:
    """Generate every template n times (seeds seed..seed+n-1) for each identity and score the images.

    Everything cheap is checked first, so no model is loaded if any of it fails; then one pipeline per
    base model generates all identities' images, and CLIP scores them all at the end."""
    request = request.checked()
    plan = _plan(library, names, request)
    placement = devices.resolve(request.device, request.dtype)
    for key, ident in plan.identities.items():
        if key not in plan.vectors:
            plan.vectors[key] = library.effective_parts(ident.name)
    results, references = _start_results(library, plan, hooks)
    scorer, fidelity_note = _load_clip(request.clip_model, hooks)
    for chosen, group in plan.groups.items():
        run = _ModelRun(request, hooks, chosen, placement, fidelity_note, results, references)
        _generate_on_model(run, group, plan)
    if scorer is not None:
        _score_fidelity(scorer, results, placement)
        del scorer
        gc.collect()
    return list(results.values())


def _plan(library: Library, names: Sequence[str], request: EvalRequest) -> _Plan:
    """The identities (or one identity's snapshots), grouped by the base model each runs on."""
    identities: dict[str, Identity] = {}
    for name in names:
        ident = library.get(name)
        if name_key(ident.name) in identities:
            raise CrossinitError(f"identity {ident.name!r} is named twice")
        identities[name_key(ident.name)] = ident
    if not identities:
        raise CrossinitError("no identity to evaluate")
    vectors: dict[str, list[np.ndarray]] = {}
    library_name: dict[str, str] = {}
    step_of: dict[str, int | None] = {}
    if request.snapshot_steps is not None:
        identities, vectors, library_name, step_of = snapshot_variants(library, identities, request.snapshot_steps)
    groups: dict[str, list[Identity]] = {}
    for ident in identities.values():
        chosen = config.identities_model(request.model, [ident])
        groups.setdefault(chosen, []).append(ident)
    together = _multi_identity_templates(request.templates, identities, groups)
    for chosen, group in groups.items():
        devices.check_model_reference(chosen)  # a bad --model is one line before CLIP or any model loads
        sample.check_model(chosen, group)
    return _Plan(identities, vectors, library_name, step_of, groups, together)


def _start_results(
    library: Library, plan: _Plan, hooks: EvalHooks
) -> tuple[dict[str, Evaluation], dict[str, list[np.ndarray]]]:
    """An empty result per identity, and the face descriptors of its stored crops (the references)."""
    results: dict[str, Evaluation] = {}
    references: dict[str, list[np.ndarray]] = {}
    for key, ident in plan.identities.items():
        crops = _load_crops(library, plan.library_name.get(key, ident.name))
        result = Evaluation(name=ident.name, settings={}, crops=crops, prompts=[], identity_created=ident.created)
        result.step = plan.step_of.get(key)
        if not crops:
            result.identity_note = (
                f"identity {ident.name!r} has no stored face crops (imported?), so identity similarity "
                "cannot be measured"
            )
        else:
            try:
                references[key] = reference_descriptors(crops)
            except CrossinitError as exc:  # dlib or its weights missing
                result.identity_note = f"identity similarity is unavailable: {exc}"
            else:
                result.references = len(references[key])
                if references[key]:
                    result.reference = reference_of(references[key])
                if not references[key]:
                    from crossinit_cli.faces import no_face_reason

                    why = no_face_reason(ident.name, [c.size for c in crops], ident.training.get("aligned"))
                    result.identity_note = f"{why}, so identity similarity cannot be measured"
        if result.identity_note:
            hooks.say(result.identity_note)
        results[key] = result
    return results, references


def _load_clip(clip_model: str | None, hooks: EvalHooks) -> tuple[ClipScorer | None, str | None]:
    """The CLIP scorer, or None and the note that says why prompt fidelity is left out."""
    if clip_model is None:
        return None, "prompt fidelity was not asked for"
    try:
        with _holding(hooks.on_load, clip_model):
            return ClipScorer.load(clip_model), None
    except ClipUnreachable as exc:
        hooks.say(f"{exc}; prompt fidelity is left out and identity similarity is reported alone")
        return None, f"CLIP model {clip_model!r} is not available (not cached, no network)"
    except ClipUnavailable as exc:
        if Path(clip_model).expanduser().exists():
            how = f"{str(exc)[:120]}; pass a folder with a CLIP model, tokenizer and image processor"
        else:
            how = f"download it once with `hf download {clip_model}`, or pass --clip-model with a local folder"
        hooks.say(
            f"CLIP model {clip_model!r} could not be loaded, so prompt fidelity is left out and identity "
            f"similarity is reported alone ({how})"
        )
        return None, f"CLIP model {clip_model!r} is not available ({exc})"


@dataclass(frozen=True)
class _ModelRun:
    """One base model's part of an evaluation: where it runs and the results its images go to."""

    request: EvalRequest
    hooks: EvalHooks
    model: str
    placement: devices.Placement
    fidelity_note: str | None
    results: dict[str, Evaluation]
    references: dict[str, list[np.ndarray]]


def _generate_on_model(run: _ModelRun, group: list[Identity], plan: _Plan) -> None:
    """Generation: one pipeline for this base model, all its identities and prompts at once."""
    import torch

    with _holding(run.hooks.on_load, run.model):
        pipe = sample.load(run.model, run.placement, group)
    try:
        vectors = {i.name: plan.vectors[name_key(i.name)] for i in group}
        mapping = sample.add_identities(pipe, vectors, model=run.model)
        width, height = sample.native_size(pipe)
        request = run.request
        settings = sample.Settings(
            width=width, height=height, steps=request.steps, guidance=request.guidance, scheduler=request.scheduler
        )
        for ident in group:
            _generate_one(run, ident, pipe, mapping, settings)
        for template, keys in plan.together.get(run.model, []):
            skips = {i.clip_skip for i in group if name_key(i.name) in keys}  # their own, when they agree
            together = replace(settings, clip_skip=skips.pop() if len(skips) == 1 else 1)
            _generate_together(run, template, keys, pipe, mapping, together)
    finally:
        del pipe
        gc.collect()
        if run.placement.device == "cuda":
            torch.cuda.empty_cache()


def _generate_one(run: _ModelRun, ident: Identity, pipe: Any, mapping: Any, settings: sample.Settings) -> None:
    """Every `{}` template for one identity, each face matched against its references."""
    request, key = run.request, name_key(ident.name)
    result = run.results[key]
    sample.check_clip_skip(run.model, ident.clip_skip, pipe)
    settings = replace(settings, clip_skip=ident.clip_skip)  # each identity at the layer it was learned at
    result.settings = {
        "prompts": list(request.templates),
        "n": request.n,
        "seed": request.seed,
        "steps": request.steps,
        "guidance": request.guidance,
        "scheduler": request.scheduler,
        "size": [settings.width, settings.height],
        "model": run.model,
        "device": run.placement.device,
        "dtype": run.placement.dtype,
        "strength": ident.strength,
        "snapshot": ident.active_step,  # 0: the final vectors
        "clip_skip": ident.clip_skip,
        "clip_model": request.clip_model,
    }
    result.fidelity_note = run.fidelity_note
    seeds = request.seeds
    for template in request.templates:
        if group_names(template):
            continue
        prompt = fill(template, ident.name)
        images = sample.sample(pipe, sample.expand_prompt(prompt, mapping), seeds, settings)
        entry = PromptResult(template, prompt, clip_text(template), list(seeds), images)
        for image in images:
            if result.has_identity:
                entry.matches.append(match_face(run.references[key], image))
            if run.hooks.on_image is not None:
                run.hooks.on_image(ident.name, prompt)
        result.prompts.append(entry)


def _generate_together(
    run: _ModelRun, template: str, keys: list[str], pipe: Any, mapping: Any, settings: sample.Settings
) -> None:
    """A template naming several identities: generated once, its faces assigned to the identities named."""
    seeds = run.request.seeds
    images = sample.sample(pipe, sample.expand_prompt(template, mapping), seeds, settings)
    named = [run.results[key] for key in keys]
    entries = [PromptResult(template, template, clip_text(template), list(seeds), images) for _ in keys]
    scored = all(r.has_identity for r in named)
    for image in images:
        if scored:
            found = faces_in(image)
            for entry, match in zip(entries, assign_faces(found, [run.references[k] for k in keys])):
                entry.matches.append(match)
        if run.hooks.on_image is not None:
            run.hooks.on_image(", ".join(r.name for r in named), template)
    for result, entry in zip(named, entries):
        if not scored:  # one named identity without crops: faces cannot be told apart
            entry.matches = [None] * len(images) if result.has_identity else []
        result.prompts.append(entry)


def _score_fidelity(scorer: ClipScorer, results: dict[str, Evaluation], placement: devices.Placement) -> None:
    """Prompt fidelity: CLIP once, on the device the pipelines have left."""
    scorer.to(placement.device)
    for result in results.values():
        for entry in result.prompts:
            entry.clip_scores = scorer.score(entry.images, [entry.text] * len(entry.images))


def _multi_identity_templates(
    templates: Sequence[str], identities: dict[str, Identity], groups: dict[str, list[Identity]]
) -> dict[str, list[tuple[str, list[str]]]]:
    """{model: [(template, [identity keys])]} for the templates naming several identities.

    Each names only identities being evaluated, all learned on (or run with) the same base model."""
    model_of = {name_key(i.name): model for model, group in groups.items() for i in group}
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for template in templates:
        named = group_names(template)
        if not named:
            continue
        keys = [sample.ref_key(n) for n in named]
        missing = [n for n, k in zip(named, keys) if k not in identities]
        if missing:
            raise CrossinitError(
                f"prompt {template!r} names <{missing[0]}>, who is not being evaluated; name every identity "
                f"it mentions: crossinit eval {' '.join(named)} ..."
            )
        models = {model_of[k] for k in keys}
        if len(models) > 1:
            raise CrossinitError(f"prompt {template!r} names identities learned on different base models; pass --model")
        found.setdefault(models.pop(), []).append((template, keys))
    return found


@contextmanager
def _holding(on_load: Callable[[str], Any] | None, what: str) -> Iterator[None]:
    if on_load is None:
        yield
        return
    with on_load(what):
        yield


def _load_crops(library: Library, name: str) -> list[Image.Image]:
    from PIL import Image, UnidentifiedImageError

    crops = []
    for path in library.crops(name):
        try:
            with Image.open(path) as image:
                crops.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CrossinitError(f"identity {name!r} is damaged: cannot read crop {path.name} ({exc})") from None
    return crops


# ---- results into the library -------------------------------------------------------------------


def save(library: Library, result: Evaluation) -> Path:
    """Store the evaluation in the identity's metadata and its contact sheet in its folder, under the
    library lock (so a concurrent rename or remove cannot leave a half-written entry); returns the sheet."""
    png = io.BytesIO()
    contact_sheet(result).save(png, format="PNG")
    record = result.record()
    where: list[Path] = []

    def change(ident: Identity) -> None:
        if result.identity_created and ident.created != result.identity_created:
            raise CrossinitError(
                f"identity {ident.name!r} was replaced while it was being evaluated; run `crossinit eval` again"
            )
        path = library.path_of(ident.name) / SHEET_PATH
        write_bytes_atomic(path, png.getvalue())
        ident.evaluation = record
        where.append(path)

    library.modify(result.name, change)
    return where[0]
