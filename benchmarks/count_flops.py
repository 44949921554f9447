"""The arithmetic of a crossinit step against the example loop's, and the best ratio it allows.

    python benchmarks/count_flops.py --model /tmp/fullsize/sd21              # SD 2.1-base shapes, 512 px
    python benchmarks/count_flops.py --model /tmp/fullsize/sdxl --resolution 512 --cpu-isa avx2

Counts (torch.utils.flop_counter: matrix products, convolutions and attention, forward and backward; the
CPU's flash attention added to what it knows) what one training step of each actually runs: crossinit's
`train._step` inside `train.run`, and a step of bench_learn's example loop (its own VAE encode, the text
encoder with the whole table trainable, the UNet). Also the VAE encode that `train.run` does once per run
(a first learn's largest fixed cost).

The counter slows the many small operators it intercepts, so the seconds beside each count are those of
the step before it, run uncounted (the VAE encode's, which has few operators, are taken under it).
sgemm's rate on this machine is printed as a yardstick. Where both run at the same rate (the same UNet
and text encoder kernels), the loop's GFLOP over crossinit's is the best per-step ratio crossinit can
show without doing less arithmetic than the UNet needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_learn import PHOTO, _aligned, example_loop_steps, run_as_isa  # noqa: E402


def _gflop(counter: Any) -> float:
    return counter.get_total_flops() / 1e9


def _counter() -> Any:
    """A FlopCounterMode that also counts the CPU's flash attention, forward and backward, as torch counts
    the other SDPA kernels (2 matrix products forward, 5 backward; its registry leaves the CPU's out)."""
    import torch
    from torch.utils import flop_counter

    def forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(q, k, v)

    def backward(grad: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten  # the counter hands the formulas each tensor's shape
    cpu = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    return flop_counter.FlopCounterMode(display=False, custom_mapping=cpu)


def sgemm_rate() -> float:
    """GFLOP/s of a 2048³ fp32 matrix product on this machine, the best of 3."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best / 1e9


def crossinit_counts(model: str, steps: int, resolution: int | None) -> dict[str, float]:
    """GFLOP of train.run's VAE encode and of its last step; seconds of the step before it (uncounted)."""
    from crossinit_cli import crossinit, families, train
    from crossinit_cli.devices import Placement, load_pipeline
    from crossinit_cli.faces import align_faces

    pipe = load_pipeline(model)
    family = families.of_pipeline(pipe)
    slots = families.slots(pipe, family)
    size = resolution or train.model_resolution(pipe.unet, pipe.vae)
    crops = [c.image for c in align_faces([PHOTO], size)]
    inits = crossinit.cross_init_slots(slots)
    parts = train.ModelParts.of_pipeline(pipe, family, slots)
    config = train.TrainConfig(steps=steps, batch_size=1, resolution=size)
    encode, counted = _counter(), _counter()
    figures: dict[str, float] = {"size": size}
    done: list[float] = []  # each step's seconds
    original_step = train._step

    def step(*a: Any, **k: Any) -> float:
        if "encode_s" not in figures:  # all before the first step: the VAE encode and setup
            encode.__exit__(None, None, None)
            figures["encode_s"] = time.perf_counter() - started
        if len(done) == steps - 1:
            with counted:
                return original_step(*a, **k)
        clock = time.perf_counter()
        loss = original_step(*a, **k)
        done.append(time.perf_counter() - clock)
        return loss

    train._step = step
    try:
        encode.__enter__()
        started = time.perf_counter()
        train.run(
            parts,
            crops,
            inits if family.multi else inits[0],
            config,
            Placement("cpu", "fp32", "count_flops"),
            train.RunHooks(save_state=lambda state: None),
            memory=train.StepMemory(checkpointing="off"),
        )
    finally:
        train._step = original_step
        if "encode_s" not in figures:  # it failed before its first step
            encode.__exit__(None, None, None)
    figures.update(encode_gflop=_gflop(encode), step_gflop=_gflop(counted), step_s=done[-1])
    return figures


def loop_counts(model: str, steps: int, size: int) -> dict[str, float]:
    """GFLOP of the example loop's last step; seconds of the step before it (uncounted)."""
    counted = _counter()
    ended: list[int] = []

    def after_step() -> None:  # the next step starts as this returns: count the last one only
        ended.append(1)
        if len(ended) == steps - 1:
            counted.__enter__()
        elif len(ended) == steps:
            counted.__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        times = example_loop_steps(
            Path(model),
            _aligned(tmp, size),
            steps=steps,
            batch_size=1,
            size=size,
            bf16=False,
            cpu=[],
            after_step=after_step,
        )
    return {"step_gflop": _gflop(counted), "step_s": times[-2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers folder (synthetic.build_full_size_*)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    parser.add_argument("--steps", type=int, default=3, help="steps of each: the last counted, the one before timed")
    parser.add_argument("--json", action="store_true", help="the figures as one JSON object")
    parser.add_argument("--cpu-isa", choices=("native", "avx2"), default="native", help="avx2: as bench_learn's")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3: a first, one timed, and the last counted")
    run_as_isa(args.cpu_isa)
    import torch

    rate = sgemm_rate()
    ours = crossinit_counts(args.model, args.steps, args.resolution)
    loop = loop_counts(args.model, args.steps, int(ours["size"]))
    if args.json:
        print(json.dumps({"sgemm_gflop_s": rate, "crossinit": ours, "loop": loop}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, {int(ours['size'])} px")
    print(f"sgemm 2048³: {rate:.0f} GFLOP/s")
    print(f"{'':34}{'GFLOP':>10}{'s':>9}{'GFLOP/s':>10}")
    rows = (
        ("crossinit step", ours["step_gflop"], ours["step_s"]),
        ("example loop step", loop["step_gflop"], loop["step_s"]),
        ("crossinit VAE encode and setup", ours["encode_gflop"], ours["encode_s"]),
    )
    for name, gflop, seconds in rows:
        print(f"{name:34}{gflop:10.1f}{seconds:9.2f}{gflop / seconds:10.0f}")
    print(f"loop / crossinit per step: {loop['step_gflop'] / ours['step_gflop']:.3f}x the arithmetic")
    print(f"                           {loop['step_s'] / ours['step_s']:.3f}x the time (one step each: noisy)")


if __name__ == "__main__":
    main()
