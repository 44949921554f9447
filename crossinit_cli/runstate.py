"""A run's state, captured and put back: the rows, AdamW, every random generator, the step and the losses.

With it a stopped `learn` continues exactly as if never stopped (checkpoint.py keeps it on disk);
`snapshot_rows` copies the rows the same way for `--snapshot-every`, named by `row_names`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import torch

    from crossinit_cli.families import Slot

ROWS = "learned"
"""The one encoder's rows' name in snapshots and checkpoints (an SDXL run names each by its encoder key)."""


def row_names(slots: Sequence[Slot]) -> list[str]:
    """The names of a run's rows in snapshots and checkpoints: `ROWS` for one encoder, else each encoder's key."""
    return [ROWS] if len(slots) == 1 else [s.spec.key for s in slots]


def snapshot_rows(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned rows at this step, as a snapshot's named tensors (copies, on the CPU)."""
    return {name: r.detach().float().cpu().clone() for name, r in rows.items()}


def capture_rng(draw: random.Random, noise_gen: torch.Generator) -> dict[str, Any]:
    """Every random generator a run draws from: the data order's, the noise's, torch's global ones."""
    import torch

    state: dict[str, Any] = {"draw": draw.getstate(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], draw: random.Random, noise_gen: torch.Generator) -> None:
    import torch

    version, internal, gauss = state["draw"]
    draw.setstate((version, tuple(internal), gauss))
    noise_gen.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_run(
    step: int,
    rows: dict[str, torch.Tensor],
    optimizer: Any,
    scaler: Any,
    rngs: dict[str, Any],
    order: list[int],
    losses: list[float],
    snapshots: dict[int, dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """A run's whole state after `step`: with it the loop continues exactly as if never stopped.

    Copies, not references: AdamW updates its state in place, and a Ctrl-C may land mid-update."""
    import copy

    return {
        "step": step,
        "rows": snapshot_rows(rows),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scaler": copy.deepcopy(scaler.state_dict()),
        "rng": rngs,
        "order": list(order),
        "losses": list(losses),
        "snapshots": dict(snapshots),
    }


def restore_run(
    state: dict[str, Any],
    rows: dict[str, torch.Tensor],
    optimizer: Any,
    scaler: Any,
    draw: random.Random,
    noise_gen: Any,
) -> tuple[int, list[int], list[float], dict[int, dict[str, torch.Tensor]]]:
    """Put a captured state back; returns (step, data order, losses, snapshots) to continue from."""
    import torch

    if set(state["rows"]) != set(rows):
        raise CrossinitError(f"the checkpoint holds rows {sorted(state['rows'])}, this model trains {sorted(rows)}")
    with torch.no_grad():
        for name, row in rows.items():
            row.copy_(state["rows"][name].to(row.device))
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], draw, noise_gen)
    snapshots = {int(k): v for k, v in state["snapshots"].items()}
    return int(state["step"]), list(state["order"]), list(state["losses"]), snapshots
