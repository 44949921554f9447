"""Prompt fidelity: does a generated image follow the rest of its prompt? And the prompts it is asked of.

The prompt templates an evaluation runs (`DEFAULT_PROMPTS`, a file's lines through `read_prompts`): `{}`
where the identity goes, or two or more `<name>`s for a multi-identity image. `ClipScorer` is CLIP
image-text cosine similarity (`--clip-model`, default CLIP ViT-B/32, the Celeb Basis protocol's model),
scored against the prompt with the identity token stripped (`clip_text`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import hf, sample
from crossinit_cli.errors import CrossinitError, library_text

if TYPE_CHECKING:
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

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

CLIP_BATCH = 32


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


def image_count(templates: Sequence[str], identities: int, n: int) -> int:
    """How many images an evaluation makes: `{}` templates per identity, multi-identity ones once."""
    per_identity = sum(1 for t in templates if not group_names(t))
    return (per_identity * identities + (len(templates) - per_identity)) * n


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
