"""The paper's two numbers for a stored identity: identity similarity and prompt fidelity.

Cross Initialization (like Celeb Basis, whose protocol it follows) judges a personalised identity on two
axes: *reconstruction* (do generated faces keep the person's identity?) and *editability* (do they
follow the rest of the prompt?). This module measures both for identities in the library:

- identity similarity: the dlib ResNet face descriptor (its weights ship in `face-recognition-models`)
  of each generated face against the identity's stored crops: mean cosine similarity, mean dlib
  (Euclidean) distance, the share of images in which a face was found at all, and the share closer
  than dlib's same-person threshold;
- prompt fidelity: CLIP image-text cosine similarity between each image and its prompt with the
  identity token stripped (`--clip-model`, default CLIP ViT-B/32, the model of that protocol).

Usable from Python without the CLI:

    from crossinit_cli import scoring
    from crossinit_cli.store import Library

    lib = Library(home)
    request = scoring.EvalRequest(model="stabilityai/stable-diffusion-2-1-base")
    results = scoring.evaluate(lib, ["alice"], request)
    for result in results:
        scoring.save(lib, result)   # metadata `evaluation` + eval/contact-sheet.png
        print(result.record()["identity"])

The pipeline is loaded once per base model for all prompts and identities of a run (identities learned
on different base models are grouped, one model after the other); CLIP is loaded once. Nothing is
written to the library before every number is computed.
"""

from __future__ import annotations

import gc
import io
import math
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import __version__, config, devices, hf, sample
from crossinit_cli.atomic import write_bytes_atomic
from crossinit_cli.errors import CrossinitError, library_text
from crossinit_cli.store import Identity, Library, name_key, now

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    from PIL import Image

PLACEHOLDER = "{}"
DEFAULT_PROMPTS: tuple[str, ...] = (
    # The official code's inference prompt is "a photo of a {} person": the person word stays.
    # reconstruction
    "a photo of a {} person",
    # expression
    "a photo of a {} person smiling",
    "a photo of a {} person looking angry",
    # accessories
    "a photo of a {} person wearing glasses",
    "a photo of a {} person wearing a hat",
    # style
    "an oil painting of a {} person",
    "a pencil sketch of a {} person",
    # place
    "a photo of a {} person on the beach",
    "a photo of a {} person in the snow",
)
DEFAULT_N = 4
DEFAULT_SEED = 0
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
FACE_METRIC = "dlib_face_recognition_resnet_model_v1"
# dlib's own decision threshold: two faces closer than this are the same person (99.38% on LFW).
SAME_PERSON_DISTANCE = 0.6  # = faces.SAME_PERSON_DISTANCE, which `learn` checks its photos with
SHEET_PATH = Path("eval") / "contact-sheet.png"
SHEET_TILE = 256  # px per image on the contact sheet (a full-size 4 x 10 sheet of 512 px tiles is ~15 MB)
SHEET_CROPS = 4  # stored crops shown in the sheet's first row, at least
CLIP_BATCH = 32


# ---- prompts ------------------------------------------------------------------------------------


def read_prompts(text: str, source: str = "prompts") -> list[str]:
    """Prompt templates from a file's text: one a line, `{}` where the identity goes.

    Blank lines and `#` comments are skipped; a line without `{}` (or `<name>`s) becomes
    "a photo of a {} person, <line>".
    """
    templates = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        named = PLACEHOLDER in line or sample.identity_refs(line)
        templates.append(line if named else f"a photo of a {PLACEHOLDER} person, {line}")
    if not templates:
        raise CrossinitError(f"no prompts in {source} (blank lines and # comments are skipped)")
    return check_templates(templates)


def check_templates(templates: Sequence[str]) -> list[str]:
    """A template names its identity with `{}` (it runs for every identity evaluated), or names two or
    more identities as `<alice> ... <bob>` and no `{}` (it runs once, and its faces are assigned)."""
    checked = []
    for template in templates:
        refs = sample.identity_refs(template)
        if PLACEHOLDER in template and refs:
            raise CrossinitError(
                f"prompt {template!r} names <{refs[0]}> beside {PLACEHOLDER}; a prompt names one identity "
                f"with {PLACEHOLDER}, or two or more with <name>"
            )
        if PLACEHOLDER not in template and len(refs) < 2:
            raise CrossinitError(
                f"prompt {template!r} has no {PLACEHOLDER} where the identity goes"
                + (f" (for <{refs[0]}> alone write {PLACEHOLDER})" if refs else "")
            )
        checked.append(template)
    if not checked:
        raise CrossinitError("no prompts to evaluate")
    return checked


