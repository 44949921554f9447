"""crossinit from Python: the CLI's own engines behind one small, typed surface (docs/python-api.md).

    from crossinit_cli import api

    lib = api.Library()                                  # the user's library, as `crossinit` finds it
    alice = lib.learn(["alice.jpg"], fast=True)          # an `api.Identity`
    images = lib.generate("a photo of <alice> at the beach", n=2, seed=7)   # PIL images

Every keyword is named after the CLI flag it stands for, and model, device and dtype fall back on the
saved config (`crossinit config`) exactly as the CLI's do, so both give the same results bit for bit.
Nothing prints: a `progress` callback hears progress and warnings as `Progress` records; mistakes raise
`CrossinitError` (or a subclass). Importing this module imports no torch: the engines come in per call.
What docs/python-api.md does not document is private.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from crossinit_cli import store
    from crossinit_cli.config import RunOptions

__all__ = ["CrossinitError", "Identity", "Library", "Progress", "ProgressCallback"]

PathLike = str | Path


@dataclass(frozen=True)
class Progress:
    """One thing a running call says; handed to the `progress` callback.

    `phase` is what is happening: a phase of `learn` as it starts ("face detection and alignment", "model
    load", "cross initialization", "library write", ...), "start" (training begins), "training" (after
    each step: `step` of `total` done, `loss`), "model load" and "sampling" (`generate`: `step` of `total`
    denoising steps), or "warning" / "hint" with the text in `message`."""

    phase: str
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    message: str | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Identity:
    """A stored identity, as `Library.get`, `list`, `learn`, `import_` and `edit` return it.

    `vectors` reads the identity's embedding rows when asked: the rows prompts use (the active snapshot at
    the stored strength), one float32 array [tokens, width] per text encoder, keyed by encoder ("clip_l"
    for SD 1.x, "clip_h" for SD 2.x, "clip_l" and "clip_g" for SDXL)."""

    name: str
    family: str  # "sd1", "sd2" or "sdxl"
    model: str  # the base model it was learned on (hub id or absolute path; "" if an import recorded none)
    clip_skip: int
    tokens: int
    widths: tuple[int, ...]  # one per text encoder
    strength: float
    tags: tuple[str, ...]
    notes: str
    created: str
    training: dict[str, Any] = field(repr=False)
    home: Path = field(repr=False)

    @property
    def token(self) -> str:
        """How prompts name it: `<name>`."""
        return f"<{self.name}>"

    @property
    def vectors(self) -> dict[str, np.ndarray]:
        from crossinit_cli import families
        from crossinit_cli.store import Library as Store

        parts = Store(self.home).effective_parts(self.name)
        keys = [e.key for e in families.get(self.family).encoders] if self.family in families.FAMILIES else []
        if len(keys) != len(parts):
            keys = [str(i) for i in range(len(parts))]
        return dict(zip(keys, parts))


class Library:
    """A crossinit library: `Library()` is the user's (CROSSINIT_HOME, else the platform's data folder, as
    the CLI finds it); `Library(folder)` another one (created when something is first stored)."""

    def __init__(self, home: PathLike | None = None) -> None:
        from crossinit_cli import config

        self.home: Path = config.library_home(Path(home) if home is not None else None)

    def __repr__(self) -> str:
        return f"Library({str(self.home)!r})"

    # ---- reading and changing entries ---------------------------------------------------------------

    def list(
        self,
        *,
        tag: str | None = None,
        family: str | None = None,
        model: str | None = None,
        search: str | None = None,
        sort: str = "name",
        limit: int | None = None,
    ) -> list[Identity]:
        """The stored identities, filtered and sorted as `crossinit list` does (damaged entries left out)."""
        from crossinit_cli.catalog import Query
        from crossinit_cli.editing import check_query
        from crossinit_cli.store import Identity as Stored

        _at_least("limit", limit, 0)
        query = check_query(Query(tag=tag, family=family, model=model, search=search, sort=sort, limit=limit))
        entries = self._store().list(query)
        return [self._entry(e) for e in entries if isinstance(e, Stored)]

    def get(self, name: str) -> Identity:
        """One identity by name (case-insensitive)."""
        return self._entry(self._store().get(name))

    def edit(
        self,
        name: str,
        *,
        rename: str | None = None,
        note: str | None = None,
        tag: str | Sequence[str] | None = None,
        untag: str | Sequence[str] | None = None,
        strength: float | None = None,
        use_snapshot: int | str | None = None,
    ) -> Identity:
        """Change an identity in place, as `crossinit edit` does; the identity as stored afterwards."""
        from crossinit_cli.editing import Edits, edit

        edits = Edits(
            rename=rename,
            note=note,
            tags=_strings(tag),
            untags=_strings(untag),
            strength=strength,
            use_snapshot=None if use_snapshot is None else str(use_snapshot),
        )
        return self._entry(edit(self._store(), name, edits))

    def remove(self, *names: str) -> None:
        """Delete identities (and unfinished runs of these names); every name is checked before any goes."""
        from crossinit_cli.editing import remove

        if not names:
            raise CrossinitError("name the identities to remove")
        remove(self._store(), list(names))

    # ---- learning -----------------------------------------------------------------------------------

    def learn(
        self,
        photos: PathLike | Sequence[PathLike],
        *,
        name: str | None = None,
        fast: bool = False,
        full: bool = False,
        steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        micro_batch: int | None = None,
        checkpointing: str = "auto",
        reg_weight: float | None = None,
        model: str | None = None,
        resolution: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
        force: bool = False,
        no_align: bool = False,
        strict: bool = False,
        clip_skip: int = 1,
        snapshot_every: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> Identity:
        """Learn an identity from photos (files or folders) of one face and store it: `crossinit learn`."""
        from crossinit_cli import learning

        if fast and full:
            raise CrossinitError("choose one of fast and full")
        _at_least_each(1, steps=steps, batch_size=batch_size, micro_batch=micro_batch, clip_skip=clip_skip)
        _at_least("snapshot_every", snapshot_every, 0)
        _one_of("checkpointing", checkpointing, ("auto", "on", "off"))
        paths = [Path(photos)] if isinstance(photos, (str, Path)) else [Path(p) for p in photos]
        if not paths:
            raise CrossinitError("give one or more photos (or a folder)")
        run = _run_options(model=model, device=device, dtype=dtype)
        request = learning.LearnRequest(
            name=name,
            mode="fast" if fast else "full",
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            reg_weight=reg_weight,
            seed=seed,
            align=not no_align,
            clip_skip=clip_skip,
            micro_batch=micro_batch,
            checkpointing=checkpointing,
            model=run.model,
            device=run.device,
            dtype=run.dtype,
            force=force,
            resolution=resolution,
            snapshot_every=snapshot_every,
            strict=strict,
        )
        learned = learning.learn_identity(self._store(), paths, request, _learn_hooks(progress))
        return self._entry(learned.identity)

    def resume(
        self,
        name: str,
        *,
        steps: int | None = None,
        micro_batch: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> Identity:
        """Continue `name`'s interrupted run from its checkpoint, with its own settings (`learn --resume`);
        `steps` is a new total, at least the steps already done."""
        from crossinit_cli import resuming

        _at_least("steps", steps, 1)
        _at_least("micro_batch", micro_batch, 1)
        hooks = _learn_hooks(progress)
        learned = resuming.resume(self._store(), name, micro_batch=micro_batch, steps=steps, hooks=hooks)
        return self._entry(learned.identity)

    # ---- generating ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        identity: str | None = None,
        n: int = 1,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative: str | None = None,
        size: str | None = None,
        scheduler: str | None = None,
        out: PathLike | None = None,
        prompts: Sequence[str] | None = None,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        clip_skip: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        """Images of a prompt naming identities as `<name>` (or of several `prompts`, on one model load):
        `crossinit generate`'s pixels, without files unless `out` names a folder to write its PNGs to.

        Each image's `.info` holds what its PNG records: "parameters" (A1111's text), "crossinit" (JSON
        text) and "seed" (an int; image i of a prompt has seed + i)."""
        from crossinit_cli import generation
        from crossinit_cli.generation import SamplingFlags

        _at_least("n", n, 1)
        _at_least("steps", steps, 1)
        _at_least("clip_skip", clip_skip, 1)
        flags = SamplingFlags(n, seed, size, steps, guidance, negative, scheduler, None, identity, clip_skip)
        run = _run_options(model=model, device=device, dtype=dtype, output_dir=None if out is None else Path(out))
        hooks = _generate_hooks(progress, list(prompts) if prompts is not None else None)
        source = None if prompts is None else "the prompts given"
        if prompts is not None and prompt is not None:
            raise CrossinitError("give either a prompt or prompts, not both")
        plan = generation.plan_run(self._store(), prompt, source, flags, run, hooks, write=out is not None)
        loaded = generation.load_plan(plan, hooks)
        images = []
        for job in plan.jobs:
            for image in loaded.images(job, plan.choices, hooks):
                if plan.out_dir is not None:  # each as it is sampled, as the CLI writes them
                    generation.write_image(image, plan.out_dir)
                images.append(_with_info(image))
        return images

    # ---- files in and out ---------------------------------------------------------------------------

    def export(
        self,
        names: str | Sequence[str] | None = None,
        *,
        all: bool = False,  # named after --all
        tag: str | None = None,
        format: str | None = None,  # named after --format
        output: PathLike | None = None,
        to: PathLike | None = None,
        force: bool = False,
    ) -> list[Path]:
        """Write identities (by name, `all`, or `tag`) as embedding files for other tools: `crossinit export`.

        One identity goes to `output` (a file, its suffix picking the format; or a folder), default
        ./<name>.safetensors; several to a folder; `to` a tool's install folder puts each where that tool
        reads embeddings. The paths written (with `to`, also the ones already up to date)."""
        from crossinit_cli import exporting

        chosen = [names] if isinstance(names, str) else list(names or [])
        selection = exporting.Selection(chosen, every=all, tag=tag)
        done = exporting.export(
            self._store(),
            selection,
            fmt=format,
            output=None if output is None else str(output),
            to=None if to is None else Path(to),
            force=force,
        )
        skipped = [f for f in done.files if f.status == "skipped"]
        if skipped:
            first = skipped[0]
            count = f"{len(skipped)} identit{'y' if len(skipped) == 1 else 'ies'}"
            raise CrossinitError(f"{count} not exported ({first.name}: {first.reason})")
        return done.paths

    def import_(
        self, path: PathLike, *, name: str | None = None, model: str | None = None, force: bool = False
    ) -> list[Identity]:
        """Store an embedding file (any export format, the official code's .bin, a diffusers folder), or
        every embedding file of a folder, as identities: `crossinit import`. The identities stored."""
        from crossinit_cli import config, exporting

        model = config.model_reference(model) if model else None
        done = exporting.import_(self._store(), Path(path), name=name, model=model, force=force)
        return [self._entry(self._store().get(f.name)) for f in done.imported if f.name is not None]

    # ---- private ------------------------------------------------------------------------------------

    def _store(self) -> store.Library:
        from crossinit_cli.store import Library as Store

        return Store(self.home)

    def _entry(self, ident: store.Identity) -> Identity:
        return Identity(
            name=ident.name,
            family=ident.family,
            model=ident.base_model,
            clip_skip=ident.clip_skip,
            tokens=ident.tokens,
            widths=tuple(ident.widths),
            strength=ident.strength,
            tags=tuple(ident.tags),
            notes=ident.notes,
            created=ident.created,
            training=dict(ident.training),
            home=self.home,
        )


# ---- the CLI's rules, shared --------------------------------------------------------------------------


def _run_options(
    *, model: str | None, device: str | None, dtype: str | None, output_dir: Path | None = None
) -> RunOptions:
    """model, device and dtype merged with the saved config as the CLI merges its flags (a keyword wins)."""
    from crossinit_cli import config

    if device is not None and device not in config.DEVICES:
        raise CrossinitError(f"device must be one of {', '.join(config.DEVICES)}, not {device!r}")
    if dtype is not None and dtype not in config.DTYPES:
        raise CrossinitError(f"dtype must be one of {', '.join(config.DTYPES)}, not {dtype!r}")
    return config.RunOptions.merged(
        config.load_config(), model=model, device=device, dtype=dtype, output_dir=output_dir
    )


def _at_least(keyword: str, value: int | None, low: int) -> None:
    """The range check the CLI's flags get from Typer (`min=`)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise CrossinitError(f"{keyword} must be a whole number of at least {low}, not {value!r}")


def _at_least_each(low: int, **values: int | None) -> None:
    for keyword, value in values.items():
        _at_least(keyword, value, low)


def _one_of(keyword: str, value: str, choices: Sequence[str]) -> None:
    """The choice check the CLI's flags get from Typer (an Enum)."""
    if value not in choices:
        raise CrossinitError(f"{keyword} must be one of {', '.join(map(repr, choices))}, not {value!r}")


def _strings(value: str | Sequence[str] | None) -> list[str] | None:
    return None if value is None else [value] if isinstance(value, str) else list(value)


def _learn_hooks(progress: ProgressCallback | None) -> Any:
    from crossinit_cli.learning import SILENT, LearnHooks, Start

    if progress is None:
        return SILENT

    def started(start: Start) -> None:
        progress(Progress("start", total=start.steps, message=_start_line(start)))

    return LearnHooks(
        on_progress=lambda step, total, loss: progress(Progress("training", step, total, float(loss))),
        on_warning=lambda message: progress(Progress("warning", message=message)),
        on_start=started,
        on_phase_start=lambda name: None if name == "training" else progress(Progress(name)),
    )


def _start_line(start: Any) -> str:
    return (
        f"learning {start.name} from {start.photos} photo{'s' if start.photos != 1 else ''} on {start.device} "
        f"({start.dtype}), {start.family} at {start.size} px: {start.steps} steps, batch {start.batch_size}, "
        f"lr {start.lr:g}"
    )


def _generate_hooks(progress: ProgressCallback | None, prompts: list[str] | None) -> Any:
    from crossinit_cli.generation import GenerateHooks

    read = None if prompts is None else (lambda _source: "\n".join(prompts))
    if progress is None:
        return GenerateHooks(read=read)

    @contextlib.contextmanager
    def loading(message: str) -> Iterator[None]:
        progress(Progress("model load", message=message))
        yield

    return GenerateHooks(
        warn=lambda message: progress(Progress("warning", message=message)),
        hint=lambda message: progress(Progress("hint", message=message)),
        loading=loading,
        on_prompt=lambda prompt, steps: progress(Progress("sampling", 0, steps, message=prompt)),
        on_step=lambda done, total: progress(Progress("sampling", done, total)),
        read=read,
    )


def _with_info(generated: Any) -> Image.Image:
    """The image with its PNG's text chunks (and its seed) in `.info`."""
    image = generated.image
    meta = generated.metadata
    image.info["parameters"] = meta["parameters"]
    image.info["crossinit"] = json.dumps(meta["crossinit"], ensure_ascii=False)
    image.info["seed"] = generated.seed
    return image
