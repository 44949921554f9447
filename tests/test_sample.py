"""The sampling engine on the tiny model: identity tokens in the text encoder, schedulers, seeded batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crossinit_cli import devices, sample
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Identity, Library
from tests.factories import random_vectors


@pytest.fixture()
def pipe(tiny_model: Path) -> Any:
    return sample.load(str(tiny_model), devices.resolve("cpu"))


class EmbeddingSpy:
    """Records (input ids, output rows) of every lookup in the text encoder's token-embedding table."""

    def __init__(self, pipe: Any) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        module = pipe.text_encoder.get_input_embeddings()
        self.handle = module.register_forward_hook(lambda mod, args, out: self.seen.append((args[0], out.detach())))

    def rows_for(self, ids: tuple[int, ...]) -> list[torch.Tensor]:
        """The rows looked up at positions holding `ids` in order, one [k, width] tensor per occurrence."""
        found = []
        for input_ids, out in self.seen:
            for b in range(input_ids.shape[0]):
                row = input_ids[b].tolist()
                for pos in range(len(row) - len(ids) + 1):
                    if tuple(row[pos : pos + len(ids)]) == ids:
                        found.append(out[b, pos : pos + len(ids)])
        return found


def _conditioning(pipe: Any, prompt: str) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return embeds


# ---- prompts and tokens -------------------------------------------------------------------------


def test_identity_refs_are_store_names_matched_case_insensitively() -> None:
    assert sample.identity_refs("<Alice> meets <bob.smith-2> and <ALICE>, <lora:x:1> <3 <|endoftext|>") == [
        "Alice",
        "bob.smith-2",
    ]
    assert sample.identity_refs("no identities here") == []


def test_token_names_are_unique_per_identity_and_ascii() -> None:
    alice = sample.token_names("Alice", 2)
    assert alice == ["<crossinit:alice:0>", "<crossinit:alice:1>"]
    assert sample.token_names("ALICE", 2) == alice
    others = [sample.token_names(n, 2) for n in ("alice.0", "alice0", "zoë", "c3a9")]
    every = alice + [t for tokens in others for t in tokens]
    assert len(set(every)) == len(every)
    assert all(t.isascii() for t in every)


def test_expand_prompt_rewrites_known_and_refuses_unknown(pipe: Any) -> None:
    mapping = sample.add_identities(pipe, {"alice": random_vectors(1, scale=5)})
    assert sample.expand_prompt("<ALICE>, smiling <lora:x:1>", mapping) == (
        "<crossinit:alice:0> <crossinit:alice:1>, smiling <lora:x:1>"
    )
    with pytest.raises(CrossinitError, match="<bob>"):
        sample.expand_prompt("<alice> and <bob>", mapping)


# ---- identities inside the pipeline -------------------------------------------------------------


def test_identity_changes_conditioning_and_pipeline_sees_exactly_its_vectors(pipe: Any) -> None:
    alice = random_vectors(1, scale=5)
    before = _conditioning(pipe, "a photo of smiling")
    mapping = sample.add_identities(pipe, {"alice": alice})
    expanded = sample.expand_prompt("a photo of <alice> smiling", mapping)
    with_alice = _conditioning(pipe, expanded)
    assert not torch.allclose(before, with_alice, atol=1e-3)
    # The vectors, not just the extra tokens, drive the conditioning.
    sample.add_identities(pipe, {"alice": random_vectors(2, scale=5)})
    assert not torch.allclose(with_alice, _conditioning(pipe, expanded), atol=1e-3)
    sample.add_identities(pipe, {"alice": alice})

    spy = EmbeddingSpy(pipe)
    settings = sample.Settings(width=64, height=64, steps=1)
    sample.sample(pipe, expanded, [0], settings)
    rows = spy.rows_for(mapping["alice"].ids)
    assert len(rows) == 1  # once in the prompt; the (empty) negative prompt has none
    assert torch.equal(rows[0], torch.from_numpy(alice))


def test_two_identities_in_one_prompt_each_get_their_own_rows(pipe: Any) -> None:
    alice, bob = random_vectors(1, scale=5), random_vectors(2, k=3, scale=5)
    calls: list[int] = []
    real_resize = pipe.text_encoder.resize_token_embeddings
    pipe.text_encoder.resize_token_embeddings = lambda *a, **k: (calls.append(1), real_resize(*a, **k))[1]
    mapping = sample.add_identities(pipe, {"Alice": alice, "bob": bob})
    assert len(calls) == 1  # one resize for all identities
    assert set(mapping["alice"].ids).isdisjoint(mapping["bob"].ids)
    assert len(mapping["bob"].ids) == 3

    spy = EmbeddingSpy(pipe)
    prompt = sample.expand_prompt("<alice> and <BOB> at the beach", mapping)
    sample.sample(pipe, prompt, [0], sample.Settings(width=64, height=64, steps=1))
    assert torch.equal(spy.rows_for(mapping["alice"].ids)[0], torch.from_numpy(alice))
    assert torch.equal(spy.rows_for(mapping["bob"].ids)[0], torch.from_numpy(bob))


def test_stored_strength_scales_the_offset_from_the_cross_init_start(
    pipe: Any, library: Library, tiny_model: Path
) -> None:
    learned, init = random_vectors(3, scale=5), random_vectors(4, scale=5)
    library.add(Identity(name="alice", tokens=2, width=32, base_model=str(tiny_model)), learned, init)
    library.modify("alice", lambda ident: setattr(ident, "strength", 0.5))
    mapping = sample.add_identities(pipe, {"alice": library.effective_vectors("alice")})
    spy = EmbeddingSpy(pipe)
    sample.sample(pipe, sample.expand_prompt("<alice>", mapping), [0], sample.Settings(width=64, height=64, steps=1))
    seen = spy.rows_for(mapping["alice"].ids)[0].numpy()
    np.testing.assert_allclose(seen, init + 0.5 * (learned - init), rtol=0, atol=1e-6)
    assert not np.allclose(seen, learned, atol=1e-3)


