"""Model families: what crossinit needs to know about SD 1.x, SD 2.x and SDXL, and nothing else does.

A family says which diffusers pipeline class runs it, which text encoders (one or two) and tokenizers it
has, which hidden state of each the UNet reads, what extra conditioning the UNet takes (SDXL: encoder 2's
pooled embedding and the size/crop time ids) and how its embeddings are exported. Training, sampling,
formats, eval and the store ask the family instead of testing for SDXL themselves.

    detect_config(...)  the family from a diffusers folder's configs (or a hub id's cached ones)
    peek(model)         the family and text widths of a model reference, without loading weights (or None)
    of_pipeline(pipe)   the family of a loaded pipeline
    slots(pipe)         its (encoder spec, tokenizer, text encoder) triples, in the family's order
    conditioning(...)   what the UNet takes for a batch of caption ids: hidden states and added kwargs
    check_clip_skip(...) refuse a clip skip the family or the encoder cannot take

Anything else (SD3, Flux, a refiner or a folder without a text encoder) is refused with one line naming
what was found. Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError, library_text

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a family, as the pipeline names its parts and the UNet reads it."""

    key: str  # the export key and the store's name for this encoder's vectors ("clip_l", "clip_g")
    tokenizer: str  # the pipeline's attribute
    text_encoder: str
    penultimate: bool  # the UNet reads hidden_states[-2] (no final layer norm); else last_hidden_state


@dataclass(frozen=True)
class Family:
    """What one model family is; the known ones are in FAMILIES."""

    name: str  # "sd1", "sd2", "sdxl": what the store records
    title: str
    pipeline: str  # the diffusers text-to-image pipeline class
    encoders: tuple[EncoderSpec, ...]
    real_widths: tuple[int, ...]  # the released models' text widths, one per encoder
    native: int  # the released models' image size (a loaded model's own config decides: train.model_resolution)
    time_ids: bool  # the UNet takes encoder 2's pooled embedding and size/crop time ids (SDXL)
    checkpointing: bool  # the UNet's gradient checkpointing where the free memory is unknown (memory.plan)
    checkpoints: str  # what an export fits, in words (readers.fits adds the tools that read the file)

    @property
    def multi(self) -> bool:
        return len(self.encoders) > 1


_ONE = (EncoderSpec("clip_l", "tokenizer", "text_encoder", penultimate=False),)
_SD2_ONE = (EncoderSpec("clip_h", "tokenizer", "text_encoder", penultimate=False),)
_XL = (
    EncoderSpec("clip_l", "tokenizer", "text_encoder", penultimate=True),
    EncoderSpec("clip_g", "tokenizer_2", "text_encoder_2", penultimate=True),
)

FAMILIES: dict[str, Family] = {
    "sd1": Family(
        "sd1",
        "SD 1.x",
        "StableDiffusionPipeline",
        _ONE,
        (768,),
        512,
        False,
        False,
        "SD 1.x checkpoints (SD 1.5 and its fine-tunes)",
    ),
    "sd2": Family(
        "sd2",
        "SD 2.x",
        "StableDiffusionPipeline",
        _SD2_ONE,
        (1024,),
        512,
        False,
        False,
        "SD 2.x checkpoints (SD 2.1 and its fine-tunes)",
    ),
    "sdxl": Family(
        "sdxl",
        "SDXL",
        "StableDiffusionXLPipeline",
        _XL,
        (768, 1280),
        1024,
        True,
        True,
        "SDXL checkpoints (SDXL base, Pony, Illustrious and other SDXL fine-tunes)",
    ),
}
_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}
_XL_CLASSES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}


def get(name: str) -> Family:
    """The family named `name` ("sd1", "sd2", "sdxl"), or a one-line error listing the known ones."""
    family = FAMILIES.get(name)
    if family is None:
        raise CrossinitError(f"unknown model family {name!r}; crossinit knows {', '.join(FAMILIES)}")
    return family


# ---- detection ----------------------------------------------------------------------------------


def _single_encoder(width: int | None, linear_projection: bool | None) -> Family:
    """SD 1.x or 2.x: by the released widths (768, 1024), else by the UNet (SD 2.x projects linearly)."""
    if width == 768:
        return FAMILIES["sd1"]
    if width == 1024:
        return FAMILIES["sd2"]
    return FAMILIES["sd2" if linear_projection else "sd1"]


