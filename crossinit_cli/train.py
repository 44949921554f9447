"""Training the two new token rows, paper steps 4-5 (docs/method.md#the-steps-and-where-they-are).

`run` reads top to bottom through named phases: data (`encode_crops`), model (`_model`), optimiser, loop
(`_train_loop`: `_step`, `_keep`), result. What the phases use has its own room: encoding.py (the crops
through the VAE), captions.py (captions, the rows spliced in, the conditioning), objective.py (the loss
target, the regulariser, the norms) and runstate.py (a run's state captured for checkpoints and resumed).

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
  gradients add up to the whole batch's before the one update (memory.py chooses; `--micro-batch`), and
  the UNet's gradient checkpointing is on only where a single image would not fit without it
  (`--checkpointing`): it recomputes the forward in the backward, a third of a step;
- bf16 (fp16 where bf16 is missing) autocast on CUDA with the UNet's weights in that dtype; on the CPU the
  same in bf16 where it has native bf16 (devices.cpu_bf16), fp32 elsewhere; the UNet channels-last in
  both; the rows, the loss and AdamW stay fp32; PyTorch SDPA attention in the UNet and the text encoder.

SDXL (families.py) has two text encoders: each gets its own two rows and its own start, the regulariser
is the official one per encoder, summed (`objective.regulariser_all`), and the UNet also takes encoder 2's pooled
embedding and each photo's size/crop time ids (`condition`, `photo_time_ids`). Its 2.6B-parameter UNet holds
~3.4x SD 2.1's activations per unit of feature map, so it is checkpointed sooner (memory.UNSPLIT_SCALE), and
always where the free memory cannot be read; diffusers >= 0.32 checkpoints with the UNet in eval mode
(0.30-0.31 only in train mode). The VAE encodes in bf16 when training in
bf16 where bf16 convolutions are native, else in fp32 (it overflows in fp16).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import families, objective, runstate
from crossinit_cli.captions import TEMPLATES, caption_ids, condition, gather, splice_rows
from crossinit_cli.crossinit import add_placeholder_tokens
from crossinit_cli.encoding import Latents, encode_crops, photo_time_ids
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from crossinit_cli.devices import Placement
    from crossinit_cli.families import Family, SizeCondition, Slot
    from crossinit_cli.memory import MicroBatch

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


def oom_advice(
    config: TrainConfig, size: int, micro_batch: int | None = None, *, suggest_checkpointing: bool = False
) -> str:
    """Settings that fit in less memory: first half the micro-batch (the same result), or `--checkpointing on`
    at a micro-batch of 1 where it was off, then a smaller size, or half the batch for twice the steps at the
    same learning rate per image (so the run sees as many images, each learned at the same rate)."""
    micro = config.batch_size if micro_batch is None else micro_batch
    checkpoint = ["--checkpointing on (same result)"] if suggest_checkpointing else []
    options = [f"--micro-batch {micro // 2} (same result)"] if micro > 1 else checkpoint
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
class StepMemory:
    """How a step holds its memory; neither changes the rows beyond float rounding.

    `micro_batch`: at most that many images through the UNet at once (None: as many as fit in the device's
    free memory, memory.py), their gradients added up to the whole batch's. `checkpointing`: the UNet's
    gradient checkpointing (its forward recomputed in the backward), "on", "off" or "auto" (off where a
    micro-batch fits the free memory without it, memory.plan)."""

    micro_batch: int | None = None
    checkpointing: str = "auto"


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
    memory: StepMemory = StepMemory(),
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

    `memory` says how a step holds its memory (`StepMemory`): not part of the result, so a run may resume
    with other settings.
    """
    started = time.perf_counter()
    config.check()
    if not crops:
        raise CrossinitError("no face crops to learn from")
    if memory.micro_batch is not None and memory.micro_batch < 1:
        raise CrossinitError(f"--micro-batch must be at least 1, not {memory.micro_batch}")
    setup = _setup(parts, config, placement)
    loop = _Loop.start(config.seed, setup.device)  # seeded first; a resume restores their states
    data = encode_crops(parts.vae, crops, placement, setup.size, hooks.latent_cache)
    data = replace(data, time_ids=_time_ids_tensor(setup, sizes, len(crops)))
    encode_s = time.perf_counter() - started
    model = _model(parts, setup, init)
    with _linears_cast_once(model.slots, setup):
        setup = replace(setup, micro=_micro_batch(parts, setup, memory))  # once on the device
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


def _micro_batch(parts: ModelParts, setup: _Setup, asked: StepMemory) -> MicroBatch:
    """The micro-batch and checkpointing: as asked, or what fits in the free memory now (memory.plan)."""
    from crossinit_cli import memory

    latent_side = setup.size // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    per_item = memory.item_estimates(
        parts.unet.config.block_out_channels, latent_side, setup.placement.dtype, setup.family
    )
    free = memory.free_bytes(str(setup.device)) if asked.micro_batch is None or asked.checkpointing == "auto" else None
    batch, default = setup.config.batch_size, setup.family.checkpointing
    return memory.plan(batch, asked.micro_batch, asked.checkpointing, per_item, free, default)


def _time_ids_tensor(setup: _Setup, sizes: Sequence[SizeCondition] | None, photos: int) -> torch.Tensor | None:
    import torch

    if not setup.family.time_ids:
        return None
    rows = photo_time_ids(sizes, photos, setup.size)
    return torch.tensor(rows, device=setup.device, dtype=torch.float32)


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
        return dict(zip(runstate.row_names(self.slots), self.rows))


