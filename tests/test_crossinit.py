"""Cross Initialization (paper steps 1-3) checked against an independent computation of their description in
docs/method.md#the-steps-and-where-they-are."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from crossinit_cli import crossinit
from crossinit_cli.devices import load_pipeline

NAMES = Path(crossinit.__file__).parent / "data" / "celeb_names.txt"
OFFICIAL = sorted((Path(__file__).parent / "data" / "official").glob("*.bin"))


def _reference_init(tokenizer, text_encoder, *, penultimate: bool = False, skip: int = 1) -> torch.Tensor:
    """Paper steps 1-2 written out from docs/method.md's text, sharing no code with crossinit.py or families.py.

    `penultimate` (docs/method.md#model-families, SDXL's encoders): the output of the last layer but one,
    without the final layer norm (hidden_states[-2]), instead of the final layer norm's output. `skip` N
    (docs/method.md#clip-skip): the output of the last layer but N - 1, through the final layer norm.
    """
    text_encoder = getattr(text_encoder, "text_model", text_encoder)  # CLIPTextModelWithProjection's inner model
    table = text_encoder.embeddings.token_embedding.weight.detach()
    first, second = [], []
    for line in NAMES.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        ids = tokenizer(line.strip()).input_ids  # [BOS, t1, t2, ..., EOS], no padding
        if len(ids) >= 3:
            first.append(table[ids[1]])
        if len(ids) >= 4:
            second.append(table[ids[2]])
    m0, m1 = torch.stack(first).mean(0), torch.stack(second).mean(0)

    length = text_encoder.config.max_position_embeddings
    rows = [table[tokenizer.bos_token_id], m0, m1, table[tokenizer.eos_token_id]]
    rows += [table[tokenizer.pad_token_id]] * (length - 4)
    x = torch.stack(rows)[None] + text_encoder.embeddings.position_embedding.weight[None, :length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    layers = list(text_encoder.encoder.layers)
    for layer in layers[:-1] if penultimate else layers[: len(layers) - skip + 1]:
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        heads, dim = attn.num_heads, attn.head_dim

        def split(t: torch.Tensor, heads: int = heads, dim: int = dim) -> torch.Tensor:
            return t.view(1, length, heads, dim).transpose(1, 2)

        q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim) + causal, dim=-1)
        x = x + attn.out_proj((weights @ v).transpose(1, 2).reshape(1, length, -1))
        x = x + layer.mlp(layer.layer_norm2(x))
    return (x if penultimate else text_encoder.final_layer_norm(x))[0, 1:3]


@torch.no_grad()
def test_init_equals_an_independent_computation(tiny_model: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    expected = _reference_init(pipe.tokenizer, pipe.text_encoder)
    got = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    assert got.shape == (2, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # SD 2.x ships a text-encoder config with stale special-token ids (bos 0, eos 2, pad 1); the
    # tokenizer's are the ones the model was trained with.
    pipe.text_encoder.config.bos_token_id, pipe.text_encoder.config.eos_token_id = 0, 2
    pipe.text_encoder.config.pad_token_id = 1
    torch.testing.assert_close(crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None), expected)


@torch.no_grad()
def test_celebrity_mean_uses_raw_rows_and_keeps_duplicates(tiny_model: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    m0, m1 = crossinit.celebrity_mean(pipe.tokenizer, pipe.text_encoder)
    table = pipe.text_encoder.get_input_embeddings().weight
    lines = [line.strip() for line in NAMES.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 691 and len(set(lines)) < len(lines)  # duplicates are part of the official mean
    firsts = [pipe.tokenizer(name).input_ids[1] for name in lines]
    torch.testing.assert_close(m0, table[firsts].mean(0))


def test_names_of_one_token_feed_only_the_first_column(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tokenizer:
        model_max_length = 77

        def __call__(self, names, **kwargs):
            # "Cher" is one token, every other name two; BOS = 0, EOS = 1.
            ids = [[0, 5, 1] if n == "Cher" else [0, 2, 3, 1] for n in names]
            return type("Encoding", (), {"input_ids": ids})

    class Encoder:
        def __init__(self) -> None:
            self.table = torch.nn.Embedding(6, 2)
            with torch.no_grad():
                self.table.weight.copy_(torch.arange(12, dtype=torch.float32).view(6, 2))

        def get_input_embeddings(self) -> torch.nn.Embedding:
            return self.table

    monkeypatch.setattr(crossinit.resources, "celeb_names", lambda: ("Cher", "A B", "C D"))
    m0, m1 = crossinit.celebrity_mean(Tokenizer(), Encoder())
    table = torch.arange(12, dtype=torch.float32).view(6, 2)
    torch.testing.assert_close(m0, (table[5] + table[2] + table[2]) / 3)
    torch.testing.assert_close(m1, table[3])  # "Cher" adds nothing to the second column


def test_cache_is_used_on_a_second_call(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = load_pipeline(str(tiny_model))
    first = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def not_again(*args: object) -> None:
        raise AssertionError("the init was computed again instead of read from the cache")

    monkeypatch.setattr(crossinit, "cross", not_again)
    again = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, tmp_path)
    assert torch.equal(first, again)


def test_cache_does_not_mix_models(tiny_model: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    first = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, tmp_path)
    # A fine-tune with the same token table but other encoder layers gets its own init.
    with torch.no_grad():
        getattr(pipe.text_encoder, "text_model", pipe.text_encoder).encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    tuned = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, tmp_path)
    assert not torch.allclose(first, tuned)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_damaged_cache_is_recomputed(tiny_model: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    first = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, tmp_path)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    assert torch.equal(crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, tmp_path), first)


def test_fingerprint_is_stable_and_tracks_the_token_table(tiny_model: Path) -> None:
    one, two = load_pipeline(str(tiny_model)), load_pipeline(str(tiny_model))
    fingerprint = crossinit.encoder_fingerprint(one.text_encoder)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert crossinit.encoder_fingerprint(two.text_encoder) == fingerprint
    with torch.no_grad():
        two.text_encoder.get_input_embeddings().weight[5, 0] += 1e-3
    assert crossinit.encoder_fingerprint(two.text_encoder) != fingerprint


def test_placeholder_tokens_start_at_the_init(tiny_model: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    rows = len(pipe.tokenizer)
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    ids = crossinit.add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, init)
    assert ids == [rows, rows + 1]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], init)
    caption = pipe.tokenizer(f"a photo of a {crossinit.PHRASE}").input_ids
    assert caption.count(ids[0]) == 1 and caption.index(ids[1]) == caption.index(ids[0]) + 1
    # A second identity on the same loaded model reuses the two tokens.
    assert crossinit.add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, init * 2) == ids
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], init * 2)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CROSSINIT_REAL_MODEL"), reason="set CROSSINIT_REAL_MODEL to SD 2.1-base")
@torch.no_grad()
def test_init_lands_near_the_official_learned_vectors() -> None:
    """On real SD 2.1-base weights: the start is closer to where the official code ended than "person" is."""
    pipe = load_pipeline(os.environ["CROSSINIT_REAL_MODEL"])
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    person = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("person").input_ids[1]]
    for path in OFFICIAL:
        learned = torch.stack(list(torch.load(path, weights_only=True).values())).float()
        for column in range(2):
            near = torch.cosine_similarity(init[column], learned[column], dim=0)
            usual = torch.cosine_similarity(person, learned[column], dim=0)
            assert near > usual, (path.name, column, float(near), float(usual))
            assert 0.5 < float(init[column].norm() / learned[column].norm()) < 2.0