def fill(template: str, name: str) -> str:
    """The prompt generated for one identity: `{}` -> `<name>` (a prompt naming several stays as written)."""
    return template.replace(PLACEHOLDER, f"<{name}>")


def group_names(template: str) -> list[str]:
    """The identities a multi-identity template names, as written; [] for a `{}` template."""
    return [] if PLACEHOLDER in template else sample.identity_refs(template)


def clip_text(template: str) -> str:
    """The text CLIP scores an image against: the prompt with the identity token stripped.

    This is the textual-inversion / Celeb Basis convention ("a photo of {} on the beach" -> "a photo of on
    the beach"): the score then measures the rest of the prompt, not how CLIP reads a new token.
    """
    text = sample.IDENTITY_REF.sub(" ", template.replace(PLACEHOLDER, " "))
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?=[,;:])", "", text)
    return " ".join(text.split()).strip(" ,;:")


# ---- identity similarity ------------------------------------------------------------------------


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
        return {"similarity": _round(self.similarity), "photos": self.photos, "pairs": self.pairs, "kind": kind}


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


def identity_summary(matches: Sequence[FaceMatch | None]) -> dict[str, Any]:
    """Share of images with a face, and mean cosine / distance over those that have one."""
    faces = [m for m in matches if m is not None]
    total = len(matches)
    return {
        "images": total,
        "faces": len(faces),
        "face_rate": _round(len(faces) / total) if total else None,
        "cosine": _mean([m.cosine for m in faces]),
        "distance": _mean([m.distance for m in faces]),
        # Over all images: a face that is missing is not the person either.
        "match_rate": _round(sum(m.same_person for m in faces) / total) if total else None,
        "same_person": sum(m.same_person for m in faces),
        "similarity": _mean([m.similarity for m in faces]),
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
        likeness = _round(ident / ceiling) if ceiling > 0 else None
    return {
        "identity_similarity": ident,
        "reference_similarity": _round(ceiling),
        "likeness": likeness,
        "same_person_rate": _round(summary["same_person"] / len(faces)) if faces else None,
        "face_rate": summary["face_rate"],
    }


# ---- prompt fidelity ----------------------------------------------------------------------------


class ClipUnavailable(Exception):
    """The CLIP model could not be loaded (offline and not cached, not a CLIP folder, ...)."""


class ClipUnreachable(ClipUnavailable):
    """The CLIP model is not cached and the Hub cannot be reached; its message says so and how to fix it."""


class ClipScorer:
    """CLIP image-text cosine similarity, the "CLIP score" of textual inversion and Celeb Basis."""

    def __init__(self, name: str, model: Any, tokenizer: Any, processor: Any) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor

    @classmethod
    def load(cls, name: str) -> ClipScorer:
        """Load a CLIP model (hub id or local folder) on the CPU; ClipUnavailable says why it could not."""
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise ClipUnavailable(f"transformers cannot be imported ({exc})") from None
        try:
            # transformers 5 moved the PIL implementation under its own name (the default one needs torchvision).
            from transformers import CLIPImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor as ImageProcessor
        source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
        try:
            # Cached: no network call; not cached and no network: one line now, not a minute of retries.
            source = hf.hub_source(source, "config.json", "CLIP model") if hf.is_hub_id(source) else source
        except hf.HubUnreachable as exc:
            raise ClipUnreachable(str(exc)) from None
        try:
            with hf.quiet_libraries():
                model = CLIPModel.from_pretrained(source)
                tokenizer = AutoTokenizer.from_pretrained(source)
                processor = ImageProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError) as exc:
            # huggingface_hub's "not cached / offline / not found" errors are OSError subclasses; a folder
            # that is not a CLIP model gives ValueError or KeyError.
            raise ClipUnavailable(library_text(exc)) from None
        model.eval().requires_grad_(False)
        return cls(name, model, tokenizer, processor)

    def to(self, device: str) -> ClipScorer:
        self.model.to(device)
        return self

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Cosine similarity of image i and text i, each in [-1, 1]."""
        import torch

        if len(images) != len(texts):
            raise ValueError("one text per image")
        device = next(self.model.parameters()).device
        max_length = int(self.model.config.text_config.max_position_embeddings)
        scores: list[float] = []
        for start in range(0, len(images), CLIP_BATCH):
            chunk = [im.convert("RGB") for im in images[start : start + CLIP_BATCH]]
            words = list(texts[start : start + CLIP_BATCH])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            tokens = self.tokenizer(words, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                out = self.model(
                    input_ids=tokens["input_ids"].to(device),
                    attention_mask=tokens["attention_mask"].to(device),
                    pixel_values=pixels.to(device=device, dtype=self.model.dtype),
                )
            image_embeds = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            text_embeds = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            scores.extend(float(s) for s in (image_embeds * text_embeds).sum(dim=-1).cpu())
        return scores


# ---- one evaluation -----------------------------------------------------------------------------


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
            "clip_score": _mean(self.clip_scores) if self.clip_scores is not None else None,
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
        return {"available": True, "model": model, "clip_score": _mean(scores)}

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


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation runs: prompts, images per prompt, sampling settings, models, and (optionally) the
    snapshots of one identity's run instead of the identities' current vectors.

    `model` runs every identity on that base model; otherwise each runs on the model it was learned on
    (`base_model`), or the built-in default when that is not recorded (`config.identities_model`).
    `clip_model=None` skips prompt fidelity. `snapshot_steps` evaluates the snapshots of one identity's run
    (0: the final vectors), all on one pipeline load; each result's `step` says which."""

    templates: Sequence[str] = DEFAULT_PROMPTS
    n: int = DEFAULT_N
    seed: int = DEFAULT_SEED
    steps: int = sample.DEFAULT_STEPS
    guidance: float = sample.DEFAULT_GUIDANCE
    scheduler: str = sample.DEFAULT_SCHEDULER
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    clip_model: str | None = DEFAULT_CLIP_MODEL
    snapshot_steps: Sequence[int] | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def checked(self) -> EvalRequest:
        """The request with its templates checked; a bad count, seed or scheduler is an error here."""
        templates = check_templates(self.templates)
        if self.n < 1:
            raise CrossinitError(f"-n must be at least 1, not {self.n}")
        if self.steps < 1:
            raise CrossinitError(f"--steps must be at least 1, not {self.steps}")
        sample.check_seed_range(self.seed, self.n)
        sample.scheduler_choice(self.scheduler)
        return replace(self, templates=templates)


