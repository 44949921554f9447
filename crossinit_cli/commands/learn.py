"""`learn` and `learn --resume`: the learning session (learning.py) as a person sees it on a terminal.

This module only presents: it hands learning.py hooks that print (the photos used, the spinner while the
model loads, the progress bar, --verbose's times), then prints the result (or `--json`'s record).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from crossinit_cli import learning, resuming, ui
from crossinit_cli.commands.common import stderr_progress
from crossinit_cli.learning import LearnHooks, LearnRequest

if TYPE_CHECKING:
    from crossinit_cli import faces
    from crossinit_cli.memory import MicroBatch
    from crossinit_cli.store import Library
    from crossinit_cli.train import TrainResult


def learn(
    library: Library,
    photos: list[Path],
    request: LearnRequest,
    *,
    quiet: bool,
    as_json: bool,
    configured_model: str | None = None,
) -> int:
    """`learn PHOTOS`: learning.learn_identity, shown."""
    learned = learning.learn_identity(library, photos, request, session_hooks(quiet))
    # generate runs on the identity's own model unless a configured one wins (config.identities_model).
    hint_model = request.model if configured_model not in (None, request.model) else None
    _report(library, learned, model=hint_model, quiet=quiet, as_json=as_json)
    return 0


def resume_identity(
    library: Library,
    name: str,
    *,
    quiet: bool,
    as_json: bool,
    configured_model: str | None = None,
    micro_batch: int | None = None,
    steps: int | None = None,
) -> int:
    """`learn --resume NAME`: resuming.resume, shown."""
    learned = resuming.resume(library, name, micro_batch=micro_batch, steps=steps, hooks=session_hooks(quiet))
    hint_model = learned.model if configured_model not in (None, learned.model) else None  # as in learn
    _report(library, learned, model=hint_model, quiet=quiet, as_json=as_json)
    return 0


def session_hooks(quiet: bool) -> LearnHooks:
    """What `learn` shows of a session: everything but warnings and --verbose's times goes with --quiet."""
    if quiet:
        return LearnHooks(on_warning=ui.warn, on_phase=_Shown(quiet).phase_done)
    shown = _Shown(quiet)
    return LearnHooks(
        on_progress=shown.progress,
        on_warning=ui.warn,
        on_photos=report_photos,
        on_start=_announce,
        on_micro_batch=_micro_batch_note,
        on_phase_start=shown.phase_started,
        on_phase=shown.phase_done,
        loading=_loading,
    )


def report_fixed_cost(result: TrainResult) -> None:
    """With --verbose: the whole command's time, and its fixed cost (learning.FixedCost)."""
    cost = learning.fixed_cost(result, ui.elapsed())
    ui.timing("total", cost.total_s)
    ui.timing(f"fixed cost (all but the {result.steps_run} training steps)", cost.fixed_s)
    ui.timing("fixed cost in CPU time", cost.fixed_cpu_s)


def report_photos(gathered: faces.Gathered) -> None:
    """Which photos are used and which files were skipped (and why). Said once every cheap check has passed:
    until then stderr holds nothing but the one-line error."""
    from crossinit_cli import faces

    ui.info(escape(faces.listed("using", gathered.photos)))
    if gathered.skipped:
        ui.info(escape(faces.listed("skipped", *zip(*gathered.skipped))))


def _announce(start: learning.Start) -> None:
    if start.resumed_at is not None:
        ui.info(f"resuming [bold]{escape(start.name)}[/] at step {start.resumed_at} of {start.steps}")
    ui.info(
        f"learning [bold]{escape(start.name)}[/] from {start.photos} photo{'s' if start.photos != 1 else ''} on "
        f"{start.device} ({start.dtype}), {start.family} at {start.size} px: {start.steps} "
        f"steps, batch {start.batch_size}, lr {start.lr:g}"
        + (f", clip skip {start.clip_skip}" if start.clip_skip > 1 else "")
    )


@contextmanager
def _loading(model_id: str) -> Iterator[None]:
    """A spinner on a terminal only: until something has worked, stderr holds nothing but an error."""
    with ui.err().status(f"loading {escape(model_id)}", spinner="dots"):
        yield


def _micro_batch_note(micro: MicroBatch) -> None:
    """Say the micro-batch before the first step: with --verbose always, otherwise when the batch is split
    (a split step is slower on a GPU; the line says why it was needed)."""
    if ui.Verbosity.on or micro.split:
        ui.info(escape(micro.describe()))


def _report(library: Library, learned: learning.Learned, *, model: str | None, quiet: bool, as_json: bool) -> None:
    from crossinit_cli.editing import identity_record

    report_fixed_cost(learned.result)
    name, result, target = learned.identity.name, learned.result, learned.target
    if as_json:
        ui.print_json(identity_record(library, learned.identity, detail=True))
    # Kept with --quiet (which hides the progress and the hints): where the identity went is the result.
    ui.info(
        f"learned [bold]{escape(name)}[/] in {result.total_s:.1f} s "
        f"({result.per_step_s:.3f} s/step, final loss {result.final_loss:.4f}); stored in {escape(str(target))}"
    )
    if not quiet:
        model_flag = f" --model {_shell_quote(model)}" if model else ""
        ui.info(escape(f'next: crossinit generate "a photo of a <{name}> person as an astronaut" -n 4{model_flag}'))


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


class _Shown:
    """--verbose's phase times, and during "training" the step, loss and ETA on stderr: a rich bar on a
    terminal, a plain line every ~10% otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.started = 0.0

    def phase_started(self, phase: str) -> None:
        if phase != "training" or self.quiet:
            return
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

    def phase_done(self, phase: str, seconds: float) -> None:
        if phase == "training" and self.bar is not None:
            self.bar.stop()
            self.bar = None
        ui.timing(phase, seconds)

    def progress(self, step: int, total: int, loss: float) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("training", total=total, loss="-")
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")
            return
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / step * (total - step)
            ui.info(f"step {step}/{total}  loss {loss:.4f}  eta {eta:.0f} s")
