"""What the CPU's kernels cost under a learn step's shapes, and whether another layout or attention kernel is faster.

    python benchmarks/bench_kernels.py --model /tmp/speed/sd21                  # this CPU as it is
    python benchmarks/bench_kernels.py --model /tmp/speed/sd21 --cpu-isa avx2   # as an AVX2-only CPU would run

Three parts, each run in turn round after round (medians reported, so that load from elsewhere falls on all
alike):
- the ISA check: a 1024x1024 matmul in fp32 and bf16 and a 320-channel 3x3 convolution at 64x64, which shows
  what `--cpu-isa avx2` took away (bf16 then runs emulated, orders of magnitude slower);
- the UNet's forward + backward with input gradients only (what a training step needs: only the two new rows
  learn) in fp32, NCHW against channels-last and SDPA's default kernel against its math kernel, with the
  gradient each gives against the first's;
- the VAE encoding a crop and its mirror image (a first learn's largest fixed cost), NCHW against channels-last;
- pre-packed convolution weights: oneDNN reorders a convolution's weights into its blocked layout at every
  call; packed once (`mkldnn_reorder_conv2d_weight`, as torch's inductor does for inference) and run through
  `mkldnn._convolution_pointwise`, forward and backward (input gradients: the same kind of convolution with
  the weights transposed and flipped), alone on single convolutions (`--parts conv`) and on every stride-1
  convolution of the UNet (the "packed" row of `--parts unet`).

`--cpu-isa avx2` limits ATen, oneDNN and MKL to AVX2 for this process (re-run with the variables set, since they
are read when torch loads), as `bench_learn.py --cpu-isa avx2` does for its processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_learn import run_as_isa  # noqa: E402


def _timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def _rounds(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[list[float], Any]]:
    """Each variant once per round, in turn: its times and its last result."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, work in variants.items():
            seconds, results[name] = _timed(work)
            times[name].append(round(seconds, 3))
            print(f"  {name:28} {seconds:8.3f} s", file=sys.stderr, flush=True)
    return {name: (times[name], results[name]) for name in variants}


def isa_check(rounds: int) -> dict[str, tuple[list[float], Any]]:
    import torch

    x, w = torch.randn(1024, 1024), torch.randn(1024, 1024)
    xb, wb = x.bfloat16(), w.bfloat16()
    conv, image = torch.nn.Conv2d(320, 320, 3, padding=1).requires_grad_(False), torch.randn(1, 320, 64, 64)
    warm = [x @ w, xb @ wb, conv(image)]  # noqa: F841 (the first call of each builds its kernels)
    variants = {"matmul fp32": lambda: x @ w, "matmul bf16": lambda: xb @ wb, "conv 3x3 fp32": lambda: conv(image)}
    return _rounds(variants, rounds)


def unet_variants(model: Path, rounds: int, only: str = "") -> dict[str, tuple[list[float], Any]]:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model / "unet").requires_grad_(False).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    side = unet.config.sample_size
    width = unet.config.cross_attention_dim
    noisy, t = torch.randn(1, unet.config.in_channels, side, side), torch.tensor([500])
    states = torch.randn(1, 77, width)

    def step(channels_last: bool, math: bool, packed: bool = False) -> Any:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        unet.to(memory_format=layout)
        rows = states.clone().requires_grad_(True)
        backends = [SDPBackend.MATH] if math else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        for module, forward in packs.items():
            module.forward = forward if packed else type(module).forward.__get__(module)
        with sdpa_kernel(backends):
            unet(noisy.contiguous(memory_format=layout), t, rows).sample.square().mean().backward()
        return rows.grad

    def wanted(name: str) -> bool:
        return not only or name in only.split(";")

    convs = [m for m in unet.modules() if _packable(m)] if wanted("NCHW, SDPA flash, packed") else []
    sides: dict[Any, int] = {}  # each convolution's input side: a weight packed for another size is reordered again
    hooks = [m.register_forward_pre_hook(lambda m, args: sides.__setitem__(m, args[0].shape[-1])) for m in convs]
    if convs:
        with torch.no_grad():
            unet(noisy, t, states)
    for hook in hooks:
        hook.remove()
    packs = {m: _packed_forward(m, sides[m]) for m in convs}  # packed once, not timed
    variants = {
        "NCHW, SDPA flash": lambda: step(False, False),
        "channels-last, SDPA flash": lambda: step(True, False),
        "NCHW, SDPA math": lambda: step(False, True),
        "channels-last, SDPA math": lambda: step(True, True),
        "NCHW, SDPA flash, packed": lambda: step(False, False, packed=True),
    }
    return _rounds({name: work for name, work in variants.items() if wanted(name)}, rounds)