@dataclass(frozen=True)
class EvalHooks:
    """What a caller hears: `notify(message)` about a metric that is unavailable, `on_image(name, prompt)`
    about every image made; `on_load(model)` returns a context manager held while a model loads."""

    notify: Callable[[str], None] | None = None
    on_image: Callable[[str, str], None] | None = None
    on_load: Callable[[str], Any] | None = None

    def say(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)


@dataclass
class _Plan:
    """An evaluation once every cheap check has passed: which identity runs on which model, with which
    vectors, scored against whose crops."""

    identities: dict[str, Identity]  # result key -> identity (a snapshot's pseudo-identity with --snapshots)
    vectors: dict[str, list[np.ndarray]]
    library_name: dict[str, str]  # result key -> the identity whose crops it is scored against
    step_of: dict[str, int | None]
    groups: dict[str, list[Identity]]  # base model -> identities run on it
    together: dict[str, list[tuple[str, list[str]]]]  # base model -> templates naming several identities


def evaluate(
    library: Library, names: Sequence[str], request: EvalRequest = EvalRequest(), hooks: EvalHooks = EvalHooks()
) -> list[Evaluation]:
    """Generate every template n times (seeds seed..seed+n-1) for each identity and score the images.

    Everything cheap is checked first, so no model is loaded if any of it fails; then one pipeline per
    base model generates all identities' images, and CLIP scores them all at the end."""
    request = request.checked()
    plan = _plan(library, names, request)
    placement = devices.resolve(request.device, request.dtype)
    for key, ident in plan.identities.items():
        if key not in plan.vectors:
            plan.vectors[key] = library.effective_parts(ident.name)
    results, references = _start_results(library, plan, hooks)
    scorer, fidelity_note = _load_clip(request.clip_model, hooks)
    for chosen, group in plan.groups.items():
        run = _ModelRun(request, hooks, chosen, placement, fidelity_note, results, references)
        _generate_on_model(run, group, plan)
    if scorer is not None:
        _score_fidelity(scorer, results, placement)
        del scorer
        gc.collect()
    return list(results.values())


