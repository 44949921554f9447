"""Method fidelity across families (issue 20): SDXL's gradient checkpointing, its size and crop conditioning
from the photo, the regulariser's weight per row, and every encoder's norms in the training record."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossinit_cli import checkpoint, crossinit, faces, families, objective, train
from crossinit_cli.devices import Placement, load_pipeline
from crossinit_cli.families import SizeCondition
from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
GRACE = DATA / "grace_hopper.jpg"  # 512 x 600: not square
CPU = Placement("cpu", "fp32", "tests")
CHEAP = ("--steps", "2", "--batch-size", "1", "--quiet")


@pytest.fixture(scope="module")
def crops() -> list[Image.Image]:
    return [c.image for c in faces.align_faces([ASTRONAUT, GRACE], 64)]


def _sdxl_parts(model: Path, **family_changes: Any) -> tuple[Any, train.ModelParts, list[torch.Tensor]]:
    pipe = load_pipeline(str(model))
    family = replace(families.of_pipeline(pipe), **family_changes)
    slots = families.slots(pipe, family)
    return pipe, train.ModelParts.of_pipeline(pipe, family, slots), crossinit.cross_init_slots(slots)


# ---- 1. gradient checkpointing holds with the UNet in eval mode -----------------------------------


def _up_block_calls(model: Path, crops: list, *, checkpointing: bool) -> tuple[int, set[bool]]:
    """How many times one up-block resnet runs in a 1-step run, and the UNet's training flag meanwhile."""
    pipe, parts, init = _sdxl_parts(model)
    calls: list[bool] = []
    resnet = pipe.unet.up_blocks[0].resnets[0]
    resnet.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    train.run(
        parts,
        crops[:1],
        init,
        train.TrainConfig(steps=1, batch_size=1),
        CPU,
        memory=train.StepMemory(checkpointing="on" if checkpointing else "off"),
    )
    return len(calls), set(calls)


def test_sdxl_training_recomputes_the_unet_blocks_in_backward_with_the_unet_in_eval_mode(
    tiny_sdxl: Path, crops: list
) -> None:
    # A checkpointed block runs twice a step: in the forward, and again in the backward, which recomputes
    # its activations instead of holding them. diffusers 0.30-0.31 skip that in eval mode (their blocks
    # test `self.training`): there this test counts 1 (pyproject.toml's floor is 0.32 for it).
    once, _ = _up_block_calls(tiny_sdxl, crops, checkpointing=False)
    twice, modes = _up_block_calls(tiny_sdxl, crops, checkpointing=True)
    assert once == 1 and twice == 2, (once, twice)
    assert modes == {False}  # eval mode throughout, as the UNet is frozen


def test_pyproject_asks_for_the_diffusers_that_checkpoints_in_eval_mode() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert '"diffusers>=0.32"' in pyproject


# ---- 3. the regulariser per row as the official code weights it -----------------------------------


def _official_gradient(row: torch.Tensor, start: torch.Tensor, weight: float) -> torch.Tensor:
    """d/dv of the official `λ · mean over its 2 rows of ||v_i − v⁰_i||₂`: λ/2 · the unit vector from v⁰_i."""
    difference = row - start
    return weight / row.shape[0] * difference / difference.norm(dim=1, keepdim=True)


def test_each_sdxl_row_gets_the_official_regulariser_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    starts = [torch.randn(2, 32, generator=generator), torch.randn(2, 64, generator=generator)]
    rows = [(s + torch.randn(s.shape, generator=generator)).requires_grad_() for s in starts]
    weight = 1e-5
    objective.regulariser_all(rows, starts, weight).backward()
    for row, start in zip(rows, starts):
        expected = _official_gradient(row.detach(), start, weight)
        torch.testing.assert_close(row.grad, expected, rtol=1e-4, atol=1e-12)
        # Each row's pull is λ/2, as on SD 2.1; the mean over SDXL's four rows gave λ/4.
        np.testing.assert_allclose(row.grad.norm(dim=1).numpy(), [weight / 2] * 2, rtol=1e-4)


def test_the_one_encoder_regulariser_is_unchanged_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(2, 1024, generator=generator)
    row = start + torch.randn(2, 1024, generator=generator)
    official = 1e-5 * F.pairwise_distance(row, start, p=2).mean()
    assert torch.equal(objective.regulariser_all([row], [start], 1e-5), official)


# ---- 2. SDXL's size and crop conditioning from the photo ------------------------------------------


