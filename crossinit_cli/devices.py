"""Which device and precision to run on, and loading a Stable Diffusion model from wherever it lives.

`--device auto` picks CUDA, then Apple MPS, then the CPU. Precision (docs/method.md#device-and-precision): bf16
(or fp16 where bf16 is unsupported) autocast on CUDA; on the CPU bf16 where it computes bf16 natively (AMX-BF16 or
AVX512-BF16) and fp32 elsewhere; on MPS bf16 for training from macOS 14 (fp32 before) and fp16 for sampling.
`CROSSINIT_CPU_BF16=0`/`1` overrides the CPU's detection. A model is a hub id (from the local cache;
`HF_HUB_OFFLINE` respected), a local diffusers folder, or a single-file `.safetensors`/`.ckpt` checkpoint:
`load_pipeline` loads it whole (to sample), `load_for_training` only the parts training uses.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli.errors import CrossinitError, library_text

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

CPUINFO = Path("/proc/cpuinfo")
"""Where the CPU's feature flags are read (Linux); elsewhere the CPU computes in fp32 unless told otherwise."""

CPU_BF16_ENV = "CROSSINIT_CPU_BF16"
"""`0` or `1`: whether the CPU computes in bf16 under `--dtype auto`, whatever its flags say."""

_NATIVE_BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


@dataclass(frozen=True)
class Placement:
    """Where and how a job runs: `device` ("cuda", "mps", "cpu"), `dtype` name, why that device (`reason`)
    and why that precision (`dtype_reason`)."""

    device: str
    dtype: str
    reason: str
    dtype_reason: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, DTYPE_NAMES[self.dtype])


def resolve_device(requested: str = "auto") -> tuple[str, str]:
    """(device, reason) for `--device`; an explicit device that is not there is a user error."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda", f"CUDA is available ({torch.cuda.get_device_name(0)})"
        if has_mps:
            return "mps", "Apple MPS is available"
        return "cpu", "no CUDA or MPS device found"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise CrossinitError("--device cuda was asked for, but torch sees no CUDA device (CPU-only torch build?)")
        return "cuda", "asked for with --device cuda"
    if requested == "mps":
        if not has_mps:
            raise CrossinitError("--device mps was asked for, but MPS is not available on this machine")
        return "mps", "asked for with --device mps"
    if requested == "cpu":
        return "cpu", "asked for with --device cpu"
    raise CrossinitError(f"unknown device {requested!r}; use auto, cuda, mps or cpu")


def resolve(requested_device: str = "auto", requested_dtype: str = "auto", *, training: bool = False) -> Placement:
    """The device and the compute precision for a job, each with the reason it was chosen."""
    device, reason = resolve_device(requested_device)
    if requested_dtype != "auto":
        if requested_dtype not in DTYPE_NAMES:
            raise CrossinitError(f"unknown dtype {requested_dtype!r}; use auto, fp32, fp16 or bf16")
        if device == "cpu" and requested_dtype == "fp16":
            raise CrossinitError("fp16 is not supported on the CPU; use fp32 or bf16")
        return Placement(device, requested_dtype, reason, f"asked for with --dtype {requested_dtype} (or the config)")
    if device == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return Placement(device, "bf16", reason, "this GPU supports bf16")
        return Placement(device, "fp16", reason, "this GPU has no bf16")
    if device == "mps":
        if not training:
            return Placement(device, "fp16", reason, "MPS samples in fp16")
        bf16, why = mps_bf16()
        return Placement(device, "bf16" if bf16 else "fp32", reason, why)
    bf16, why = cpu_bf16()
    return Placement(device, "bf16" if bf16 else "fp32", reason, why)


def cpu_bf16() -> tuple[bool, str]:
    """Whether the CPU computes in bf16 under `--dtype auto`, and why: where it has native bf16 instructions
    (AMX-BF16 or AVX512-BF16; measured 2.3x faster per training step, loss equal to 4 digits) and torch has
    oneDNN to use them. Without them bf16 is emulated and slower than fp32. `CROSSINIT_CPU_BF16` overrides."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override:
        if override not in {"0", "1"}:
            raise CrossinitError(f"{CPU_BF16_ENV} must be 0 or 1, not {override!r}")
        return override == "1", f"{CPU_BF16_ENV}={override}"
    flags = cpu_flags()
    if flags is None:
        return False, f"the CPU's flags are unreadable ({CPUINFO}); set {CPU_BF16_ENV}=1 if it has native bf16"
    native = [label for flag, label in _NATIVE_BF16_FLAGS if flag in flags]
    if not native:
        return False, "this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16)"
    import torch

    if not torch.backends.mkldnn.is_available():
        return False, f"this CPU has {native[0]} but this torch build has no oneDNN to use it"
    return True, f"this CPU has {native[0]}"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from CPUINFO (x86 `flags` lines), or None where it cannot be read."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def mps_bf16() -> tuple[bool, str]:
    """Whether MPS trains in bf16 under `--dtype auto`: torch's MPS backend has bf16 from macOS 14 (assumed
    from torch's documentation, untested here); before that, fp32 weights as always."""
    release = platform.mac_ver()[0]
    major = int(release.split(".")[0]) if release.split(".")[0].isdigit() else 0
    if major >= 14:
        return True, f"MPS on macOS {release} supports bf16"
    return False, f"MPS has bf16 from macOS 14 only (this is {release or 'unknown'}); fp32 weights"


