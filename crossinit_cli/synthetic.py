"""Randomly initialised Stable Diffusion pipelines built on disk, offline.

`build_tiny_sd` makes a small model (seconds to build, milliseconds a step) with the same structure as
SD 2.x, `build_tiny_sd1` one shaped like SD 1.x (quick_gelu CLIP text encoder, pad = EOS, no linear
projection in the UNet) and `build_tiny_sdxl` one shaped like SDXL (two text encoders, the second with a
projection, a text_time UNet): the tests and the CPU benchmark run crossinit's real code paths on them.
`build_full_size_sd21` and `build_full_size_sdxl` make random-init models with SD 2.1-base's and SDXL
base's exact shapes, which cost the same per step as the real weights: the GPU benchmark times them.
None is a model anyone should generate pictures with.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

from crossinit_cli import resources

_EXTRA_CORPUS = (
    "a photo of the face of person portrait rendering cropped close-up bright dark clean dirty good cool "
    "nice small weird large man woman smiling sad angry wearing hat glasses in the style of painting "
    "sitting beach city night snow forest red blue green with on at by an is it"
)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _train_bpe(words: list[str], merges_wanted: int) -> list[tuple[str, str]]:
    """A few hundred CLIP-style BPE merges (words end in '</w>') learned from `words`."""
    table = bytes_to_unicode()
    counts = Counter(words)
    split = {w: [table[b] for b in w.encode()] for w in counts}
    for symbols in split.values():
        symbols[-1] += "</w>"
    merges: list[tuple[str, str]] = []
    for _ in range(merges_wanted):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        for word, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[word] = out
    return merges


def write_tokenizer(folder: Path, merges_wanted: int = 400) -> int:
    """Write a CLIP tokenizer (vocab.json, merges.txt) trained on the celebrity names; returns its size."""
    names = resources.celeb_names()
    words = [w.lower() for line in names for w in line.split()] + _EXTRA_CORPUS.split() * 3
    merges = _train_bpe(words, merges_wanted)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return len(vocab)


def build_tiny_sd(folder: Path, *, width: int = 32, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny random SD pipeline saved as a diffusers folder (64 px images, text width `width`)."""
    import torch
    from transformers import CLIPTextModel

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(folder / "_tokenizer_src", "<|endoftext|>")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, width, mlp=2))
    unet = _tiny_unet(
        width,
        # diffusers' historical name: this is the number of heads. One head of 64 channels keeps SD's
        # 64-wide attention heads (SD 2.1: 5/10/20 heads of 64), so attention costs what it does there.
        attention_head_dim=1,
        use_linear_projection=True,  # as SD 2.x
    )
    return _save(folder, tokenizer, text_encoder, unet, _tiny_vae(), prediction_type)


def _tiny_text_config(tokenizer: Any, width: int, *, mlp: int, act: str = "quick_gelu", projection: int = 0) -> Any:
    """A 3-layer, 4-head CLIP text config over `tokenizer`'s vocabulary (`mlp` x width MLP)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * mlp,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or width,
    )


def _tiny_unet(cross_attention_dim: int, **overrides: Any) -> Any:
    """The tiny two-level UNet (64 px images through the tiny VAE), with the family's `overrides`."""
    from diffusers import UNet2DConditionModel

    settings: dict[str, Any] = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "norm_num_groups": 16,
    }
    return UNet2DConditionModel(**{**settings, **overrides})


def _tiny_tokenizer(folder: Path, pad: str) -> Any:
    from transformers import CLIPTokenizer

    write_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad)


