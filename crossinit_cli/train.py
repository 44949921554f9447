"""Training the two new token rows, paper steps 4-5 (docs/method.md#the-steps-and-where-they-are).

`run` reads top to bottom through named phases: data (`encode_crops`), model (`_model`), optimiser, loop
(`_train_loop`: `_step`, `_keep`), result.

Faithful to the official Cross Initialization code (a fork of diffusers' textual-inversion example): the
standard diffusion loss (MSE on the scheduler's epsilon or v target, t uniform in [0, T)) plus
`λ · mean_i ||v_i − v⁰_i||₂`, AdamW (0.9, 0.999, wd 0.01, eps 1e-8) at a constant learning rate, captions
from the example's templates filled with "face of <v0> <v1> person", random horizontal flips.

What differs is only how fast the same numbers come out:
- each crop and its mirror image go through the VAE once (and not again in a later run on the same
  model: latents.py); every step draws a fresh latent sample from the cached mean and std, as
  `latent_dist.sample()` would, so the official code's noise is kept;
- the optimiser holds the two new rows, not the whole token table. AdamW is elementwise and the official
  code restores every other row after each step, so the two rows follow the same trajectory while the
  rest of the table gets no gradient, no optimiser state and no restore copy;
- every frozen weight has requires_grad False, so backward computes no weight gradients;
- each distinct caption of a batch goes through the text encoder once;
- a batch that would not fit in the device's free memory goes through the UNet in micro-batches whose
  gradients add up to the whole batch's before the one update (memory.py chooses; `--micro-batch`);
- bf16 (fp16 where bf16 is missing) autocast on CUDA with the UNet's weights in that dtype; on the CPU the
  same in bf16 where it has native bf16 (devices.cpu_bf16), fp32 elsewhere; the UNet channels-last in
  both; the rows, the loss and AdamW stay fp32; PyTorch SDPA attention in the UNet and the text encoder.

SDXL (families.py) has two text encoders: each gets its own two rows and its own start, the regulariser
is the official one per encoder, summed (`regulariser_all`), and the UNet also takes encoder 2's pooled
embedding and each photo's size/crop time ids (`condition`, `photo_time_ids`). Its 2.6B-parameter UNet runs
with gradient checkpointing, so that batch 8 at 1024 px fits a 24 GB GPU; diffusers >= 0.32 checkpoints
with the UNet in eval mode (0.30-0.31 only in train mode). The VAE encodes in bf16 when training in
bf16 where bf16 convolutions are native, else in fp32 (it overflows in fp16).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import devices, families, latents
from crossinit_cli.crossinit import PHRASE, add_placeholder_tokens
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from crossinit_cli.devices import Placement
    from crossinit_cli.families import Family, SizeCondition, Slot
    from crossinit_cli.memory import MicroBatch

# diffusers' textual-inversion `imagenet_templates_small`; the official code repeats it with "an
# illustration of" and "a depiction of" in place of "a photo of" (81 captions, duplicates kept).
_SMALL_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
TEMPLATES = tuple(
    t.replace("a photo of", medium)
    for medium in ("a photo of", "an illustration of", "a depiction of")
    for t in _SMALL_TEMPLATES
)
FLIP_P = 0.5
MIN_RESOLUTION = 256
LR_PER_IMAGE = 0.000625
"""The official base learning rate; its `--scale_lr` multiplies it by the batch (0.005 at batch 8)."""
FINAL_LOSS_WINDOW = 10
"""final_loss is the mean of the last steps' losses: one step's loss is dominated by its random t."""

Progress = Callable[[int, int, float], None]
"""Called after each step with (step, total steps, loss)."""
SaveState = Callable[[dict[str, Any]], None]
"""Called with a run's state (see `capture_run`) to keep it somewhere safe (a checkpoint)."""
CHECKPOINT_EVERY = 5
"""A checkpoint is written at most every this many steps (and at Ctrl-C): a kill -9 loses at most 4."""
ROWS = "learned"
"""The name of the learned rows in a snapshot or checkpoint of a one-encoder model: each is a dict of
named tensors, and a model with several encoders (SDXL) names its rows by encoder ("clip_l", "clip_g")."""


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does. Defaults are the paper's full mode."""

    steps: int = 320
    lr: float = LR_PER_IMAGE * 8  # the official 0.000625 scaled by the batch of 8
    batch_size: int = 8
    reg_weight: float = 1e-5  # λ
    seed: int = 0
    resolution: int | None = None  # None: the model's native size (unet sample size x VAE scale)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.01
    adam_eps: float = 1e-8
    clip_skip: int = 1  # SD 1.x/2.x: the text encoder's layer -N through the final layer norm (families.read_hidden)

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> TrainConfig:
        """The paper's `full` or `fast` settings, with any non-None override applied.

        A batch size given without a learning rate scales the rate with it, as the official `--scale_lr`
        does: `LR_PER_IMAGE` x batch (batch 4 trains at 0.0025)."""
        if mode not in MODES:
            raise CrossinitError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "batch_size" in given and "lr" not in given:
            given["lr"] = scaled_lr(given["batch_size"])
        config = replace(MODES[mode], **given)
        config.check()
        return config

    def check(self) -> None:
        if self.steps < 1:
            raise CrossinitError(f"steps must be at least 1, not {self.steps}")
        if self.batch_size < 1:
            raise CrossinitError(f"batch size must be at least 1, not {self.batch_size}")
        if not math.isfinite(self.lr) or self.lr < 0:
            raise CrossinitError(f"learning rate must be a positive number, not {self.lr:g}")
        if not math.isfinite(self.reg_weight) or self.reg_weight < 0:
            raise CrossinitError(f"regulariser weight must be zero or positive, not {self.reg_weight:g}")
        if self.clip_skip < 1:
            raise CrossinitError(f"--clip-skip must be 1 (the last layer, the default) or more, not {self.clip_skip}")
        check_resolution(self.resolution)