def _packable(module: Any) -> bool:
    import torch

    plain = getattr(module, "padding_mode", "") == "zeros" and getattr(module, "groups", 0) == 1
    return isinstance(module, torch.nn.Conv2d) and plain and module.stride == (1, 1) and module.dilation == (1, 1)


def _packed_forward(conv: Any, side: int) -> Callable[[Any], Any]:
    """`conv`'s forward with its weights packed once for oneDNN, and its backward (input gradients) likewise."""
    import torch

    pad = list(conv.padding)
    back_pad = [k - 1 - p for k, p in zip(conv.kernel_size, pad)]
    ones = [1, 1]
    reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
    ahead = reorder(conv.weight.to_mkldnn(), pad, ones, ones, 1, [1, conv.in_channels, side, side])
    flipped = conv.weight.transpose(0, 1).flip(2, 3).contiguous()
    back = reorder(flipped.to_mkldnn(), back_pad, ones, ones, 1, [1, conv.out_channels, side, side])

    def run(x: Any, weight: Any, bias: Any, padding: list[int]) -> Any:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, ones, ones, 1, "none", [], "")

    class Packed(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return run(x, ahead, conv.bias, pad).contiguous()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return run(grad.contiguous(), back, None, back_pad).contiguous()

    return Packed.apply


def conv_variants(rounds: int) -> dict[str, tuple[list[float], Any]]:
    """Single convolutions of the UNet's shapes (input channels, output channels, side), stock against packed."""
    import torch

    torch.manual_seed(0)
    variants: dict[str, Callable[[], Any]] = {}
    for cin, cout, side in ((320, 320, 64), (1280, 1280, 16), (1280, 1280, 8), (2560, 1280, 8)):
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False)
        x = torch.randn(1, cin, side, side)
        packed = _packed_forward(conv, side)

        def both(forward: Callable[[Any], Any], x: Any = x) -> Any:
            inputs = x.clone().requires_grad_(True)
            forward(inputs).square().sum().backward()
            return inputs.grad

        variants[f"{cin}->{cout} at {side}, stock"] = lambda both=both, conv=conv: both(conv)
        variants[f"{cin}->{cout} at {side}, packed"] = lambda both=both, packed=packed: both(packed)
    runs = _rounds(variants, rounds)
    names = list(runs)
    for stock, packed in zip(names[::2], names[1::2]):  # each packed input gradient against its stock one
        expected, got = runs[stock][1], runs[packed][1]
        print(f"  {packed}: max |diff| {float((got - expected).abs().max()):.1e} of {float(expected.abs().max()):.1e}")
    return runs


def vae_variants(model: Path, rounds: int) -> dict[str, tuple[list[float], Any]]:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model / "vae").requires_grad_(False).eval()
    size = vae.config.sample_size
    pixels = torch.randn(1, 3, size, size)
    pixels = torch.cat([pixels, pixels.flip(-1)])  # the crop and its mirror image, as encoding.py sends them

    def encode(channels_last: bool) -> Any:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        vae.to(memory_format=layout)
        with torch.inference_mode():
            return vae.encode(pixels.contiguous(memory_format=layout)).latent_dist.mean.clone()

    return _rounds({"NCHW": lambda: encode(False), "channels-last": lambda: encode(True)}, rounds)


def _report(title: str, runs: dict[str, tuple[list[float], Any]]) -> None:
    first = next(iter(runs.values()))[1]
    print(title)
    for name, (times, result) in runs.items():
        line = f"  {name:28} median {statistics.median(times):8.3f} s   runs {times}"
        if first is not None and hasattr(result, "shape") and result.shape == first.shape and result.dim() > 2:
            scale = float(first.abs().max())
            line += f"   max |diff| vs the first {float((result - first).abs().max()):.1e} (of max {scale:.1e})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an SD 1.x/2.x diffusers folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--parts", default="isa,unet,vae,conv", help="which parts, comma-separated")
    parser.add_argument("--unet-variants", default="", help="only these UNet variants (names, ;-separated)")
    args = parser.parse_args()
    run_as_isa(args.cpu_isa)
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen {capability}, CPU ISA {args.cpu_isa}")
    model, rounds = args.model, args.rounds
    parts = {"isa": ("the ISA check", lambda: isa_check(rounds))}
    title = "UNet forward + backward, input gradients only, fp32"
    parts["unet"] = (title, lambda: unet_variants(model, rounds, args.unet_variants))
    parts["vae"] = ("VAE encode of a crop and its mirror image, fp32", lambda: vae_variants(model, rounds))
    parts["conv"] = ("single convolutions, forward + backward (input gradients), fp32", lambda: conv_variants(rounds))
    for name in args.parts.split(","):
        title, run = parts[name]
        _report(title, run())


if __name__ == "__main__":
    main()