def _tiny_vae(scaling_factor: float = 0.18215) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def build_tiny_sd1(folder: Path, *, width: int = 32, seed: int = 0) -> Path:
    """A tiny random SD 1.x-shaped pipeline: CLIP ViT-L's quick_gelu and 4x MLP, pad = EOS, epsilon."""
    import torch
    from transformers import CLIPTextModel

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(folder / "_tokenizer_src", "<|endoftext|>")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, width, mlp=4))  # 768 -> 3072, as CLIP ViT-L
    unet = _tiny_unet(
        width,
        attention_head_dim=8,  # SD 1.x's config value (it is the number of heads)
        use_linear_projection=False,  # as SD 1.x
    )
    return _save(folder, tokenizer, text_encoder, unet, _tiny_vae(), "epsilon")


def build_tiny_sdxl(folder: Path, *, widths: tuple[int, int] = (32, 64), seed: int = 0) -> Path:
    """A tiny random SDXL-shaped pipeline: a CLIP-L-like and a bigG-like (projected) encoder, text_time UNet."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(folder / "_tokenizer_src", "<|endoftext|>")
    tokenizer_2 = _tiny_tokenizer(folder / "_tokenizer_2_src", "!")  # SDXL's second tokenizer pads with "!"
    projection = widths[1] // 2
    torch.manual_seed(seed)

    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, widths[0], mlp=4, projection=projection))
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_text_config(tokenizer, widths[1], mlp=4, act="gelu", projection=projection)
    )
    time_dim = 8
    unet = _tiny_unet(
        sum(widths),
        attention_head_dim=(1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    modules = {"vae": _tiny_vae(0.13025), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return _save_sdxl(folder, tokenizer, tokenizer_2, {**modules, "unet": unet})


def build_full_size_sdxl(folder: Path, *, seed: int = 0) -> Path:
    """A random-init model with stable-diffusion-xl-base-1.0's shapes (2.6B UNet, CLIP-L 768 + bigG 1280)."""
    import torch

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(folder / "_tokenizer_src", "<|endoftext|>")
    tokenizer_2 = _tiny_tokenizer(folder / "_tokenizer_2_src", "!")
    torch.manual_seed(seed)
    return _save_sdxl(folder, tokenizer, tokenizer_2, sdxl_base_modules(tokenizer))


def _save_sdxl(folder: Path, tokenizer: Any, tokenizer_2: Any, modules: dict[str, Any]) -> Path:
    """Assemble an SDXL pipeline with SDXL's Euler scheduler and write it as a diffusers folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, **modules)
    pipe.save_pretrained(str(folder))
    return folder


def sdxl_base_modules(tokenizer: Any) -> dict[str, Any]:
    """SDXL base's text encoders, UNet and VAE with random weights (on the default device: under
    `torch.device("meta")` they cost no memory, which is how a test counts their parameters)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width: int, layers: int, heads: int, act: str, projection: int) -> Any:
        # The real vocabulary has 49408 rows; the cost of the table does not depend on the tokenizer.
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=width * 4,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=projection,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    text_encoder = CLIPTextModel(config(768, 12, 12, "quick_gelu", 768))
    text_encoder_2 = CLIPTextModelWithProjection(config(1280, 32, 20, "gelu", 1280))
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet}


def build_full_size_sd21(folder: Path, *, seed: int = 0) -> Path:
    """A random-init model with stable-diffusion-2-1-base's shapes (865M UNet, 1024-wide OpenCLIP-H text)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tokenizer_src"
    write_tokenizer(tok_dir, merges_wanted=400)
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"),
        str(tok_dir / "merges.txt"),
        model_max_length=77,
        pad_token="!",
    )
    torch.manual_seed(seed)
    # The real vocabulary has 49408 rows; the cost of the table does not depend on the tokenizer.
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = _sd_vae(sample_size=512)
    return _save(folder, tokenizer, text_encoder, unet, vae, "epsilon")


def _sd_vae(**settings: Any) -> Any:
    """Stable Diffusion's real 8x VAE (84M parameters), with random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        **settings,
    )


def _save(folder: Path, tokenizer: Any, text_encoder: Any, unet: Any, vae: Any, prediction_type: str) -> Path:
    """Assemble the pipeline with SD's training noise schedule and write it as a diffusers folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder
