"""The training objective's small math: what the UNet predicts, the paper's regulariser, and the rows' norms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import torch


def loss_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is asked to predict: the noise (epsilon models) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    raise CrossinitError(f"the model's scheduler predicts {kind!r}; only epsilon and v_prediction can be trained")


def regulariser(rows: torch.Tensor, start: torch.Tensor, weight: float) -> torch.Tensor:
    """Paper step 4's `λ · mean_i ||v_i − v⁰_i||₂` (plain L2, not squared), as the official pairwise_distance."""
    import torch.nn.functional as F

    return weight * F.pairwise_distance(rows, start, p=2).mean()


def regulariser_all(rows: Sequence[torch.Tensor], starts: Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """The official regulariser on each encoder's rows against its own start, summed over the encoders.

    Each row keeps the official weight λ/2 (the mean over its encoder's two rows): SDXL's four rows are
    not averaged together, which would give each λ/4. One encoder: exactly `regulariser`."""
    total = regulariser(rows[0], starts[0], weight)
    for row, start in zip(rows[1:], starts[1:]):
        total = total + regulariser(row, start, weight)
    return total


def norms(learned: torch.Tensor, init: torch.Tensor, table: torch.Tensor, token_ids: list[int]) -> dict[str, Any]:
    """One encoder's row norms, to compare a family's training against SD 2.1's: the init's and the learned
    rows' L2 norms, and the mean L2 norm of the token table's rows other than the placeholders."""
    import torch

    keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
    keep[token_ids] = False
    vocabulary = torch.linalg.vector_norm(table, dim=1, dtype=torch.float32)[keep].mean()  # no copy of the table
    return {
        "init": [round(float(n), 4) for n in torch.linalg.vector_norm(init.float(), dim=1)],
        "learned": [round(float(n), 4) for n in torch.linalg.vector_norm(learned.float(), dim=1)],
        "vocabulary_mean": round(float(vocabulary), 4),
    }
