"""The learning session: photos of a face in, a stored identity out (faces -> cross init -> training -> library).

`learn_identity` is the one entry point for a new identity, `resume` continues an interrupted run; `learn`,
`learn --resume`, `learn --batch` (batches.py) and the self-test all go through them or their parts:
`load_trainer` loads a model once (a batch learns many identities on it) and `train_and_store` trains and
stores one `LearnJob`. Everything a user can get wrong (name, settings, photos) is checked before the
model is loaded, so a mistake costs a second, not a model load. The library is written once, at the end,
atomically: Ctrl-C or a crash at any point leaves it as it was.

Silent: nothing here prints or exits. A caller hears a session through `LearnHooks` (progress, warnings,
the phases and their times) and gets `Learned` back; mistakes are CrossinitError.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.config import DEFAULT_MODEL, model_reference
from crossinit_cli.devices import check_model_reference
from crossinit_cli.encoding import precision as part_precision
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library, validate_name

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from crossinit_cli import faces
    from crossinit_cli.devices import Placement
    from crossinit_cli.faces import FaceCrop
    from crossinit_cli.families import SizeCondition
    from crossinit_cli.memory import MicroBatch
    from crossinit_cli.train import Progress, TrainConfig, TrainResult

SNAPSHOT_EVERY = {"full": 40, "fast": None}
"""`--snapshot-every` by mode: full mode keeps 8 points of its 320 steps; fast mode's 25 steps, none."""
ALIGN_SIZE = 512
"""Photos are checked and aligned at SD's native size before the model is loaded; a model of another size
gets them cut again at its own from the same landmarks (FaceCrop.at_size), with no second detection."""


@dataclass(frozen=True)
class Settings:
    """How to train, as `learn`'s flags (and a batch manifest's columns) say it; None takes the mode's default."""

    mode: str = "full"
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    reg_weight: float | None = None
    seed: int = 0
    align: bool = True
    clip_skip: int = 1  # the text-encoder layer the identity is learned at (A1111's Clip skip; SD 1.x/2.x)
    micro_batch: int | None = None  # images through the UNet at once (None: what fits); not part of the result
    checkpointing: str = "auto"  # the UNet's gradient checkpointing: "on", "off", "auto" (by the free memory)

    def train_config(self, resolution: int | None = None) -> TrainConfig:
        """The mode's TrainConfig with these overrides."""
        from crossinit_cli.train import TrainConfig

        return TrainConfig.for_mode(
            self.mode,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            reg_weight=self.reg_weight,
            seed=self.seed,
            resolution=resolution,
            clip_skip=self.clip_skip,
        )


@dataclass(frozen=True)
class LearnRequest(Settings):
    """What `crossinit learn PHOTOS` asks for, by its flags' names; model, device and dtype as resolved (the
    CLI merges them with the saved config first)."""

    name: str | None = None  # None: the first photo's stem
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    resolution: int | None = None
    snapshot_every: int | None = None
    strict: bool = False  # refuse photos whose faces look like different people, instead of warning


@dataclass(frozen=True)
class Start:
    """Training is about to begin: what a person is told ("learning NAME from 3 photos on cuda ...")."""

    name: str
    photos: int
    device: str
    dtype: str
    family: str  # the family's title
    size: int
    steps: int
    batch_size: int
    lr: float
    clip_skip: int
    resumed_at: int | None = None  # `resume`: the step the run continues from


@dataclass(frozen=True)
class LearnHooks:
    """What a caller hears of a session; every hook optional (none given: the session is silent)."""

    on_progress: Progress | None = None  # (step, steps, loss) after each training step
    on_warning: Callable[[str], None] | None = None  # something odd that does not stop the session
    on_photos: Callable[[faces.Gathered], None] | None = None  # photos used and files skipped, once all is checked
    on_start: Callable[[Start], None] | None = None
    on_micro_batch: Callable[[MicroBatch], None] | None = None  # told before the first step
    on_phase_start: Callable[[str], None] | None = None
    on_phase: Callable[[str, float], None] | None = None  # a phase's name and seconds, as it ends (failed too)
    loading: Callable[[str], AbstractContextManager[Any]] | None = None  # wraps the model load (given the model)

    def warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)

    def took(self, phase: str, seconds: float) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, seconds)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time `name` for on_phase (also when it fails)."""
        if self.on_phase_start is not None:
            self.on_phase_start(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.took(name, time.perf_counter() - started)


SILENT = LearnHooks()


@dataclass(frozen=True)
class Learned:
    """A stored identity, as the library holds it, with its training's result and folder."""

    identity: Identity
    result: TrainResult
    target: Path
    model: str  # the base model it was learned on