def _plan(library: Library, names: Sequence[str], request: EvalRequest) -> _Plan:
    """The identities (or one identity's snapshots), grouped by the base model each runs on."""
    identities: dict[str, Identity] = {}
    for name in names:
        ident = library.get(name)
        if name_key(ident.name) in identities:
            raise CrossinitError(f"identity {ident.name!r} is named twice")
        identities[name_key(ident.name)] = ident
    if not identities:
        raise CrossinitError("no identity to evaluate")
    vectors: dict[str, list[np.ndarray]] = {}
    library_name: dict[str, str] = {}
    step_of: dict[str, int | None] = {}
    if request.snapshot_steps is not None:
        identities, vectors, library_name, step_of = _snapshot_variants(library, identities, request.snapshot_steps)
    groups: dict[str, list[Identity]] = {}
    for ident in identities.values():
        chosen = config.identities_model(request.model, [ident])
        groups.setdefault(chosen, []).append(ident)
    together = _multi_identity_templates(request.templates, identities, groups)
    for chosen, group in groups.items():
        sample.check_model(chosen, group)
    return _Plan(identities, vectors, library_name, step_of, groups, together)


def _start_results(
    library: Library, plan: _Plan, hooks: EvalHooks
) -> tuple[dict[str, Evaluation], dict[str, list[np.ndarray]]]:
    """An empty result per identity, and the face descriptors of its stored crops (the references)."""
    results: dict[str, Evaluation] = {}
    references: dict[str, list[np.ndarray]] = {}
    for key, ident in plan.identities.items():
        crops = _load_crops(library, plan.library_name.get(key, ident.name))
        result = Evaluation(name=ident.name, settings={}, crops=crops, prompts=[], identity_created=ident.created)
        result.step = plan.step_of.get(key)
        if not crops:
            result.identity_note = (
                f"identity {ident.name!r} has no stored face crops (imported?), so identity similarity "
                "cannot be measured"
            )
        else:
            try:
                references[key] = reference_descriptors(crops)
            except CrossinitError as exc:  # dlib or its weights missing
                result.identity_note = f"identity similarity is unavailable: {exc}"
            else:
                result.references = len(references[key])
                if references[key]:
                    result.reference = reference_of(references[key])
                if not references[key]:
                    from crossinit_cli.faces import no_face_reason

                    why = no_face_reason(ident.name, [c.size for c in crops], ident.training.get("aligned"))
                    result.identity_note = f"{why}, so identity similarity cannot be measured"
        if result.identity_note:
            hooks.say(result.identity_note)
        results[key] = result
    return results, references


def _load_clip(clip_model: str | None, hooks: EvalHooks) -> tuple[ClipScorer | None, str | None]:
    """The CLIP scorer, or None and the note that says why prompt fidelity is left out."""
    if clip_model is None:
        return None, "prompt fidelity was not asked for"
    try:
        with _holding(hooks.on_load, clip_model):
            return ClipScorer.load(clip_model), None
    except ClipUnreachable as exc:
        hooks.say(f"{exc}; prompt fidelity is left out and identity similarity is reported alone")
        return None, f"CLIP model {clip_model!r} is not available (not cached, no network)"
    except ClipUnavailable as exc:
        if Path(clip_model).expanduser().exists():
            how = f"{str(exc)[:120]}; pass a folder with a CLIP model, tokenizer and image processor"
        else:
            how = f"download it once with `hf download {clip_model}`, or pass --clip-model with a local folder"
        hooks.say(
            f"CLIP model {clip_model!r} could not be loaded, so prompt fidelity is left out and identity "
            f"similarity is reported alone ({how})"
        )
        return None, f"CLIP model {clip_model!r} is not available ({exc})"


@dataclass(frozen=True)
class _ModelRun:
    """One base model's part of an evaluation: where it runs and the results its images go to."""

    request: EvalRequest
    hooks: EvalHooks
    model: str
    placement: devices.Placement
    fidelity_note: str | None
    results: dict[str, Evaluation]
    references: dict[str, list[np.ndarray]]


