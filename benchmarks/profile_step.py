"""Where a training step's time goes: `train.run` under torch.profiler, and the UNet's own cost beside it.

    python benchmarks/profile_step.py --model /tmp/fullsize/sd21 --dtype fp32 --steps 3
    python benchmarks/profile_step.py --model /tmp/fullsize/sd21 --steps 5 --no-profiler   # wall clock only

Prints, for the steps after the first (the profiler's warm-up): the top operators by self CPU time, and
the step split into labelled parts (record_function around the UNet's forward, each text encoder's
forward, the optimiser's step, the checkpoint capture and the backward pass). Then the UNet alone (its
forward, and its forward + backward with input gradients only, as a step needs) and the text encoder's
forward + backward through the two rows alone, so that "the step beyond the UNet" can be read off.
Built for the full-size random models (`synthetic.build_full_size_sd21`); on the tiny model it shows the
same table in milliseconds.

Every step's parts are also timed by the wall clock (seconds, and the process's system CPU time and minor
page faults: memory the step touched afresh). With --no-profiler that is all it measures, so that the
profiler's own cost (thousands of operator records a step) is not in the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
PHOTO = ROOT / "tests" / "data" / "astronaut.png"

from bench_learn import run_as_isa  # noqa: E402

CLOCKED: dict[str, float] = {}
"""Wall seconds of each labelled part since the last step ended."""


def _labelled(module: Any, method: str, label: str) -> None:
    """Wrap `module.method` in a profiler label, and add its wall time to CLOCKED[label]."""
    import torch

    original = getattr(module, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)
        finally:
            CLOCKED[label] = CLOCKED.get(label, 0.0) + time.perf_counter() - started

    setattr(module, method, wrapped)


def _usage() -> tuple[float, int]:
    """This process's system CPU seconds and minor page faults so far."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_stime, used.ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--checkpointing", default="off", choices=("on", "off"))
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--no-profiler", action="store_true", help="time the parts by the wall clock only")
    parser.add_argument("--cpu-isa", choices=("native", "avx2"), default="native", help="avx2: as bench_learn's")
    args = parser.parse_args()
    run_as_isa(args.cpu_isa)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from crossinit_cli import crossinit, families, train
    from crossinit_cli.devices import Placement, load_pipeline
    from crossinit_cli.faces import align_faces

    pipe = load_pipeline(args.model)
    family = families.of_pipeline(pipe)
    slots = families.slots(pipe, family)
    size = train.model_resolution(pipe.unet, pipe.vae)
    crops = [c.image for c in align_faces([PHOTO], size)]
    inits = crossinit.cross_init_slots(slots)
    placement = Placement("cpu", args.dtype, "profile")
    parts = train.ModelParts.of_pipeline(pipe, family, slots)
    config = train.TrainConfig(steps=args.steps, batch_size=args.batch_size)
    _labelled(pipe.unet, "forward", "unet forward")
    for slot in slots:
        _labelled(slot.text_encoder, "forward", f"text encoder forward ({slot.spec.key})")
    _labelled(torch.optim.AdamW, "step", "optimiser step")
    step_times: list[float] = []
    marks = [time.perf_counter()]
    clock_rows: list[str] = []
    usage = [_usage()]

    def progress(step: int, total: int, loss: float) -> None:
        marks.append(time.perf_counter())
        step_times.append(marks[-1] - marks[-2])
        usage.append(_usage())
        (system, faults), (system_before, faults_before) = usage[-1], usage[-2]
        parts = "  ".join(f"{label} {seconds:6.2f}" for label, seconds in CLOCKED.items())
        clock_rows.append(
            f"  step {step}: {step_times[-1]:6.2f} s  ({parts}); system {system - system_before:5.2f} s, "
            f"{(faults - faults_before) * resource.getpagesize() / 2**20:6.0f} MiB faulted in"
        )
        CLOCKED.clear()
        if step == 1 and prof is not None:
            prof.step()  # the first step is the warm-up: `schedule` records from the second

    hooks = train.RunHooks(progress=progress, save_state=lambda state: None)
    original_step = train._step

    def step(*a: Any, **k: Any) -> float:
        if not step_times:  # the first step's figures exclude the VAE encode and the setup
            marks[0], usage[0] = time.perf_counter(), _usage()
            CLOCKED.clear()
        with record_function("train step"):
            return original_step(*a, **k)

    train._step = step
    original_backward = torch.Tensor.backward

    def backward(self: Any, *a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        with record_function("backward (UNet and text encoder)"):
            result = original_backward(self, *a, **k)
        CLOCKED["backward"] = CLOCKED.get("backward", 0.0) + time.perf_counter() - started
        return result

    torch.Tensor.backward = backward
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=10**6)
    profiler = profile(activities=[ProfilerActivity.CPU], schedule=schedule)
    with contextlib.nullcontext() if args.no_profiler else profiler as prof:
        result = train.run(
            parts,
            crops,
            inits if family.multi else inits[0],
            config,
            placement,
            hooks,
            memory=train.StepMemory(checkpointing=args.checkpointing),
        )
    torch.Tensor.backward = original_backward
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, batch {args.batch_size}, "
        f"{size} px, checkpointing {args.checkpointing}"
    )
    print(f"VAE encode and setup {result.encode_s:.2f} s; steps {[round(t, 2) for t in step_times]}")
    print("\neach step by the wall clock" + ("" if args.no_profiler else " (under the profiler)") + ":")
    print("\n".join(clock_rows))
    if prof is None:
        _alone(pipe, slots, family, size, args, placement)
        return
    averages = prof.key_averages()
    measured = max(1, len(step_times) - 1)
    print(f"\nlabelled parts, seconds per step over the {measured} steps after the first (inclusive):")
    for event in averages:
        if event.key in {"train step", "unet forward", "optimiser step", "backward (UNet and text encoder)"} or (
            event.key.startswith("text encoder forward")
        ):
            print(f"  {event.key:40} {event.cpu_time_total / 1e6 / measured:8.3f} s  ({event.count} calls)")
    print(f"\ntop {args.top} operators by self CPU time, per step:")
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    for event in rows[: args.top]:
        if event.key.startswith(("train step", "unet forward", "text encoder", "optimiser", "backward (")):
            continue
        print(f"  {event.key:60} {event.self_cpu_time_total / 1e6 / measured:8.3f} s  ({event.count} calls)")
    _alone(pipe, slots, family, size, args, placement)