def _missing_model(model: str) -> CrossinitError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    how = (
        f"download it once with `hf download {model}` (or `huggingface-cli download {model}`), "
        "or pass --model with a local diffusers folder or .safetensors checkpoint"
    )
    state = (
        "offline mode (HF_HUB_OFFLINE) is on and it is not in the local cache"
        if offline
        else ("it is neither a local path nor a model that could be fetched")
    )
    return CrossinitError(f"model {model!r} is not available: {state}; {how}")


def check_model_reference(model: str) -> None:
    """Refuse, before anything heavy is imported, a model that is neither an existing path nor a hub id."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise CrossinitError(f"{path} is a folder but not a diffusers model (no model_index.json)")
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise CrossinitError(f"model {model!r}: no such file or folder, and not a hub id like owner/name")
    if not path.exists():
        from crossinit_cli import hf

        hf.check_hub_id(model)


def load_pipeline(model: str, *, torch_dtype: Any = None) -> Any:
    """The model's own family's pipeline (SD 1.x/2.x or SDXL) from a hub id, a folder or a single file, on the CPU.

    The family is read from the model's configs first, so an SD3 or Flux folder is refused in one line
    before diffusers is imported; a model whose configs are not at hand yet (a hub id to download, a
    .ckpt) is loaded generically and its family checked once loaded.
    """
    check_model_reference(model)
    from crossinit_cli import families

    peeked = families.peek(model)
    path = Path(model).expanduser()
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    family = peeked.family if peeked is not None else None
    if family is None or not family.multi:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if path.is_file():
            cls = families.pipeline_class(family or families.FAMILIES["sd1"])
            pipe = cls.from_single_file(str(path), **kwargs)
        elif family is not None:
            pipe = _pretrained(families.pipeline_class(family), model, kwargs)
        else:
            from diffusers import DiffusionPipeline

            pipe = _pretrained(DiffusionPipeline, model, kwargs)
    except CrossinitError:
        raise
    except OSError as exc:
        # huggingface_hub's "not found / not cached / offline" errors are all OSError subclasses.
        if path.exists():
            raise CrossinitError(f"cannot load model from {path}: {library_text(exc)}") from None
        raise _missing_model(model) from None
    families.of_pipeline(pipe)  # refuses what is not SD 1.x/2.x/SDXL, whatever the files said
    families.pool_at_eos(pipe)
    return pipe


def _pretrained(cls: Any, model: str, kwargs: dict[str, Any]) -> Any:
    """`cls.from_pretrained` of a folder or hub id. A cached hub model loads from its snapshot folder, with no
    network call at all (hf.hub_source); one whose cached copy is incomplete (a download cut off) is then
    fetched as usual, when the Hub can be reached."""
    from crossinit_cli import hf

    if Path(model).expanduser().exists() or not hf.is_hub_id(model):
        return cls.from_pretrained(model, **kwargs)
    source = hf.hub_source(model, "model_index.json")
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError:
        if source == model or hf.offline():
            raise
    hf.require_hub(model)
    return cls.from_pretrained(model, **kwargs)


def text_width(text_encoder: Any) -> int:
    """The width of the text encoder's token embeddings (768 for SD 1.x, 1024 for SD 2.x)."""
    return int(text_encoder.get_input_embeddings().weight.shape[1])


def check_width(identity_name: str, identity_width: int, model: str, width: int) -> None:
    if identity_width != width:
        raise CrossinitError(
            f"identity {identity_name!r} has {identity_width}-wide vectors but model {model!r} has a "
            f"{width}-wide text encoder; use the base model it was learned on"
        )


LOAD_FOLDER = "folder"
"""`load_for_training`'s part-by-part load of a diffusers folder (or a cached hub snapshot)."""
LOAD_PIPELINE = "pipeline"
"""`load_for_training`'s load through `load_pipeline` (a single-file checkpoint, a hub id not fully cached)."""
TEXT_ENCODER_DTYPE = "fp32"
"""What every text encoder trains in, on every load path: the learned rows and the cross init are fp32."""