def _generate_on_model(run: _ModelRun, group: list[Identity], plan: _Plan) -> None:
    """Generation: one pipeline for this base model, all its identities and prompts at once."""
    import torch

    with _holding(run.hooks.on_load, run.model):
        pipe = sample.load(run.model, run.placement, group)
    try:
        vectors = {i.name: plan.vectors[name_key(i.name)] for i in group}
        mapping = sample.add_identities(pipe, vectors, model=run.model)
        width, height = sample.native_size(pipe)
        request = run.request
        settings = sample.Settings(
            width=width, height=height, steps=request.steps, guidance=request.guidance, scheduler=request.scheduler
        )
        for ident in group:
            _generate_one(run, ident, pipe, mapping, settings)
        for template, keys in plan.together.get(run.model, []):
            skips = {i.clip_skip for i in group if name_key(i.name) in keys}  # their own, when they agree
            together = replace(settings, clip_skip=skips.pop() if len(skips) == 1 else 1)
            _generate_together(run, template, keys, pipe, mapping, together)
    finally:
        del pipe
        gc.collect()
        if run.placement.device == "cuda":
            torch.cuda.empty_cache()


def _generate_one(run: _ModelRun, ident: Identity, pipe: Any, mapping: Any, settings: sample.Settings) -> None:
    """Every `{}` template for one identity, each face matched against its references."""
    request, key = run.request, name_key(ident.name)
    result = run.results[key]
    sample.check_clip_skip(run.model, ident.clip_skip, pipe)
    settings = replace(settings, clip_skip=ident.clip_skip)  # each identity at the layer it was learned at
    result.settings = {
        "prompts": list(request.templates),
        "n": request.n,
        "seed": request.seed,
        "steps": request.steps,
        "guidance": request.guidance,
        "scheduler": request.scheduler,
        "size": [settings.width, settings.height],
        "model": run.model,
        "device": run.placement.device,
        "dtype": run.placement.dtype,
        "strength": ident.strength,
        "snapshot": ident.active_step,  # 0: the final vectors
        "clip_skip": ident.clip_skip,
        "clip_model": request.clip_model,
    }
    result.fidelity_note = run.fidelity_note
    seeds = request.seeds
    for template in request.templates:
        if group_names(template):
            continue
        prompt = fill(template, ident.name)
        images = sample.sample(pipe, sample.expand_prompt(prompt, mapping), seeds, settings)
        entry = PromptResult(template, prompt, clip_text(template), list(seeds), images)
        for image in images:
            if result.has_identity:
                entry.matches.append(match_face(run.references[key], image))
            if run.hooks.on_image is not None:
                run.hooks.on_image(ident.name, prompt)
        result.prompts.append(entry)


def _generate_together(
    run: _ModelRun, template: str, keys: list[str], pipe: Any, mapping: Any, settings: sample.Settings
) -> None:
    """A template naming several identities: generated once, its faces assigned to the identities named."""
    seeds = run.request.seeds
    images = sample.sample(pipe, sample.expand_prompt(template, mapping), seeds, settings)
    named = [run.results[key] for key in keys]
    entries = [PromptResult(template, template, clip_text(template), list(seeds), images) for _ in keys]
    scored = all(r.has_identity for r in named)
    for image in images:
        if scored:
            found = faces_in(image)
            for entry, match in zip(entries, assign_faces(found, [run.references[k] for k in keys])):
                entry.matches.append(match)
        if run.hooks.on_image is not None:
            run.hooks.on_image(", ".join(r.name for r in named), template)
    for result, entry in zip(named, entries):
        if not scored:  # one named identity without crops: faces cannot be told apart
            entry.matches = [None] * len(images) if result.has_identity else []
        result.prompts.append(entry)


def _score_fidelity(scorer: ClipScorer, results: dict[str, Evaluation], placement: devices.Placement) -> None:
    """Prompt fidelity: CLIP once, on the device the pipelines have left."""
    scorer.to(placement.device)
    for result in results.values():
        for entry in result.prompts:
            entry.clip_scores = scorer.score(entry.images, [entry.text] * len(entry.images))


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