def test_an_aligned_face_claims_the_size_it_had_in_the_photo(tmp_path: Path) -> None:
    face = faces.align_face(ASTRONAUT, 64)
    condition = face.size_condition(1024)
    side = condition.original_size[0]
    assert condition.original_size == (side, side) and condition.crop_top_left == (0, 0)
    assert 100 < side < 512  # the face's square, not the 512 px photo nor the 1024 px target
    # The same face in a photo twice as large claims twice the size; the target size changes nothing.
    large = tmp_path / "large.png"
    with Image.open(ASTRONAUT) as image:
        image.resize((1024, 1024), Image.Resampling.LANCZOS).save(large)
    doubled = faces.align_face(large, 64).size_condition(512).original_size[0]
    assert doubled == pytest.approx(2 * side, rel=0.03)


def test_without_alignment_the_photo_is_the_original_and_its_centre_square_the_crop() -> None:
    # As diffusers' SDXL text-to-image example conditions a centre crop: the photo's (height, width), and the
    # square's offset (600 - 512) / 2 = 44 px from the top, scaled to the training size.
    crop = faces.align_face(GRACE, 64, align=False)
    assert crop.size_condition(1024) == SizeCondition((600, 512), (88, 0))
    assert crop.size_condition(256) == SizeCondition((600, 512), (22, 0))
    assert crop.size_condition(1024).time_ids(1024) == [600, 512, 88, 0, 1024, 1024]


def test_each_batch_item_carries_its_own_photos_time_ids_and_a_flip_keeps_them(
    tiny_sdxl: Path, crops: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import UNet2DConditionModel

    sizes = [SizeCondition((300, 300)), SizeCondition((600, 512), (6, 0))]
    drawn: list[list[int]] = []
    seen: list[torch.Tensor] = []
    draw, forward = train._draw_batch, UNet2DConditionModel.forward
    monkeypatch.setattr(train, "_draw_batch", lambda *a: (lambda r: (drawn.append(r[0]), r)[1])(draw(*a)))

    def recording(self: Any, *args: Any, added_cond_kwargs: Any = None, **kwargs: Any) -> Any:
        seen.append(added_cond_kwargs["time_ids"].detach().clone())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    _, parts, init = _sdxl_parts(tiny_sdxl)
    train.run(parts, crops, init, train.TrainConfig(steps=4, batch_size=4), CPU, sizes=sizes)
    assert len(drawn) == len(seen) == 4
    items = [item for step in drawn for item in step]
    assert {i % 2 for i in items} == {0, 1} and any(i >= 2 for i in items)  # both photos, some mirrored
    for step, time_ids in zip(drawn, seen):
        expected = [sizes[item % 2].time_ids(64) for item in step]  # row i + 2 is photo i mirrored
        assert time_ids.tolist() == expected


def test_sdxl_micro_batches_carry_each_items_time_ids_and_learn_the_whole_batchs_rows(
    tiny_sdxl: Path, crops: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import UNet2DConditionModel

    sizes = [SizeCondition((300, 300)), SizeCondition((600, 512), (6, 0))]
    seen: list[list[list[int]]] = []
    forward = UNet2DConditionModel.forward

    def recording(self: Any, *args: Any, added_cond_kwargs: Any = None, **kwargs: Any) -> Any:
        seen.append(added_cond_kwargs["time_ids"].tolist())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    config = train.TrainConfig(steps=3, batch_size=4, seed=3, reg_weight=0.5, lr=0.02)
    results = []
    for micro_batch in (4, 1):
        _, parts, init = _sdxl_parts(tiny_sdxl)
        results.append(train.run(parts, crops, init, config, CPU, sizes=sizes, memory=train.StepMemory(micro_batch)))
    whole, split = seen[:3], seen[3:]
    assert [len(t) for t in split] == [1] * 12  # one item a UNet call
    assert [row for call in split for row in call] == [row for call in whole for row in call]  # same items' ids
    for key, (learned, start) in results[1].parts.items():
        assert np.allclose(learned, results[0].parts[key][0], rtol=0, atol=5e-6), key
        assert not np.allclose(learned, start, atol=1e-3)


def test_learn_records_each_photos_size_conditioning(cli, library: Library, tiny_sdxl: Path) -> None:
    result = cli("learn", ASTRONAUT, GRACE, "--name", "alice", "--model", tiny_sdxl, *CHEAP)
    assert result.exit_code == 0, result.stderr
    recorded = library.get("alice").training["size_conditioning"]
    expected = [faces.align_face(p, 64).size_condition(64).to_record() for p in (ASTRONAUT, GRACE)]
    assert recorded == [{"photo": "astronaut.png", **expected[0]}, {"photo": "grace_hopper.jpg", **expected[1]}]

    result = cli("learn", GRACE, "--no-align", "--name", "bob", "--model", tiny_sdxl, *CHEAP)
    assert result.exit_code == 0, result.stderr
    (bob,) = library.get("bob").training["size_conditioning"]
    # 44 px from the top of a 512 px square, at 64 px: 5.5, rounded to even.
    assert bob == {"photo": "grace_hopper.jpg", "original_size": [600, 512], "crops_coords_top_left": [6, 0]}


def test_sd_models_have_no_size_conditioning_to_record(cli, library: Library, tiny_model: Path) -> None:
    assert cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_model, *CHEAP).exit_code == 0
    assert "size_conditioning" not in library.get("alice").training


def test_a_resumed_run_keeps_the_size_conditioning_it_started_with(
    cli, library: Library, home: Path, tiny_sdxl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import UNet2DConditionModel

    calls = {"n": 0}
    real = objective.regulariser

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # SDXL: two encoders, two calls a step; this is step 3's
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "regulariser", interrupted)
    result = cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_sdxl, "--steps", "6", "--batch-size", "1")
    assert result.exit_code == 130, result.stderr
    monkeypatch.setattr(objective, "regulariser", real)
    run = checkpoint.find(home, "alice")
    assert run is not None and run.step == 2
    started = faces.align_face(ASTRONAUT, 64).size_condition(64).to_record()
    assert run.settings["size_conditioning"] == [started]
    damaged = {**run.settings, "size_conditioning": [{"original_size": "large"}]}
    checkpoint._write_json(run.path / checkpoint.RUN, damaged)
    result = cli("learn", "--resume", "alice", "--quiet")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "the checkpoint of 'alice' is damaged" in result.stderr and not library.exists("alice")
    # What the checkpoint says is what the rest of the run uses, whatever the photo would give today.
    kept = {"original_size": [123, 123], "crops_coords_top_left": [0, 0]}
    checkpoint._write_json(run.path / checkpoint.RUN, {**run.settings, "size_conditioning": [kept]})
    seen: list[list[float]] = []
    forward = UNet2DConditionModel.forward

    def recording(self: Any, *args: Any, added_cond_kwargs: Any = None, **kwargs: Any) -> Any:
        seen.extend(added_cond_kwargs["time_ids"].tolist())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    assert cli("learn", "--resume", "alice", "--quiet").exit_code == 0
    assert len(seen) == 4 and all(row == [123, 123, 0, 0, 64, 64] for row in seen)
    assert library.get("alice").training["size_conditioning"] == [{"photo": "astronaut.png", **kept}]