def detect_config(
    index: dict[str, Any], text_config: dict[str, Any] | None, unet_config: dict[str, Any] | None, where: str
) -> Family:
    """The family of a diffusers model from its model_index.json and its text encoder's and UNet's configs."""
    cls = str(index.get("_class_name", "?"))
    if cls not in _SD_CLASSES | _XL_CLASSES:
        raise CrossinitError(
            f"{where} is a {cls}; crossinit supports SD 1.x, SD 2.x and SDXL "
            "(StableDiffusionPipeline, StableDiffusionXLPipeline)"
        )
    if not _has_component(index, "text_encoder"):
        raise CrossinitError(
            f"{where} is a {cls} without a text encoder (an SDXL refiner?); an identity needs the base model's "
            "text encoder"
        )
    if cls in _XL_CLASSES:
        if not _has_component(index, "text_encoder_2"):
            raise CrossinitError(f"{where} is a {cls} without text_encoder_2; SDXL needs both text encoders")
        return FAMILIES["sdxl"]
    width = (text_config or {}).get("hidden_size")
    return _single_encoder(width, (unet_config or {}).get("use_linear_projection"))


def _has_component(index: dict[str, Any], name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None


@dataclass(frozen=True)
class Peeked:
    """A model's family and text widths, read from its configs alone."""

    family: Family
    widths: tuple[int, ...] | None  # None where the configs do not say
    layers: int | None = None  # the (first) text encoder's layer count, where its config says


def peek(model: str) -> Peeked | None:
    """The family and widths of `model` from its configs (local folder, hub cache, .safetensors header).

    None when they cannot be known without loading (a hub id not in the cache, a .ckpt pickle). A model
    of an unsupported kind is refused here, before anything heavy is imported.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _peek_folder(lambda name: path / name, str(path))
    if path.is_file():
        return _peek_single_file(path)
    from crossinit_cli import hf

    if not hf.is_hub_id(model) or not hf.valid_hub_id(model):  # "/models", "a/b c": nothing to peek at
        return None
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Path | None:
        found = try_to_load_from_cache(model, name)
        return Path(found) if isinstance(found, str) else None

    if cached("model_index.json") is None:
        return None
    return _peek_folder(cached, model)


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _peek_folder(locate: Any, where: str) -> Peeked | None:
    index = _read_json(locate("model_index.json"))
    if index is None:
        return None  # not a diffusers folder: the loader says so
    text = _read_json(locate("text_encoder/config.json"))
    family = detect_config(index, text, _read_json(locate("unet/config.json")), where)
    layers = (text or {}).get("num_hidden_layers")
    layers = layers if isinstance(layers, int) else None
    widths: list[int] = []
    for spec in family.encoders:
        config = text if spec.text_encoder == "text_encoder" else _read_json(locate(f"{spec.text_encoder}/config.json"))
        width = (config or {}).get("hidden_size")
        if not isinstance(width, int):
            return Peeked(family, None, layers)
        widths.append(width)
    return Peeked(family, tuple(widths), layers)


# Keys of the original (CompVis / Stability) single-file layout that tell the families apart.
_XL_TEXT_1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_XL_TEXT_2 = "conditioner.embedders.1.model.token_embedding.weight"
_SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SD2_TEXT = "cond_stage_model.model.token_embedding.weight"


def _peek_single_file(path: Path) -> Peeked | None:
    """A .safetensors checkpoint's family from its tensor names and shapes (the header only)."""
    if path.suffix.lower() != ".safetensors":
        return None  # a pickle cannot be inspected without unpickling it: the loader decides
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = set(handle.keys())

            def width(key: str) -> int:
                return int(handle.get_slice(key).get_shape()[-1])

            if _XL_TEXT_1 in keys and _XL_TEXT_2 in keys:
                return Peeked(FAMILIES["sdxl"], (width(_XL_TEXT_1), width(_XL_TEXT_2)))
            if _SD1_TEXT in keys:
                return Peeked(FAMILIES["sd1"], (width(_SD1_TEXT),))
            if _SD2_TEXT in keys:
                return Peeked(FAMILIES["sd2"], (width(_SD2_TEXT),))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CrossinitError(f"{path} is not a readable .safetensors checkpoint ({library_text(exc)})") from None
    found = _single_file_kind(keys)
    raise CrossinitError(
        f"{path} is {found}; crossinit supports SD 1.x, SD 2.x and SDXL checkpoints with their text encoders"
    )


def _single_file_kind(keys: set[str]) -> str:
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        return "an SD3 checkpoint"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "a Flux checkpoint"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "an SDXL refiner checkpoint (no CLIP ViT-L text encoder)"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a checkpoint without a text encoder"
    return "not a Stable Diffusion checkpoint"


def of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline, from its class and configs."""
    index = {"_class_name": type(pipe).__name__}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            index[name] = ["transformers", type(getattr(pipe, name)).__name__]
    text = getattr(pipe, "text_encoder", None)
    unet = getattr(pipe, "unet", None)
    return detect_config(
        index,
        dict(text.config.to_dict()) if text is not None else None,
        dict(unet.config) if unet is not None else None,
        "this model",
    )


def pipeline_class(family: Family) -> Any:
    import diffusers

    return getattr(diffusers, family.pipeline)


# ---- using a loaded model -----------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One text encoder of a loaded pipeline with its tokenizer."""

    spec: EncoderSpec
    tokenizer: Any
    text_encoder: Any
    loader: str = ""  # how the model was loaded (devices.TrainingModel.loader): part of the cross init's cache key

    @property
    def width(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])


