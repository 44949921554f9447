"""`generate`: prompts naming stored identities in, PNGs that record how they were made out.

Everything that can be checked without the model (prompts, identity names and widths, size, scheduler,
seeds, the output folder) is checked first, so a mistake costs no model load. The pipeline is then
loaded once for all prompts, every identity is added to it once, and each prompt is one batched call.
Files are written to a temp name and linked into place, so a reader (or Ctrl-C) never sees half a PNG
and an existing file is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from crossinit_cli import __version__, devices, sample, ui
from crossinit_cli.atomic import TEMP_PREFIX, shared_mode
from crossinit_cli.commands.common import read_source
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library, name_key

if TYPE_CHECKING:
    from PIL import Image

TEMPLATE = "a photo of a <{name}> person"  # the official inference prompt, "a photo of a {} person"
SLUG_CHARS = 48


@dataclass
class PromptJob:
    """One prompt to sample: as the user wrote it (after `--identity` templating)."""

    prompt: str
    identities: list[Identity]
    slug: str  # the file-name stem before `-<seed>-<i>`


@dataclass(frozen=True)
class SamplingFlags:
    """generate's sampling flags as given (None: not given); with --manifest, what a line leaves out."""

    n: int = 1
    seed: int | None = None
    size: str | None = None
    steps: int | None = None
    guidance: float | None = None
    negative: str | None = None
    scheduler: str | None = None
    out: Path | None = None
    identity: str | None = None
    clip_skip: int | None = None  # None: the identities' own (choose_clip_skip)


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


@dataclass
class Plan:
    """A generate run, checked before any model is loaded."""

    jobs: list[PromptJob]
    identities: list[Identity]  # every one a prompt or the negative prompt names
    vectors: dict[str, list[Any]]  # their effective vectors, per text encoder
    negative: str
    seeds: list[int]
    steps: int
    guidance: float
    scheduler: sample.SchedulerChoice
    scheduler_name: str
    size: tuple[int, int] | None  # None: the model's own
    placement: devices.Placement
    out_dir: Path
    grid: bool
    model: str  # --model, else the configured model, else the identities' own (config.identities_model)
    clip_skip: int = 1  # --clip-skip, else the identities' own when they agree (choose_clip_skip)

    @property
    def base_seed(self) -> int:
        return self.seeds[0]


def generate_images(
    library: Library, prompt: str | None, *, prompts: str | None, flags: SamplingFlags, run: RunOptions, grid: bool
) -> int:
    plan = plan_run(library, prompt, prompts, flags, run, grid)
    show = not run.quiet and ui.err().is_terminal
    loaded = load_run(plan, plan.model, show)
    written: list[Written] = []
    try:
        with sampling_progress(show, len(plan.jobs) * len(plan.seeds)) as bar:
            for job in plan.jobs:
                loaded.sample_job(job, bar, written, echo=not run.as_json)
    except KeyboardInterrupt:
        if written:
            raise KeyboardInterrupt(
                f"interrupted; the {len(written)} file(s) already written to {plan.out_dir} are complete"
            ) from None
        raise
    if run.as_json:
        ui.print_json([w.to_json(loaded.record) for w in written])
    else:
        _summary(plan, written)
    return 0


# ---- the checks: everything cheap first, so a mistake costs no model load ------------------------


def plan_run(
    library: Library, prompt: str | None, prompts: str | None, flags: SamplingFlags, run: RunOptions, grid: bool
) -> Plan:
    negative = flags.negative or ""
    jobs, known = _jobs(library, prompt, prompts, flags.identity, negative)
    seeds, steps, scheduler_name, size = _sampling_choices(flags)
    model = run.model_for(known.values())
    devices.check_model_reference(model)
    placement = devices.resolve(run.device, run.dtype)
    sample.check_model(model, known.values())
    clip_skip = choose_clip_skip(flags.clip_skip, known.values(), model=model)
    vectors = {ident.name: library.effective_parts(ident.name) for ident in known.values()}
    # Last of the checks, so that a mistake found above leaves no new folder behind.
    out_dir = prepare_out_dir(Path(run.output_dir))
    warn_other_model(known.values(), model)
    return Plan(
        jobs=jobs,
        identities=list(known.values()),
        vectors=vectors,
        negative=negative,
        seeds=seeds,
        steps=steps,
        guidance=sample.DEFAULT_GUIDANCE if flags.guidance is None else flags.guidance,
        scheduler=sample.scheduler_choice(scheduler_name),
        scheduler_name=scheduler_name,
        size=size,
        placement=placement,
        out_dir=out_dir,
        grid=grid,
        model=model,
        clip_skip=clip_skip,
    )