def _alone(pipe: Any, slots: Any, family: Any, size: int, args: Any, placement: Any) -> None:
    """The UNet's own forward and forward+backward (input gradients only), and the text encoder's fwd+bwd."""
    import torch

    from crossinit_cli.captions import splice_rows

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    unet = pipe.unet
    side = size // 8
    width = sum(s.text_encoder.config.hidden_size for s in slots)
    b = args.batch_size
    noisy = torch.randn(b, 4, side, side, dtype=dtype)
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (b,))
    added = None
    if family.time_ids:
        pooled = slots[-1].text_encoder.config.projection_dim
        added = {"text_embeds": torch.randn(b, pooled, dtype=dtype), "time_ids": torch.full((b, 6), float(size))}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    forward, both, text = [], [], []
    for _ in range(2):
        states = torch.randn(b, 77, width, dtype=dtype, requires_grad=True)
        started = time.perf_counter()
        with torch.no_grad(), autocast:
            unet(noisy, t, states, added_cond_kwargs=added)
        forward.append(time.perf_counter() - started)
        started = time.perf_counter()
        with autocast:
            out = unet(noisy, t, states, added_cond_kwargs=added).sample
        out.float().square().mean().backward()
        both.append(time.perf_counter() - started)
        encoder = slots[0].text_encoder
        rows = torch.nn.Parameter(torch.randn(2, encoder.config.hidden_size))
        ids = torch.randint(0, encoder.config.vocab_size - 2, (b, 77))
        ids[:, 5:7] = torch.tensor([encoder.config.vocab_size - 2, encoder.config.vocab_size - 1])
        hook = splice_rows(encoder, [encoder.config.vocab_size - 2, encoder.config.vocab_size - 1], rows)
        started = time.perf_counter()
        with autocast:
            output = encoder(ids)
        output.last_hidden_state.float().mean().backward()
        hook.remove()
        text.append(time.perf_counter() - started)
    print("\nalone (2 runs each, the second shown first):")
    print(f"  UNet forward (no grad)                   {forward[1]:8.3f} s  {forward[0]:.3f}")
    print(f"  UNet forward + backward (input grads)    {both[1]:8.3f} s  {both[0]:.3f}")
    print(f"  text encoder forward + backward          {text[1]:8.3f} s  {text[0]:.3f}")
    print(f"  median of the step parts: {statistics.median(both):.3f} s UNet")


if __name__ == "__main__":
    main()
