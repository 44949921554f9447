"""One run's snapshots side by side: their scores kept with them, and the best one picked (`eval --snapshots`).

`snapshot_variants` makes a pseudo-identity of each snapshot's vectors so that an evaluation runs them
all on one pipeline; `save_snapshot_scores` stores each one's calibrated numbers in the identity's
metadata, and `pick_best` chooses the best likeness / prompt-fidelity trade-off among them (docs/eval.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library, name_key

if TYPE_CHECKING:
    import numpy as np

    from crossinit_cli.evalresult import Evaluation

LIKENESS_KEEP = 0.9
"""`eval --pick-best` keeps the snapshots within this share of the best likeness, then prefers prompt fidelity."""


def pick_best(records: Sequence[dict[str, Any]]) -> int | None:
    """The step of the best likeness / prompt-fidelity trade-off among snapshot records (docs/eval.md).

    Candidates are the snapshots whose likeness is at least `LIKENESS_KEEP` of the best one; among them
    the highest prompt fidelity wins. Without CLIP the earliest candidate wins: the least drift from the
    cross-init start, which the paper ties to editability. Ties go to the earlier step for the same reason.

    None when nothing tells the snapshots apart: every likeness is 0 (no face in the generated images, or
    none like the person) and no prompt fidelity was measured. Picking the earliest then would be a
    choice made on no evidence, so nothing is picked (`nothing_measured` says why)."""
    measured = [r for r in records if r.get("likeness") is not None]
    if not measured:
        raise CrossinitError("likeness could not be measured for any snapshot (no stored face crops), so none is best")
    if nothing_measured(measured):
        return None
    top = max(r["likeness"] for r in measured)
    candidates = [r for r in measured if r["likeness"] >= LIKENESS_KEEP * top]
    scored = [r for r in candidates if r.get("prompt_fidelity") is not None]
    if scored:
        return int(max(scored, key=lambda r: (r["prompt_fidelity"], -r["step"]))["step"])
    return int(min(candidates, key=lambda r: r["step"])["step"])


def nothing_measured(records: Sequence[dict[str, Any]]) -> str | None:
    """Why `pick_best` has no evidence to pick on (None when it has some)."""
    if any(r.get("prompt_fidelity") is not None for r in records) or any(r.get("likeness") for r in records):
        return None
    faceless = all(not r.get("face_rate") for r in records)
    likeness = "no face was found in the generated images" if faceless else "every snapshot's likeness is 0"
    return f"{likeness} and prompt fidelity was not measured (no CLIP score)"


def save_snapshot_scores(
    library: Library, name: str, results: Sequence[Evaluation], picked: int | None = None
) -> Identity:
    """Store each snapshot's calibrated numbers with it in the identity's metadata; with `picked`, make
    that snapshot the active one (the last step is the final vectors: active_step 0)."""
    created = results[0].identity_created if results else ""
    by_step = {r.step: {**r.calibrated(), "date": r.date, "settings": _short_settings(r.settings)} for r in results}

    def change(ident: Identity) -> None:
        if created and ident.created != created:
            raise CrossinitError(
                f"identity {ident.name!r} was replaced while it was being evaluated; run `crossinit eval` again"
            )
        for entry in ident.snapshots:
            found = by_step.get(int(entry["step"]))
            if found is not None:
                entry["evaluation"] = found
        if picked is not None:
            last = max(int(e["step"]) for e in ident.snapshots)
            ident.active_step = 0 if picked == last else picked

    return library.modify(name, change)


def _short_settings(settings: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "seed", "steps", "model", "strength", "clip_model")
    return {k: settings.get(k) for k in keep} | {"prompts": len(settings.get("prompts", []))}


def snapshot_label(name: str, step: int) -> str:
    """How a snapshot is named inside one evaluation's pipeline (a valid identity name, never stored)."""
    return f"{name}.s{step}" if step else name


def snapshot_variants(
    library: Library, identities: dict[str, Identity], snapshot_steps: Sequence[int]
) -> tuple[dict[str, Identity], dict[str, list[np.ndarray]], dict[str, str], dict[str, int | None]]:
    """One pseudo-identity per snapshot of the one identity evaluated, with that snapshot's vectors."""
    from dataclasses import replace

    if len(identities) != 1:
        raise CrossinitError("--snapshots evaluates one identity's run; name one identity")
    (ident,) = identities.values()
    _, stored = library.read(ident.name)
    variants: dict[str, Identity] = {}
    vectors: dict[str, list[np.ndarray]] = {}
    names: dict[str, str] = {}
    steps: dict[str, int | None] = {}
    for step in snapshot_steps:
        variant = replace(ident, name=snapshot_label(ident.name, step))
        key = name_key(variant.name)
        variants[key] = variant
        vectors[key] = stored.per_encoder(ident.strength, step)
        names[key] = ident.name
        steps[key] = step
    return variants, vectors, names, steps