def slots(pipe: Any, family: Family | None = None) -> list[Slot]:
    """The pipeline's text encoders and tokenizers in the family's order."""
    family = family or of_pipeline(pipe)
    loader = str(getattr(pipe, "loader", "") or "")
    return [Slot(s, getattr(pipe, s.tokenizer), getattr(pipe, s.text_encoder), loader) for s in family.encoders]


def widths(pipe: Any) -> tuple[int, ...]:
    return tuple(slot.width for slot in slots(pipe))


def pool_at_eos(pipe: Any, family: Family | None = None) -> None:
    """Make each text encoder pool at the end-of-text token even when the prompt holds added tokens.

    SDXL's released text_encoder_2 config carries the stale `eos_token_id` 2, for which transformers
    pools at the highest token id of the prompt: the end token for the original vocabulary, but an
    identity's placeholder once tokens are added. SDXL was trained (open_clip), and A1111 and ComfyUI
    sample, with the pooled output at the end token, so the tokenizer's own end id is set instead.
    """
    for slot in slots(pipe, family):
        model = getattr(slot.text_encoder, "text_model", slot.text_encoder)
        if getattr(model, "eos_token_id", None) == 2 and slot.tokenizer.eos_token_id not in (None, 2):
            model.eos_token_id = slot.tokenizer.eos_token_id
            slot.text_encoder.config.eos_token_id = slot.tokenizer.eos_token_id


def text_layers(text_encoder: Any) -> int:
    """How many transformer layers a loaded text encoder has (SD 1.x's CLIP ViT-L: 12; SD 2.x's, as diffusers
    converts it: 23, OpenCLIP ViT-H's 24 without the last, which SD 2.x never used)."""
    return int(text_encoder.config.num_hidden_layers)


def check_clip_skip(family: Family, clip_skip: int, layers: int | None = None) -> None:
    """Refuse, in one line, a clip skip that `family` (SDXL) or a text encoder of `layers` layers cannot take.

    Clip skip N is AUTOMATIC1111's: the output of layer -N through the final layer norm (1: the last
    layer, what the model was trained on). SDXL's UNet already reads each encoder's hidden_states[-2]
    without that norm, and its tools do not agree on what skipping more would mean (docs/method.md)."""
    if clip_skip < 1:
        raise CrossinitError(f"--clip-skip must be 1 (the last layer, the default) or more, not {clip_skip}")
    if clip_skip == 1:
        return
    if family.multi:
        raise CrossinitError(
            f"--clip-skip is for SD 1.x and SD 2.x; {family.title} reads each text encoder's hidden_states[-2] "
            "already and its tools do not agree on skipping more, so use --clip-skip 1"
        )
    if layers is not None and clip_skip > layers:
        raise CrossinitError(
            f"--clip-skip {clip_skip} is more than this model's text encoder has layers ({layers}); "
            f"choose 1 to {layers}"
        )


