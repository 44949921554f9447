"""`learn`: photos of a face in, a stored identity out (faces -> cross init -> training -> library).

Everything a user can get wrong (name, settings, photos) is checked before the model is loaded, so a
mistake costs a second, not a model load. The library is written once, at the end, atomically: Ctrl-C
or a crash at any point leaves it as it was.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from crossinit_cli import ui
from crossinit_cli.commands.common import stderr_progress
from crossinit_cli.devices import check_model_reference
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library, validate_name

if TYPE_CHECKING:
    from crossinit_cli.devices import Placement
    from crossinit_cli.faces import FaceCrop
    from crossinit_cli.train import Progress, TrainConfig, TrainResult

SNAPSHOT_EVERY = {"full": 40, "fast": None}
"""`--snapshot-every` by mode: full mode keeps 8 points of its 320 steps; fast mode's 25 steps, none."""
ALIGN_SIZE = 512
"""Photos are checked and aligned at SD's native size before the model is loaded; a model of another size
gets them aligned again at its own (a dlib pass is ~60 ms a photo, a model load several seconds)."""


def learn_identity(
    library: Library,
    photos: list[Path],
    *,
    name: str | None,
    mode: str,
    steps: int | None,
    lr: float | None,
    batch_size: int | None,
    reg_weight: float | None,
    model: str | None,
    device: str | None,
    resolution: int | None = None,
    dtype: str | None,
    seed: int,
    force: bool,
    align: bool,
    quiet: bool,
    as_json: bool,
    snapshot_every: int | None = None,
) -> int:
    from crossinit_cli import checkpoint, faces
    from crossinit_cli import config as settings
    from crossinit_cli.train import TrainConfig

    # ---- cheap checks first: name, settings, photos ------------------------------------------------
    name = _identity_name(name, photos)
    if library.exists(name) and not force:
        raise CrossinitError(f"identity {name!r} already exists; pass --force to replace it, or --name")
    unfinished = checkpoint.find(library.home, name)
    if unfinished is not None and not force:
        raise CrossinitError(
            f"{name!r} has an unfinished run (step {unfinished.step} of {unfinished.steps}); continue it with "
            f"`crossinit learn --resume {name}`, or pass --force to start over"
        )
    snapshot_every = _snapshot_every(snapshot_every, mode)
    if lr is not None and not lr > 0:
        raise CrossinitError(f"--lr must be a positive number, not {lr:g}")
    train_config = TrainConfig.for_mode(
        mode, steps=steps, lr=lr, batch_size=batch_size, reg_weight=reg_weight, seed=seed, resolution=resolution
    )
    defaults = settings.load_config()
    model_id = model or defaults.model
    paths = faces.collect_photos(photos)
    with ui.timed("face detection and alignment"):
        crops = faces.align_faces(paths, ALIGN_SIZE, align=align, warn=ui.warn)
    # Photos first (a bad photo is named whatever the model), then the model, still before heavy imports.
    check_model_reference(model_id)
    from crossinit_cli import families

    families.peek(model_id)  # SD3, Flux, a refiner...: one line now, not after a model load

    # ---- the model -----------------------------------------------------------------------------------
    from crossinit_cli import devices

    placement = devices.resolve(device or defaults.device, dtype or defaults.dtype, training=True)
    trainer = load_trainer(library, model_id, placement, quiet=quiet)

    # ---- training and the one write ------------------------------------------------------------------
    target, result = learn_and_store(
        library,
        trainer,
        name=name,
        paths=paths,
        crops=crops,
        train_config=train_config,
        mode=mode,
        align=align,
        force=force,
        quiet=quiet,
        snapshot_every=snapshot_every,
        resumable=True,
    )
    _report(library, name, result, target, model=model, quiet=quiet, as_json=as_json)
    return 0