def learn_identity(library: Library, photos: list[Path], request: LearnRequest, hooks: LearnHooks = SILENT) -> Learned:
    """Learn and store one identity from `photos`: cheap checks (name, settings, photos, model reference),
    then the model, then training and the one library write."""
    from crossinit_cli import faces

    name = _identity_name(request.name, photos)
    _check_name_free(library, name, request.force)
    snapshot_every = _snapshot_every(request.snapshot_every, request.mode)
    train_config = _train_config(request)
    model_id = request.model
    gathered = faces.gather_photos(photos)
    with hooks.phase("face detection and alignment"):  # a folder's unusable files are skipped, with why
        crops, gathered = faces.align_gathered(gathered, ALIGN_SIZE, align=request.align, warn=hooks.warn)
    paths = gathered.photos
    odd_faces = check_photos(crops, align=request.align, strict=request.strict, hooks=hooks)
    # Photos first (a bad photo is named whatever the model), then the model, still before heavy imports.
    check_model_reference(model_id)
    check_peeked_clip_skip(model_id, train_config.clip_skip)  # SD3, Flux, SDXL with a clip skip...: before loading
    if hooks.on_photos is not None:
        hooks.on_photos(gathered)
    if odd_faces:
        hooks.warn(odd_faces)

    # ---- the model, then training and the one write ---------------------------------------------------
    from crossinit_cli import devices

    with hooks.phase("imports"):
        devices.import_for_training()
    placement = devices.resolve(request.device, request.dtype, training=True)
    trainer = load_trainer(library, model_id, placement, clip_skip=train_config.clip_skip, hooks=hooks)
    job = LearnJob(name, paths, crops, train_config, request.mode, request.align, request.force)
    job = replace(job, snapshot_every=snapshot_every, resumable=True, micro_batch=request.micro_batch)
    job = replace(job, checkpointing=request.checkpointing)
    learned = train_and_store(library, trainer, job, hooks)
    return replace(learned, identity=library.get(name))


def check_peeked_clip_skip(model_id: str, clip_skip: int) -> None:
    """Refuse a model of an unsupported kind, or a clip skip its family or text encoder cannot take, from
    its configs alone (families.peek), before anything heavy is imported."""
    from crossinit_cli import families

    peeked = families.peek(model_id)
    if peeked is not None:
        families.check_clip_skip(peeked.family, clip_skip, peeked.layers)


@dataclass(frozen=True)
class FixedCost:
    """A whole command's time and its fixed cost (all but the training steps: Python's imports, the model
    load, faces, the cross init, the VAE encodes, the write), which no --steps changes; also in CPU time
    since the process started, which other work on a shared machine barely changes."""

    total_s: float
    fixed_s: float
    fixed_cpu_s: float


def fixed_cost(result: TrainResult, total_s: float) -> FixedCost:
    """The fixed cost of a session that took `total_s` since its process started, of which `result` trained."""
    import os

    used = os.times()
    return FixedCost(total_s, total_s - result.steps_s, used.user + used.system - result.steps_cpu_s)


def check_photos(crops: list[FaceCrop], *, align: bool, strict: bool, hooks: LearnHooks = SILENT) -> str | None:
    """Compare the photos' faces: the warning to give about photos that look like someone else (None: they
    look alike), or with `strict` a CrossinitError. With --no-align no detector runs, so there are no faces
    to compare; one photo needs no comparison (and no descriptor)."""
    from crossinit_cli import faces

    if not align:
        return None
    with hooks.phase("face comparison"):
        odd = faces.odd_faces(crops)
    if not odd:
        return None
    message = _odd_message(odd, len(crops))
    if strict:
        raise CrossinitError(f"{message}; nothing stored (leave it out, or learn without --strict)")
    return f"{message}; learning from every photo anyway (--strict refuses)"