def read_hidden(spec: EncoderSpec, text_encoder: Any, ids: torch.Tensor, clip_skip: int = 1) -> Any:
    """The encoder's output as the UNet reads it: (hidden states [b, 77, width], the model output).

    `clip_skip` N > 1 (SD 1.x/2.x, check_clip_skip): the output of layer -N through the final layer norm,
    as A1111's sd_hijack_clip.py computes it (`hidden_states[-N]`, then `final_layer_norm`)."""
    if spec.penultimate:
        output = text_encoder(ids, output_hidden_states=True)
        return output.hidden_states[-2], output
    if clip_skip > 1:
        output = text_encoder(ids, output_hidden_states=True)
        model = getattr(text_encoder, "text_model", text_encoder)
        return model.final_layer_norm(output.hidden_states[-clip_skip]), output
    output = text_encoder(ids)
    return output.last_hidden_state, output


@dataclass(frozen=True)
class SizeCondition:
    """SDXL's size and crop micro-conditioning of one training image (`original_size`,
    `crops_coords_top_left`), in pixels, (height, width) and (top, left) as diffusers orders them.

    `faces.size_condition` gives a photo's (docs/method.md#sdxls-size-and-crop-conditioning)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)

    @classmethod
    def native(cls, size: int) -> SizeCondition:
        """What the SDXL pipeline samples with by default: an uncropped original of the target size."""
        return cls((size, size))

    def time_ids(self, size: int) -> list[int]:
        """The six time ids of a `size` x `size` target, as diffusers' `_get_add_time_ids` lays them out."""
        return [*self.original_size, *self.crop_top_left, size, size]

    def to_record(self) -> dict[str, list[int]]:
        return {"original_size": list(self.original_size), "crops_coords_top_left": list(self.crop_top_left)}

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> SizeCondition:
        height, width = (int(v) for v in raw["original_size"])
        top, left = (int(v) for v in raw["crops_coords_top_left"])
        return cls((height, width), (top, left))


def conditioning(
    family: Family, pairs: list[tuple[Slot, torch.Tensor]], size: int, clip_skip: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """What the UNet takes for a batch of captions, as the family's pipeline computes it from a prompt.

    `pairs` holds each encoder's caption ids [b, 77]. SD 1.x/2.x: the one encoder's last_hidden_state
    (with `clip_skip` N > 1, layer -N's output through the final layer norm: `read_hidden`).
    SDXL: both encoders' hidden_states[-2] concatenated along the width, plus encoder 2's projected pooled
    output and the pipeline's default time ids (original size = target size = `size`, crop 0, 0); training
    replaces them with each photo's (`SizeCondition`).
    """
    import torch

    states, last_output = [], None
    for slot, ids in pairs:
        hidden, last_output = read_hidden(slot.spec, slot.text_encoder, ids, clip_skip)
        states.append(hidden)
    if not family.time_ids:
        return states[0], None
    pooled = last_output.text_embeds
    batch = pooled.shape[0]
    ids = SizeCondition.native(size).time_ids(size)
    time_ids = torch.tensor([ids], device=pooled.device, dtype=pooled.dtype)
    return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}


# ---- identities against models ------------------------------------------------------------------


def check_identity(
    name: str,
    family: str,
    identity_widths: tuple[int, ...],
    model: str,
    model_family: Family,
    model_widths: tuple[int, ...] | None,
) -> None:
    """A one-line error naming both when an identity cannot be used with a model of another family or width."""
    if family and family != model_family.name:
        raise CrossinitError(
            f"identity {name!r} was learned on an {get(family).title if family in FAMILIES else family} model, "
            f"but {model!r} is {model_family.title}; use a model of the family it was learned on"
        )
    if model_widths is not None and tuple(identity_widths) != tuple(model_widths):
        mine = "+".join(map(str, identity_widths))
        theirs = "+".join(map(str, model_widths))
        raise CrossinitError(
            f"identity {name!r} has {mine}-wide vectors but model {model!r} has a {theirs}-wide text encoder; "
            "use the base model it was learned on"
        )
