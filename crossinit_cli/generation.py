"""The generation engine: prompts naming stored identities in, images with their seeds and metadata out.

Everything that can be checked without the model (prompts, identity names and widths, size, scheduler,
seeds, the output folder) is checked first by `plan_run`, so a mistake costs no model load. `load_run`
then loads the pipeline once and adds every identity once; `LoadedRun.images` samples one prompt, and can
be called for as many prompts (and settings) as wanted. `generate` is the whole run without files, as the
Python API gives it; the `generate` command writes the same images as PNGs (`write_image`, `write_grid`).

Silent: warnings, hints and progress go to the `GenerateHooks` a caller gives; errors are `CrossinitError`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import devices, pngfiles, sample
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError
from crossinit_cli.pngfiles import ImageFacts, Written
from crossinit_cli.store import Identity, Library

if TYPE_CHECKING:
    from PIL import Image

TEMPLATE = "a photo of a <{name}> person"  # the official inference prompt, "a photo of a {} person"
PLAIN_WORD = re.compile(r"[\w][\w.\-]*")


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


@dataclass(frozen=True)
class GenerateHooks:
    """What a caller hears of a run; every one optional (None: nothing is said)."""

    warn: Callable[[str], None] | None = None  # a warning, one plain line
    hint: Callable[[str], None] | None = None  # a hint (a stored name written without <>), plain text
    loading: Callable[[str], AbstractContextManager[Any]] | None = None  # held while the model loads
    timed: Callable[[str], AbstractContextManager[Any]] | None = None  # held around each named phase
    on_prompt: Callable[[str, int], None] | None = None  # a prompt's sampling starts: (prompt, steps)
    on_step: Callable[[int, int], None] | None = None  # (done, total) denoising steps of the batch
    read: Callable[[str], str] | None = None  # the text of --prompts FILE|- (default: the file's text)

    def say_warning(self, message: str) -> None:
        if self.warn is not None:
            self.warn(message)

    def held(self, phase: str) -> AbstractContextManager[Any]:
        return self.timed(phase) if self.timed is not None else nullcontext()


@dataclass
class PromptJob:
    """One prompt to sample: as the user wrote it (after `--identity` templating)."""

    prompt: str
    identities: list[Identity]
    slug: str  # the file-name stem before `-<seed>-<i>`
    line: int | None = None  # its manifest line, when it comes from one

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.identities]


@dataclass(frozen=True)
class Choices:
    """How one prompt is sampled: seeds and settings, each checked."""

    seeds: list[int]
    steps: int
    guidance: float
    negative: str
    scheduler: str  # a key of sample.SCHEDULERS
    size: tuple[int, int] | None  # None: the model's own
    clip_skip: int = 1

    @property
    def base_seed(self) -> int:
        return self.seeds[0]

    @property
    def sampler(self) -> str:
        """The scheduler's name in A1111."""
        return sample.scheduler_choice(self.scheduler).a1111


@dataclass
class Plan:
    """A generate run, checked before any model is loaded."""

    jobs: list[PromptJob]
    identities: list[Identity]  # every one a prompt or the negative prompt names
    vectors: dict[str, list[Any]]  # their effective vectors, per text encoder
    choices: Choices
    placement: devices.Placement
    out_dir: Path | None  # None: nothing will be written
    model: str  # --model, else the configured model, else the identities' own (config.identities_model)
    model_origin: str = ""  # where `model` came from and how to change it (model_origin), for errors about it


@dataclass
class GeneratedImage:
    """One sampled image with everything its file would record."""

    image: Image.Image
    job: PromptJob
    expanded: str  # the prompt with the identities' placeholder tokens
    choices: Choices
    seed: int
    index: int
    record: dict[str, Any]  # the run's settings (pngfiles.run_record)

    @property
    def metadata(self) -> dict[str, Any]:
        """Its PNG text chunks: A1111's `parameters` and crossinit's own record."""
        facts = ImageFacts(
            self.job.prompt,
            self.expanded,
            self.choices.negative,
            self.seed,
            self.choices.base_seed,
            self.index,
            tuple(self.job.identities),
        )
        return pngfiles.png_metadata(facts, self.record)

    @property
    def stem(self) -> str:
        return f"{self.job.slug}-{self.choices.base_seed}-{self.index}"


# ---- the checks: everything cheap first, so a mistake costs no model load ------------------------