def check_resolution(resolution: int | None) -> None:
    """`--resolution`: a multiple of 64 (the VAE's 8x times the UNet's 8x); the least a model takes is
    checked once it is loaded (learning.check_model_resolution)."""
    if resolution is not None and (resolution < 64 or resolution % 64):
        raise CrossinitError(f"--resolution must be a multiple of 64, not {resolution}")


def scaled_lr(batch_size: int) -> float:
    """The official `--scale_lr` rule: the base rate times the batch (times processes, which is 1 here)."""
    return LR_PER_IMAGE * batch_size


def oom_advice(config: TrainConfig, size: int, micro_batch: int | None = None) -> str:
    """Settings that fit in less memory: first half the micro-batch (the same result, a slower step), then a
    smaller size, or half the batch for twice the steps at the same learning rate per image (so the run sees
    as many images, each learned at the same rate)."""
    micro = config.batch_size if micro_batch is None else micro_batch
    options = [f"--micro-batch {micro // 2} (same result)"] if micro > 1 else []
    smaller = size // 2 // 64 * 64
    options += [f"--resolution {smaller}"] if smaller >= MIN_RESOLUTION else []
    if config.batch_size > 1:
        half = config.batch_size // 2
        lr = config.lr * half / config.batch_size
        lr_flag = "" if math.isclose(config.lr, scaled_lr(config.batch_size)) else f" --lr {lr:g}"
        steps = config.steps * config.batch_size // half
        options.append(f"--batch-size {half} --steps {steps}{lr_flag} (same rate per image)")
    return "try " + ", ".join([*options, "or --device cpu"]) if options else "try --device cpu, or a smaller --model"


MODES = {
    # The official full mode: 320 steps, batch 8, lr 0.005, constant schedule.
    "full": TrainConfig(),
    # The official fast mode runs 25 steps; its batch and lr are unpublished, so the full mode's are kept
    # (docs/method.md says why).
    "fast": TrainConfig(steps=25),
}


@dataclass
class TrainResult:
    """What a run produced: the two learned rows, where they started, and how it went."""

    learned: np.ndarray  # float32 [2, width]
    init: np.ndarray  # float32 [2, width], the cross-init start v⁰
    losses: list[float]
    final_loss: float
    per_step_s: float
    total_s: float
    encode_s: float
    resolution: int
    config: TrainConfig
    device: str
    dtype: str
    token_ids: list[int] = field(default_factory=list)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Every text encoder's (learned, init) by its key (families.EncoderSpec.key); learned/init are the first's."""
    snapshots: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # step -> {name: [2, width]}
    snapshot_losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss of the steps before it
    norms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per encoder key: the init's and the learned rows' L2 norms and the vocabulary's mean row norm (`norms`)."""
    steps_s: float = 0.0  # the training steps' own time (per_step_s x steps_run); the rest of a learn is fixed cost
    steps_cpu_s: float = 0.0  # the CPU time the process spent in them (all threads)
    steps_run: int = 0  # the steps this run took (fewer than config.steps when it resumed)
    micro_batch: MicroBatch | None = None  # how many images went through the UNet at once, and why


