"""Training the two new rows (paper steps 4-5, docs/method.md#the-steps-and-where-they-are) on the tiny model:
what moves, where it goes, and how."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crossinit_cli import captions, crossinit, objective, train
from crossinit_cli.devices import Placement, load_pipeline
from crossinit_cli.errors import CrossinitError

DATA = Path(__file__).parent / "data"
CPU = Placement("cpu", "fp32", "tests")


@pytest.fixture(scope="module")
def crops() -> list:
    from crossinit_cli.faces import align_faces

    return [c.image for c in align_faces([DATA / "astronaut.png", DATA / "grace_hopper.jpg"], 64)]


def _run(model: Path, crops: list, *, vae_calls: list | None = None, run: dict | None = None, **overrides):
    """Train on a freshly loaded pipeline (train.run moves and changes it); returns (result, pipe, table before)."""
    pipe = load_pipeline(str(model))
    table_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    if vae_calls is not None:
        encode = pipe.vae.encode
        pipe.vae.encode = lambda x: (vae_calls.append(len(x)), encode(x))[1]
    settings = {"steps": 4, "batch_size": 2, **overrides}
    parts = train.ModelParts.of_pipeline(pipe)
    result = train.run(parts, crops, init, train.TrainConfig(**settings), CPU, train.RunHooks(**(run or {})))
    return result, pipe, table_before


def test_only_the_two_new_rows_change(tiny_model: Path, crops: list) -> None:
    result, pipe, before = _run(tiny_model, crops)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = result.token_ids
    assert len(ids) == 2 and min(ids) >= before.shape[0]  # new rows, appended to the vocabulary
    assert torch.equal(after[: before.shape[0]], before)  # every existing token means what it meant
    assert np.allclose(after[ids].numpy(), result.learned)  # the pipeline now holds the learned rows
    assert result.learned.shape == result.init.shape == (2, 32) and result.learned.dtype == np.float32
    moved = np.linalg.norm(result.learned - result.init, axis=1)
    assert (moved > 1e-3).all(), moved
    assert len(result.losses) == 4 and np.isfinite(result.losses).all()


def test_init_is_the_cross_init(tiny_model: Path, crops: list) -> None:
    pipe = load_pipeline(str(tiny_model))
    expected = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None).numpy()
    result, _, _ = _run(tiny_model, crops, steps=1)
    assert np.array_equal(result.init, expected)


def test_large_reg_weight_pulls_toward_the_start(tiny_model: Path, crops: list) -> None:
    free, _, _ = _run(tiny_model, crops, steps=8, reg_weight=0.0)
    held, _, _ = _run(tiny_model, crops, steps=8, reg_weight=10.0)
    drift_free = np.linalg.norm(free.learned - free.init, axis=1).mean()
    drift_held = np.linalg.norm(held.learned - held.init, axis=1).mean()
    assert drift_held < 0.5 * drift_free, (drift_held, drift_free)


def test_regulariser_is_the_plain_l2_distance() -> None:
    rows, start = torch.zeros(2, 4), torch.zeros(2, 4)
    rows[0, 0], rows[1] = 3.0, torch.tensor([0.0, 0.0, 4.0, 0.0])
    # mean of ||v_i - v0_i||_2 over the two rows = (3 + 4) / 2, times λ; squared would give 12.5.
    assert objective.regulariser(rows, start, 2.0).item() == pytest.approx(2.0 * 3.5, rel=1e-5)


def test_training_lowers_the_loss(tiny_model: Path, crops: list) -> None:
    # Same seed, same draws (photos, flips, captions, t, noise): the only difference is whether the two
    # rows learn. Pairing the steps removes the noise of the random timesteps from the comparison.
    frozen, _, _ = _run(tiny_model, crops, steps=12, lr=0.0)
    trained, _, _ = _run(tiny_model, crops, steps=12, lr=0.05)
    assert frozen.losses[0] == pytest.approx(trained.losses[0])
    gain = np.array(frozen.losses[-6:]) - np.array(trained.losses[-6:])
    # Small on a random tiny model, but systematic: positive for every seed tried (0-4).
    assert gain.mean() > 0, (frozen.losses, trained.losses)


def test_v_prediction_trains_on_the_velocity(tiny_model: Path, tiny_model_v: Path, crops: list) -> None:
    from diffusers import DDPMScheduler

    pipe = load_pipeline(str(tiny_model_v))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert scheduler.config.prediction_type == "v_prediction"
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # Salimans & Ho's v
    assert torch.allclose(objective.loss_target(scheduler, latents, noise, t), velocity, atol=1e-6)
    epsilon = DDPMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "epsilon"})
    assert torch.equal(objective.loss_target(epsilon, latents, noise, t), noise)

    # The two fixtures have the same weights; only the target differs, and so does the loss.
    v_result, _, _ = _run(tiny_model_v, crops, steps=2)
    eps_result, _, _ = _run(tiny_model, crops, steps=2)
    assert np.isfinite(v_result.losses).all()
    assert v_result.losses[0] != pytest.approx(eps_result.losses[0], rel=1e-3)


def test_unknown_prediction_type_is_a_clear_error() -> None:
    class Scheduler:
        class config:  # noqa: N801 - mimics diffusers' config attribute
            prediction_type = "sample"

    with pytest.raises(CrossinitError, match="predicts 'sample'"):
        objective.loss_target(Scheduler(), torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_same_seed_same_rows_other_seed_other_rows(tiny_model: Path, crops: list) -> None:
    first, _, _ = _run(tiny_model, crops, seed=3)
    again, _, _ = _run(tiny_model, crops, seed=3)
    other, _, _ = _run(tiny_model, crops, seed=4)
    assert np.array_equal(first.learned, again.learned) and first.losses == again.losses
    assert not np.allclose(first.learned, other.learned)


def test_each_photo_goes_through_the_vae_once(tiny_model: Path, crops: list) -> None:
    calls: list[int] = []
    _run(tiny_model, crops, steps=6, vae_calls=calls)
    assert sum(calls) == 2 * len(crops)  # every crop and its mirror image, whatever the number of steps


def test_divergence_stops_with_advice(tiny_model: Path, crops: list) -> None:
    with pytest.raises(CrossinitError, match="diverged.*--dtype fp32 or a lower --lr"):
        _run(tiny_model, crops, steps=5, lr=1e30)


def test_modes_and_overrides() -> None:
    fast, full = train.TrainConfig.for_mode("fast"), train.TrainConfig.for_mode("full")
    assert (fast.steps, fast.batch_size, fast.lr) == (25, 8, 0.005)
    assert (full.steps, full.batch_size, full.lr, full.reg_weight) == (320, 8, 0.005, 1e-5)
    tuned = train.TrainConfig.for_mode("fast", steps=40, lr=None, seed=9)
    assert (tuned.steps, tuned.lr, tuned.seed) == (40, 0.005, 9)
    with pytest.raises(CrossinitError, match="steps must be at least 1"):
        train.TrainConfig.for_mode("full", steps=0)
    with pytest.raises(CrossinitError, match="unknown mode"):
        train.TrainConfig.for_mode("turbo")


def test_batch_size_without_lr_scales_the_rate_as_the_official_scale_lr() -> None:
    assert train.TrainConfig.for_mode("full", batch_size=4).lr == 0.0025
    assert train.TrainConfig.for_mode("fast", batch_size=16).lr == 0.01
    assert train.TrainConfig.for_mode("full", batch_size=4, lr=0.001).lr == 0.001  # an explicit rate wins
    assert train.TrainConfig.for_mode("full", lr=0.001, batch_size=None).lr == 0.001


def test_out_of_memory_advice_keeps_the_rate_per_image() -> None:
    default = train.oom_advice(train.TrainConfig.for_mode("full"), 512)
    assert default == (
        "try --micro-batch 4 (same result), --resolution 256, --batch-size 4 --steps 640 (same rate per image), "
        "or --device cpu"
    )
    own = train.oom_advice(train.TrainConfig.for_mode("full", batch_size=8, lr=0.002, steps=100), 64, 1)
    assert own == "try --batch-size 4 --steps 200 --lr 0.001 (same rate per image), or --device cpu"
    alone = train.oom_advice(train.TrainConfig.for_mode("fast", batch_size=1), 1024)
    assert alone == "try --resolution 512, or --device cpu"
    assert (
        train.oom_advice(train.TrainConfig.for_mode("fast", batch_size=1), 64)
        == "try --device cpu, or a smaller --model"
    )


def test_captions_are_the_official_templates() -> None:
    assert len(captions.TEMPLATES) == 81 and captions.TEMPLATES[0] == "a photo of a {}"
    assert "an illustration of my {}" in captions.TEMPLATES and "a depiction of the large {}" in captions.TEMPLATES
    assert all(t.count("{}") == 1 for t in captions.TEMPLATES)
    assert captions.TEMPLATES[0].format(crossinit.PHRASE) == "a photo of a face of <v0> <v1> person"


def test_resolution_follows_the_model(tiny_model: Path) -> None:
    pipe = load_pipeline(str(tiny_model))
    assert train.model_resolution(pipe.unet, pipe.vae) == 64


def test_mixed_precision_path_keeps_the_rows_in_fp32(tiny_model: Path, crops: list) -> None:
    # The CUDA recipe (bf16 autocast, UNet weights in bf16, rows and AdamW in fp32) run on the CPU.
    pipe = load_pipeline(str(tiny_model))
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    config = train.TrainConfig(steps=3, batch_size=2)
    result = train.run(train.ModelParts.of_pipeline(pipe), crops, init, config, Placement("cpu", "bf16", "tests"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32
    assert result.learned.dtype == np.float32 and result.dtype == "bf16"
    assert np.isfinite(result.losses).all() and not np.allclose(result.learned, result.init)


def test_a_run_resumed_from_any_saved_state_ends_bit_for_bit_where_the_whole_run_ends(
    tiny_model: Path, crops: list
) -> None:
    """Two photos, batch 3: each checkpoint falls mid-shuffle, so the pending data order and every
    generator must come back exactly; snapshots and losses continue too."""
    saved: list[dict] = []
    settings = {"steps": 12, "batch_size": 3, "seed": 5}
    whole, _, _ = _run(tiny_model, crops, run={"snapshot_every": 4, "save_state": saved.append}, **settings)
    assert [s["step"] for s in saved] == [5, 10]  # every CHECKPOINT_EVERY steps, not at the end
    assert sorted(whole.snapshots) == [4, 8, 12]
    for state in saved:
        resumed, _, _ = _run(tiny_model, crops, run={"snapshot_every": 4, "resume_from": state}, **settings)
        assert np.array_equal(resumed.learned, whole.learned) and resumed.losses == whole.losses
        for step in whole.snapshots:
            assert np.array_equal(resumed.snapshots[step]["learned"], whole.snapshots[step]["learned"])
    # Without the generators' states (a fresh draw of the data order and noise) the run goes elsewhere.
    broken = {**saved[0], "rng": {**saved[0]["rng"], "noise": torch.Generator().manual_seed(99).get_state()}}
    other, _, _ = _run(tiny_model, crops, run={"resume_from": broken}, **settings)
    assert not np.array_equal(other.learned, whole.learned)


def test_ctrl_c_saves_the_last_whole_step(tiny_model: Path, crops: list, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[dict] = []
    calls = {"n": 0}
    real = objective.regulariser

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-way through step 4: its forward ran, its update did not
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "regulariser", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, crops, run={"save_state": saved.append}, steps=12, batch_size=2)
    assert [s["step"] for s in saved] == [3] and len(saved[0]["losses"]) == 3
