"""The sampling engine: stored identities into a Stable Diffusion pipeline, prompts into images.

Usable from Python without the CLI:

    from crossinit_cli import devices, sample
    from crossinit_cli.store import Library

    lib = Library(home)
    placement = devices.resolve("auto")
    pipe = sample.load(model, placement)
    mapping = sample.add_identities(pipe, {"alice": lib.effective_parts("alice")}, model=model)
    settings = sample.Settings(width=512, height=512)
    images = sample.sample(pipe, sample.expand_prompt("<alice> as an astronaut", mapping), [7, 8], settings)

Identities are named in prompts as `<alice>` (case-insensitive, as in the store). Each identity's k
vectors become k new tokens `<crossinit:alice:0>` ... of the pipeline's tokenizer (SDXL: of both
tokenizers, each encoder getting its own vectors), and `expand_prompt` rewrites `<alice>` into them.
The pipeline class is the model family's (families.py): StableDiffusionPipeline or StableDiffusionXLPipeline.
Image i of a batch is drawn from its own CPU generator seeded with its own
seed, so an image depends on its seed, the settings and the device, not on its place in the batch.
A clip skip N > 1 (SD 1.x/2.x, `Settings.clip_skip`) encodes the prompt and the negative prompt at the
text encoder's layer -N through its final layer norm, as A1111 does for both (`encode_prompt`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crossinit_cli import devices, families, hf
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, name_key

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
DEFAULT_SCHEDULER = "dpm++"
MAX_SIDE = 2048
# Images per UNet batch; larger -n runs in batches of this size (halved again on CUDA out-of-memory).
MAX_BATCH = 8
# Store names are `\w[\w.\-]*`; anything else in angle brackets (A1111's `<lora:x:1>`, `<3`) is left alone.
IDENTITY_REF = re.compile(r"<(\w[\w.\-]*)>")
TOKEN_PREFIX = "<crossinit:"


@dataclass(frozen=True)
class SchedulerChoice:
    """A `--scheduler` name: the diffusers class, its A1111 sampler name, and settings over the model's."""

    cls: str
    a1111: str
    overrides: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    # DPM-Solver++(2M): good images in 20-30 steps on SD 1.x/2.x; A1111 calls it "DPM++ 2M".
    "dpm++": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++"}),
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler-a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    # Without PRK warm-up steps PNDM is PLMS, the sampler SD shipped with (and A1111's name for it).
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
}


@dataclass
class Settings:
    """How to sample one batch; the defaults are the ones that give good images on real SD weights."""

    width: int
    height: int
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    negative: str = ""
    scheduler: str = DEFAULT_SCHEDULER
    clip_skip: int = 1  # A1111's Clip skip: the text encoder's layer -N through its final layer norm


@dataclass(frozen=True)
class IdentityTokens:
    """How one identity lives inside a pipeline: its placeholder tokens and their ids."""

    name: str
    tokens: tuple[str, ...]
    ids: tuple[int, ...]


# ---- prompts ------------------------------------------------------------------------------------


def identity_refs(prompt: str) -> list[str]:
    """The identities a prompt names as `<name>`, as written, first occurrence of each key only."""
    found: dict[str, str] = {}
    for match in IDENTITY_REF.finditer(prompt):
        written = match.group(1)
        found.setdefault(ref_key(written), written)
    return list(found.values())


def ref_key(written: str) -> str:
    """The store key a `<name>` reference stands for."""
    # A reference that is not even a valid store name (`<con>`, over-long) is simply an unknown identity.
    try:
        return name_key(written)
    except CrossinitError:
        return written.casefold()


def token_names(name: str, k: int) -> list[str]:
    """The k placeholder tokens of one identity, unique per identity (keys contain no ':')."""
    key = name_key(name)
    # Non-ASCII keys go in as hex: the tokenizer's own normaliser (NFC + lowercase) must not change them,
    # and '#' cannot occur in a store name, so a hex form never collides with an ASCII name.
    slug = key if key.isascii() else "#" + key.encode("utf-8").hex()
    return [f"{TOKEN_PREFIX}{slug}:{j}>" for j in range(k)]


