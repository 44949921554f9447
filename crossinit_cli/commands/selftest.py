"""`doctor --self-test`: a photo's whole way through crossinit, on a tiny random model, offline.

detect -> learn -> generate -> export -> import -> remove, each step through the engines the commands
call (`faces.align_faces`, then the Python API, `crossinit_cli.api`: `learn`, `generate`, `export`,
`import_` and `remove`, built on learning.py, generation.py, exporting.py and editing.py), on the face photo
shipped with the package (`resources.sample_photo`). A tiny random Stable Diffusion model built on the
spot (`synthetic.build_tiny_sd`) stands in for the weights, so nothing is downloaded and no network is
used; the library and the images live in a temporary folder that is deleted afterwards, so the user's
library, config and Hugging Face cache are neither read nor written. Each step checks what a user would
check (a face found, an identity stored, a PNG with its settings, a file that reads back to the same
vectors, an empty library).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.markup import escape

from crossinit_cli import api, resources, ui
from crossinit_cli._version import __version__
from crossinit_cli.config import RunOptions
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library

NAME = "self-test"
IMPORTED = "self-test-import"
LEARN_STEPS = 4
"""Training steps of the self-test's `learn --fast`: enough to run every phase of the loop, a few seconds."""


@dataclass
class Step:
    """One step of the self-test as it is printed and as `--json` reports it."""

    name: str
    ok: bool
    seconds: float
    detail: str


@dataclass
class _Workspace:
    """The throw-away folders and what the steps hand on to each other."""

    root: Path
    photo: Path
    run: RunOptions
    library: Library
    model: Path | None = None
    exported: Path | None = None

    @property
    def api(self) -> api.Library:
        """The throw-away library through the Python API, which drives the same engines as the commands."""
        return api.Library(self.library.home)

    def where(self) -> dict[str, str]:
        """The model, device and precision keywords: the tiny model, the user's device and precision."""
        return {"model": str(self.model), "device": self.run.device, "dtype": self.run.dtype}


def self_test(run: RunOptions) -> int:
    """Run every step, print each with its time (or `--json`), and return 0 when all passed, else 1."""
    started = time.perf_counter()
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="crossinit-self-test-") as tmp, resources.sample_photo() as photo:
        work = _Workspace(Path(tmp), photo, run, Library(Path(tmp) / "library"))
        photo_path = str(photo)
        if not run.as_json:
            ui.out().print(
                f"crossinit {__version__} self-test on a tiny random model, the photo {escape(photo.name)} shipped "
                "with crossinit and a throw-away library (no weights, no network)",
                soft_wrap=True,
            )
        for name, action in _STEPS:
            step = _run_step(name, action, work)
            steps.append(step)
            if not run.as_json:
                _print_step(step)
            if not step.ok:
                break
    total = time.perf_counter() - started
    passed = len(steps) == len(_STEPS) and all(s.ok for s in steps)
    failed = next((s for s in steps if not s.ok), None)
    if run.as_json:
        record = {"ok": passed, "seconds": round(total, 2), "photo": photo_path}
        ui.print_json({**record, "steps": [asdict(s) for s in steps]})
    elif passed:
        ui.out().print(f"the install works: {len(steps)} steps passed in {total:.1f} s")
    if failed is not None:
        ui.error(f"self-test failed at step {failed.name!r}: {failed.detail}")
    return 0 if passed else 1


def _run_step(name: str, action: Callable[[_Workspace], str], work: _Workspace) -> Step:
    """One step, its console output held back (it would interleave with the step lines), timed.

    A self-test is there to report what is broken, whatever it is: any exception fails the step and is
    named, instead of ending the run in a traceback."""
    started = time.perf_counter()
    try:
        with _held_output():
            detail = action(work)
        ok = True
    except CrossinitError as exc:
        ok, detail = False, _first_line(str(exc))
    except Exception as exc:  # the install's own breakage (an import, a kernel): reported, named, step failed
        ok, detail = False, f"{type(exc).__name__}: {_first_line(str(exc))}"
    return Step(name, ok, round(time.perf_counter() - started, 2), detail)