def plan_run(
    library: Library,
    prompt: str | None,
    prompts: str | None,
    flags: SamplingFlags,
    run: RunOptions,
    hooks: GenerateHooks = GenerateHooks(),
    *,
    write: bool = True,
) -> Plan:
    """The run `flags` ask for, every check done. `prompts` is a --prompts source (FILE, or '-' read by
    `hooks.read`); with `write`, the output folder (`run.output_dir`) is created and proved writable."""
    negative = flags.negative or ""
    jobs, known = _jobs(library, prompt, prompts, flags.identity, negative, hooks)
    seeds, steps, scheduler, size = _sampling_choices(flags)
    check_one_family(known.values())
    model = run.model_for(known.values())
    origin = model_origin(run, known.values())
    with naming_origin(origin):
        devices.check_model_reference(model)
    placement = devices.resolve(run.device, run.dtype)
    with naming_origin(origin):
        sample.check_model(model, known.values())
        clip_skip = choose_clip_skip(flags.clip_skip, known.values(), model=model, warn=hooks.warn)
    vectors = {ident.name: library.effective_parts(ident.name) for ident in known.values()}
    # Last of the checks, so that a mistake found above leaves no new folder behind.
    out_dir = pngfiles.prepare_out_dir(Path(run.output_dir)) if write else None
    warn_other_model(known.values(), model, hooks.warn)
    guidance = sample.DEFAULT_GUIDANCE if flags.guidance is None else flags.guidance
    choices = Choices(seeds, steps, guidance, negative, scheduler, size, clip_skip)
    return Plan(jobs, list(known.values()), vectors, choices, placement, out_dir, model, origin)


def check_one_family(identities: Iterable[Identity]) -> None:
    """Identities of different model families (SD 1.x, SD 2.x, SDXL) cannot share a run: no model takes
    both widths. One line listing which identity is which family."""
    from crossinit_cli import families

    by_family: dict[str, list[str]] = {}
    for ident in identities:
        if ident.family:
            by_family.setdefault(ident.family, []).append(ident.name)
    if len(by_family) > 1:
        which = "; ".join(
            f"{families.get(f).title if f in families.FAMILIES else f}: {', '.join(names)}"
            for f, names in by_family.items()
        )
        raise CrossinitError(
            f"identities of different model families cannot be combined in one prompt or run ({which}); "
            "generate each family's identities in a run of their own"
        )


def model_origin(run: RunOptions, identities: Iterable[Identity] = ()) -> str:
    """Where the model a run uses came from, and the command that changes it (config.identities_model's
    order: --model, the config, the identities' records, the built-in default)."""
    if run.explicit_model:
        return "the model comes from --model"
    if run.configured_model:
        return (
            "the model comes from your config (`crossinit config set model ...`, `crossinit config unset model`); "
            "pass --model to override"
        )
    named = [ident.name for ident in identities if ident.base_model]
    if named:
        return (
            f"the model is the one {', '.join(named)} was learned on (its identity record's base_model: "
            f"`crossinit edit {named[0]}`); pass --model to override"
        )
    return "the model is the built-in default; pass --model, or set one with `crossinit config set model ...`"


@contextmanager
def naming_origin(origin: str) -> Iterator[None]:
    """A model error raised inside ends with where the model came from (`origin`, model_origin)."""
    try:
        yield
    except CrossinitError as exc:
        if not origin or origin in str(exc):
            raise
        raise CrossinitError(f"{exc}; {origin}") from None


def warn_other_model(identities: Iterable[Identity], model: str, warn: Callable[[str], None] | None) -> None:
    """One warning per identity that runs on another model than it was learned on (--model or the config's)."""
    for ident in identities:
        if warn is not None and ident.base_model and ident.base_model != model:
            warn(f"identity {ident.name!r} was learned on {ident.base_model}; generating with {model}")