def expand_prompt(prompt: str, mapping: Mapping[str, IdentityTokens]) -> str:
    """Rewrite every `<name>` into that identity's placeholder tokens; an unknown name is an error."""

    def replace(match: re.Match[str]) -> str:
        entry = mapping.get(ref_key(match.group(1)))
        if entry is None:
            raise CrossinitError(f"prompt names <{match.group(1)}>, but no such identity was added to the pipeline")
        return " ".join(entry.tokens)

    return IDENTITY_REF.sub(replace, prompt)


# ---- settings -----------------------------------------------------------------------------------


def scheduler_choice(name: str) -> SchedulerChoice:
    choice = SCHEDULERS.get(name.strip().lower())
    if choice is None:
        raise CrossinitError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return choice


def parse_size(text: str) -> tuple[int, int]:
    """`WxH` -> (width, height): positive multiples of 8, at most MAX_SIDE each."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", text)
    if not match:
        raise CrossinitError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 512x512")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        # The VAE halves the resolution three times (SD 1.x/2.x), so other sizes cannot be decoded.
        if side <= 0 or side % 8 or side > MAX_SIDE:
            raise CrossinitError(
                f"--size {text!r}: width and height must be positive multiples of 8, at most {MAX_SIDE}"
            )
    return width, height


def native_size(pipe: Any) -> tuple[int, int]:
    """(width, height) the model was trained at: the UNet's latent size times the VAE's scale."""
    sample_size = pipe.unet.config.sample_size
    if isinstance(sample_size, (list, tuple)):
        height, width = int(sample_size[0]), int(sample_size[1])
    else:
        height = width = int(sample_size)
    scale = int(pipe.vae_scale_factor)
    return width * scale, height * scale


def peek_model(model: str) -> families.Peeked | None:
    """The family and text widths of `model` from its configs alone (families.peek), or None if unknown.

    Lets `generate` refuse an identity of another family or width before spending seconds loading weights.
    """
    return families.peek(model)


def peek_text_width(model: str) -> int | None:
    """The (first) text encoder's width of `model` from its config alone, or None if unknown."""
    found = peek_model(model)
    return found.widths[0] if found is not None and found.widths else None


def check_model(model: str, identities: Iterable[Identity], pipe: Any = None) -> None:
    """Refuse, in one line naming both, identities of another family or width than `model`.

    Without `pipe` the model's configs are read (nothing is checked when they cannot be); with a loaded
    pipeline its own encoders are compared, before any weight is moved to the device.
    """
    if pipe is None:
        found = peek_model(model)
        if found is None:
            return
        family, widths = found.family, found.widths
    else:
        family, widths = families.of_pipeline(pipe), families.widths(pipe)
    for ident in identities:
        families.check_identity(ident.name, ident.family, tuple(ident.widths), model, family, widths)


def check_clip_skip(model: str, clip_skip: int, pipe: Any = None) -> None:
    """Refuse, in one line, a clip skip `model`'s family or text encoder cannot take (families.check_clip_skip).

    Without `pipe` the model's configs are read (only the family is checked when they say nothing more,
    nothing when they cannot be read); with a loaded pipeline, its own text encoder."""
    if pipe is None:
        found = peek_model(model)
        if found is not None:
            families.check_clip_skip(found.family, clip_skip, found.layers)
        return
    families.check_clip_skip(families.of_pipeline(pipe), clip_skip, families.text_layers(pipe.text_encoder))


MAX_SEED = 2**64 - 1
"""The largest seed a torch generator takes; n images use seeds seed..seed+n-1."""


def check_seed_range(seed: int, n: int) -> None:
    """`--seed` for n images: every one of seed..seed+n-1 must be a valid generator seed."""
    if not 0 <= seed <= MAX_SEED - (n - 1):
        raise CrossinitError(f"--seed must be between 0 and {MAX_SEED - (n - 1)}, not {seed}")


# ---- the pipeline -------------------------------------------------------------------------------