def warn_other_model(identities: Iterable[Identity], model: str) -> None:
    """One line per identity that runs on another model than it was learned on (--model or the config's)."""
    for ident in identities:
        if ident.base_model and ident.base_model != model:
            ui.warn(f"identity {ident.name!r} was learned on {ident.base_model}; generating with {model}")


def choose_clip_skip(
    given: int | None, identities: Iterable[Identity], where: str = "", *, model: str | None = None
) -> int:
    """The clip skip to sample at: `given` (--clip-skip), else the identities' own when they all agree, else 1;
    checked against `model`'s configs when given (sample.check_clip_skip).

    One line per identity learned at another clip skip than the chosen one: its vectors were fitted to
    another layer's outputs, so it looks less like its person there."""
    identities = [i for i in identities if not getattr(i, "clip_skip_unknown", None)]  # unknown: nothing to say
    own = {ident.clip_skip for ident in identities}
    chosen = given if given is not None else (own.pop() if len(own) == 1 else 1)
    if model is not None:  # a clip skip the model cannot take is the one line, without warnings before it
        sample.check_clip_skip(model, chosen)
    for ident in identities:
        if ident.clip_skip != chosen:
            ui.warn(
                f"{where}identity {ident.name!r} was learned at clip skip {ident.clip_skip}; generating at clip skip "
                f"{chosen}" + ("" if given is not None else " (the identities disagree; pass --clip-skip)")
            )
    return chosen


def _jobs(
    library: Library, prompt: str | None, prompts: str | None, identity: str | None, negative: str
) -> tuple[list[PromptJob], dict[str, Identity]]:
    """One PromptJob per prompt (after `--identity` templating), and every identity the prompts name."""
    default = library.get(identity) if identity else None
    texts = prompt_texts(prompt, prompts)
    if not texts and default is None:
        raise CrossinitError("no prompt given; pass a prompt, --prompts FILE (or - for stdin), or --identity NAME")
    texts = [apply_template(t, default) for t in texts] or [apply_template("", default)]
    known = resolve_identities(library, [*texts, negative])
    hint_plain_names(library, texts)
    jobs = []
    for text in texts:
        named = [known[sample.ref_key(r)] for r in sample.identity_refs(text)]
        jobs.append(PromptJob(text, named, file_slug(text, named)))
    return jobs, known


def _sampling_choices(flags: SamplingFlags) -> tuple[list[int], int, str, tuple[int, int] | None]:
    """The seeds, steps, scheduler name and size the flags ask for, each checked."""
    n = flags.n
    if n < 1:
        raise CrossinitError(f"-n must be at least 1, not {n}")
    steps = sample.DEFAULT_STEPS if flags.steps is None else flags.steps
    if steps < 1:
        raise CrossinitError(f"--steps must be at least 1, not {steps}")
    scheduler = (flags.scheduler or sample.DEFAULT_SCHEDULER).strip().lower()
    sample.scheduler_choice(scheduler)
    size = sample.parse_size(flags.size) if flags.size is not None else None
    base_seed = secrets.randbelow(2**32) if flags.seed is None else flags.seed
    sample.check_seed_range(base_seed, n)
    return [base_seed + i for i in range(n)], steps, scheduler, size


# ---- the model: loaded once, identities added once, then every prompt --------------------------


