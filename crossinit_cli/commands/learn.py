"""`learn`: photos of a face in, a stored identity out (faces -> cross init -> training -> library).

Everything a user can get wrong (name, settings, photos) is checked before the model is loaded, so a
mistake costs a second, not a model load. The library is written once, at the end, atomically: Ctrl-C
or a crash at any point leaves it as it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from crossinit_cli import ui
from crossinit_cli.devices import check_model_reference
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library, validate_name

if TYPE_CHECKING:
    from crossinit_cli.devices import Placement
    from crossinit_cli.faces import FaceCrop
    from crossinit_cli.train import Progress, TrainConfig, TrainResult

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
    dtype: str | None,
    seed: int,
    force: bool,
    align: bool,
    quiet: bool,
    as_json: bool,
) -> int:
    from crossinit_cli import config as settings
    from crossinit_cli import faces
    from crossinit_cli.train import TrainConfig

    # ---- cheap checks first: name, settings, photos ------------------------------------------------
    name = _identity_name(name, photos)
    if library.exists(name) and not force:
        raise CrossinitError(f"identity {name!r} already exists; pass --force to replace it, or --name")
    if lr is not None and not lr > 0:
        raise CrossinitError(f"--lr must be a positive number, not {lr:g}")
    train_config = TrainConfig.for_mode(
        mode, steps=steps, lr=lr, batch_size=batch_size, reg_weight=reg_weight, seed=seed
    )
    defaults = settings.load_config()
    model_id = model or defaults.model
    paths = faces.collect_photos(photos)
    with ui.timed("face detection and alignment"):
        crops = faces.align_faces(paths, ALIGN_SIZE, align=align, warn=ui.warn)
    # Photos first (a bad photo is named whatever the model), then the model, still before heavy imports.
    check_model_reference(model_id)

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
    )

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
    return 0


@dataclass
class Trainer:
    """A base model loaded for training once; it learns any number of identities in turn."""

    model_id: str
    pipe: Any
    placement: Placement
    resolution: int
    fingerprint: str
    init: Any  # torch.Tensor [2, width]: the cross-init start, the same for every identity of this model


def load_trainer(library: Library, model_id: str, placement: Placement, *, quiet: bool) -> Trainer:
    """Load the model, free what training does not use, and compute (or read) its cross init."""
    from crossinit_cli import crossinit, devices, train

    _quiet_libraries()
    # A spinner on a terminal only: until something has worked, stderr holds nothing but an error.
    with ui.err().status(f"loading {escape(model_id)}", spinner="dots") if not quiet else _nothing():
        with ui.timed("model load"):
            pipe = devices.load_pipeline(model_id)
        train.free_vae_decoder(pipe.vae)
        fingerprint = crossinit.encoder_fingerprint(pipe.text_encoder)
        with ui.timed("cross initialization"):
            init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, library.home / ".cache" / "init")
    resolution = train.model_resolution(pipe.unet, pipe.vae)
    return Trainer(model_id, pipe, placement, resolution, fingerprint, init)


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
) -> tuple[Path, TrainResult]:
    """Train one identity on a loaded model and store it: the library is written once, atomically."""
    from crossinit_cli import faces, train

    if trainer.resolution != ALIGN_SIZE:
        crops = faces.align_faces(paths, trainer.resolution, align=align)
    placement = trainer.placement
    if not quiet:
        ui.info(
            f"learning [bold]{escape(name)}[/] from {len(crops)} photo{'s' if len(crops) != 1 else ''} on "
            f"{placement.device} ({placement.dtype}): {train_config.steps} steps, batch {train_config.batch_size}, "
            f"lr {train_config.lr:g}"
        )
    pipe = trainer.pipe
    with ui.timed("training"), _progress_display(quiet) as progress:
        result = train.train(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            unet=pipe.unet,
            vae=pipe.vae,
            scheduler_config=pipe.scheduler.config,
            crops=[c.image for c in crops],
            init=trainer.init,
            config=train_config,
            placement=placement,
            progress=progress,
        )
    identity = Identity(
        name=name,
        tokens=int(result.learned.shape[0]),
        width=int(result.learned.shape[1]),
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
        },
    )
    with ui.timed("library write"):
        target = library.add(identity, result.learned, result.init, crops=[c.image for c in crops], force=force)
    return target, result


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


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _quiet_libraries() -> None:
    """diffusers and transformers print loading bars and advice on stderr; the user sees ours instead."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


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
        console = ui.err()
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
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