# ---- 5. every encoder's norms in the training record ----------------------------------------------


def _vocabulary_mean(text_encoder: Any) -> float:
    return float(text_encoder.get_input_embeddings().weight.detach().norm(dim=1).mean())


def test_sdxl_record_holds_every_encoders_init_learned_and_vocabulary_norms(
    cli, library: Library, tiny_sdxl: Path
) -> None:
    assert cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_sdxl, *CHEAP).exit_code == 0
    shown = json.loads(cli("show", "alice", "--json").stdout)
    norms = shown["training"]["norms"]
    assert list(norms) == ["clip_l", "clip_g"]
    vectors = library.vectors("alice")
    pipe = load_pipeline(str(tiny_sdxl))  # a fresh model: its table is the vocabulary alone
    for (key, (learned, init)), encoder in zip(vectors.parts.items(), (pipe.text_encoder, pipe.text_encoder_2)):
        np.testing.assert_allclose(norms[key]["init"], np.linalg.norm(init, axis=1), atol=1e-4)
        np.testing.assert_allclose(norms[key]["learned"], np.linalg.norm(learned, axis=1), atol=1e-4)
        assert norms[key]["vocabulary_mean"] == pytest.approx(_vocabulary_mean(encoder), abs=1e-4)
    assert norms["clip_l"]["learned"] != norms["clip_l"]["init"]
    assert "training.norms" in cli("show", "alice").stdout  # and in the table, on one line of JSON


def test_sd_record_holds_its_one_encoders_norms(cli, library: Library, tiny_model: Path) -> None:
    assert cli("learn", ASTRONAUT, "--name", "alice", "--model", tiny_model, *CHEAP).exit_code == 0
    norms = library.get("alice").training["norms"]
    (key,) = norms
    vectors = library.vectors("alice")
    np.testing.assert_allclose(norms[key]["init"], np.linalg.norm(vectors.init, axis=1), atol=1e-4)
    np.testing.assert_allclose(norms[key]["learned"], np.linalg.norm(vectors.learned, axis=1), atol=1e-4)
    pipe = load_pipeline(str(tiny_model))
    assert norms[key]["vocabulary_mean"] == pytest.approx(_vocabulary_mean(pipe.text_encoder), abs=1e-4)