def _snapshot_variants(
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


def faces_in(image: Image.Image) -> list[np.ndarray]:
    """Descriptors of every face in a generated image."""
    from crossinit_cli import faces

    return faces.face_descriptors(image)


def _multi_identity_templates(
    templates: Sequence[str], identities: dict[str, Identity], groups: dict[str, list[Identity]]
) -> dict[str, list[tuple[str, list[str]]]]:
    """{model: [(template, [identity keys])]} for the templates naming several identities.

    Each names only identities being evaluated, all learned on (or run with) the same base model."""
    model_of = {name_key(i.name): model for model, group in groups.items() for i in group}
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for template in templates:
        named = group_names(template)
        if not named:
            continue
        keys = [sample.ref_key(n) for n in named]
        missing = [n for n, k in zip(named, keys) if k not in identities]
        if missing:
            raise CrossinitError(
                f"prompt {template!r} names <{missing[0]}>, who is not being evaluated; name every identity "
                f"it mentions: crossinit eval {' '.join(named)} ..."
            )
        models = {model_of[k] for k in keys}
        if len(models) > 1:
            raise CrossinitError(f"prompt {template!r} names identities learned on different base models; pass --model")
        found.setdefault(models.pop(), []).append((template, keys))
    return found


def image_count(templates: Sequence[str], identities: int, n: int) -> int:
    """How many images an evaluation makes: `{}` templates per identity, multi-identity ones once."""
    per_identity = sum(1 for t in templates if not group_names(t))
    return (per_identity * identities + (len(templates) - per_identity)) * n


@contextmanager
def _holding(on_load: Callable[[str], Any] | None, what: str) -> Iterator[None]:
    if on_load is None:
        yield
        return
    with on_load(what):
        yield


def _load_crops(library: Library, name: str) -> list[Image.Image]:
    from PIL import Image, UnidentifiedImageError

    crops = []
    for path in library.crops(name):
        try:
            with Image.open(path) as image:
                crops.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise CrossinitError(f"identity {name!r} is damaged: cannot read crop {path.name} ({exc})") from None
    return crops


# ---- results into the library -------------------------------------------------------------------


def save(library: Library, result: Evaluation) -> Path:
    """Store the evaluation in the identity's metadata and its contact sheet in its folder, under the
    library lock (so a concurrent rename or remove cannot leave a half-written entry); returns the sheet."""
    png = io.BytesIO()
    contact_sheet(result).save(png, format="PNG")
    record = result.record()
    where: list[Path] = []

    def change(ident: Identity) -> None:
        if result.identity_created and ident.created != result.identity_created:
            raise CrossinitError(
                f"identity {ident.name!r} was replaced while it was being evaluated; run `crossinit eval` again"
            )
        path = library.path_of(ident.name) / SHEET_PATH
        write_bytes_atomic(path, png.getvalue())
        ident.evaluation = record
        where.append(path)

    library.modify(result.name, change)
    return where[0]


def contact_sheet(result: Evaluation) -> Image.Image:
    """The stored crops in the first row, then one row per prompt, each under a label with its scores."""
    from PIL import Image, ImageDraw

    first = result.prompts[0].images[0] if result.prompts and result.prompts[0].images else None
    tile = min(SHEET_TILE, first.width if first is not None else SHEET_TILE)
    n = max((len(p.images) for p in result.prompts), default=1)
    cols = max(n, min(len(result.crops), SHEET_CROPS), 1)
    band = max(12, tile // 12)
    font = _font(int(band * 0.75))
    rows: list[tuple[str, list[Image.Image]]] = []
    crops_label = f"stored crops of <{result.name}> ({len(result.crops)})" if result.crops else "no stored crops"
    rows.append((crops_label, result.crops[:cols]))
    for entry in result.prompts:
        rows.append((_row_label(entry, result.has_identity), entry.images))
    sheet = Image.new("RGB", (cols * tile, len(rows) * (band + tile)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (band + tile)
        draw.text((3, top + 1), _fit(draw, label, font, cols * tile - 6), fill="black", font=font)
        for c, image in enumerate(images[:cols]):
            sheet.paste(_square(image, tile), (c * tile, top + band))
    return sheet


def _row_label(entry: PromptResult, with_identity: bool) -> str:
    parts = [entry.prompt]
    if with_identity:
        faces = identity_summary(entry.matches)
        parts.append(f"faces {faces['faces']}/{faces['images']}")
        if faces["cosine"] is not None:
            parts.append(f"cos {faces['cosine']:.3f}")
    if entry.clip_scores:
        parts.append(f"CLIP {_mean(entry.clip_scores):.3f}")
    return "  ·  ".join(parts)


def _square(image: Image.Image, side: int) -> Image.Image:
    from PIL import Image, ImageOps

    return ImageOps.fit(image.convert("RGB"), (side, side), Image.Resampling.LANCZOS)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or built without FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


# ---- numbers ------------------------------------------------------------------------------------


def _round(value: float) -> float:
    return round(float(value), 4)


def _mean(values: Sequence[float] | None) -> float | None:
    values = [v for v in (values or []) if math.isfinite(v)]
    return _round(sum(values) / len(values)) if values else None
