"""Cross Initialization, paper steps 1-3 (Pang et al., CVPR 2024): where the new tokens start.

docs/method.md#the-steps-and-where-they-are describes each step and where it lives.

Textual Inversion usually starts a new token at the embedding of a word such as "person", far from where
training ends. Cross Initialization starts it where the text encoder's *outputs* live: the mean input
embedding of celebrity names, passed once through the text encoder.

    celebrity_mean   step 1: mean raw token-embedding rows of the 1st and 2nd BPE token of 691 names
    cross            step 2: [BOS, m0, m1, EOS, PAD...] through the text encoder, outputs at positions 1, 2
    add_placeholder_tokens   step 3: k = 2 new tokens whose input rows are those two outputs

SDXL has two text encoders: `cross_init_slots` runs steps 1-2 once per encoder, each with its own
tokenizer and token table, and takes the hidden state that encoder's UNet input is made of (SDXL:
`hidden_states[-2]`, see families.py); with a clip skip N (SD 1.x/2.x) it takes layer -N's output through
the final layer norm, the layer the UNet then reads. The result depends only on the base model (and the
clip skip), so `cross_init` caches it per model, encoder, clip skip, dtype and load path under the library's
`.cache/init/`.
Nothing here trains; `train.py` does. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossinit_cli import families, resources
from crossinit_cli.atomic import write_atomic
from crossinit_cli.errors import CrossinitError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from crossinit_cli.families import Slot

PLACEHOLDERS = ("<v0>", "<v1>")
"""The k = 2 new tokens, as the captions write them."""

PHRASE = "face of <v0> <v1> person"
"""What the caption templates are filled with (the official code's `face of {} person`)."""

CACHE_VERSION = 1
"""Bump when the computation changes, so that old cached inits are not reused."""


def celebrity_mean(tokenizer: Any, text_encoder: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper step 1, the celebrity mean: (m0, m1), each of the text encoder's width.

    Each name of `data/celeb_names.txt` is tokenised without padding, `[BOS, t1, t2, ..., EOS]`; the raw
    token-embedding rows (no position embedding) of t1 and t2 are averaged over all names. A one-token
    name feeds only m0. Duplicate names are kept, so they weigh twice, as in the official code.
    """
    import torch

    names = list(resources.celeb_names())
    encoded = tokenizer(names, padding="do_not_pad", truncation=True, max_length=tokenizer.model_max_length).input_ids
    table = text_encoder.get_input_embeddings().weight.detach().float()
    columns: tuple[list[int], list[int]] = ([], [])
    for ids in encoded:
        body = ids[1:-1]  # drop BOS and EOS
        for column, token_id in zip(columns, body[:2]):
            column.append(token_id)
    if not columns[0] or not columns[1]:
        raise CrossinitError("this model's tokenizer splits no celebrity name into two tokens; cannot cross-initialise")
    m0 = table[torch.tensor(columns[0])].mean(dim=0)
    m1 = table[torch.tensor(columns[1])].mean(dim=0)
    return m0, m1


def cross(
    tokenizer: Any,
    text_encoder: Any,
    m0: torch.Tensor,
    m1: torch.Tensor,
    *,
    penultimate: bool = False,
    clip_skip: int = 1,
) -> torch.Tensor:
    """Paper step 2, the cross: the text encoder's outputs for the input `[BOS, m0, m1, EOS, PAD...]`.

    The 77 rows go through the encoder as usual (position embeddings added, causal mask, final layer
    norm); `last_hidden_state` at positions 1 and 2 is returned as a [2, width] float32 tensor. With
    `penultimate` (SDXL's encoders) it is `hidden_states[-2]` instead, the output of the last layer but
    one without the final layer norm, which is what SDXL's UNet reads from each encoder. With `clip_skip`
    N > 1 (SD 1.x/2.x) it is the output of layer -N through the final layer norm, the layer the UNet then
    reads (families.read_hidden): the start lies where the prompts' outputs will live.
    transformers' CLIPTextModel takes no input embeddings, so the two rows are substituted at the
    token-embedding layer and everything after it is the model's own forward. BOS, EOS and PAD come from
    the tokenizer: SD 2.x's text-encoder config carries stale ids (bos 0, eos 2), and the output at
    positions 1 and 2 depends on the BOS row through attention.
    """
    import torch

    length = text_encoder.config.max_position_embeddings
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Positions 1 and 2 hold a stand-in id (BOS) whose rows the hook replaces with m0 and m1.
    ids = [bos, bos, bos, eos] + [pad] * (length - 4)
    table = text_encoder.get_input_embeddings()
    device = table.weight.device
    middle = torch.stack([m0, m1]).to(device=device, dtype=table.weight.dtype)

    def substitute(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, 1:3] = middle
        return output

    spec = families.EncoderSpec("", "", "", penultimate=penultimate)
    handle = table.register_forward_hook(substitute)
    try:
        with torch.no_grad():
            hidden, _ = families.read_hidden(spec, text_encoder, torch.tensor([ids], device=device), clip_skip)
    finally:
        handle.remove()
    return hidden[0, 1:3].float().cpu()


def encoder_fingerprint(text_encoder: Any) -> str:
    """A stable id of the text encoder's token-embedding table: sha256 of its float32 bytes, 16 hex chars.

    Two models share it when their vocabularies embed identically (an identity's vectors mean the same
    thing on both). Take it before `add_placeholder_tokens`, which adds rows.
    """
    import numpy as np

    table = text_encoder.get_input_embeddings().weight.detach().float().cpu().numpy()
    digest = hashlib.sha256(str(table.shape).encode())
    digest.update(np.ascontiguousarray(table).tobytes())
    return digest.hexdigest()[:16]


def _cache_key(
    tokenizer: Any,
    text_encoder: Any,
    fingerprint: str,
    penultimate: bool = False,
    clip_skip: int = 1,
    loader: str = "",
) -> str:
    """What the init depends on: the token table (fingerprint), the names' token ids, the encoder, the dtype
    it computes in and how it was loaded (`loader`, devices.TrainingModel.loader).

    A fine-tune may keep the token table and change the layers after it, which changes step 2's output;
    a strided sample of every parameter catches that without hashing a gigabyte. The dtype: an fp16 encoder's
    start is ~2e-3 off the fp32 one, so it must never be read back for an fp32 load (nor the other way).
    """

    digest = hashlib.sha256(f"v{CACHE_VERSION}:{fingerprint}".encode())
    dtype = str(text_encoder.get_input_embeddings().weight.dtype).removeprefix("torch.")
    digest.update(f"dtype={dtype};loader={loader}".encode())
    if penultimate:
        digest.update(b"hidden_states[-2]")
    if clip_skip > 1:
        digest.update(f"clip_skip={clip_skip}".encode())
    encoded = tokenizer(list(resources.celeb_names()), padding="do_not_pad").input_ids
    digest.update(repr([ids[1:3] for ids in encoded]).encode())
    digest.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    hash_weights(digest, text_encoder)
    return digest.hexdigest()[:32]


def hash_weights(digest: Any, module: Any, prefix: str = "", dtype: torch.dtype | None = None) -> None:
    """Feed `digest` every parameter of `module` by name and shape and a strided sample of ~4096 of its
    values (in `dtype` first, when given): enough to tell fine-tunes apart without hashing a gigabyte.
    The cross init's cache key and the latents' (latents.encoder_key) are made with it."""
    import numpy as np

    for name, param in module.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)]
        sample = (sample.to(dtype) if dtype is not None else sample).float().cpu().numpy()
        digest.update(f"{prefix}{name}{tuple(param.shape)}".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())


def cross_init(
    tokenizer: Any,
    text_encoder: Any,
    cache_dir: Path | None = None,
    *,
    penultimate: bool = False,
    clip_skip: int = 1,
    fingerprint: str | None = None,
    loader: str = "",
) -> torch.Tensor:
    """Steps 1 and 2: the [2, width] float32 start of the two new tokens, cached per model (and clip skip)
    in `cache_dir`.

    `fingerprint` is the encoder's `encoder_fingerprint` when the caller has it already (hashing SD 2.x's
    table reads 200 MB); `loader` how the model was loaded (part of the cache key, with the encoder's dtype)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None:
        fingerprint = fingerprint or encoder_fingerprint(text_encoder)
        key = _cache_key(tokenizer, text_encoder, fingerprint, penultimate, clip_skip, loader)
        path = Path(cache_dir) / f"{key}.safetensors"
        try:
            cached = load_file(str(path))["init"]
            if cached.shape == (2, text_encoder.get_input_embeddings().weight.shape[1]):
                return cached.float()
        except (OSError, KeyError, SafetensorError):
            pass  # absent or damaged: compute it again and overwrite
    mean = celebrity_mean(tokenizer, text_encoder)
    init = cross(tokenizer, text_encoder, *mean, penultimate=penultimate, clip_skip=clip_skip)
    if not torch.isfinite(init).all():
        raise CrossinitError("cross initialization produced NaN or infinite values; is the text encoder damaged?")
    if path is not None:
        # The cache is an optimisation: a read-only library must not stop training.
        with contextlib.suppress(CrossinitError):
            write_atomic(path, lambda tmp: save_file({"init": init.contiguous()}, str(tmp)))
    return init


def cross_init_slots(
    slots: Sequence[Slot],
    cache_dir: Path | None = None,
    clip_skip: int = 1,
    fingerprints: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Steps 1 and 2 for every text encoder of a model (families.slots): one [2, width] start each, at the
    layer the UNet reads with `clip_skip` (families.check_clip_skip says which families take one).
    `fingerprints`: each encoder's `encoder_fingerprint`, when the caller has them already."""
    prints = list(fingerprints) if fingerprints is not None else [None] * len(slots)
    return [
        cross_init(
            s.tokenizer,
            s.text_encoder,
            cache_dir,
            penultimate=s.spec.penultimate,
            clip_skip=clip_skip,
            fingerprint=f,
            loader=s.loader,
        )
        for s, f in zip(slots, prints)
    ]


def add_placeholder_tokens(tokenizer: Any, text_encoder: Any, init: torch.Tensor) -> list[int]:
    """Paper step 3: add the k = 2 placeholder tokens and set their input-embedding rows to `init`.

    Returns their token ids. Adding them again (a second identity learned on the same loaded model)
    reuses the ids and resets their rows.
    """
    import torch

    tokenizer.add_tokens(list(PLACEHOLDERS))
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(PLACEHOLDERS))]
    table = text_encoder.get_input_embeddings()
    if max(ids) >= table.weight.shape[0]:
        # mean_resizing would draw random rows (and touch the global RNG); they are overwritten anyway.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[ids] = init.to(device=table.weight.device, dtype=table.weight.dtype)
    return ids
