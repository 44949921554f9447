"""Identity similarity: how much a generated face looks like the person (docs/eval.md).

The dlib ResNet face descriptor (its weights ship in `face-recognition-models`) of each generated face
against those of the identity's stored crops: mean cosine and mean dlib (Euclidean) distance, the share
of images with a face and of faces closer than dlib's same-person threshold; `similarity` maps a distance
onto a scale with that threshold at 0.5, `Reference` is the person's own ceiling (how alike their photos
are), and `likeness_of` their ratio. `assign_faces` tells apart the faces of an image naming several
identities. No model is loaded here beyond dlib's (faces.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

FACE_METRIC = "dlib_face_recognition_resnet_model_v1"

# dlib's own decision threshold: two faces closer than this are the same person (99.38% on LFW).
SAME_PERSON_DISTANCE = 0.6  # = faces.SAME_PERSON_DISTANCE, which `learn` checks its photos with

SIMILARITY_ZERO = 2 * SAME_PERSON_DISTANCE
"""The dlib distance at which identity similarity reaches 0; the same-person threshold sits at 0.5."""


def similarity(distance: float) -> float:
    """Identity similarity on a scale a threshold can be read on: 1 - distance / 1.2, clipped to [0, 1].

    dlib's descriptors lie in a narrow cone (cosines of strangers are ~0.88), so raw cosines compress
    everything into a few hundredths; its distance is what dlib calibrates (0.6 = same person), and this
    maps it linearly: 1.0 the identical face, 0.5 dlib's same-person threshold, 0 far apart."""
    return min(1.0, max(0.0, 1.0 - distance / SIMILARITY_ZERO))


THRESHOLD_SIMILARITY = similarity(SAME_PERSON_DISTANCE)


@dataclass(frozen=True)
class FaceMatch:
    """One generated face against the identity's reference descriptors (means over the references)."""

    cosine: float
    distance: float
    crossover: bool = False  # in a multi-identity image: closer to another named identity than to this one

    @property
    def similarity(self) -> float:
        return similarity(self.distance)

    @property
    def same_person(self) -> bool:
        return self.distance < SAME_PERSON_DISTANCE


@dataclass(frozen=True)
class Reference:
    """The person's own ceiling: how similar their stored photos are to each other.

    With two or more photos with a face: the mean similarity over every pair of distinct photos. With
    one, there is no pair: dlib's same-person threshold (similarity 0.5) stands in, and `pairs` is 0."""

    similarity: float
    photos: int
    pairs: int

    @property
    def from_threshold(self) -> bool:
        return self.pairs == 0

    def record(self) -> dict[str, Any]:
        kind = "threshold" if self.from_threshold else "photo pairs"
        return {"similarity": rounded(self.similarity), "photos": self.photos, "pairs": self.pairs, "kind": kind}


def reference_of(descriptors: Sequence[np.ndarray]) -> Reference:
    """The ceiling of one identity from the descriptors of its stored crops (see `Reference`)."""
    import itertools

    import numpy as np

    pairs = list(itertools.combinations(range(len(descriptors)), 2))
    if not pairs:
        return Reference(THRESHOLD_SIMILARITY, len(descriptors), 0)
    values = [similarity(float(np.linalg.norm(descriptors[a] - descriptors[b]))) for a, b in pairs]
    return Reference(sum(values) / len(values), len(descriptors), len(pairs))


def assign_faces(found: Sequence[np.ndarray], references: Sequence[Sequence[np.ndarray]]) -> list[FaceMatch | None]:
    """Match the faces of one image to the identities it names, one face each (an assignment).

    `references[i]` are identity i's descriptors. The assignment maximises the summed similarity over
    every one-to-one matching (exhaustive: a prompt names a few people and an image shows a few faces).
    Returns, per identity, its face's match against its own references (None when it got no face),
    flagged as a crossover when that face is closer to another named identity."""
    import itertools

    if not found:
        return [None] * len(references)
    table = [[compare_descriptors(refs, face) for refs in references] for face in found]
    k, m = len(references), len(found)
    best: tuple[float, tuple[int | None, ...]] = (-1.0, tuple([None] * k))
    if m >= k:
        choices = itertools.permutations(range(m), k)
        candidates = (tuple(c) for c in choices)
    else:  # fewer faces than identities: choose which identities get one
        candidates = (
            tuple(perm.index(i) if i in perm else None for i in range(k))
            for perm in itertools.permutations(range(k), m)
        )
    for faces_of in candidates:
        total = sum(table[f][i].similarity for i, f in enumerate(faces_of) if f is not None)
        if total > best[0]:
            best = (total, faces_of)
    matches: list[FaceMatch | None] = []
    for i, f in enumerate(best[1]):
        if f is None:
            matches.append(None)
            continue
        own = table[f][i]
        rival = max((table[f][j].similarity for j in range(k) if j != i), default=-1.0)
        matches.append(FaceMatch(own.cosine, own.distance, crossover=rival > own.similarity))
    return matches