@contextmanager
def _held_output() -> Iterator[None]:
    """The commands' own lines (paths written, hints, progress) are the steps' business, not the report's."""
    from crossinit_cli import hf

    with ui.out().capture(), ui.err().capture(), hf.quiet_libraries():
        yield


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "unknown error"


def _print_step(step: Step) -> None:
    mark = "[green]ok[/]    " if step.ok else "[bold red]FAILED[/]"
    ui.out().print(f"  {mark} {step.name:<9} {step.seconds:6.1f} s  {escape(step.detail)}", soft_wrap=True)


# ---- the steps: each returns the line it prints, or raises ---------------------------------------


def _model(work: _Workspace) -> str:
    from crossinit_cli.synthetic import build_tiny_sd

    work.model = build_tiny_sd(work.root / "model")
    return "tiny random SD 2.x-shaped model built (text width 32, 64 px images)"


def _detect(work: _Workspace) -> str:
    from crossinit_cli import faces
    from crossinit_cli.learning import ALIGN_SIZE

    warnings: list[str] = []
    crops = faces.align_faces(faces.collect_photos([work.photo]), ALIGN_SIZE, align=True, warn=warnings.append)
    if len(crops) != 1:
        raise CrossinitError(f"expected one aligned face in {work.photo.name}, got {len(crops)}")
    width, height = crops[0].image.size
    return f"a face found in {work.photo.name} and aligned to {width}x{height}"


def _learn(work: _Workspace) -> str:
    import numpy as np

    ident = work.api.learn([work.photo], name=NAME, fast=True, steps=LEARN_STEPS, seed=0, **work.where())
    if not all(np.isfinite(rows).all() for rows in ident.vectors.values()):
        raise CrossinitError("the learned vectors are not finite")
    training = ident.training
    return (
        f"<{NAME}> learned in {training['steps']} steps on {training['device']} ({training['dtype']}), "
        f"final loss {training['final_loss']:.4f}, stored"
    )


def _generate(work: _Workspace) -> str:
    from PIL import Image

    out = work.root / "images"
    work.api.generate(f"a photo of <{NAME}>", n=1, seed=0, steps=2, out=out, **work.where())
    images = sorted(out.glob("*.png"))
    if len(images) != 1:
        raise CrossinitError(f"expected one image in {out}, found {len(images)}")
    with Image.open(images[0]) as image:
        image.load()
        parameters = image.info.get("parameters", "")
        size = image.size
    if f"<{NAME}>" not in parameters or "Seed: 0" not in parameters:
        raise CrossinitError(f"{images[0].name} does not record its prompt and seed")
    return f"{images[0].name}: {size[0]}x{size[1]}, prompt and seed in its metadata"


def _export(work: _Workspace) -> str:
    folder = work.root / "export"
    work.api.export(NAME, format="a1111", output=f"{folder}/")
    work.exported = folder / f"{NAME}.safetensors"
    if not work.exported.is_file():
        raise CrossinitError(f"{work.exported.name} was not written")
    return f"{work.exported.name} written (AUTOMATIC1111 / ComfyUI layout)"


def _import(work: _Workspace) -> str:
    import numpy as np

    assert work.exported is not None
    work.api.import_(work.exported, name=IMPORTED, model=str(work.model))
    learned = work.library.effective_vectors(NAME)
    back = work.library.effective_vectors(IMPORTED)
    if not np.array_equal(learned, back):
        raise CrossinitError(f"{work.exported.name} read back to other vectors than <{NAME}>'s")
    return f"read back as <{IMPORTED}>: the same {back.shape[0]}x{back.shape[1]} vectors"


def _remove(work: _Workspace) -> str:
    work.api.remove(NAME, IMPORTED)
    left = work.library.list()
    if left:
        raise CrossinitError(f"{len(left)} entr{'y' if len(left) == 1 else 'ies'} left in the library")
    return "both identities removed; the library is empty"


_STEPS: tuple[tuple[str, Callable[[_Workspace], str]], ...] = (
    ("model", _model),
    ("detect", _detect),
    ("learn", _learn),
    ("generate", _generate),
    ("export", _export),
    ("import", _import),
    ("remove", _remove),
)
