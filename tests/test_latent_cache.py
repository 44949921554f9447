"""The crops' latents kept between runs (latents.py, the library's `.cache/latents/`): a photo learned again on
the same model skips the VAE and learns the same rows; another VAE, a damaged file or an unwritable cache
encode again; removing an identity deletes its face's latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crossinit_cli import encoding, latents, train
from crossinit_cli.devices import Placement, load_pipeline
from crossinit_cli.store import Library
from tests.test_train import _run

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
CPU = Placement("cpu", "fp32", "tests")


@pytest.fixture(scope="module")
def crops() -> list:
    from crossinit_cli.faces import align_faces

    return [c.image for c in align_faces([ASTRONAUT, DATA / "grace_hopper.jpg"], 64)]


def _encode(model: Path, crops: list, cache: Path | None, *, nudge: float = 0.0) -> tuple[encoding.Latents, list[int]]:
    """encoding.encode_crops on a fresh pipeline: (the latents, the batch size of each VAE call)."""
    pipe = load_pipeline(str(model))
    if nudge:
        with torch.no_grad():
            pipe.vae.encoder.conv_in.weight.add_(nudge)
    calls: list[int] = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda x: (calls.append(len(x)), encode(x))[1]
    setup = train._setup(train.ModelParts.of_pipeline(pipe), train.TrainConfig(), CPU)
    return encoding.encode_crops(pipe.vae, crops, setup.placement, setup.size, cache), calls


def test_a_photo_learned_again_skips_the_vae_and_learns_the_same_rows(
    tiny_model: Path, crops: list, tmp_path: Path
) -> None:
    cache = tmp_path / "latents"
    uncached, _, _ = _run(tiny_model, crops)
    first_calls: list[int] = []
    first, _, _ = _run(tiny_model, crops, vae_calls=first_calls, run={"latent_cache": cache})
    again_calls: list[int] = []
    again, _, _ = _run(tiny_model, crops, vae_calls=again_calls, run={"latent_cache": cache})
    assert first_calls == [2, 2] and again_calls == []  # each crop with its mirror image, then none
    assert len(list(cache.glob("*.safetensors"))) == len(crops)
    assert np.array_equal(again.learned, first.learned) and again.losses == first.losses
    assert np.array_equal(first.learned, uncached.learned)  # the cache changes nothing but the time


def test_a_new_photo_beside_cached_ones_is_the_only_one_encoded(tiny_model: Path, crops: list, tmp_path: Path) -> None:
    cache = tmp_path / "latents"
    _encode(tiny_model, crops[:1], cache)
    both, calls = _encode(tiny_model, crops, cache)
    assert calls == [2]
    fresh, _ = _encode(tiny_model, crops, None)
    # Rows: the photos, then their mirror images; each photo's latents do not depend on the others.
    assert torch.equal(both.mean, fresh.mean) and torch.equal(both.std, fresh.std)
    assert both.mean.shape[0] == 4 and not torch.equal(both.mean[0], both.mean[2])


def test_another_vae_encoder_misses_the_cache(tiny_model: Path, crops: list, tmp_path: Path) -> None:
    cache = tmp_path / "latents"
    before, _ = _encode(tiny_model, crops, cache)
    nudged, calls = _encode(tiny_model, crops, cache, nudge=0.01)
    assert calls == [2, 2] and not torch.allclose(nudged.mean, before.mean)
    assert len(list(cache.glob("*.safetensors"))) == 2 * len(crops)  # both kept, under different keys


@pytest.mark.parametrize("damage", ["garbage", "wrong shape"])
def test_a_damaged_file_is_encoded_again_and_rewritten(
    tiny_model: Path, crops: list, tmp_path: Path, damage: str
) -> None:
    from safetensors.torch import save_file

    cache = tmp_path / "latents"
    before, _ = _encode(tiny_model, crops[:1], cache)
    (file,) = cache.glob("*.safetensors")
    if damage == "garbage":
        file.write_bytes(b"\0not safetensors")
    else:
        save_file({"mean": torch.zeros(3, 4), "std": torch.zeros(3, 4)}, str(file))
    again, calls = _encode(tiny_model, crops[:1], cache)
    assert calls == [2] and torch.equal(again.mean, before.mean) and torch.equal(again.std, before.std)
    mean, std = latents.read(file)
    assert torch.equal(mean[0], before.mean[0]) and torch.equal(std[1], before.std[1])


def test_an_unwritable_cache_does_not_stop_training(tiny_model: Path, crops: list, tmp_path: Path) -> None:
    blocked = tmp_path / "a file"
    blocked.write_text("in the way")
    done, calls = _encode(tiny_model, crops[:1], blocked / "latents")
    assert calls == [2] and done.mean.shape[0] == 2 and blocked.read_text() == "in the way"


def test_learn_reads_the_cache_and_remove_deletes_the_faces_latents(
    cli, library: Library, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cheap = ("--steps", "2", "--batch-size", "1", "--model", tiny_model, "--quiet")
    encoded: list[int] = []
    pair = encoding._encode_pair
    monkeypatch.setattr(encoding, "_encode_pair", lambda *a: (encoded.append(1), pair(*a))[1])
    for name in ("ann", "bea"):
        result = cli("learn", ASTRONAUT, "--name", name, *cheap)
        assert result.exit_code == 0, result.stderr
    assert encoded == [1]  # bea's photo was read from ann's run
    np.testing.assert_array_equal(library.vectors("ann").learned, library.vectors("bea").learned)
    folder = latents.folder(library.home)
    assert len(list(folder.glob("*.safetensors"))) == 1
    assert cli("remove", "ann", "--yes").exit_code == 0
    assert list(folder.glob("*.safetensors")) == []  # the face's latents went with the identity
    assert library.get("bea").name == "bea"


def test_removing_an_unfinished_run_deletes_its_faces_latents(
    cli, library: Library, tiny_model: Path, crops: list
) -> None:
    """A learn stopped before the end keeps its crops in `.unfinished/`; `remove` clears the run and the
    latents its crops were encoded to, and leaves another photo's."""
    from crossinit_cli import checkpoint

    checkpoint.start(library.home, {"name": "ann", "steps": 10}, crops[:1])
    folder = latents.folder(library.home)
    _encode(tiny_model, crops, folder)
    assert len(list(folder.glob("*.safetensors"))) == 2
    result = cli("remove", "ann", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "unfinished run" in result.stderr
    (left,) = folder.glob("*.safetensors")
    assert left.name.startswith(latents.crop_digest(crops[1]))