def descriptor(image: Image.Image) -> np.ndarray | None:
    """The dlib ResNet descriptor of the largest face in `image`, or None when no face is found."""
    from crossinit_cli import faces

    return faces.face_descriptor(image)


def reference_descriptors(crops: Sequence[Image.Image]) -> list[np.ndarray]:
    """Descriptors of the stored crops in which a face is found (crops from `--no-align` may have none)."""
    found = [descriptor(crop) for crop in crops]
    return [d for d in found if d is not None]


def match_face(references: Sequence[np.ndarray], image: Image.Image) -> FaceMatch | None:
    """How close the face in `image` is to the references; None when `image` shows no face."""
    found = descriptor(image)
    if found is None:
        return None
    return compare_descriptors(references, found)


def compare_descriptors(references: Sequence[np.ndarray], found: np.ndarray) -> FaceMatch:
    """Mean cosine similarity and mean dlib distance of one descriptor to each reference."""
    import numpy as np

    if not references:
        raise ValueError("no reference descriptors")
    refs = np.stack([np.asarray(r, dtype=np.float64) for r in references])
    vec = np.asarray(found, dtype=np.float64)
    norms = np.linalg.norm(refs, axis=1) * np.linalg.norm(vec)
    cosine = float(np.mean(refs @ vec / np.maximum(norms, 1e-12)))
    distance = float(np.mean(np.linalg.norm(refs - vec, axis=1)))
    return FaceMatch(cosine=cosine, distance=distance)


def faces_in(image: Image.Image) -> list[np.ndarray]:
    """Descriptors of every face in a generated image."""
    from crossinit_cli import faces

    return faces.face_descriptors(image)


def identity_summary(matches: Sequence[FaceMatch | None]) -> dict[str, Any]:
    """Share of images with a face, and mean cosine / distance over those that have one."""
    faces = [m for m in matches if m is not None]
    total = len(matches)
    return {
        "images": total,
        "faces": len(faces),
        "face_rate": rounded(len(faces) / total) if total else None,
        "cosine": mean_of([m.cosine for m in faces]),
        "distance": mean_of([m.distance for m in faces]),
        # Over all images: a face that is missing is not the person either.
        "match_rate": rounded(sum(m.same_person for m in faces) / total) if total else None,
        "same_person": sum(m.same_person for m in faces),
        "similarity": mean_of([m.similarity for m in faces]),
    }


def likeness_of(matches: Sequence[FaceMatch | None], reference: Reference) -> dict[str, Any]:
    """The calibrated numbers of docs/eval.md: similarity of the generated faces, the person's own
    ceiling, their ratio, and the shares of faces that are the person and of images with a face."""
    summary = identity_summary(matches)
    faces = [m for m in matches if m is not None]
    ident = summary["similarity"]
    ceiling = reference.similarity
    likeness: float | None = 0.0  # no face was found: nothing looks like the person
    if ident is not None:
        likeness = rounded(ident / ceiling) if ceiling > 0 else None
    return {
        "identity_similarity": ident,
        "reference_similarity": rounded(ceiling),
        "likeness": likeness,
        "same_person_rate": rounded(summary["same_person"] / len(faces)) if faces else None,
        "face_rate": summary["face_rate"],
    }


def rounded(value: float) -> float:
    """A score as it is stored and printed: 4 decimals."""
    return round(float(value), 4)


def mean_of(values: Sequence[float] | None) -> float | None:
    """The rounded mean of the finite values; None when there are none."""
    values = [v for v in (values or []) if math.isfinite(v)]
    return rounded(sum(values) / len(values)) if values else None