def resume_identity(library: Library, name: str, *, quiet: bool, as_json: bool) -> int:
    """`learn --resume NAME`: continue an interrupted run from its checkpoint, with its own settings."""
    from crossinit_cli import checkpoint, devices
    from crossinit_cli.train import TrainConfig

    run = checkpoint.find(library.home, name)
    if run is None:
        raise CrossinitError(f"no unfinished run of {name!r}; `crossinit list` shows unfinished runs")
    saved = run.settings
    name = saved["name"]
    if library.exists(name) and not saved.get("force"):
        raise CrossinitError(f"identity {name!r} already exists; `crossinit remove {name}` first, or learn --force")
    state = run.load_state()
    crops = run.crops()
    model_id = saved["model"]
    check_model_reference(model_id)
    placement = devices.resolve(saved["device"], saved["dtype"], training=True)
    if placement.device != saved["placed_on"]:
        ui.warn(
            f"the run started on {saved['placed_on']} and continues on {placement.device}: the result will not "
            "equal an uninterrupted run bit for bit"
        )
    trainer = load_trainer(library, model_id, placement, quiet=quiet)
    size = saved["train"].get("resolution") or trainer.resolution
    if crops[0].size != (size, size):
        raise CrossinitError(f"the checkpoint of {name!r} was made for another model size; start over with learn")
    if not quiet:
        ui.info(f"resuming [bold]{escape(name)}[/] at step {state['step'] if state else 0} of {run.steps}")
    target, result = learn_and_store(
        library,
        trainer,
        name=name,
        paths=[Path(p) for p in saved["photos"]],
        crops=crops,
        train_config=TrainConfig(**{**saved["train"], "adam_betas": tuple(saved["train"]["adam_betas"])}),
        mode=saved["mode"],
        align=saved["align"],
        force=bool(saved.get("force")),
        quiet=quiet,
        snapshot_every=saved.get("snapshot_every"),
        resumable=True,
        resume=(run, state),
    )
    _report(library, name, result, target, model=model_id, quiet=quiet, as_json=as_json)
    return 0


def _snapshot_every(given: int | None, mode: str) -> int | None:
    if given is None:
        return SNAPSHOT_EVERY[mode]
    if given < 0:
        raise CrossinitError(f"--snapshot-every must be 0 (none) or a number of steps, not {given}")
    return given or None


def _report(
    library: Library, name: str, result: TrainResult, target: Path, *, model: str | None, quiet: bool, as_json: bool
) -> None:
    if as_json:
        from crossinit_cli.commands.library import identity_record

        ui.print_json(identity_record(library, library.get(name), detail=True))
    if not quiet:
        ui.info(
            f"learned [bold]{escape(name)}[/] in {result.total_s:.1f} s "
            f"({result.per_step_s:.3f} s/step, final loss {result.final_loss:.4f}); stored in {escape(str(target))}"
        )
        model_flag = f" --model {_shell_quote(model)}" if model else ""
        ui.info(escape(f'next: crossinit generate "a photo of a <{name}> person as an astronaut" -n 4{model_flag}'))


@dataclass
class Trainer:
    """A base model loaded for training once; it learns any number of identities in turn."""

    model_id: str
    pipe: Any
    placement: Placement
    resolution: int
    fingerprint: str
    init: Any  # list of torch.Tensor [2, width], one per text encoder: the same for every identity of this model
    family: Any = None  # families.Family
    slots: Any = None  # families.slots(pipe)


def load_trainer(library: Library, model_id: str, placement: Placement, *, quiet: bool) -> Trainer:
    """Load the model, free what training does not use, and compute (or read) its cross init."""
    from crossinit_cli import crossinit, devices, families, hf, train

    hf.silence_libraries()  # for the whole run: the model stays loaded while it trains
    # A spinner on a terminal only: until something has worked, stderr holds nothing but an error.
    with ui.err().status(f"loading {escape(model_id)}", spinner="dots") if not quiet else contextlib.nullcontext():
        with ui.timed("model load"):
            pipe = devices.load_pipeline(model_id)
        train.free_vae_decoder(pipe.vae)
        family = families.of_pipeline(pipe)
        slots = families.slots(pipe, family)
        fingerprint = model_fingerprint(slots)
        with ui.timed("cross initialization"):
            init = crossinit.cross_init_slots(slots, library.home / ".cache" / "init")
    resolution = train.model_resolution(pipe.unet, pipe.vae)
    return Trainer(model_id, pipe, placement, resolution, fingerprint, init, family, slots)


def model_fingerprint(slots: Any) -> str:
    """The text encoders' fingerprint (crossinit.encoder_fingerprint; SDXL: of both tables together)."""
    import hashlib

    from crossinit_cli import crossinit

    prints = [crossinit.encoder_fingerprint(s.text_encoder) for s in slots]
    return prints[0] if len(prints) == 1 else hashlib.sha256("+".join(prints).encode()).hexdigest()[:16]