def test_width_mismatch_names_both_widths_and_the_model(pipe: Any) -> None:
    with pytest.raises(CrossinitError, match=r"'wide' has 48-wide .* model 'tiny-sd' has a 32-wide"):
        sample.add_identities(pipe, {"wide": random_vectors(1, width=48, scale=5)}, model="tiny-sd")


def test_truncated_identities_are_reported(pipe: Any) -> None:
    mapping = sample.add_identities(pipe, {"alice": random_vectors(1, scale=5)})
    assert sample.truncated_identities(pipe, sample.expand_prompt("<alice> smiling", mapping), mapping) == []
    long = "smiling " * 80 + "<alice>"
    assert sample.truncated_identities(pipe, sample.expand_prompt(long, mapping), mapping) == ["alice"]


def test_peek_text_width_reads_the_config_without_loading(tiny_model: Path, tmp_path: Path) -> None:
    assert sample.peek_text_width(str(tiny_model)) == 32
    assert sample.peek_text_width(str(tmp_path)) is None
    assert sample.peek_text_width("nobody/not-cached-anywhere") is None


# ---- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [("512x512", (512, 512)), ("768X512", (768, 512)), (" 64x32 ", (64, 32))])
def test_parse_size_accepts_multiples_of_8(text: str, size: tuple[int, int]) -> None:
    assert sample.parse_size(text) == size


@pytest.mark.parametrize("text", ["100x7", "abc", "0x512", "512", "512x-8", "4096x512", "1e3x8", ""])
def test_parse_size_refuses_bad_sizes(text: str) -> None:
    with pytest.raises(CrossinitError, match="--size"):
        sample.parse_size(text)


def test_native_size_is_unet_size_times_vae_scale(pipe: Any) -> None:
    assert sample.native_size(pipe) == (64, 64)


def test_schedulers_by_name_keep_the_models_schedule(pipe: Any) -> None:
    base = dict(pipe.scheduler.config)
    expected = {
        "dpm++": "DPMSolverMultistepScheduler",
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler-a": "EulerAncestralDiscreteScheduler",
        "pndm": "PNDMScheduler",
    }
    assert list(sample.SCHEDULERS) == list(expected)
    for name, cls in expected.items():
        sample.use_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == cls
        assert pipe.scheduler.config.beta_schedule == base["beta_schedule"]
        assert pipe.scheduler.config.prediction_type == base["prediction_type"]
    sample.use_scheduler(pipe, "DPM++")
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    with pytest.raises(CrossinitError, match="dpm\\+\\+, ddim, euler, euler-a, pndm"):
        sample.scheduler_choice("k_lms")


# ---- sampling -----------------------------------------------------------------------------------


def test_a_batch_is_one_unet_batch_and_seeds_reproduce(pipe: Any) -> None:
    batches: list[int] = []
    pipe.unet.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    steps: list[tuple[int, int]] = []
    settings = sample.Settings(width=64, height=64, steps=2)
    first = sample.sample(pipe, "a photo", [5, 6, 7], settings, on_step=lambda d, t: steps.append((d, t)))
    assert batches == [6, 6]  # two steps, three images with their unconditional halves, one batch
    assert steps == [(1, 2), (2, 2)]
    assert [im.size for im in first] == [(64, 64)] * 3

    again = sample.sample(pipe, "a photo", [5, 6, 7], settings)
    other = sample.sample(pipe, "a photo", [8], settings)
    arrays = [np.asarray(im) for im in first]
    for a, b in zip(arrays, again):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], np.asarray(other[0]))
    # An image depends on its own seed, not its place in the batch (up to float rounding).
    alone = np.asarray(sample.sample(pipe, "a photo", [6], settings)[0]).astype(int)
    assert np.abs(alone - arrays[1].astype(int)).max() <= 2


def test_large_batches_are_split(pipe: Any) -> None:
    calls: list[int] = []
    pipe.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    images = sample.sample(pipe, "a photo", [1, 2, 3], sample.Settings(width=32, height=32, steps=1), max_batch=2)
    assert len(images) == 3 and calls == [4, 2]


def test_out_of_memory_halves_the_batch_and_keeps_every_seeds_image(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sample.Settings(width=32, height=32, steps=1)
    alone = [sample.sample(pipe, "a photo", [seed], settings)[0] for seed in (1, 2, 3, 4, 5)]
    real_draw, calls = sample._draw, []

    def draw_within_two(pipe: Any, prompt: str, seeds: list[int], *rest: Any) -> list[Any]:
        calls.append(list(seeds))
        if len(seeds) > 2:  # as if the GPU held two images at a time
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_draw(pipe, prompt, seeds, *rest)

    monkeypatch.setattr(sample, "_draw", draw_within_two)
    images = sample.sample(pipe, "a photo", [1, 2, 3, 4, 5], settings, max_batch=4)
    assert calls == [[1, 2, 3, 4], [1, 2], [3, 4], [5]]
    assert len(images) == 5  # each seed's image, in order (up to the float rounding of batching)
    for image, single in zip(images, alone):
        assert np.abs(np.asarray(image).astype(int) - np.asarray(single).astype(int)).max() <= 2


def test_out_of_memory_on_one_image_is_a_one_line_error(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: Any) -> list[Any]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sample, "_draw", no_memory)
    with pytest.raises(CrossinitError, match=r"out of memory on cpu generating one 32x32 image; try a smaller --size"):
        sample.sample(pipe, "a photo", [1, 2], sample.Settings(width=32, height=32, steps=1))