def _model(parts: ModelParts, setup: _Setup, init: torch.Tensor | Sequence[torch.Tensor]) -> _Model:
    """Model (paper step 3): two new tokens at the cross init (steps 1-2, crossinit.py); everything else frozen."""
    import torch
    from diffusers import DDPMScheduler

    inits = [init] if not isinstance(init, (list, tuple)) else list(init)
    slots, device = setup.slots, setup.device
    all_ids = [add_placeholder_tokens(s.tokenizer, s.text_encoder, i) for s, i in zip(slots, inits)]
    captions = [caption_ids(s.tokenizer, ids).to(device) for s, ids in zip(slots, all_ids)]
    for slot in slots:
        slot.text_encoder.requires_grad_(False).eval().to(device)  # fp32 weights; autocast computes in `compute`
    _freeze_unet(parts.unet, setup)
    starts = [i.detach().to(device=device, dtype=torch.float32) for i in inits]
    rows = [torch.nn.Parameter(s.clone()) for s in starts]
    noise_scheduler = DDPMScheduler.from_config(parts.scheduler_config)
    return _Model(parts.unet, noise_scheduler, slots, all_ids, captions, starts, rows)


@contextlib.contextmanager
def _linears_cast_once(slots: Sequence[Slot], setup: _Setup) -> Iterator[None]:
    """Under autocast, the text encoders' Linear weights in the compute dtype for the run, the fp32 ones put
    back after it. Autocast casts a frozen weight again at every call (its cache keeps only weights that
    require grad); cast once, the numbers are the same bit for bit (docs/performance.md)."""
    import torch

    if setup.placement.dtype == "fp32":
        yield
        return
    kept: list[tuple[Any, Any, Any]] = []
    try:
        for slot in slots:
            for module in slot.text_encoder.modules():
                if isinstance(module, torch.nn.Linear) and module.weight.dtype != setup.compute:
                    kept.append((module, module.weight, module.bias))
                    module.weight = torch.nn.Parameter(module.weight.to(setup.compute), requires_grad=False)
                    if module.bias is not None:
                        module.bias = torch.nn.Parameter(module.bias.to(setup.compute), requires_grad=False)
        yield
    finally:
        for module, weight, bias in kept:
            module.weight, module.bias = weight, bias


def _freeze_unet(unet: Any, setup: _Setup) -> None:
    """The UNet frozen on the device in the compute dtype, with SDPA attention."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.requires_grad_(False).eval().to(setup.device)
    if unet.dtype != setup.compute:  # frozen, so its weights can live in the compute dtype (as diffusers' example does)
        unet.to(dtype=setup.compute)
    unet.set_attn_processor(AttnProcessor2_0())
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
            self.done, self.order, self.losses, self.snapshots = runstate.restore_run(
                state, model.named, optimiser.optimizer, optimiser.scaler, self.draw, self.noise_gen
            )
        self.state = state


def _train_loop(
    loop: _Loop, data: Latents, model: _Model, optimiser: _Optimiser, setup: _Setup, hooks: RunHooks
) -> None:
    """Loop: one step per batch until `config.steps`, then the check on what prompts will see.

    Ctrl-C saves the last whole step (a Ctrl-C mid-step may have half-updated the rows); out of memory
    becomes one line with settings that fit."""
    config = setup.config
    hooked = [splice_rows(s.text_encoder, ids, r) for s, ids, r in zip(model.slots, model.token_ids, model.rows)]
    checkpointed = setup.micro is not None and setup.micro.checkpointing
    if checkpointed:
        # In eval mode: diffusers >= 0.32 checkpoints whenever grad is enabled (0.30-0.31 only in train mode,
        # hence the floor in pyproject.toml; tests/test_fidelity.py counts the recomputed blocks).
        model.unet.enable_gradient_checkpointing()
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
            f"px; {oom_advice(config, setup.size, setup.micro_size, suggest_checkpointing=not checkpointed)}"
        ) from None
    finally:
        for hook in hooked:
            hook.remove()
        if checkpointed:
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


def _step(loop: _Loop, data: Latents, model: _Model, optimiser: _Optimiser, setup: _Setup) -> float:
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
    target = objective.loss_target(scheduler, latents, noise, t)
    captions = torch.tensor(chosen, device=device)
    time_ids = None if data.time_ids is None else data.time_ids[index]  # SDXL: each item's own photo's

    total, size = 0.0, setup.micro_size
    for start in range(0, len(items), size):
        part = slice(start, start + size)
        noised = (noisy[part], t[part], target[part], None if time_ids is None else time_ids[part])
        loss = _part_loss(model, optimiser, setup, noised, captions[part])
        loss = loss * (len(captions[part]) / len(items))
        if start + size >= len(items):
            loss = loss + objective.regulariser_all(model.rows, model.starts, setup.config.reg_weight)
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
        states, added = gather(conditioning, inverse, setup.compute)
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
        loop.snapshots[step] = runstate.snapshot_rows(model.named)
    if hooks.save_state is not None:
        rngs = runstate.capture_rng(loop.draw, loop.noise_gen)
        named, opt, scaler = model.named, optimiser.optimizer, optimiser.scaler
        loop.state = runstate.capture_run(step, named, opt, scaler, rngs, loop.order, loop.losses, loop.snapshots)
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
            encoder_norms[slot.spec.key] = objective.norms(learned.detach(), begin, table, ids)
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