def model_resolution(unet: Any, vae: Any) -> int:
    """The image size a model was trained at: 512 for SD 2.1-base, 64 for the tiny test model."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def free_vae_decoder(vae: Any) -> None:
    """Drop the VAE's decoder: training only encodes, and on SD it is ~200 MB of GPU memory for nothing."""
    vae.decoder = None
    if getattr(vae, "post_quant_conv", None) is not None:
        vae.post_quant_conv = None


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


def photo_time_ids(sizes: Sequence[SizeCondition] | None, photos: int, size: int) -> list[list[int]]:
    """SDXL's time ids of each latent row (`_Latents`: the photos, then their mirror images): every photo's
    own `SizeCondition`, kept by its mirror image; without `sizes`, the pipeline's default for all."""
    from crossinit_cli.families import SizeCondition

    if sizes is not None and len(sizes) != photos:
        raise CrossinitError(f"{len(sizes)} size conditions for {photos} photos")
    conditions = list(sizes) if sizes is not None else [SizeCondition.native(size)] * photos
    each = [c.time_ids(size) for c in conditions]
    return each + each


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


def condition(
    family: Family, slots: Sequence[Slot], captions: Sequence[torch.Tensor], size: int, clip_skip: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The UNet's text conditioning for caption ids (one tensor per encoder), as the family's pipeline makes it
    (at the text encoder's layer -`clip_skip`, through its final layer norm, for SD 1.x/2.x)."""
    return families.conditioning(family, list(zip(slots, captions)), size, clip_skip)


def _gather(conditioning: tuple[torch.Tensor, dict[str, torch.Tensor] | None], index: torch.Tensor, dtype: Any) -> Any:
    """Rows `index` of a conditioning (distinct captions -> batch items), in the UNet's dtype."""
    states, added = conditioning
    if added is not None:
        added = {k: v[index].to(dtype) for k, v in added.items()}
    return states[index].to(dtype), added


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float in [-1, 1], resized bicubically as the official dataset does."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), PILImage.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _splice_rows(text_encoder: Any, token_ids: list[int], rows: torch.Tensor) -> Any:
    """Make the token-embedding layer return `rows` for the placeholder ids; returns the hook handle.

    The rows are gathered in their own float32, so autocast never rounds the learned vectors themselves.
    """
    import torch

    table = text_encoder.get_input_embeddings()
    wanted = torch.tensor(token_ids, device=table.weight.device)

    def splice(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        hit = args[0].unsqueeze(-1) == wanted  # [batch, length, k]
        which = hit.int().argmax(dim=-1)
        return torch.where(hit.any(dim=-1, keepdim=True), rows[which].to(output.dtype), output)

    return table.register_forward_hook(splice)


@dataclass(frozen=True)
class ModelParts:
    """The parts of a loaded pipeline that training uses.

    A model with several text encoders (SDXL) gives its `family` and `slots` (families.slots); `tokenizer`
    and `text_encoder` are then the first slot's. Without them the model is SD 2.x with one encoder."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: Any
    family: Family | None = None
    slots: Sequence[Slot] | None = None

    @classmethod
    def of_pipeline(cls, pipe: Any, family: Family | None = None, slots: Sequence[Slot] | None = None) -> ModelParts:
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler.config, family, slots)


@dataclass(frozen=True)
class RunHooks:
    """What a caller hears and keeps of a run: progress, snapshots, checkpoints, a state to resume from, the
    micro-batch chosen (told before the first step), and where the crops' latents are cached (`encode_crops`)."""

    progress: Progress | None = None
    snapshot_every: int | None = None
    save_state: SaveState | None = None
    resume_from: dict[str, Any] | None = None
    micro_batch: Callable[[MicroBatch], None] | None = None
    latent_cache: Path | None = None


def run(
    parts: ModelParts,
    crops: Sequence[Image.Image],
    init: torch.Tensor | Sequence[torch.Tensor],
    config: TrainConfig,
    placement: Placement,
    hooks: RunHooks = RunHooks(),
    *,
    sizes: Sequence[SizeCondition] | None = None,
    micro_batch: int | None = None,
) -> TrainResult:
    """Learn the two placeholder rows for a face from its aligned `crops`, starting at `init` [2, width]
    (one init per text encoder for SDXL). Each phase's docstring names its paper step
    (docs/method.md#the-steps-and-where-they-are). `sizes` are SDXL's size conditions of the crops, one per
    crop (`faces.FaceCrop.size_condition`); without them every crop claims an original of the training size.

    The modules are moved to the placement's device (the UNet also cast to its dtype); each text encoder
    keeps the two new tokens with the learned rows. Same seed, device and inputs give the same rows. Raises
    CrossinitError if the loss becomes NaN or infinite.

    `hooks.snapshot_every` keeps the rows every that many steps (and at the last, when it kept some before).
    `hooks.save_state` receives the run's state every `CHECKPOINT_EVERY` steps and at Ctrl-C;
    `hooks.resume_from` (such a state) continues a run, with the same result, bit for bit on the CPU, as
    one never interrupted.

    `micro_batch` puts at most that many images through the UNet at once (None: as many as fit in the
    device's free memory, memory.py): the same step in less memory, with rows equal to the whole batch's
    within float rounding; it is not part of the result, so a run may resume with another.
    """
    started = time.perf_counter()
    config.check()
    if not crops:
        raise CrossinitError("no face crops to learn from")
    if micro_batch is not None and micro_batch < 1:
        raise CrossinitError(f"--micro-batch must be at least 1, not {micro_batch}")
    setup = _setup(parts, config, placement)
    loop = _Loop.start(config.seed, setup.device)  # seeded first; a resume restores their states
    data = encode_crops(parts.vae, crops, setup, hooks.latent_cache)
    data = replace(data, time_ids=_time_ids_tensor(setup, sizes, len(crops)))
    encode_s = time.perf_counter() - started
    model = _model(parts, setup, init)
    setup = replace(setup, micro=_micro_batch(parts, setup, micro_batch))  # once the weights are on the device
    if hooks.micro_batch is not None:
        hooks.micro_batch(setup.micro)
    optimiser = _optimiser(model.rows, config, placement, setup)
    loop.restore(hooks.resume_from, model, optimiser)
    loop_started, loop_cpu = time.perf_counter(), time.process_time()
    _train_loop(loop, data, model, optimiser, setup, hooks)
    timing = _Timing(started, encode_s, time.perf_counter() - loop_started, time.process_time() - loop_cpu)
    return _result(loop, model, setup, timing)


# ---- the phases `run` reads through -------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """Where and how a run computes: device, dtype, image size and the model family's encoder slots."""

    config: TrainConfig
    placement: Placement
    device: Any  # torch.device
    compute: Any  # torch.dtype of the UNet and autocast
    size: int
    family: Family
    slots: list[Slot]
    micro: MicroBatch | None = None  # chosen once the model is on the device (`_micro_batch`)

    @property
    def micro_size(self) -> int:
        return self.micro.size if self.micro is not None else self.config.batch_size


def _setup(parts: ModelParts, config: TrainConfig, placement: Placement) -> _Setup:
    import torch

    family = parts.family or families.FAMILIES["sd2"]
    slots = (
        list(parts.slots)
        if parts.slots is not None
        else [families.Slot(family.encoders[0], parts.tokenizer, parts.text_encoder)]
    )
    families.check_clip_skip(family, config.clip_skip, families.text_layers(slots[0].text_encoder))
    return _Setup(
        config=config,
        placement=placement,
        device=torch.device(placement.device),
        compute=placement.torch_dtype,
        size=config.resolution or model_resolution(parts.unet, parts.vae),
        family=family,
        slots=slots,
    )


def _micro_batch(parts: ModelParts, setup: _Setup, requested: int | None) -> MicroBatch:
    """How many images go through the UNet at once: `requested`, or what fits in the free memory now."""
    from crossinit_cli import memory

    latent_side = setup.size // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    per_item = memory.item_bytes(parts.unet.config.block_out_channels, latent_side, setup.placement.dtype)
    free = memory.free_bytes(str(setup.device)) if requested is None else None
    return memory.choose(setup.config.batch_size, requested, per_item, free)


@dataclass(frozen=True)
class _Latents:
    """Every crop and its mirror image as the VAE's latent distribution (mean and std), encoded once."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling: float
    photos: int  # row i + photos is photo i mirrored
    time_ids: torch.Tensor | None = None  # SDXL: each row's time ids [2 * photos, 6] (`photo_time_ids`)


def _time_ids_tensor(setup: _Setup, sizes: Sequence[SizeCondition] | None, photos: int) -> torch.Tensor | None:
    import torch

    if not setup.family.time_ids:
        return None
    rows = photo_time_ids(sizes, photos, setup.size)
    return torch.tensor(rows, device=setup.device, dtype=torch.float32)


def encode_dtype(placement: Placement) -> torch.dtype:
    """The VAE encodes in bf16 when training in bf16 where bf16 convolutions are native (CUDA; a CPU with
    AVX512-BF16 or AMX, which oneDNN uses), else in fp32: without them PyTorch runs a bf16 convolution
    through its slow reference path, ~100x an fp32 one on an AVX2 CPU (docs/performance.md), and fp16
    overflows in SD's VAE. bf16 keeps fp32's range; the latents differ from fp32's by well under the
    sampling noise (tests/test_train.py)."""
    import torch

    if placement.dtype != "bf16":
        return torch.float32
    if placement.device != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if devices.cpu_bf16()[0] else torch.float32


def encode_crops(vae: Any, crops: Sequence[Image.Image], setup: _Setup, cache_dir: Path | None = None) -> _Latents:
    """Data (paper step 5): every crop and its mirror image through the VAE once (the random flip's two
    sides), in `encode_dtype`, channels-last; the latent mean and std are kept in fp32.

    Each crop goes through with its mirror image as one batch of two, so that its latents do not depend on
    the other photos; with `cache_dir` (the library's `.cache/latents/`, latents.py) they are kept there and
    a crop encoded before on the same VAE, precision, device and size is read instead (the same numbers)."""
    import torch

    dtype = encode_dtype(setup.placement)
    files: list[Path | None] = [None] * len(crops)
    if cache_dir is not None:
        key = latents.encoder_key(vae, dtype, setup.device.type, setup.size)
        files = [latents.path(cache_dir, crop, key) for crop in crops]
    pairs = [latents.read(file) if file is not None else None for file in files]
    if any(pair is None for pair in pairs):
        vae.requires_grad_(False).eval().to(setup.device, memory_format=torch.channels_last)
        if vae.dtype != dtype:
            vae.to(dtype=dtype)
    for i, (crop, file) in enumerate(zip(crops, files)):
        if pairs[i] is None:
            pairs[i] = _encode_pair(vae, crop, setup, dtype)
            if file is not None:
                latents.write(file, *pairs[i])
    means = [pair[0].to(setup.device) for pair in pairs]
    stds = [pair[1].to(setup.device) for pair in pairs]
    mean = torch.cat([m[:1] for m in means] + [m[1:] for m in means])  # row i + len(crops): crop i mirrored
    std = torch.cat([s[:1] for s in stds] + [s[1:] for s in stds])
    return _Latents(mean, std, vae.config.scaling_factor, len(crops))


def _encode_pair(vae: Any, crop: Image.Image, setup: _Setup, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the crop and its mirror image, each [2, channels, h, w] in fp32."""
    import torch

    pixels = _pixels(crop, setup.size)
    pixels = torch.stack([pixels, pixels.flip(-1)]).to(setup.device, dtype=dtype)
    with torch.inference_mode():
        dist = vae.encode(pixels.contiguous(memory_format=torch.channels_last)).latent_dist
        mean, std = dist.mean.float().contiguous(), dist.std.float().contiguous()
    return mean.clone(), std.clone()  # out of inference mode: the loop's autograd may read them


@dataclass(frozen=True)
class _Model:
    """The frozen model with the two new tokens per encoder, and the rows being learned."""

    unet: Any
    noise_scheduler: Any
    slots: list[Slot]
    token_ids: list[list[int]]  # per slot, the placeholder ids
    captions: list[torch.Tensor]  # per slot, every caption template's ids [81, 77]
    starts: list[torch.Tensor]  # per slot, the cross-init start v⁰ [2, width]
    rows: list[torch.Tensor]  # per slot, the learned rows (torch.nn.Parameter) [2, width]

    @property
    def named(self) -> dict[str, torch.Tensor]:
        """The rows by their snapshot and checkpoint names (`row_names`)."""
        return dict(zip(row_names(self.slots), self.rows))


def _model(parts: ModelParts, setup: _Setup, init: torch.Tensor | Sequence[torch.Tensor]) -> _Model:
    """Model (paper step 3): two new tokens at the cross init (steps 1-2, crossinit.py); everything else frozen."""
    import torch
    from diffusers import DDPMScheduler

    inits = [init] if not isinstance(init, (list, tuple)) else list(init)
    slots, device = setup.slots, setup.device
    all_ids = [add_placeholder_tokens(s.tokenizer, s.text_encoder, i) for s, i in zip(slots, inits)]
    captions = [_caption_ids(s.tokenizer, ids).to(device) for s, ids in zip(slots, all_ids)]
    for slot in slots:
        slot.text_encoder.requires_grad_(False).eval().to(device)  # fp32 weights; autocast computes in `compute`
    _freeze_unet(parts.unet, setup)
    starts = [i.detach().to(device=device, dtype=torch.float32) for i in inits]
    rows = [torch.nn.Parameter(s.clone()) for s in starts]
    noise_scheduler = DDPMScheduler.from_config(parts.scheduler_config)
    return _Model(parts.unet, noise_scheduler, slots, all_ids, captions, starts, rows)


def _freeze_unet(unet: Any, setup: _Setup) -> None:
    """The UNet frozen on the device in the compute dtype, with SDPA attention (and SDXL's checkpointing)."""
    import torch

    unet.requires_grad_(False).eval().to(setup.device)
    if setup.family.checkpointing:  # SDXL's UNet: recompute activations in backward instead of holding them all
        # In eval mode: diffusers >= 0.32 checkpoints whenever grad is enabled (0.30-0.31 only in train mode,
        # hence the floor in pyproject.toml; tests/test_fidelity.py counts the recomputed blocks).
        unet.enable_gradient_checkpointing()
    if unet.dtype != setup.compute:  # frozen, so its weights can live in the compute dtype (as diffusers' example does)
        unet.to(dtype=setup.compute)
    unet.set_attn_processor(_sdpa_processor())
    if setup.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if setup.device.type == "cuda" or (setup.device.type == "cpu" and setup.compute == torch.bfloat16):
        # oneDNN's bf16 convolutions run channels-last natively: on an AMX Xeon a 512 px UNet fwd+bwd took 6.0 s
        # with autocast alone and 5.3 s with the weights in bf16 and channels-last (issue 21)
        unet.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class _Optimiser:
    """AdamW over the new rows only, its loss scaler (fp16) and the autocast context of each step."""

    optimizer: Any
    scaler: Any
    autocast: Any


def _optimiser(rows: list[torch.Tensor], config: TrainConfig, placement: Placement, setup: _Setup) -> _Optimiser:
    """Optimiser: the official AdamW settings at a constant learning rate."""
    import torch

    optimizer = torch.optim.AdamW(
        rows, lr=config.lr, betas=config.adam_betas, weight_decay=config.adam_weight_decay, eps=config.adam_eps
    )
    scaler = torch.amp.GradScaler(setup.device.type, enabled=placement.dtype == "fp16")
    autocast = torch.autocast(setup.device.type, dtype=setup.compute, enabled=placement.dtype != "fp32")
    return _Optimiser(optimizer, scaler, autocast)


@dataclass
class _Loop:
    """What the loop carries from step to step: the generators, the data order, losses and snapshots."""

    draw: random.Random  # which photo, flip and caption each batch item gets
    noise_gen: Any  # torch.Generator: latent samples, noise, timesteps
    done: int = 0  # the steps finished before this run (a resume)
    order: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    state: dict[str, Any] | None = None  # the last whole step's state, for save_state at Ctrl-C

    @classmethod
    def start(cls, seed: int, device: Any) -> _Loop:
        import torch

        return cls(random.Random(seed), torch.Generator(device).manual_seed(seed))

    def restore(self, state: dict[str, Any] | None, model: _Model, optimiser: _Optimiser) -> None:
        """Continue from a captured state (`capture_run`), or start at step 1 when there is none."""
        if state is not None:
            self.done, self.order, self.losses, self.snapshots = restore_run(
                state, model.named, optimiser.optimizer, optimiser.scaler, self.draw, self.noise_gen
            )
        self.state = state


def _train_loop(
    loop: _Loop, data: _Latents, model: _Model, optimiser: _Optimiser, setup: _Setup, hooks: RunHooks
) -> None:
    """Loop: one step per batch until `config.steps`, then the check on what prompts will see.

    Ctrl-C saves the last whole step (a Ctrl-C mid-step may have half-updated the rows); out of memory
    becomes one line with settings that fit."""
    config = setup.config
    hooked = [_splice_rows(s.text_encoder, ids, r) for s, ids, r in zip(model.slots, model.token_ids, model.rows)]
    try:
        for step in range(loop.done + 1, config.steps + 1):
            value = _step(loop, data, model, optimiser, setup)
            if not math.isfinite(value):
                raise CrossinitError(
                    f"training diverged at step {step} (loss is {value}); try --dtype fp32 or a lower --lr"
                )
            _keep(step, value, loop, model, optimiser, config, hooks)
        _check_final(model, optimiser, setup)
    except KeyboardInterrupt:
        if hooks.save_state is not None and loop.state is not None:
            hooks.save_state(loop.state)
        raise
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, MPS's and the CPU allocator's are RuntimeErrors
        if not _out_of_memory(exc):
            raise
        micro = f" (micro-batch {setup.micro_size})" if setup.micro_size < config.batch_size else ""
        raise CrossinitError(
            f"out of memory on {setup.placement.device} at batch size {config.batch_size}{micro} and {setup.size} "
            f"px; {oom_advice(config, setup.size, setup.micro_size)}"
        ) from None
    finally:
        for hook in hooked:
            hook.remove()
        if setup.family.checkpointing:
            model.unet.disable_gradient_checkpointing()


def _out_of_memory(exc: RuntimeError) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _draw_batch(loop: _Loop, photos: int, batch_size: int) -> tuple[list[int], list[int]]:
    """Which latent (photo, or its mirror with probability FLIP_P) and which caption each batch item gets:
    a fresh shuffle of the photos each pass, like the official DataLoader (paper step 5)."""
    items, chosen = [], []
    for _ in range(batch_size):
        if not loop.order:
            loop.order = loop.draw.sample(range(photos), photos)
        photo = loop.order.pop()
        items.append(photo + (photos if loop.draw.random() < FLIP_P else 0))
        chosen.append(loop.draw.randrange(len(TEMPLATES)))
    return items, chosen


def _step(loop: _Loop, data: _Latents, model: _Model, optimiser: _Optimiser, setup: _Setup) -> float:
    """One step (paper step 4): the diffusion loss on a noised batch plus the regulariser, and
    one AdamW update of the rows. Returns the step's loss.

    Every random draw is made for the whole batch first, then the batch goes through the UNet in
    micro-batches whose gradients add up before the update: each part's mean loss weighted by its share of
    the batch, the regulariser added once. Unsplit, that is the one loss of the whole batch."""
    import torch

    device, noise_gen, scheduler = setup.device, loop.noise_gen, model.noise_scheduler
    items, chosen = _draw_batch(loop, data.photos, setup.config.batch_size)
    index = torch.tensor(items, device=device)
    mean, std = data.mean[index], data.std[index]
    latents = (mean + std * torch.randn(mean.shape, generator=noise_gen, device=device)) * data.scaling
    noise = torch.randn(latents.shape, generator=noise_gen, device=device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),), generator=noise_gen, device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = loss_target(scheduler, latents, noise, t)
    captions = torch.tensor(chosen, device=device)
    time_ids = None if data.time_ids is None else data.time_ids[index]  # SDXL: each item's own photo's

    total, size = 0.0, setup.micro_size
    for start in range(0, len(items), size):
        part = slice(start, start + size)
        noised = (noisy[part], t[part], target[part], None if time_ids is None else time_ids[part])
        loss = _part_loss(model, optimiser, setup, noised, captions[part])
        loss = loss * (len(captions[part]) / len(items))
        if start + size >= len(items):
            loss = loss + regulariser_all(model.rows, model.starts, setup.config.reg_weight)
        optimiser.scaler.scale(loss).backward()
        total += float(loss.item())
    optimiser.scaler.step(optimiser.optimizer)
    optimiser.scaler.update()
    optimiser.optimizer.zero_grad(set_to_none=True)
    return total


def _part_loss(
    model: _Model, optimiser: _Optimiser, setup: _Setup, noised: tuple[torch.Tensor, ...], chosen: torch.Tensor
) -> torch.Tensor:
    """The mean diffusion loss of some of a batch's items: (noisy latents, t, target, SDXL's time ids or None)
    and caption numbers."""
    import torch
    import torch.nn.functional as F

    noisy, t, target, time_ids = noised
    distinct, inverse = torch.unique(chosen, return_inverse=True)
    with optimiser.autocast:
        captions = [c[distinct] for c in model.captions]
        conditioning = condition(setup.family, model.slots, captions, setup.size, setup.config.clip_skip)
        states, added = _gather(conditioning, inverse, setup.compute)
        if added is not None:  # SDXL: each item's own photo's size and crop (a batch mixes photos)
            added["time_ids"] = time_ids.to(setup.compute)
        prediction = model.unet(noisy.to(setup.compute), t, states, added_cond_kwargs=added).sample
    return F.mse_loss(prediction.float(), target.float())


def _keep(
    step: int, value: float, loop: _Loop, model: _Model, optimiser: _Optimiser, config: TrainConfig, hooks: RunHooks
) -> None:
    """After a step: its loss, a snapshot when one is due, the run's state (a checkpoint every
    CHECKPOINT_EVERY steps), and the caller's progress."""
    loop.losses.append(value)
    if _snapshot_due(step, hooks.snapshot_every, config.steps):
        loop.snapshots[step] = snapshot_rows(model.named)
    if hooks.save_state is not None:
        rngs = capture_rng(loop.draw, loop.noise_gen)
        named, opt, scaler = model.named, optimiser.optimizer, optimiser.scaler
        loop.state = capture_run(step, named, opt, scaler, rngs, loop.order, loop.losses, loop.snapshots)
        if step % CHECKPOINT_EVERY == 0 and step < config.steps:
            hooks.save_state(loop.state)
    if hooks.progress is not None:
        hooks.progress(step, config.steps, value)


def _check_final(model: _Model, optimiser: _Optimiser, setup: _Setup) -> None:
    """Each loss is computed before its update: check the last update on what prompts will see."""
    import torch

    with torch.no_grad(), optimiser.autocast:
        captions = [c[:1] for c in model.captions]
        final = condition(setup.family, model.slots, captions, setup.size, setup.config.clip_skip)[0]
    if not (all(torch.isfinite(r).all() for r in model.rows) and torch.isfinite(final).all()):
        raise CrossinitError(
            f"training diverged at step {setup.config.steps} (the learned vectors overflow); "
            "try --dtype fp32 or a lower --lr"
        )


@dataclass(frozen=True)
class _Timing:
    started: float  # perf_counter at the start of the run
    encode_s: float
    loop_s: float
    loop_cpu_s: float


def _result(loop: _Loop, model: _Model, setup: _Setup, timing: _Timing) -> TrainResult:
    """Result: the learned rows, also written into each text encoder's table, and every encoder's norms."""
    import numpy as np
    import torch

    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    encoder_norms: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for slot, ids, learned, begin in zip(model.slots, model.token_ids, model.rows, model.starts):
            table = slot.text_encoder.get_input_embeddings().weight
            table[ids] = learned.detach().to(table.dtype)
            parts[slot.spec.key] = (
                learned.detach().float().cpu().numpy().astype(np.float32),
                begin.cpu().numpy().astype(np.float32),
            )
            encoder_norms[slot.spec.key] = norms(learned.detach(), begin, table, ids)
    config, losses = setup.config, loop.losses
    window = losses[-FINAL_LOSS_WINDOW:]
    first_learned, first_init = next(iter(parts.values()))
    return TrainResult(
        learned=first_learned,
        init=first_init,
        losses=losses,
        final_loss=float(sum(window) / len(window)),
        per_step_s=timing.loop_s / max(1, config.steps - loop.done),
        total_s=time.perf_counter() - timing.started,
        encode_s=timing.encode_s,
        resolution=setup.size,
        config=replace(config, resolution=setup.size),
        device=setup.placement.device,
        dtype=setup.placement.dtype,
        token_ids=model.token_ids[0],
        parts=parts,
        snapshots={k: {n: t.numpy().astype(np.float32) for n, t in v.items()} for k, v in loop.snapshots.items()},
        snapshot_losses={k: _window_mean(losses[:k]) for k in loop.snapshots},
        norms=encoder_norms,
        steps_s=timing.loop_s,
        steps_cpu_s=timing.loop_cpu_s,
        steps_run=config.steps - loop.done,
        micro_batch=setup.micro,
    )


def _snapshot_due(step: int, every: int | None, steps: int) -> bool:
    """Snapshots at every multiple of `every`, and at the last step when there are earlier ones."""
    return bool(every) and every < steps and (step % every == 0 or step == steps)


def _window_mean(losses: list[float]) -> float:
    window = losses[-FINAL_LOSS_WINDOW:]
    return round(float(sum(window) / len(window)), 6)


# ---- snapshots and checkpoints: small helpers the loop calls --------------------------------------


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


def _caption_ids(tokenizer: Any, token_ids: list[int]) -> torch.Tensor:
    """Every caption template filled with the phrase, as one encoder's padded ids [81, 77]."""
    captions = tokenizer(
        [t.format(PHRASE) for t in TEMPLATES],
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    if not all((captions == i).any(dim=1).all() for i in token_ids):
        raise CrossinitError("this model's tokenizer does not keep the placeholder tokens whole; cannot train")
    return captions


def _sdpa_processor() -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()