@dataclass
class LoadedRun:
    """The pipeline with the run's identities in it, and the settings every prompt of the run shares."""

    plan: Plan
    pipe: Any
    mapping: dict[str, Any]
    settings: sample.Settings
    record: dict[str, Any]  # the run's settings, as each image's metadata and `--json` record them

    def sample_job(self, job: PromptJob, bar: _SamplingBar, written: list[Written], *, echo: bool) -> None:
        """Sample one prompt's images (and its grid), write them, and add each to `written` once it is."""
        plan = self.plan
        expanded = sample.expand_prompt(job.prompt, self.mapping)
        for name in sample.truncated_identities(self.pipe, expanded, self.mapping):
            ui.warn(
                f"prompt {_short(job.prompt)} is longer than the text encoder's window; <{name}> "
                "falls in the part that is cut off"
            )
        bar.start(job.prompt, self.settings.steps)
        with ui.timed(f"sampling {len(plan.seeds)} image(s) for {_short(job.prompt)}"):
            images = sample.sample(self.pipe, expanded, plan.seeds, self.settings, on_step=bar.step)
        batch: list[Written] = []
        for i, image in enumerate(images):
            meta = png_metadata(job, expanded, plan.negative, plan.seeds[i], plan.base_seed, i, self.record)
            path = save_png(image, plan.out_dir, f"{job.slug}-{plan.base_seed}-{i}", meta)
            record = Written("image", path, job.prompt, plan.negative, plan.seeds[i], _names(job), index=i)
            batch.append(record)
            written.append(record)
            if echo:
                ui.err().print(escape(str(path)), soft_wrap=True)
        bar.images_done(len(images))
        if plan.grid:
            paths = [str(r.path) for r in batch]
            meta = png_metadata(job, expanded, plan.negative, plan.base_seed, plan.base_seed, None, self.record)
            meta["crossinit"]["images"] = paths
            path = save_png(contact_sheet(images), plan.out_dir, f"{job.slug}-{plan.base_seed}-grid", meta)
            written.append(Written("grid", path, job.prompt, plan.negative, plan.base_seed, _names(job), images=paths))
            if echo:
                ui.err().print(escape(str(path)), soft_wrap=True)


def load_run(plan: Plan, model: str, show: bool) -> LoadedRun:
    placement = plan.placement
    with (
        loading_status(show, f"loading {escape(model)} on {placement.device} ({placement.dtype})"),
        ui.timed("model load"),
    ):
        pipe = sample.load(model, placement, plan.identities)
    sample.check_clip_skip(model, plan.clip_skip, pipe)
    mapping = sample.add_identities(pipe, plan.vectors, model=model)
    image_width, image_height = plan.size or sample.native_size(pipe)
    settings = sample.Settings(
        width=image_width,
        height=image_height,
        steps=plan.steps,
        guidance=plan.guidance,
        negative=sample.expand_prompt(plan.negative, mapping),
        scheduler=plan.scheduler_name,
        clip_skip=plan.clip_skip,
    )
    record = run_record(settings, model, placement)
    return LoadedRun(plan, pipe, mapping, settings, record)


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


def _summary(plan: Plan, written: list[Written]) -> None:
    images_written = sum(w.kind == "image" for w in written)
    seeds = f"{plan.base_seed}{f'..{plan.seeds[-1]}' if len(plan.seeds) > 1 else ''}"
    ui.info(
        f"wrote {images_written} image{'s' if images_written != 1 else ''} to {escape(str(plan.out_dir))} "
        f"(seed {seeds}, {plan.steps} steps, {plan.scheduler.a1111}, {plan.placement.device})"
    )


# ---- prompts ------------------------------------------------------------------------------------