def choose_clip_skip(
    given: int | None,
    identities: Iterable[Identity],
    where: str = "",
    *,
    model: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> int:
    """The clip skip to sample at: `given` (--clip-skip), else the identities' own when they all agree, else 1;
    checked against `model`'s configs when given (sample.check_clip_skip).

    One warning per identity learned at another clip skip than the chosen one: its vectors were fitted to
    another layer's outputs, so it looks less like its person there."""
    identities = [i for i in identities if not i.clip_skip_unknown]  # unknown: nothing to warn about
    own = {ident.clip_skip for ident in identities}
    chosen = given if given is not None else (own.pop() if len(own) == 1 else 1)
    if model is not None:  # a clip skip the model cannot take is the one error, without warnings before it
        sample.check_clip_skip(model, chosen)
    for ident in identities:
        if warn is not None and ident.clip_skip != chosen:
            warn(
                f"{where}identity {ident.name!r} was learned at clip skip {ident.clip_skip}; generating at clip skip "
                f"{chosen}" + ("" if given is not None else " (the identities disagree; pass --clip-skip)")
            )
    return chosen


def _jobs(
    library: Library, prompt: str | None, prompts: str | None, identity: str | None, negative: str, hooks: GenerateHooks
) -> tuple[list[PromptJob], dict[str, Identity]]:
    """One PromptJob per prompt (after `--identity` templating), and every identity the prompts name."""
    default = library.get(identity) if identity else None
    texts = prompt_texts(prompt, prompts, hooks.read)
    if not texts and default is None:
        raise CrossinitError("no prompt given; pass a prompt, --prompts FILE (or - for stdin), or --identity NAME")
    written = texts or [""]
    texts = [apply_template(t, default) for t in written]
    known = resolve_identities(library, [*texts, negative])
    hint_plain_names(library, texts, hooks.hint)
    jobs = []
    for text, own in zip(texts, written):
        named = [known[sample.ref_key(r)] for r in sample.identity_refs(text)]
        jobs.append(PromptJob(text, named, pngfiles.file_slug(own, named)))  # named by the user's words
    return jobs, known


def _sampling_choices(flags: SamplingFlags) -> tuple[list[int], int, str, tuple[int, int] | None]:
    """The seeds, steps, scheduler name and size the flags ask for, each checked."""
    n = flags.n
    if n < 1:
        raise CrossinitError(f"-n must be at least 1, not {n}")
    steps = sample.DEFAULT_STEPS if flags.steps is None else flags.steps
    if steps < 1:
        raise CrossinitError(f"--steps must be at least 1, not {steps}")
    if flags.guidance is not None and not math.isfinite(flags.guidance):  # NaN latents: black images
        raise CrossinitError(f"--guidance must be a finite number, not {flags.guidance}")
    scheduler = (flags.scheduler or sample.DEFAULT_SCHEDULER).strip().lower()
    sample.scheduler_choice(scheduler)
    size = sample.parse_size(flags.size) if flags.size is not None else None
    base_seed = secrets.randbelow(2**32) if flags.seed is None else flags.seed
    sample.check_seed_range(base_seed, n)
    return [base_seed + i for i in range(n)], steps, scheduler, size


# ---- prompts ------------------------------------------------------------------------------------


def prompt_texts(prompt: str | None, prompts: str | None, read: Callable[[str], str] | None = None) -> list[str]:
    """The prompts to run: the positional one, or one per line of `--prompts FILE|-` (its text from `read`)."""
    if prompts is None:
        return [prompt.strip()] if prompt is not None and prompt.strip() else []
    if prompt is not None and prompt.strip():
        raise CrossinitError("give either a prompt or --prompts, not both")
    text = read(prompts) if read is not None else _read_file(prompts)
    source = "stdin" if prompts == "-" else prompts
    lines = [line.strip() for line in text.splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise CrossinitError(f"no prompts in {source} (blank lines and # comments are skipped)")
    return found


def _read_file(source: str) -> str:
    try:
        return Path(source).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CrossinitError(f"cannot read prompts from {source}: {reason}") from None


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
                raise library.unknown(written, f" (in prompt {short(text)})")
            found[key] = library.get(written)  # a damaged entry says so itself
    return found


def hint_plain_names(library: Library, texts: list[str], hint: Callable[[str], None] | None) -> None:
    """A hint for each stored identity a prompt names without `<>` ("alice on a beach"): as plain text the
    model reads it as a word, not as the learned person."""
    if hint is None:
        return
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
                hint(
                    f"hint: '{word}' in prompt {short(text)} is plain text; write "
                    f"<{word.rstrip('.-')}> to use the stored identity"
                )


def short(text: str, limit: int = 60) -> str:
    """A prompt as messages quote it: JSON-quoted, cut to `limit` characters."""
    return json.dumps(text if len(text) <= limit else text[: limit - 1] + "…", ensure_ascii=False)


# ---- the model: loaded once, identities added once, then every prompt --------------------------


@dataclass
class LoadedRun:
    """The pipeline with the run's identities in it, reusable for any number of prompts and settings."""

    pipe: Any
    mapping: dict[str, Any]
    model: str
    placement: devices.Placement

    def images(
        self, job: PromptJob, choices: Choices, hooks: GenerateHooks = GenerateHooks(), *, one_at_a_time: bool = False
    ) -> Iterator[GeneratedImage]:
        """`job`'s images, one per seed of `choices`: sampled in as few batches as memory allows, or with
        `one_at_a_time` one pipeline call per image (each yielded the moment it exists)."""
        sample.check_clip_skip(self.model, choices.clip_skip, self.pipe)
        width, height = choices.size or sample.native_size(self.pipe)
        settings = sample.Settings(
            width=width,
            height=height,
            steps=choices.steps,
            guidance=choices.guidance,
            negative=sample.expand_prompt(choices.negative, self.mapping),
            scheduler=choices.scheduler,
            clip_skip=choices.clip_skip,
        )
        record = pngfiles.run_record(settings, self.model, self.placement)
        expanded = sample.expand_prompt(job.prompt, self.mapping)
        for name in sample.truncated_identities(self.pipe, expanded, self.mapping):
            hooks.say_warning(_truncated(job, name))
        if hooks.on_prompt is not None:
            hooks.on_prompt(job.prompt, settings.steps)
        if one_at_a_time:
            for i, seed in enumerate(choices.seeds):
                with hooks.held(f"line {job.line}, image {i}"):
                    (image,) = sample.sample(self.pipe, expanded, [seed], settings, on_step=hooks.on_step)
                yield GeneratedImage(image, job, expanded, choices, seed, i, record)
            return
        with hooks.held(f"sampling {len(choices.seeds)} image(s) for {short(job.prompt)}"):
            images = sample.sample(self.pipe, expanded, choices.seeds, settings, on_step=hooks.on_step)
        for i, image in enumerate(images):
            yield GeneratedImage(image, job, expanded, choices, choices.seeds[i], i, record)


def _truncated(job: PromptJob, name: str) -> str:
    if job.line is not None:
        return f"line {job.line}: <{name}> falls in the part of the prompt the text encoder cuts off"
    return (
        f"prompt {short(job.prompt)} is longer than the text encoder's window; <{name}> falls in the part that is "
        "cut off"
    )


@dataclass(frozen=True)
class LoadRequest:
    """What `load_run` loads: the model, where, and the identities' vectors to add to it."""

    model: str
    placement: devices.Placement
    vectors: dict[str, Any]  # name -> effective vectors, one array per text encoder (Library.effective_parts)
    identities: tuple[Identity, ...] = ()  # checked against the model before its weights move (sample.load)
    clip_skip: int | None = None  # checked against the loaded text encoder when given
    model_origin: str = ""  # where the model came from, added to an error about it (model_origin)


def load_run(request: LoadRequest, hooks: GenerateHooks = GenerateHooks()) -> LoadedRun:
    """The pipeline loaded once, with every identity added once."""
    placement = request.placement
    message = f"loading {request.model} on {placement.device} ({placement.dtype})"
    loading = hooks.loading(message) if hooks.loading is not None else nullcontext()
    with loading, hooks.held("model load"), naming_origin(request.model_origin):
        pipe = sample.load(request.model, placement, request.identities)
    if request.clip_skip is not None:
        with naming_origin(request.model_origin):
            sample.check_clip_skip(request.model, request.clip_skip, pipe)
    mapping = sample.add_identities(pipe, request.vectors, model=request.model)
    return LoadedRun(pipe, mapping, request.model, placement)


def load_plan(plan: Plan, hooks: GenerateHooks = GenerateHooks()) -> LoadedRun:
    """The pipeline for a planned run, with its identities."""
    request = LoadRequest(
        plan.model,
        plan.placement,
        plan.vectors,
        tuple(plan.identities),
        plan.choices.clip_skip,
        model_origin=plan.model_origin,
    )
    return load_run(request, hooks)


def generate(
    library: Library,
    prompt: str | None,
    flags: SamplingFlags,
    run: RunOptions,
    hooks: GenerateHooks = GenerateHooks(),
) -> list[GeneratedImage]:
    """The images `generate PROMPT` would write, without writing a file: the same pixels, seeds and
    metadata as the command's PNGs."""
    plan = plan_run(library, prompt, None, flags, run, hooks, write=False)
    loaded = load_plan(plan, hooks)
    return [image for job in plan.jobs for image in loaded.images(job, plan.choices, hooks)]


# ---- files --------------------------------------------------------------------------------------


def write_image(image: GeneratedImage, folder: Path) -> Written:
    """Save one image as `<slug>-<batch seed>-<index>.png` (a free name) with its metadata."""
    path = pngfiles.save_png(image.image, folder, image.stem, image.metadata)
    job = image.job
    return Written("image", path, job.prompt, image.choices.negative, image.seed, job.names, index=image.index)


def write_grid(images: list[GeneratedImage], written: list[Written], folder: Path) -> Written:
    """Save the contact sheet of one prompt's `images` (already `written`), naming their files."""
    first = images[0]
    choices, job = first.choices, first.job
    paths = [str(w.path) for w in written]
    seed = choices.base_seed
    facts = ImageFacts(job.prompt, first.expanded, choices.negative, seed, seed, None, tuple(job.identities))
    meta = pngfiles.png_metadata(facts, first.record)
    meta["crossinit"]["images"] = paths
    sheet = pngfiles.contact_sheet([i.image for i in images])
    path = pngfiles.save_png(sheet, folder, f"{job.slug}-{choices.base_seed}-grid", meta)
    return Written("grid", path, job.prompt, choices.negative, choices.base_seed, job.names, images=paths)
