"""How much memory a training step needs, how much the device has free, and the micro-batch that fits.

`train.run` can put a batch through the UNet a few images at a time (micro-batches) and add up their
gradients before the one AdamW update: the same step, in the memory of the micro-batch
(docs/performance.md#micro-batches). This module picks how many images go through at once:

- what one image costs (`item_bytes`): the UNet's activations kept for its backward grow with its feature
  maps, Σ over its levels of (latent side / 2^level)² x channels. That sum times a bytes-per-unit figure
  from peak RSS on SD 2.1-base's shapes at 512 px on the CPU (docs/performance.md#micro-batches) is the
  estimate, for any SD-shaped UNet and training size;
- what is free (`free_bytes`): after the model is on its device, the memory the system would still give
  (CPU: /proc/meminfo's MemAvailable, within the process's cgroup memory limit; CUDA: `mem_get_info` plus what
  torch's caching allocator holds unused; MPS: the recommended maximum less what is allocated);
- the choice (`choose`): the fewest micro-batches whose largest part fits in `HEADROOM` of the free memory,
  then the parts made as even as that count allows (8 in 2 + 2 + 2 + 2, not 3 + 3 + 2);
- gradient checkpointing (`plan`): off when one micro-batch (the one asked for, else a single image) fits
  without it, since splitting a batch costs no compute and checkpointing recomputes the UNet's forward in
  the backward (a third of a step); on otherwise, with the micro-batch then chosen on the smaller
  checkpointed estimate. Where the free memory cannot be read, the family's own default (SDXL on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GIB = 1024**3
BYTES_PER_UNIT = {"fp32": 700.0, "bf16": 500.0, "fp16": 500.0}
"""Bytes one image's step holds per unit of the UNet's feature maps (see `feature_units`): from peak RSS
at batch 8 on SD 2.1-base's shapes at 512 px on the CPU (docs/performance.md#micro-batches); fp16 is
taken as bf16."""
UNSPLIT_SCALE = {"sdxl": 3.4}
"""How many times the feature-map estimate a family's unsplit (not checkpointed) step holds an image: SDXL's
10-deep transformer stacks keep far more per unit of feature map than SD 2.1's one-deep ones (measured:
~5.5 GB an image at 512 px in fp32 without checkpointing, against 1.6 GB from `item_bytes`; peak RSS of the
diffusers-style loop, 19.2 GB, less its weights, docs/performance.md)."""
CHECKPOINTED_SHARE = {"sdxl": 1 / 3.4, "default": 0.4}
"""What a checkpointed step holds of the unsplit one: SDXL measured (15.8 GB peak at 512 px, batch 1, fp32,
checkpointed, against the loop's 19.2 GB: ~1.6-1.8 GB an image over ~14 GB of weights, the feature-map
estimate); SD 1.x/2.x's taken larger than SDXL's, their blocks being shallower (an estimate)."""
HEADROOM = 0.85
"""The share of the free memory a step may plan to use: the rest is left to the allocator's fragmentation,
the operating system's file cache and other programs."""


@dataclass(frozen=True)
class MicroBatch:
    """How many of a batch's images go through the UNet at once, and why."""

    size: int
    batch_size: int
    reason: str
    checkpointing: bool = False  # the UNet's gradient checkpointing: its forward recomputed in the backward
    checkpointing_reason: str = ""

    @property
    def split(self) -> bool:
        return self.size < self.batch_size

    def describe(self) -> str:
        """`micro-batch 2 of batch 8 (the whole batch needs ~13.4 GiB, 7.9 GiB is free, ...)`: the verbose line."""
        text = f"micro-batch {self.size} of batch {self.batch_size} ({self.reason})"
        if self.checkpointing_reason:
            text += f"; gradient checkpointing {'on' if self.checkpointing else 'off'} ({self.checkpointing_reason})"
        return text