def load(model: str, placement: devices.Placement, identities: Iterable[Identity] = ()) -> Any:
    """The pipeline for `model` in the placement's precision, moved to its device, ready to sample.

    `identities` that do not fit the model (check_model) are refused before its weights move to the device.
    """
    with hf.quiet_libraries():
        pipe = devices.load_pipeline(model, torch_dtype=placement.torch_dtype)
    check_model(model, identities, pipe)
    pipe = pipe.to(placement.device)
    if placement.device == "cpu" and placement.dtype == "bf16":
        import torch

        pipe.unet.to(memory_format=torch.channels_last)  # oneDNN's bf16 convolutions run channels-last natively
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_identities(
    pipe: Any, identities: Mapping[str, np.ndarray | Sequence[np.ndarray]], *, model: str | None = None
) -> dict[str, IdentityTokens]:
    """Add each identity's [k, width] vectors to the pipeline's tokenizers and text encoders.

    A value is one array, or one per text encoder of the model's family (SDXL: clip_l's, then clip_g's;
    `Library.effective_parts`). Returns {name key: IdentityTokens} for `expand_prompt`, with the first
    tokenizer's ids. Each embedding table is resized once for all identities; calling again with the
    same name overwrites that identity's rows.
    """
    import numpy as np

    slots = families.slots(pipe)
    shown_model = model or getattr(pipe, "name_or_path", None) or "this model"
    planned: dict[str, tuple[str, list[str], list[np.ndarray]]] = {}
    for name, raw in identities.items():
        parts = [raw] if isinstance(raw, np.ndarray) else list(raw)
        if len(parts) != len(slots):
            raise CrossinitError(
                f"identity {name!r} has vectors for {len(parts)} text encoder(s) but model {shown_model!r} has "
                f"{len(slots)}; use a model of the family it was learned on"
            )
        arrays = [np.asarray(p, dtype=np.float32) for p in parts]
        for vectors, slot in zip(arrays, slots):
            if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[0] != arrays[0].shape[0]:
                raise CrossinitError(
                    f"identity {name!r}: expected vectors of shape [k, width], got {list(vectors.shape)}"
                )
            devices.check_width(name, int(vectors.shape[1]), shown_model, slot.width)
        key = name_key(name)
        if key in planned:
            raise CrossinitError(f"identity {name!r} was given twice")
        planned[key] = (name, token_names(name, arrays[0].shape[0]), arrays)

    mapping: dict[str, IdentityTokens] = {}
    for i, slot in enumerate(slots):
        added = _add_rows(
            slot.tokenizer, slot.text_encoder, [(tokens, parts[i]) for _, tokens, parts in planned.values()]
        )
        if i == 0:
            for (key, (name, tokens, _)), ids in zip(planned.items(), added):
                mapping[key] = IdentityTokens(name=name, tokens=tuple(tokens), ids=tuple(ids))
    return mapping


def _add_rows(tokenizer: Any, encoder: Any, entries: list[tuple[list[str], np.ndarray]]) -> list[list[int]]:
    """Add every entry's tokens to one tokenizer and set their rows of its encoder; their ids, in order."""
    import torch

    vocab = tokenizer.get_vocab()
    new = [tok for tokens, _ in entries for tok in tokens if tok not in vocab]
    if new:
        tokenizer.add_tokens(new)
    table_rows = encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > table_rows:
        # The new rows are overwritten below, so skip transformers' mean/covariance initialisation.
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    found: list[list[int]] = []
    with torch.no_grad():
        for tokens, vectors in entries:
            ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
            # A tokenizer that split a placeholder would silently feed the wrong rows; refuse instead.
            if tokenizer(" ".join(tokens), add_special_tokens=False).input_ids != ids:
                raise RuntimeError(f"tokenizer {type(tokenizer).__name__} does not keep {tokens[0]} as one token")
            weight[ids] = torch.from_numpy(vectors).to(device=weight.device, dtype=weight.dtype)
            found.append(ids)
    return found


def truncated_identities(pipe: Any, expanded: str, mapping: Mapping[str, IdentityTokens]) -> list[str]:
    """Identities with tokens past the text encoder's window (77 tokens), which the pipeline drops."""
    with hf.quiet_libraries():  # transformers warns about the over-long sequence we asked for
        ids = pipe.tokenizer(expanded, truncation=False).input_ids
    cut = set(ids[pipe.tokenizer.model_max_length - 1 :])  # the window's last slot holds the end token
    return [entry.name for entry in mapping.values() if cut.intersection(entry.ids)]


