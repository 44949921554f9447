"""How fast crossinit learns, against a plain diffusers textual-inversion loop doing the same work.

    python benchmarks/bench_learn.py                 # tiny model on the CPU: seconds/step of both, the ratio
    python benchmarks/bench_learn.py --full-size     # SD 2.1-base-sized random model (for a GPU): fast and
                                                     # full mode seconds through `crossinit learn`
    python benchmarks/bench_learn.py --full-size --family sdxl   # the same on SDXL base's shapes at 1024 px

Both loops train the same two rows from the same cross init on the same aligned photo, with the same
batch, captions and schedule. The baseline is written the way diffusers' textual-inversion example (and
the official Cross Initialization code, a fork of it) does it: every step loads and augments each image,
encodes it through the VAE, runs the text encoder with the whole token table trainable, steps AdamW over
the whole table and copies the untouched rows back. The two run one step each in turn, so that other
load on the machine hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "astronaut.png"


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def diffusers_example_loop(
    model: Path, crop_path: Path, *, batch_size: int, device: str, seed: int = 0
) -> Iterator[float]:
    """The diffusers textual-inversion example's loop (fp32, as the official code runs); yields seconds per step."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from crossinit_cli import crossinit
    from crossinit_cli.devices import load_pipeline
    from crossinit_cli.train import TEMPLATES

    torch.manual_seed(seed)
    random.seed(seed)
    pipe = load_pipeline(str(model))
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    init = crossinit.cross_init(tokenizer, text_encoder, None)
    placeholder_ids = crossinit.add_placeholder_tokens(tokenizer, text_encoder, init)
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.encoder.requires_grad_(False)
    text_encoder.final_layer_norm.requires_grad_(False)
    text_encoder.embeddings.position_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(), lr=0.005, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8
    )
    text_encoder.to(device).train()
    unet.to(device)
    vae.to(device)
    initialize = init.to(device)
    orig_embeds = text_encoder.get_input_embeddings().weight.data.clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[placeholder_ids] = False

    def example() -> tuple[torch.Tensor, torch.Tensor]:
        """The example's Dataset.__getitem__: open, resize, flip, scale to [-1, 1]; a random caption."""
        image = Image.open(crop_path).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        text = random.choice(TEMPLATES).format(crossinit.PHRASE)
        ids = tokenizer(
            text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids[0]
        return pixels, ids

    while True:
        started = time.perf_counter()
        batch = [example() for _ in range(batch_size)]
        pixel_values = torch.stack([b[0] for b in batch]).to(device)
        input_ids = torch.stack([b[1] for b in batch]).to(device)
        latents = vae.encode(pixel_values).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        token_embeds = text_encoder.get_input_embeddings().weight
        reg = F.pairwise_distance(token_embeds[placeholder_ids], initialize, p=2).mean() * 1e-5
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean") + reg
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            token_embeds[keep] = orig_embeds[keep]
        loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        yield time.perf_counter() - started


def interleaved_steps(
    model: Path, crop_path: Path, *, steps: int, batch_size: int, device: str, seed: int = 0
) -> tuple[list[float], list[float], float]:
    """crossinit's train.run and the example's loop, one step each in turn: (ours, theirs, our one-time cost).

    Each of our steps is followed by one of theirs (run from our progress callback and not counted in
    ours), so that load from other processes on the machine hits both alike.
    """
    from PIL import Image

    from crossinit_cli import crossinit, devices, train
    from crossinit_cli.devices import load_pipeline

    theirs_loop = diffusers_example_loop(model, crop_path, batch_size=batch_size, device=device, seed=seed)
    next(theirs_loop)  # load and set up before anything is timed
    pipe = load_pipeline(str(model))
    train.free_vae_decoder(pipe.vae)
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    placement = devices.resolve(device, "auto", training=True)
    ours: list[float] = []
    theirs: list[float] = []
    resumed = [0.0]

    def step_done(step: int, total: int, loss: float) -> None:
        ours.append(time.perf_counter() - resumed[0])
        theirs.append(next(theirs_loop))
        resumed[0] = time.perf_counter()

    resumed[0] = time.perf_counter()
    result = train.run(
        train.ModelParts.of_pipeline(pipe),
        [Image.open(crop_path).convert("RGB")],
        init,
        train.TrainConfig(steps=steps, batch_size=batch_size, seed=seed),
        placement,
        train.RunHooks(progress=step_done),
    )
    assert len(result.losses) == steps
    ours[0] -= result.encode_s  # the first interval also holds the one-time VAE encode
    return ours, theirs, result.encode_s


def tiny_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from crossinit_cli.faces import align_faces
    from crossinit_cli.synthetic import build_tiny_sd

    with tempfile.TemporaryDirectory(prefix="crossinit-bench-") as tmp:
        model = Path(args.model) if args.model else build_tiny_sd(Path(tmp) / "tiny")
        from crossinit_cli.devices import load_pipeline
        from crossinit_cli.train import model_resolution

        probe = load_pipeline(str(model))
        size = model_resolution(probe.unet, probe.vae)
        del probe
        # Both start from the same file: the aligned crop at --crop-size (512 is what a user of the official
        # code has on disk for SD 2.1-base); each brings it to the model's size its own way.
        crop_path = Path(tmp) / "crop.png"
        align_faces([PHOTO], args.crop_size or size)[0].image.save(crop_path)

        baseline: list[float] = []
        ours: list[float] = []
        encode: list[float] = []
        for _ in range(args.rounds):
            mine, theirs, once = interleaved_steps(
                model, crop_path, steps=args.steps, batch_size=args.batch_size, device=args.device
            )
            ours += mine[args.warmup :]
            baseline += theirs[args.warmup :]
            encode.append(once)
    base_s, ours_s = statistics.median(baseline), statistics.median(ours)
    return {
        "model": str(args.model or "tiny (synthetic.build_tiny_sd)"),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "crop_size": args.crop_size or "model's",
        "steps_timed": len(ours),
        "diffusers_example_s_per_step": round(base_s, 4),
        "crossinit_s_per_step": round(ours_s, 4),
        "crossinit_one_time_encode_s": round(statistics.median(encode), 4),
        "ratio": round(base_s / ours_s, 2),
    }


FULL_SIZE = {
    # family: (builder in synthetic.py, what the report calls it)
    "sd2": ("build_full_size_sd21", "random init, SD 2.1-base shapes"),
    "sdxl": ("build_full_size_sdxl", "random init, SDXL-base shapes (2.6B UNet, CLIP-L + bigG)"),
}


def full_size_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """`crossinit learn --fast` and `--full` on a random model of SD 2.1-base's (or SDXL base's) shapes,
    as a user runs them."""
    from crossinit_cli import synthetic

    builder, described = FULL_SIZE[args.family]
    with tempfile.TemporaryDirectory(prefix="crossinit-bench-") as tmp:
        model = Path(args.model) if args.model else getattr(synthetic, builder)(Path(tmp) / f"{args.family}-size")
        env = {**os.environ, "CROSSINIT_HOME": str(Path(tmp) / "home"), "CROSSINIT_CONFIG": str(Path(tmp) / "c.toml")}
        report: dict[str, Any] = {"model": str(args.model or described), "device": args.device}
        extra = [f"--steps={args.train_steps}"] if args.train_steps else []
        extra += [f"--resolution={args.resolution}"] if args.resolution else []
        extra += [f"--batch-size={args.learn_batch_size}"] if args.learn_batch_size else []
        for mode in ("fast", "full"):
            command = [
                sys.executable,
                "-m",
                "crossinit_cli",
                "learn",
                str(PHOTO),
                f"--{mode}",
                "--name",
                mode,
                "--model",
                str(model),
                "--device",
                args.device,
                "--json",
                "--quiet",
                *extra,
            ]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{mode} mode failed: {done.stderr.strip()}")
            training = json.loads(done.stdout)["training"]
            report[mode] = {
                "end_to_end_s": round(wall, 2),
                "training_s": training["total_s"],
                "per_step_s": training["per_step_s"],
                "steps": training["steps"],
                "batch_size": training["batch_size"],
                "resolution": training["resolution"],
                "dtype": training["dtype"],
            }
        if args.device == "cuda" and args.family == "sd2":  # the example loop compared here is SD 1.x/2.x-only
            import torch

            report["gpu"] = torch.cuda.get_device_name(0)
            mine, theirs, _ = interleaved_steps(
                model, _aligned(tmp, 512), steps=args.steps, batch_size=8, device="cuda"
            )
            report["per_step_s_crossinit"] = round(statistics.median(mine[args.warmup :]), 4)
            report["per_step_s_diffusers_example_fp32"] = round(statistics.median(theirs[args.warmup :]), 4)
    return report


def _aligned(tmp: str, size: int) -> Path:
    from crossinit_cli.faces import align_faces

    path = Path(tmp) / f"crop{size}.png"
    align_faces([PHOTO], size)[0].image.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SD 2.1-base-sized model: fast/full mode seconds")
    parser.add_argument(
        "--family", choices=sorted(FULL_SIZE), default="sd2", help="with --full-size: sd2 (default) or sdxl shapes"
    )
    parser.add_argument(
        "--train-steps", type=int, default=0, help="with --full-size: override learn's steps (a CPU smoke run)"
    )
    parser.add_argument("--resolution", type=int, default=0, help="with --full-size: learn --resolution")
    parser.add_argument("--learn-batch-size", type=int, default=0, help="with --full-size: learn --batch-size")
    parser.add_argument("--model", help="use this diffusers folder instead of building one")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=12, help="steps per round and method (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each round not timed (default 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--crop-size",
        type=int,
        default=512,
        help="size of the aligned photo both start from (default 512; 0 = the model's own size)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    _quiet()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = full_size_benchmark(args) if args.full_size else tiny_benchmark(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:32} {value}")
    if not args.full_size:
        verdict = "meets" if report["ratio"] >= 1.5 else "misses"
        print(f"crossinit is {report['ratio']:.2f}x faster per step ({verdict} the 1.5x target)")


if __name__ == "__main__":
    main()