def prompt_texts(prompt: str | None, prompts: str | None) -> list[str]:
    """The prompts to run: the positional one, or one per line of `--prompts FILE|-`."""
    if prompts is None:
        return [prompt.strip()] if prompt is not None and prompt.strip() else []
    if prompt is not None and prompt.strip():
        raise CrossinitError("give either a prompt or --prompts, not both")
    text = read_source(prompts, "prompts", "one a line")
    source = "stdin" if prompts == "-" else prompts
    lines = [line.strip() for line in text.splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise CrossinitError(f"no prompts in {source} (blank lines and # comments are skipped)")
    return found


def apply_template(text: str, identity: Identity | None) -> str:
    """`--identity alice` with a prompt that names nobody: 'a photo of a <alice> person, <prompt>'."""
    if identity is None or sample.identity_refs(text):
        return text
    start = TEMPLATE.format(name=identity.name)
    return f"{start}, {text}" if text.strip() else start


def resolve_identities(library: Library, texts: list[str]) -> dict[str, Identity]:
    """{key: Identity} for every `<name>` in `texts`; an unknown name is a one-line error naming it."""
    found: dict[str, Identity] = {}
    for text in texts:
        for written in sample.identity_refs(text):
            key = sample.ref_key(written)
            if key in found:
                continue
            try:
                exists = library.path_of(written).is_dir()
            except CrossinitError:
                exists = False
            if not exists:
                raise library.unknown(written, f" (in prompt {_short(text)})")
            found[key] = library.get(written)  # a damaged entry says so itself
    return found


PLAIN_WORD = re.compile(r"[\w][\w.\-]*")


def hint_plain_names(library: Library, texts: list[str]) -> None:
    """A one-line hint on stderr for each stored identity a prompt names without `<>` ("alice on a beach"):
    as plain text the model reads it as a word, not as the learned person. Only stderr: --json stays clean."""
    keys = set(library.keys())
    if not keys:
        return
    hinted: set[str] = set()
    for text in texts:
        named = {sample.ref_key(r) for r in sample.identity_refs(text)}
        for word in PLAIN_WORD.findall(sample.IDENTITY_REF.sub(" ", text)):
            key = word.rstrip(".-").casefold()
            if key in keys and key not in named and key not in hinted:
                hinted.add(key)
                ui.info(
                    f"hint: '{escape(word)}' in prompt {escape(_short(text))} is plain text; write "
                    f"<{escape(word.rstrip('.-'))}> to use the stored identity"
                )


def file_slug(prompt: str, identities: list[Identity]) -> str:
    """The identities' names (joined by '+'), or else a short ASCII slug of the prompt."""
    if identities:
        return "+".join(i.name for i in identities)[:80]
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if len(slug) > SLUG_CHARS:
        slug = slug[:SLUG_CHARS].rsplit("-", 1)[0]
    return slug or "image"


def _short(text: str, limit: int = 60) -> str:
    return json.dumps(text if len(text) <= limit else text[: limit - 1] + "…", ensure_ascii=False)


def _names(job: PromptJob) -> list[str]:
    return [i.name for i in job.identities]


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


def png_metadata(
    job: PromptJob, expanded: str, negative: str, seed: int, base_seed: int, index: int | None, run: dict[str, Any]
) -> dict[str, Any]:
    names = _names(job)
    parameters = a1111_parameters(job.prompt, negative, seed, run, names)
    own = {
        "version": __version__,
        "prompt": job.prompt,
        "expanded_prompt": expanded,
        "negative_prompt": negative,
        "seed": seed,
        "batch_seed": base_seed,
        "index": index,
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
            for i in job.identities
        ],
        **run,
    }
    return {"parameters": parameters, "crossinit": own}


# ---- progress -----------------------------------------------------------------------------------


@contextmanager
def loading_status(show: bool, message: str) -> Iterator[None]:
    if not show:
        yield
        return
    with ui.err().status(message):
        yield


class _SamplingBar:
    """Images done overall, and steps of the batch being sampled (rich, on stderr)."""

    def __init__(self, progress: Any, total_images: int) -> None:
        self.progress = progress
        self.images = progress.add_task("images", total=total_images) if progress else None
        self.steps = progress.add_task("steps", total=1) if progress else None

    def start(self, prompt: str, steps: int) -> None:
        if self.progress:
            self.progress.reset(self.steps, total=steps, description=escape(_short(prompt, 40)))

    def step(self, done: int, total: int) -> None:
        if self.progress:
            self.progress.update(self.steps, completed=done, total=total)

    def images_done(self, count: int) -> None:
        if self.progress:
            self.progress.advance(self.images, count)


@contextmanager
def sampling_progress(show: bool, total_images: int) -> Iterator[_SamplingBar]:
    if not show:
        yield _SamplingBar(None, total_images)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=ui.err(), transient=True) as progress:
        yield _SamplingBar(progress, total_images)