def use_scheduler(pipe: Any, name: str) -> SchedulerChoice:
    """Swap in the named scheduler, keeping the model's noise schedule and prediction type."""
    import diffusers

    choice = scheduler_choice(name)
    # Always build from the model's own scheduler config, so switching back and forth loses nothing.
    base = getattr(pipe, "_crossinit_base_scheduler", None)
    if base is None:
        base = pipe.scheduler.config
        pipe._crossinit_base_scheduler = base
    pipe.scheduler = getattr(diffusers, choice.cls).from_config(base, **choice.overrides)
    pipe._crossinit_scheduler = name.strip().lower()
    return choice


def sample(
    pipe: Any,
    prompt: str,
    seeds: Sequence[int],
    settings: Settings,
    *,
    on_step: Callable[[int, int], None] | None = None,
    max_batch: int = MAX_BATCH,
) -> list[Image.Image]:
    """One image per seed for an (already expanded) prompt, in as few pipeline calls as memory allows.

    `on_step(done, total)` is called after every denoising step of every batch. On CUDA out-of-memory the
    batch is halved and the same seeds are tried again, down to one image.
    """
    import torch

    if not seeds:
        return []
    device = str(pipe.device)
    if getattr(pipe, "_crossinit_scheduler", None) != settings.scheduler.strip().lower():
        use_scheduler(pipe, settings.scheduler)
    images: list[Image.Image] = []
    batch = max(1, max_batch)
    while len(images) < len(seeds):
        chunk = list(seeds[len(images) : len(images) + batch])
        try:
            images.extend(_draw(pipe, prompt, chunk, settings, on_step))
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise CrossinitError(
                    f"out of memory on {device} generating one {settings.width}x{settings.height} image; "
                    "try a smaller --size or --dtype fp16"
                ) from None
            batch = max(1, len(chunk) // 2)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return images


def _draw(
    pipe: Any, prompt: str, seeds: list[int], settings: Settings, on_step: Callable[[int, int], None] | None
) -> list[Image.Image]:
    """One pipeline call: an image per seed, each from its own CPU generator."""
    import torch

    def step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step + 1, int(getattr(pipeline, "num_timesteps", settings.steps)))
        return kwargs

    # CPU generators make the starting noise the same on every device; one generator per image makes an
    # image independent of its batch.
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    texts: dict[str, Any] = {"prompt": prompt, "negative_prompt": settings.negative or None}
    if settings.clip_skip > 1:
        texts = {
            "prompt_embeds": encode_prompt(pipe, prompt, settings.clip_skip),
            "negative_prompt_embeds": encode_prompt(pipe, settings.negative, settings.clip_skip),
        }
    with hf.quiet_libraries():
        result = pipe(
            **texts,
            num_images_per_prompt=len(seeds),
            generator=generators,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            width=settings.width,
            height=settings.height,
            callback_on_step_end=step_end,
            output_type="pil",
        )
    return list(result.images)


def encode_prompt(pipe: Any, text: str, clip_skip: int) -> Any:
    """A prompt's text embeddings [1, 77, width] at the text encoder's layer -`clip_skip`, through its final
    layer norm (families.read_hidden), tokenised as the SD pipeline tokenises it.

    diffusers' own `clip_skip` counts from 0 (its 1 is A1111's 2) and is applied to the prompt only: its
    negative prompt, and the empty one classifier-free guidance uses, stay at the last layer. A1111 and
    ComfyUI encode both at the chosen layer, so crossinit passes both as embeddings instead."""
    import torch

    encoder = pipe.text_encoder
    ids = pipe.tokenizer(
        text,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.device)
    family = families.of_pipeline(pipe)
    families.check_clip_skip(family, clip_skip, families.text_layers(encoder))  # SDXL: refused, as everywhere
    spec = family.encoders[0]
    with torch.no_grad():
        hidden, _ = families.read_hidden(spec, encoder, ids, clip_skip)
    return hidden.to(dtype=encoder.dtype)