def feature_units(block_out_channels: Sequence[int], latent_side: int) -> int:
    """Σ over the UNet's levels of (latent side / 2^level)² x channels: what one image's activations grow with."""
    return sum((latent_side // 2**level) ** 2 * channels for level, channels in enumerate(block_out_channels))


def item_bytes(block_out_channels: Sequence[int], latent_side: int, dtype: str) -> int:
    """The estimated memory one more image in a micro-batch costs a training step."""
    return int(feature_units(block_out_channels, latent_side) * BYTES_PER_UNIT[dtype])


def item_estimate(
    block_out_channels: Sequence[int], latent_side: int, dtype: str, family: str, *, checkpointing: bool
) -> int:
    """One image's estimated cost for `family` ("sd1", "sd2", "sdxl"), with or without checkpointing."""
    unsplit = item_bytes(block_out_channels, latent_side, dtype) * UNSPLIT_SCALE.get(family, 1.0)
    share = CHECKPOINTED_SHARE.get(family, CHECKPOINTED_SHARE["default"]) if checkpointing else 1.0
    return int(unsplit * share)


def item_estimates(block_out_channels: Sequence[int], latent_side: int, dtype: str, family: Any) -> tuple[int, int]:
    """One image's estimate for a `families.Family`, (without, with) checkpointing."""
    return (
        item_estimate(block_out_channels, latent_side, dtype, family.name, checkpointing=False),
        item_estimate(block_out_channels, latent_side, dtype, family.name, checkpointing=True),
    )


CHECKPOINTING = ("auto", "on", "off")
"""`--checkpointing`: chosen by the free memory (`plan`), or forced."""


def plan(
    batch_size: int,
    requested: int | None,
    checkpointing: str,
    per_item: tuple[int, int],
    free: int | None,
    default: bool = False,
) -> MicroBatch:
    """The micro-batch and gradient checkpointing of a step: `checkpointing` "on"/"off" as asked, else ("auto")
    off when `requested` images (or one, when none is asked for) fit in `HEADROOM` of `free` without it.
    `per_item` is one image's estimate (without, with checkpointing); `default` the family's choice when
    `free` is unknown (None)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, not {checkpointing!r}")
    plain, checkpointed = per_item
    if checkpointing != "auto":
        on, why = checkpointing == "on", "asked for"
    elif free is None:
        on, why = default, f"the free memory is unknown here: the model family's default ({'on' if default else 'off'})"
    else:
        images = min(requested or 1, batch_size)
        need = f"{images} image{'s need' if images > 1 else ' needs'} ~{_gb(plain * images)} without it"
        on = plain * images > HEADROOM * free
        why = f"{need}, {_gb(free)} is free" + ("" if on else ": no recomputation")
    chosen = choose(batch_size, requested, checkpointed if on else plain, free)
    return replace(chosen, checkpointing=on, checkpointing_reason=why)


def choose(batch_size: int, requested: int | None, per_item: int, free: int | None) -> MicroBatch:
    """The micro-batch for a step: `requested` as given (at most the batch), else the fewest, even parts that
    fit in `HEADROOM` of `free` bytes (None: unknown, so the whole batch)."""
    if requested is not None:
        size = min(requested, batch_size)
        return MicroBatch(size, batch_size, "asked for" if requested < batch_size else "asked for: the whole batch")
    if free is None:
        return MicroBatch(batch_size, batch_size, "the free memory is unknown here")
    budget = HEADROOM * free
    need = f"the whole batch needs ~{_gb(per_item * batch_size)}, {_gb(free)} is free"
    fits = max(1, min(batch_size, int(budget // max(per_item, 1))))
    parts = math.ceil(batch_size / fits)
    size = math.ceil(batch_size / parts)
    if size == batch_size:
        return MicroBatch(size, batch_size, f"fits: {need}")
    if per_item > budget:
        return MicroBatch(1, batch_size, f"{need}, ~{_gb(per_item)} an image: one at a time, and it may not fit")
    return MicroBatch(size, batch_size, f"{need}, ~{_gb(per_item)} an image")


def free_bytes(device: str) -> int | None:
    """The memory `device` ("cpu", "cuda", "cuda:1", "mps") can still give a step; None where it cannot be read."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if kind == "mps":
        import torch

        mps = torch.mps
        if not hasattr(mps, "recommended_max_memory"):
            return None
        return max(0, int(mps.recommended_max_memory() - mps.current_allocated_memory()))
    return _free_ram()


def _free_ram() -> int | None:
    """MemAvailable (Linux), within the memory limit of the process's cgroup when there is one (a container);
    else psutil's figure where psutil is installed (macOS, Windows); else None."""
    available = _meminfo_available(Path("/proc/meminfo"))
    if available is None:
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    rooms = [_cgroup_room(d) for d in _cgroup_dirs(Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"))]
    return min([available, *(r for r in rooms if r is not None)])


def _meminfo_available(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_dirs(root: Path, listing: Path) -> list[Path]:
    """The memory cgroup folders that may limit this process: its own (cgroup v2's `0::/path`, v1's
    `N:memory:/path`) and the mount's root (which a container sees as its own)."""
    try:
        lines = listing.read_text(encoding="ascii").splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:
            dirs.append(root / path.lstrip("/"))
        elif "memory" in controllers.split(","):
            dirs.append(root / "memory" / path.lstrip("/"))
    return [*dirs, root, root / "memory"]


def _cgroup_room(folder: Path) -> int | None:
    """What a cgroup's memory limit leaves: limit - usage + the file cache it could drop. None: no limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as ~2^63
            cache = _stat_value(folder / "memory.stat", ("inactive_file", "total_inactive_file"))
            return max(0, limit - usage + cache)
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):  # missing, or "max" (cgroup v2's no limit)
        return None


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    values = dict(line.split(maxsplit=1) for line in lines if " " in line)
    return next((int(values[k]) for k in keys if k in values), 0)


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