@dataclass
class TrainingModel:
    """What `learn` trains with (`load_for_training`): a pipeline's parts by the pipeline's own names."""

    family: Any  # families.Family
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any  # its decoder dropped
    scheduler: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    loader: str = LOAD_FOLDER  # how it was loaded (LOAD_FOLDER, LOAD_PIPELINE): part of the cross init's cache key


def import_for_training() -> None:
    """The libraries `load_for_training` needs, imported up front so that `learn --verbose` times them apart.

    Most of it is diffusers' own: its model classes import torch._dynamo and transformers (docs/performance.md)."""
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def load_for_training(model: str, placement: Placement) -> TrainingModel:
    """The parts of `model` that training uses, loaded as cheaply as they can be, on the CPU.

    A local diffusers folder (or a cached hub model's snapshot) loads part by part: the tokenizers and
    text encoders in fp32 (the learned rows and the cross init stay fp32), the frozen UNet straight in
    the compute dtype when training in bf16/fp16 (no fp32 copy to cast), the VAE (its decoder dropped
    before anything moves or casts), no safety checker or feature extractor. Anything else (a single-file
    checkpoint, a hub id to download) loads as a pipeline (`load_pipeline`) in fp32, whatever dtype its
    weights were saved in (transformers 5 keeps the saved dtype unless told), its UNet then cast to the
    compute dtype: the same precisions on both paths (`precision`).
    """
    from crossinit_cli import families, hf

    check_model_reference(model)
    peeked = families.peek(model)
    path = Path(model).expanduser()
    folder = path if path.is_dir() else (hf.cached_folder(model, "model_index.json") if hf.is_hub_id(model) else None)
    parts = None
    if folder is not None and peeked is not None:
        try:
            parts = _load_parts(Path(folder), peeked.family, placement)
        except OSError as exc:
            if folder == path:
                raise CrossinitError(f"cannot load model from {path}: {library_text(exc)}") from None
            # A hub snapshot cut off mid-download: load_pipeline fetches it again when the Hub answers.
        else:
            families.pool_at_eos(parts, peeked.family)
    if parts is None:
        parts = _pipeline_parts(model, placement)
    free_vae_decoder(parts.vae)  # before anything moves or casts
    return parts


def _pipeline_parts(model: str, placement: Placement) -> TrainingModel:
    """The training parts of `model` loaded whole through `load_pipeline`, in fp32 (a checkpoint saved in fp16
    would otherwise keep fp16 text encoders), the UNet then in the compute dtype as on the folder path."""
    import torch

    from crossinit_cli import families

    pipe = load_pipeline(model, torch_dtype=torch.float32)
    parts = _training_parts(pipe, families.of_pipeline(pipe))
    for spec in parts.family.encoders:
        getattr(parts, spec.text_encoder).to(dtype=torch.float32)
    if placement.dtype != "fp32":
        parts.unet.to(dtype=placement.torch_dtype)
    return parts


def _training_parts(pipe: Any, family: Any) -> TrainingModel:
    return TrainingModel(
        family,
        pipe.tokenizer,
        pipe.text_encoder,
        pipe.unet,
        pipe.vae,
        pipe.scheduler,
        getattr(pipe, "tokenizer_2", None),
        getattr(pipe, "text_encoder_2", None),
        loader=LOAD_PIPELINE,
    )


def _load_parts(folder: Path, family: Any, placement: Placement) -> TrainingModel:
    """Each part a family's training needs, from a diffusers folder, by the classes model_index.json names."""
    import json

    import diffusers
    import torch
    import transformers

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))

    def part(name: str, library: Any, **kwargs: Any) -> Any:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise CrossinitError(f"{folder} has no {name} (model_index.json); it is not a text-to-image model")
        return getattr(library, entry[1]).from_pretrained(folder / name, **kwargs)

    loaded: dict[str, Any] = {}
    for spec in family.encoders:
        loaded[spec.tokenizer] = part(spec.tokenizer, transformers)
        loaded[spec.text_encoder] = part(spec.text_encoder, transformers, dtype=torch.float32)
    frozen = {} if placement.dtype == "fp32" else {"torch_dtype": placement.torch_dtype}
    return TrainingModel(
        family=family,
        unet=part("unet", diffusers, **frozen),
        vae=part("vae", diffusers),
        # train.py makes its DDPM noise schedule from this config, whatever sampler the folder names.
        scheduler=diffusers.DDPMScheduler.from_pretrained(folder / "scheduler"),
        **loaded,
    )


def free_vae_decoder(vae: Any) -> None:
    """Drop the VAE's decoder: training only encodes, and on SD it is ~200 MB of GPU memory for nothing."""
    vae.decoder = None
    if getattr(vae, "post_quant_conv", None) is not None:
        vae.post_quant_conv = None
