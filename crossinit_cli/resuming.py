"""`learn --resume`: an unfinished run continued from its checkpoint (`checkpoint.py`), with its own photos,
name and settings, to the same rows an uninterrupted run gives. Checked before any model loads (the run
exists, its values are in range, the name is free), then trained and stored by `learning.py`'s parts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from crossinit_cli.devices import check_model_reference
from crossinit_cli.errors import CrossinitError
from crossinit_cli.learning import (
    SILENT,
    Learned,
    LearnHooks,
    LearnJob,
    check_training_values,
    load_trainer,
    train_and_store,
)
from crossinit_cli.store import Library


def resume(
    library: Library,
    name: str,
    *,
    micro_batch: int | None = None,
    steps: int | None = None,
    hooks: LearnHooks = SILENT,
) -> Learned:
    """Continue an interrupted run from its checkpoint, with its own settings (the micro-batch is chosen
    again: it changes how much memory a step takes, not the result). `steps` is a new total, at least the
    steps already done (the schedule is constant, so the steps before are the same either way)."""
    from crossinit_cli.train import TrainConfig

    run, state = _resumable_run(library, name, steps)
    saved = run.settings
    name = saved["name"]
    crops = run.crops()
    model_id = saved["model"]
    check_model_reference(model_id)
    placement = _resumed_placement(saved, hooks)
    clip_skip = int(saved["train"].get("clip_skip", 1))  # runs checkpointed before clip skip existed: 1
    trainer = load_trainer(library, model_id, placement, clip_skip=clip_skip, hooks=hooks)
    size = saved["train"].get("resolution") or trainer.resolution
    if crops[0].size != (size, size):
        raise CrossinitError(f"the checkpoint of {name!r} was made for another model size; start over with learn")
    job = LearnJob(
        name=name,
        paths=[Path(p) for p in saved["photos"]],
        crops=crops,
        train_config=TrainConfig(**{**saved["train"], "adam_betas": tuple(saved["train"]["adam_betas"])}),
        mode=saved["mode"],
        align=saved["align"],
        force=bool(saved.get("force")),
        snapshot_every=saved.get("snapshot_every"),
        resumable=True,
        resume=(run, state),
        micro_batch=micro_batch,
    )
    learned = train_and_store(library, trainer, job, hooks)
    return replace(learned, identity=library.get(name))


def _resumable_run(library: Library, name: str, steps: int | None) -> tuple[Any, dict[str, Any] | None]:
    """The unfinished run of `name` and its saved state, checked before any model: it exists, its identity's
    name is free (unless the run was started with --force), its values are in range, `steps` applied."""
    from crossinit_cli import checkpoint

    run = checkpoint.find(library.home, name)
    if run is None:
        raise CrossinitError(f"no unfinished run of {name!r}; `crossinit list` shows unfinished runs")
    saved = run.settings
    name = saved["name"]
    if library.exists(name) and not saved.get("force"):
        raise CrossinitError(
            f"identity {name!r} already exists; `crossinit remove {name} --identity` first, or learn --force"
        )
    train = saved["train"]
    lr, seed = train.get("lr"), train.get("seed")
    check_training_values(
        lr=lr if isinstance(lr, (int, float)) else None,
        seed=seed if isinstance(seed, int) else None,
        where=f"the unfinished run of {name!r}: ",
    )
    state = run.load_state()
    if steps is not None and steps != run.steps:
        _set_total(run, state, steps)
    return run, state


def _resumed_placement(saved: dict[str, Any], hooks: LearnHooks) -> Any:
    """Where and in what precision the run continues: its own device and dtype choice, and the reason it had."""
    from crossinit_cli import devices

    placement = devices.resolve(saved["device"], saved["dtype"], training=True)
    if saved.get("dtype_reason"):  # the run's own precision continues, chosen for the reason it was then
        placement = replace(placement, dtype_reason=saved["dtype_reason"])
    if placement.device != saved["placed_on"]:
        hooks.warn(
            f"the run started on {saved['placed_on']} and continues on {placement.device}: the result will not "
            "equal an uninterrupted run bit for bit"
        )
    return placement


def _set_total(run: Any, state: dict[str, Any] | None, steps: int) -> None:
    """`learn --resume --steps`: a new total for the run, kept in its checkpoint; at least the steps done."""
    done = int(state["step"]) if state else 0
    if steps < done:
        raise CrossinitError(
            f"--steps {steps} is fewer than the {done} steps {run.name!r} has done; give at least {done} "
            f"(the run's total is {run.steps})"
        )
    run.set_steps(steps)
