"""What one identity's evaluation produced: its images per prompt, their scores, and the record stored.

`Evaluation.record()` is the identity's `evaluation` metadata and what `eval --json` prints;
`calibrated()` holds the keys scripts read (docs/eval.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli._version import __version__
from crossinit_cli.entries import now
from crossinit_cli.fidelity import group_names
from crossinit_cli.likeness import FACE_METRIC, FaceMatch, Reference, identity_summary, likeness_of, mean_of

if TYPE_CHECKING:
    from PIL import Image

SHEET_PATH = Path("eval") / "contact-sheet.png"


@dataclass
class PromptResult:
    """The images of one prompt template for one identity, and their scores."""

    template: str
    prompt: str  # as generated, with <name>
    text: str  # as CLIP scored it, identity stripped
    seeds: list[int]
    images: list[Image.Image] = field(default_factory=list)
    matches: list[FaceMatch | None] = field(default_factory=list)
    clip_scores: list[float] | None = None

    def record(self, with_identity: bool) -> dict[str, Any]:
        faces = identity_summary(self.matches) if with_identity else {}
        named = group_names(self.template)
        return {
            "prompt": self.template,
            "clip_text": self.text,
            "images": len(self.images),
            "faces": faces.get("faces"),
            "same_person": faces.get("same_person"),
            "similarity": faces.get("similarity"),
            "cosine": faces.get("cosine"),
            "distance": faces.get("distance"),
            "clip_score": mean_of(self.clip_scores) if self.clip_scores is not None else None,
            "identities": named or None,
            "crossover": sum(m is not None and m.crossover for m in self.matches) if named and with_identity else None,
        }


@dataclass
class Evaluation:
    """Everything one identity's evaluation produced; `record()` is what is stored and printed."""

    name: str
    settings: dict[str, Any]
    crops: list[Image.Image]
    prompts: list[PromptResult]
    identity_created: str = ""  # the identity evaluated: a re-learned one of the same name differs here
    references: int = 0  # stored crops in which a face was found
    reference: Reference | None = None  # the person's own ceiling (None without usable crops)
    identity_note: str | None = None  # why identity similarity is unavailable
    fidelity_note: str | None = None  # why prompt fidelity is unavailable
    date: str = field(default_factory=now)
    step: int | None = None  # with `snapshot_steps`: the snapshot's step (0: the final vectors)

    @property
    def has_identity(self) -> bool:
        return self.identity_note is None

    @property
    def has_fidelity(self) -> bool:
        return self.fidelity_note is None

    def identity(self) -> dict[str, Any]:
        if not self.has_identity:
            return {"available": False, "metric": FACE_METRIC, "reason": self.identity_note}
        summary = identity_summary([m for p in self.prompts for m in p.matches])
        reference = self.reference.record() if self.reference is not None else None
        return {
            "available": True,
            "metric": FACE_METRIC,
            "reference_crops": self.references,
            "reference": reference,
            **summary,
        }

    def fidelity(self) -> dict[str, Any]:
        model = self.settings.get("clip_model")
        if not self.has_fidelity:
            return {"available": False, "model": model, "reason": self.fidelity_note}
        scores = [s for p in self.prompts for s in (p.clip_scores or [])]
        return {"available": True, "model": model, "clip_score": mean_of(scores)}

    def calibrated(self) -> dict[str, Any]:
        """The keys scripts read (docs/eval.md): `likeness` and its parts, prompt fidelity, crossover."""
        matches = [m for p in self.prompts for m in p.matches]
        if self.has_identity and self.reference is not None:
            numbers = likeness_of(matches, self.reference)
        else:
            numbers = dict.fromkeys(
                ("identity_similarity", "reference_similarity", "likeness", "same_person_rate", "face_rate")
            )
        group = [p for p in self.prompts if group_names(p.template)]
        numbers["prompt_fidelity"] = self.fidelity().get("clip_score")
        numbers["crossover"] = (
            sum(m is not None and m.crossover for p in group for m in p.matches)
            if group and self.has_identity
            else None
        )
        return numbers

    def record(self) -> dict[str, Any]:
        """The identity's `evaluation` metadata (None values are dropped when written as TOML)."""
        return {
            **self.calibrated(),
            "date": self.date,
            "crossinit": __version__,
            "settings": self.settings,
            "identity": self.identity(),
            "fidelity": self.fidelity(),
            "prompts": [p.record(self.has_identity) for p in self.prompts],
            "contact_sheet": SHEET_PATH.as_posix(),
        }