def _odd_message(odd: list[faces.OddFace], photos: int) -> str:
    """One line naming the photos that look like someone else, with their face distance."""
    from crossinit_cli.faces import SAME_PERSON_DISTANCE

    threshold = f"the same person is usually under {SAME_PERSON_DISTANCE:g}"
    if photos == 2 and len(odd) == 2:
        pair = f"{odd[0].photo} and {odd[1].photo}"
        return f"{pair} do not look like the same person (face distance {odd[0].distance:.2f}; {threshold})"
    named = ", ".join(f"{o.photo} ({o.distance:.2f})" for o in odd)
    if len(odd) == photos:
        return f"the photos look like different people: {named} (median face distance to the others; {threshold})"
    if len(odd) == 1:
        return (
            f"{odd[0].photo} does not look like the other photos (median face distance {odd[0].distance:.2f} "
            f"to them; {threshold})"
        )
    return f"{named} do not look like the other photos (median face distance to them; {threshold})"


def _check_name_free(library: Library, name: str, force: bool) -> None:
    """Without --force, neither a stored identity nor an unfinished run may already have the name."""
    from crossinit_cli import checkpoint

    check_not_stored(library, name, force)
    unfinished = checkpoint.find(library.home, name)
    if unfinished is not None and not force:
        raise CrossinitError(
            f"{name!r} has an unfinished run (step {unfinished.step} of {unfinished.steps}); continue it with "
            f"`crossinit learn --resume {name}`, or pass --force to start over"
        )


def check_not_stored(library: Library, name: str, force: bool) -> None:
    if library.exists(name) and not force:
        raise CrossinitError(f"identity {name!r} already exists; pass --force to replace it, or --name")


MAX_SEED = 2**63 - 1
"""The largest training seed (torch's generators take a signed 64-bit one)."""
MAX_LR = 1e30
"""The largest learning rate taken: finite with room to spare in float32 (AdamW overflows near 1e38);
rates far above 1 only make training diverge, which the NaN guard then reports (as its test does at 1e30)."""