def learn_and_store(
    library: Library,
    trainer: Trainer,
    *,
    name: str,
    paths: list[Path],
    crops: list[FaceCrop],
    train_config: TrainConfig,
    mode: str,
    align: bool,
    force: bool,
    quiet: bool,
    snapshot_every: int | None = None,
    resumable: bool = False,
    resume: tuple[Any, dict[str, Any] | None] | None = None,
) -> tuple[Path, TrainResult]:
    """Train one identity on a loaded model and store it: the library is written once, atomically.

    `crops` are FaceCrops, or (with `resume`, a checkpoint.Run and its state) the run's stored images.
    `resumable` keeps a checkpoint under the library home while it trains (see checkpoint.py)."""
    from crossinit_cli import checkpoint, faces, train

    size = train_config.resolution or trainer.resolution
    if resume is None:
        if size != ALIGN_SIZE:
            crops = faces.align_faces(paths, size, align=align)
        images = [c.image for c in crops]
    else:
        images = list(crops)
    placement = trainer.placement
    if not quiet:
        ui.info(
            f"learning [bold]{escape(name)}[/] from {len(images)} photo{'s' if len(images) != 1 else ''} on "
            f"{placement.device} ({placement.dtype}), {trainer.family.title} at {size} px: {train_config.steps} "
            f"steps, batch {train_config.batch_size}, lr {train_config.lr:g}"
        )
    pipe = trainer.pipe
    run, state = resume if resume is not None else (None, None)
    if resumable and run is None:
        run = checkpoint.start(
            library.home,
            {
                "name": name,
                "model": trainer.model_id,
                "device": placement.device,
                "placed_on": placement.device,
                "dtype": placement.dtype,
                "mode": mode,
                "align": align,
                "force": force,
                "photos": [str(p) for p in paths],
                "snapshot_every": snapshot_every,
                "train": asdict(train_config),
            },
            images,
        )
    try:
        with ui.timed("training"), _progress_display(quiet) as progress:
            result = train.train(
                tokenizer=pipe.tokenizer,
                text_encoder=pipe.text_encoder,
                unet=pipe.unet,
                vae=pipe.vae,
                scheduler_config=pipe.scheduler.config,
                crops=images,
                init=trainer.init,
                config=train_config,
                placement=placement,
                progress=progress,
                family=trainer.family,
                slots=trainer.slots,
                snapshot_every=snapshot_every,
                save_state=run.save if run is not None else None,
                resume_from=state,
            )
    except CrossinitError:
        if run is not None:  # diverged or out of memory: the same settings would fail the same way
            run.discard()
        raise
    except KeyboardInterrupt:
        if run is None:
            raise
        raise KeyboardInterrupt(
            f"interrupted; nothing was stored, and the run is kept at step {run.step} of {train_config.steps}: "
            f"continue it with `crossinit learn --resume {name}`"
        ) from None
    identity = Identity(
        name=name,
        tokens=int(result.learned.shape[0]),
        width=int(result.learned.shape[1]),
        family=trainer.family.name,
        base_model=_model_record(trainer.model_id),
        encoder_fingerprint=trainer.fingerprint,
        source="learn",
        training={
            "mode": mode,
            "steps": train_config.steps,
            "lr": train_config.lr,
            "batch_size": train_config.batch_size,
            "reg_weight": train_config.reg_weight,
            "seed": train_config.seed,
            "final_loss": round(result.final_loss, 6),
            "per_step_s": round(result.per_step_s, 4),
            "total_s": round(result.total_s, 3),
            "device": result.device,
            "dtype": result.dtype,
            "photos": [p.name for p in paths],
            "resolution": result.resolution,
            "aligned": align,
            **({"resumed_at": int(state["step"])} if state else {}),
        },
        snapshots=[{"step": step, "loss": result.snapshot_losses[step]} for step in result.snapshots],
    )
    with ui.timed("library write"):
        learned, init = _stored_vectors(trainer.family, result)
        target = library.add(identity, learned, init, crops=images, force=force, snapshots=result.snapshots)
    if run is not None:
        run.discard()  # after the write: killed in between, the run is still there and the entry is whole
    return target, result


def _stored_vectors(family: Any, result: TrainResult) -> tuple[Any, Any]:
    """What the store keeps: one learned/init pair (SD 1.x/2.x), or one per encoder key (SDXL)."""
    if not family.multi:
        return result.learned, result.init
    return {k: v[0] for k, v in result.parts.items()}, {k: v[1] for k, v in result.parts.items()}


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


def _model_record(model_id: str) -> str:
    """A local model is recorded by its absolute path, so `generate` finds it from any folder."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


class _progress_display:  # noqa: N801 - used as a context manager, like rich's own
    """Step, loss and ETA on stderr: a rich bar on a terminal, a plain line every ~10% otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.started = 0.0

    def __enter__(self) -> Progress | None:
        if self.quiet:
            return None
        self.started = time.perf_counter()
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        self.bar = stderr_progress(
            False,
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        if self.bar is not None:
            self.bar.start()
        return self.update

    def update(self, step: int, total: int, loss: float) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("training", total=total, loss="-")
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")
            return
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / step * (total - step)
            ui.info(f"step {step}/{total}  loss {loss:.4f}  eta {eta:.0f} s")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
