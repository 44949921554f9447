"""fp32 against bf16 on the CPU (docs/performance.md#precision-on-the-cpu): what `--dtype auto` gains or loses.

    python benchmarks/bench_precision.py --sampling MODEL   # generate: seconds per image and the images' PSNR
    python benchmarks/bench_precision.py --learn MODEL      # learn: seconds per step (--steps 3 minus --steps 1)

MODEL is a diffusers folder, e.g. a full-size random one from crossinit_cli.synthetic.build_full_size_sd21 (run
it under `flock /tmp/fullsize.lock` on a shared machine). Sampling loads the model once per precision, draws the
same seed and prompt, times the pipeline call alone and compares the images (PSNR, dB), then decodes the fp32
run's latents with the VAE in fp32 and in bf16 to show what the VAE's precision alone changes. Learning runs
`crossinit learn` with --steps 1 and --steps 3 per precision: the difference of their training loops over two
steps is the per-step cost without the first step's warm-up (and without the load, detection and VAE encode).
The load average is printed with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "astronaut.png"
PROMPT = "a photo of a person as an astronaut"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def psnr(a: Any, b: Any) -> float:
    import numpy as np

    error = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def _draw(model: str, dtype: str, args: argparse.Namespace) -> tuple[Any, Any, float, Any]:
    """(image, latents, seconds, VAE) of one image in `dtype`: the pipeline call alone is timed."""
    import torch

    from crossinit_cli import devices, hf, sample

    placement = devices.resolve("cpu", dtype)
    pipe = sample.load(model, placement)
    sample.use_scheduler(pipe, sample.DEFAULT_SCHEDULER)
    call = {"num_inference_steps": args.steps, "guidance_scale": sample.DEFAULT_GUIDANCE}
    size = {"width": args.size, "height": args.size}
    with hf.quiet_libraries(), torch.inference_mode():
        started = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(args.seed)
        latents = pipe(PROMPT, generator=generator, output_type="latent", **size, **call).images
        seconds = time.perf_counter() - started
    return _decode(pipe.vae, latents, pipe.vae.dtype), latents, seconds, pipe.vae


def _decode(vae: Any, latents: Any, dtype: Any) -> Any:
    """The image the VAE (in `dtype`) decodes from `latents`, as uint8 HxWx3."""
    import torch

    with torch.inference_mode():
        pixels = vae.to(dtype=dtype).decode(latents.to(dtype) / vae.config.scaling_factor).sample
    return ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def sampling_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 first, then the VAE's decode of its latents in bf16, then bf16 throughout: each printed as it comes,
    so a run cut short still shows what it measured."""
    import torch

    from crossinit_cli import devices

    results: dict[str, Any] = {"auto_on_this_cpu": devices.cpu_bf16(), "steps": args.steps, "size": args.size}
    images = {}
    for dtype in ("fp32", "bf16"):
        before = load_average()
        images[dtype], latents, seconds, vae = _draw(args.model, dtype, args)
        results[dtype] = {"image_s": round(seconds, 1), "load_before": before, "load_after": load_average()}
        print(dtype, results[dtype], flush=True)
        if dtype == "fp32":
            decoded = _decode(vae, latents, torch.bfloat16)
            results["psnr_vae_decode_only_db"] = round(psnr(images["fp32"], decoded), 2)
            print("VAE decode alone in bf16: PSNR", results["psnr_vae_decode_only_db"], "dB", flush=True)
            del vae, latents
        if args.save:
            from PIL import Image

            Image.fromarray(images[dtype]).save(Path(args.save) / f"sample-{dtype}.png")
    results["psnr_images_db"] = round(psnr(images["fp32"], images["bf16"]), 2)
    return results


def _learn(model: str, dtype: str, steps: int) -> dict[str, Any]:
    from bench_learn import learn_json  # this script's folder is first on sys.path

    options = ["--device", "cpu", "--dtype", dtype, "--steps", str(steps), "--batch-size", "1", "--name", "bench"]
    wall, training = learn_json(model, options)
    loop_s = training["per_step_s"] * steps  # the training loop alone: no load, detection or VAE encode
    return {"wall_s": round(wall, 1), "loop_s": round(loop_s, 2), "dtype_reason": training["dtype_reason"]}


def learn_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from crossinit_cli import devices

    results: dict[str, Any] = {"auto_on_this_cpu": devices.cpu_bf16()}
    for dtype in ("fp32", "bf16"):
        runs = {}
        for steps in (1, 3):
            before = load_average()
            runs[steps] = {**_learn(args.model, dtype, steps), "load_before": before, "load_after": load_average()}
            print(dtype, f"--steps {steps}", runs[steps], flush=True)
        runs["per_step_s"] = round((runs[3]["loop_s"] - runs[1]["loop_s"]) / 2, 2)  # without the first step's warm-up
        results[dtype] = runs
    results["bf16_speed_up"] = round(results["fp32"]["per_step_s"] / results["bf16"]["per_step_s"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a diffusers folder (e.g. /tmp/fullsize/sd21)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sampling", action="store_true", help="generate one image in fp32 and in bf16")
    mode.add_argument("--learn", action="store_true", help="learn --steps 1 and 3 in fp32 and in bf16")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per image (generate's default: 30)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--save", help="a folder to save the two images in")
    args = parser.parse_args()
    results = sampling_benchmark(args) if args.sampling else learn_benchmark(args)
    print(json.dumps({**results, "load_average_end": load_average()}, indent=1))


if __name__ == "__main__":
    main()