def check_training_values(*, lr: float | None, seed: int | None, where: str = "") -> None:
    """`--lr` finite and in (0, MAX_LR], `--seed` in 0..2^63-1: one line before any photo or model is read
    (the same for a batch row and a checkpoint's settings, `where` saying which)."""
    if lr is not None and not (math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise CrossinitError(f"{where}--lr must be a positive number of at most {MAX_LR:g}, not {lr:g}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        shown = str(seed) if len(str(seed)) <= 40 else f"a number of {len(str(seed))} digits"
        raise CrossinitError(f"{where}--seed must be a whole number from 0 to {MAX_SEED}, not {shown}")


def _train_config(request: LearnRequest) -> TrainConfig:
    check_training_values(lr=request.lr, seed=request.seed)
    return request.train_config(request.resolution)


def _snapshot_every(given: int | None, mode: str) -> int | None:
    if given is None:
        return SNAPSHOT_EVERY[mode]
    if given < 0:
        raise CrossinitError(f"--snapshot-every must be 0 (none) or a number of steps, not {given}")
    return given or None


def _identity_name(name: str | None, photos: list[Path]) -> str:
    if name is not None:
        return validate_name(name)
    if not photos:
        raise CrossinitError("no photos given")
    stem = Path(photos[0]).stem or Path(photos[0]).resolve().name
    try:
        return validate_name(stem)
    except CrossinitError as exc:
        raise CrossinitError(f"{exc} (taken from the photo's file name); pass --name") from None


# ---- a model loaded once, and one identity trained on it and stored ----------------------------------


@dataclass
class Trainer:
    """A base model loaded for training once; it learns any number of identities in turn."""

    model_id: str
    pipe: Any  # devices.TrainingModel: the parts training uses, by a pipeline's names
    placement: Placement
    resolution: int
    fingerprint: str
    init: Any  # list of torch.Tensor [2, width], one per text encoder: the same for every identity of this model
    family: Any = None  # families.Family
    slots: Any = None  # families.slots(pipe)
    init_clip_skip: int = 1  # the clip skip `init` was taken at
    cache_dir: Path | None = None  # where cross inits are cached (crossinit.cross_init)
    other_inits: dict[int, Any] = field(default_factory=dict)  # starts at other clip skips, by clip skip
    prints: list[str] = field(default_factory=list)  # each text encoder's fingerprint: the init cache's key

    @property
    def latent_cache(self) -> Path | None:
        """Where the crops' latents are cached (latents.py), beside the cross inits."""
        from crossinit_cli import latents

        return latents.folder(self.cache_dir.parent.parent) if self.cache_dir is not None else None

    def at(self, clip_skip: int) -> Trainer:
        """This trainer with its `init` at `clip_skip` (each computed once: a batch's rows may differ)."""
        from crossinit_cli import crossinit, families

        if clip_skip == self.init_clip_skip:
            return self
        if clip_skip not in self.other_inits:
            families.check_clip_skip(self.family, clip_skip, families.text_layers(self.slots[0].text_encoder))
            prints = self.prints or None  # hashing a 200 MB token table again is seconds per encoder
            self.other_inits[clip_skip] = crossinit.cross_init_slots(self.slots, self.cache_dir, clip_skip, prints)
        return replace(self, init=self.other_inits[clip_skip], init_clip_skip=clip_skip)


def load_trainer(
    library: Library, model_id: str, placement: Placement, *, clip_skip: int = 1, hooks: LearnHooks = SILENT
) -> Trainer:
    """Load the model's training parts (devices.load_for_training) and compute (or read) its cross init at
    `clip_skip`."""
    from crossinit_cli import crossinit, devices, families, hf, train

    hf.silence_libraries()  # for the whole run: the model stays loaded while it trains
    with hooks.loading(model_id) if hooks.loading is not None else contextlib.nullcontext():
        with hooks.phase("model load"):
            parts = devices.load_for_training(model_id, placement)
        family = parts.family
        slots = families.slots(parts, family)
        families.check_clip_skip(family, clip_skip, families.text_layers(slots[0].text_encoder))
        cache_dir = library.home / ".cache" / "init"
        with hooks.phase("cross initialization"):
            prints = [crossinit.encoder_fingerprint(s.text_encoder) for s in slots]  # once: the init's cache key too
            init = crossinit.cross_init_slots(slots, cache_dir, clip_skip, prints)
    resolution = train.model_resolution(parts.unet, parts.vae)
    fingerprint = combined_fingerprint(prints)
    return Trainer(
        model_id, parts, placement, resolution, fingerprint, init, family, slots, clip_skip, cache_dir, prints=prints
    )


def combined_fingerprint(prints: list[str]) -> str:
    """A model's fingerprint from its text encoders' (crossinit.encoder_fingerprint; SDXL: both tables together)."""
    import hashlib

    return prints[0] if len(prints) == 1 else hashlib.sha256("+".join(prints).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LearnJob:
    """One identity to train on a loaded model and store (`train_and_store`).

    `crops` are FaceCrops, or (with `resume`, a checkpoint.Run and its state) the run's stored images.
    `resumable` keeps a checkpoint under the library home while it trains (see checkpoint.py)."""

    name: str
    paths: list[Path]
    crops: list[FaceCrop]
    train_config: TrainConfig
    mode: str
    align: bool
    force: bool
    snapshot_every: int | None = None
    resumable: bool = False
    resume: tuple[Any, dict[str, Any] | None] | None = None
    micro_batch: int | None = None  # train.run's: None picks what fits in the free memory
    checkpointing: str = "auto"  # "on", "off", or "auto": by the free memory (memory.plan)


def train_and_store(library: Library, trainer: Trainer, job: LearnJob, hooks: LearnHooks = SILENT) -> Learned:
    """Train one identity on a loaded model and store it: the library is written once, atomically. One
    process at a time trains a name (checkpoint.running); the name is checked again once that is held, so
    an identity stored meanwhile by another `learn` is refused before training, leaving nothing behind."""
    from crossinit_cli import checkpoint

    with checkpoint.running(library.home, job.name):
        if job.resume is None:
            check_not_stored(library, job.name, job.force)
        return _train_and_store(library, trainer, job, hooks)


def _train_and_store(library: Library, trainer: Trainer, job: LearnJob, hooks: LearnHooks) -> Learned:
    trainer = trainer.at(job.train_config.clip_skip)  # its start at the job's clip skip
    if job.resume is None:
        check_model_resolution(job.train_config.resolution, trainer.resolution)
    images = _training_images(trainer, job)
    run, state = job.resume if job.resume is not None else (None, None)
    if hooks.on_start is not None:
        hooks.on_start(_start(trainer, job, len(images), state if job.resume is not None else None))
    sizes = _size_conditions(trainer, job)
    if job.resumable and run is None:
        run = _start_checkpoint(library, trainer, job, images, sizes)
    result = _train(trainer, job, (images, sizes), run, state, hooks)
    identity = _identity(trainer, job, result, state, sizes)
    with hooks.phase("library write"):
        learned, init = _stored_vectors(trainer.family, result)
        target = library.add(identity, learned, init, crops=images, force=job.force, snapshots=result.snapshots)
    if run is not None:
        run.discard()  # after the write: killed in between, the run is still there and the entry is whole
    return Learned(identity, result, target, trainer.model_id)


def min_resolution(native: int) -> int:
    """The least `--resolution` a model takes: half its own size, in multiples of 64 (256 for SD 1.x and
    2.x-base, 384 for SD 2.x-768, 512 for SDXL, 64 for the tiny test models)."""
    return max(64, native // 2 // 64 * 64)


def check_model_resolution(resolution: int | None, native: int) -> None:
    """Refuse, in one line, a `--resolution` below what the loaded model takes (min_resolution)."""
    least = min_resolution(native)
    if resolution is not None and resolution < least:
        raise CrossinitError(
            f"--resolution {resolution} is too small for this model: at least {least} (half its own {native} px)"
        )


def _start(trainer: Trainer, job: LearnJob, photos: int, state: dict[str, Any] | None) -> Start:
    config, placement = job.train_config, trainer.placement
    resumed_at = None if job.resume is None else (state["step"] if state else 0)
    return Start(
        name=job.name,
        photos=photos,
        device=placement.device,
        dtype=placement.dtype,
        family=trainer.family.title,
        size=config.resolution or trainer.resolution,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        clip_skip=config.clip_skip,
        resumed_at=resumed_at,
    )


def _training_images(trainer: Trainer, job: LearnJob) -> list[Any]:
    """The images to train on: the crops, cut again at the model's size from the landmarks already found
    when it is not ALIGN_SIZE (FaceCrop.at_size: no second detection; a resumed run's stored images are
    already at its size)."""
    if job.resume is not None:
        return list(job.crops)
    size = job.train_config.resolution or trainer.resolution
    return [c.at_size(size).image for c in job.crops]


def _size_conditions(trainer: Trainer, job: LearnJob) -> list[SizeCondition] | None:
    """SDXL's size and crop conditioning of each photo (`faces.FaceCrop.size_condition`); None for a family
    without it. A resumed run takes the values it started with, from its checkpoint (a run started before
    they were kept: none, the training size, as it began)."""
    from crossinit_cli.families import SizeCondition

    if not trainer.family.time_ids:
        return None
    if job.resume is not None:
        saved = job.resume[0].settings.get("size_conditioning")
        try:
            sizes = None if saved is None else [SizeCondition.from_record(raw) for raw in saved]
        except (KeyError, TypeError, ValueError):
            sizes = []
        if sizes is not None and len(sizes) != len(job.crops):
            raise CrossinitError(
                f"the checkpoint of {job.name!r} is damaged (its size conditioning); "
                f"`crossinit remove {job.name} --unfinished`"
            )
        return sizes
    size = job.train_config.resolution or trainer.resolution
    return [crop.size_condition(size) for crop in job.crops]


def _start_checkpoint(
    library: Library, trainer: Trainer, job: LearnJob, images: list[Any], sizes: list[SizeCondition] | None
) -> Any:
    """A checkpoint.Run holding the job's settings, images and size conditions, so `learn --resume` can
    continue it with the same."""
    from crossinit_cli import checkpoint

    placement = trainer.placement
    settings = {
        "name": job.name,
        "model": trainer.model_id,
        "device": placement.device,
        "placed_on": placement.device,
        "dtype": placement.dtype,
        "dtype_reason": placement.dtype_reason,
        "mode": job.mode,
        "align": job.align,
        "force": job.force,
        "photos": [str(p) for p in job.paths],
        "snapshot_every": job.snapshot_every,
        "train": asdict(job.train_config),
        **({"size_conditioning": [c.to_record() for c in sizes]} if sizes is not None else {}),
    }
    return checkpoint.start(library.home, settings, images)


def _train(
    trainer: Trainer,
    job: LearnJob,
    photos: tuple[list[Any], Any],
    run: Any,
    state: dict[str, Any] | None,
    hooks: LearnHooks,
) -> TrainResult:
    """train.run on `photos` (the images and their size conditions); a failed run's checkpoint is dropped, a
    Ctrl-C'd one kept."""
    from crossinit_cli import train

    images, sizes = photos
    parts = train.ModelParts.of_pipeline(trainer.pipe, trainer.family, trainer.slots)
    try:
        with hooks.phase("training"):
            save = run.save if run is not None else None
            run_hooks = train.RunHooks(
                hooks.on_progress, job.snapshot_every, save, state, hooks.on_micro_batch, trainer.latent_cache
            )
            config, placement = job.train_config, trainer.placement
            memory = train.StepMemory(job.micro_batch, job.checkpointing)
            result = train.run(parts, images, trainer.init, config, placement, run_hooks, sizes=sizes, memory=memory)
        hooks.took("VAE encode", result.encode_s)
        hooks.took(f"training steps ({result.steps_run})", result.steps_s)
        return result
    except CrossinitError:
        if run is not None:  # diverged or out of memory: the same settings would fail the same way
            run.discard()
        from crossinit_cli import latents

        latents.forget_images(trainer.latent_cache, images)  # a failed run's faces leave no latents behind
        raise
    except KeyboardInterrupt:
        if run is None:
            raise
        raise KeyboardInterrupt(
            f"interrupted; nothing was stored, and the run is kept at step {run.step} of {job.train_config.steps}: "
            f"continue it with `crossinit learn --resume {job.name}`"
        ) from None


def _identity(
    trainer: Trainer,
    job: LearnJob,
    result: TrainResult,
    state: dict[str, Any] | None,
    sizes: list[SizeCondition] | None,
) -> Identity:
    """The identity's metadata: its model, and how it was trained (with every encoder's norms and, on SDXL,
    each photo's size conditioning)."""
    config = job.train_config
    conditioned = [{"photo": p.name, **c.to_record()} for p, c in zip(job.paths, sizes)] if sizes else None
    return Identity(
        name=job.name,
        tokens=int(result.learned.shape[0]),
        width=int(result.learned.shape[1]),
        family=trainer.family.name,
        base_model=model_reference(trainer.model_id),
        encoder_fingerprint=trainer.fingerprint,
        source="learn",
        clip_skip=config.clip_skip,
        training={
            "mode": job.mode,
            "steps": config.steps,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "reg_weight": config.reg_weight,
            "seed": config.seed,
            "final_loss": round(result.final_loss, 6),
            "per_step_s": round(result.per_step_s, 4),
            "total_s": round(result.total_s, 3),
            "device": result.device,
            "dtype": result.dtype,
            "dtype_reason": trainer.placement.dtype_reason,
            "precision": {**part_precision(trainer.placement), "loader": getattr(trainer.pipe, "loader", "")},
            "photos": [p.name for p in job.paths],
            "resolution": result.resolution,
            "aligned": job.align,
            "norms": result.norms,
            **({"size_conditioning": conditioned} if conditioned else {}),
            **_micro_batch_record(result),
            **({"resumed_at": int(state["step"])} if state else {}),
        },
        snapshots=[{"step": step, "loss": result.snapshot_losses[step]} for step in result.snapshots],
    )


def _micro_batch_record(result: TrainResult) -> dict[str, Any]:
    """How the steps were computed, not part of the result: the micro-batch and the UNet's gradient
    checkpointing, and why each was chosen."""
    micro = result.micro_batch
    if micro is None:
        return {}
    return {
        "micro_batch": micro.size,
        "micro_batch_reason": micro.reason,
        "checkpointing": micro.checkpointing,
        "checkpointing_reason": micro.checkpointing_reason,
    }


def _stored_vectors(family: Any, result: TrainResult) -> tuple[Any, Any]:
    """What the store keeps: one learned/init pair (SD 1.x/2.x), or one per encoder key (SDXL)."""
    if not family.multi:
        return result.learned, result.init
    return {k: v[0] for k, v in result.parts.items()}, {k: v[1] for k, v in result.parts.items()}
