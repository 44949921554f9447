"""Micro-batches (issue 21): a batch put through the UNet a few images at a time, its gradients added up,
learns the rows the whole batch learns; the choice of how many fits the free memory (memory.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossinit_cli import crossinit, memory, objective, train
from crossinit_cli.batches import BatchEntry, read_manifest
from crossinit_cli.devices import Placement, load_pipeline
from crossinit_cli.errors import CrossinitError
from crossinit_cli.store import Library

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
CPU = Placement("cpu", "fp32", "tests")
GIB = 1024**3
SD21_UNET = (320, 640, 1280, 1280)
# A strong regulariser, so that one added per micro-batch instead of once per step would show in the rows.
SETTINGS = {"steps": 4, "batch_size": 4, "seed": 7, "reg_weight": 0.5, "lr": 0.02}


@pytest.fixture(scope="module")
def crops() -> list:
    from crossinit_cli.faces import align_faces

    return [c.image for c in align_faces([DATA / "astronaut.png", DATA / "grace_hopper.jpg"], 64)]


def _run(
    model: Path,
    crops: list,
    micro_batch: int | None,
    hooks: dict | None = None,
    checkpointing: str = "auto",
    **overrides,
):
    """Train on a freshly loaded pipeline; returns (result, the batch sizes the UNet was called with)."""
    pipe = load_pipeline(str(model))
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    seen: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    config = train.TrainConfig(**{**SETTINGS, **overrides})
    parts = train.ModelParts.of_pipeline(pipe)
    run_hooks = train.RunHooks(**(hooks or {}))
    result = train.run(parts, crops, init, config, CPU, run_hooks, memory=train.StepMemory(micro_batch, checkpointing))
    return result, seen


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_micro_batches_learn_the_rows_of_the_whole_batch(tiny_model: Path, crops: list, micro_batch: int) -> None:
    whole, whole_calls = _run(tiny_model, crops, 4)
    split, split_calls = _run(tiny_model, crops, micro_batch)
    assert whole_calls == [4] * 4  # one UNet call a step
    parts = {1: [1, 1, 1, 1], 2: [2, 2], 3: [3, 1]}[micro_batch]
    assert split_calls == parts * 4  # really split: the UNet never saw more than the micro-batch
    assert np.allclose(split.learned, whole.learned, rtol=0, atol=5e-6), np.abs(split.learned - whole.learned).max()
    assert not np.allclose(split.learned, split.init, atol=1e-3)  # the rows moved: the comparison means something
    assert split.losses == pytest.approx(whole.losses, rel=1e-5)  # the whole batch's loss, not a part's
    assert split.micro_batch.size == micro_batch and split.micro_batch.reason == "asked for"


def test_the_regulariser_counts_once_a_step(tiny_model: Path, crops: list, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = objective.regulariser
    monkeypatch.setattr(objective, "regulariser", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _run(tiny_model, crops, 1)
    assert len(calls) == SETTINGS["steps"]  # not once per micro-batch (that would be 16)


def test_a_run_resumes_with_another_micro_batch_to_the_same_rows(tiny_model: Path, crops: list) -> None:
    saved: list[dict] = []
    steps = {"steps": 7, "batch_size": 3}
    whole, _ = _run(tiny_model, crops, None, {"save_state": saved.append}, **steps)
    assert whole.micro_batch.size == 3 and saved[0]["step"] == 5
    resumed, calls = _run(tiny_model, crops, 1, {"resume_from": saved[0]}, **steps)
    assert calls == [1] * 3 * 2  # the two steps left, one image at a time
    assert np.allclose(resumed.learned, whole.learned, rtol=0, atol=5e-6)
    assert resumed.losses[:5] == whole.losses[:5] and resumed.losses[5:] == pytest.approx(whole.losses[5:], rel=1e-5)


def test_a_micro_batch_below_one_is_refused(tiny_model: Path, crops: list) -> None:
    with pytest.raises(CrossinitError, match="--micro-batch must be at least 1, not 0"):
        _run(tiny_model, crops, 0)


def test_the_automatic_choice_splits_only_what_does_not_fit() -> None:
    per_item = 2 * GIB
    whole = memory.choose(8, None, per_item, 40 * GIB)
    assert (whole.size, whole.split) == (8, False)
    assert whole.reason == "fits: the whole batch needs ~16.0 GiB, 40.0 GiB is free"
    # 10 GiB free: 85% of it holds 4 images, so 8 goes in 2 parts of 4; 7 GiB holds 2 (and 5 goes in 2 + 2 + 1).
    assert memory.choose(8, None, per_item, 10 * GIB).size == 4
    assert memory.choose(8, None, per_item, 7 * GIB).size == 2
    assert memory.choose(5, None, per_item, 7 * GIB).size == 2
    tight = memory.choose(8, None, per_item, GIB)
    assert tight.size == 1 and "one at a time, and it may not fit" in tight.reason
    assert memory.choose(8, None, per_item, None) == memory.MicroBatch(8, 8, "the free memory is unknown here")
    asked = memory.choose(8, 16, per_item, None)
    assert (asked.size, asked.reason) == (8, "asked for: the whole batch")
    assert memory.choose(8, 2, per_item, 40 * GIB).describe() == "micro-batch 2 of batch 8 (asked for)"


def test_sd21_at_512_px_on_a_16_gb_laptop_takes_a_few_images_at_a_time() -> None:
    """SD 2.1-base's UNet at 512 px (latent 64): the estimate from its peak memory (docs/performance.md),
    against the ~5-10 GiB a 16 GB machine has left once the 5 GB of weights are loaded."""
    fp32 = memory.item_bytes(SD21_UNET, 64, "fp32")
    assert 1.2 * GIB < fp32 < 2.2 * GIB
    assert memory.item_bytes(SD21_UNET, 96, "fp32") == pytest.approx(2.25 * fp32, rel=1e-3)  # 768 px: the area
    assert memory.item_bytes(SD21_UNET, 64, "bf16") < fp32
    assert memory.choose(8, None, fp32, 5 * GIB).size == 2
    assert memory.choose(8, None, fp32, 10 * GIB).size == 4
    assert memory.choose(8, None, fp32, 64 * GIB).size == 8


def test_free_memory_is_what_the_system_would_still_give() -> None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo on this system")
    total = int(next(line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")).split()[1])
    free = memory.free_bytes("cpu")
    assert free is not None and 0 < free <= total * 1024


def test_a_container_memory_limit_caps_the_free_memory(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 * GIB}\n")
    (v2 / "memory.current").write_text(f"{5 * GIB}\n")
    (v2 / "memory.stat").write_text(f"anon 1\ninactive_file {GIB}\n")
    assert memory._cgroup_room(v2) == 4 * GIB  # 8 - 5, plus the file cache it would drop
    (v2 / "memory.max").write_text("max\n")
    assert memory._cgroup_room(v2) is None  # no limit
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    assert memory._cgroup_room(v1) is None
    (v1 / "memory.limit_in_bytes").write_text(f"{3 * GIB}\n")
    assert memory._cgroup_room(v1) == 2 * GIB


def test_the_process_own_cgroup_is_read_before_the_root(tmp_path: Path) -> None:
    listing = tmp_path / "cgroup"
    listing.write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/user.slice/run\n")
    root = tmp_path / "fs"
    assert memory._cgroup_dirs(root, listing) == [
        root / "memory" / "docker" / "abc",
        root / "user.slice" / "run",
        root,
        root / "memory",
    ]
    assert memory._cgroup_dirs(root, tmp_path / "missing") == [root, root / "memory"]


def test_out_of_memory_advice_offers_micro_batches_first() -> None:
    config = train.TrainConfig.for_mode("fast")
    assert train.oom_advice(config, 512) == (
        "try --micro-batch 4 (same result), --resolution 256, --batch-size 4 --steps 50 (same rate per image), "
        "or --device cpu"
    )
    assert train.oom_advice(config, 512, 1).startswith("try --resolution 256, --batch-size 4")


def test_out_of_memory_in_a_step_names_the_micro_batch_and_the_advice(
    tiny_model: Path, crops: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "_part_loss", exhausted)
    with pytest.raises(CrossinitError) as error:
        _run(tiny_model, crops, 2)
    assert str(error.value) == (
        "out of memory on cpu at batch size 4 (micro-batch 2) and 64 px; try --micro-batch 1 (same result), "
        "--batch-size 2 --steps 8 --lr 0.01 (same rate per image), or --device cpu"
    )
    # At a micro-batch of 1 with checkpointing off, checkpointing is what is left that keeps the result.
    with pytest.raises(CrossinitError) as error:
        _run(tiny_model, crops, 1, checkpointing="off")
    assert "(micro-batch 1) and 64 px; try --checkpointing on (same result), --batch-size 2" in str(error.value)
    with pytest.raises(CrossinitError) as error:
        _run(tiny_model, crops, 1, checkpointing="on")
    assert "--checkpointing" not in str(error.value)


def test_learn_records_the_micro_batch_and_says_it(cli, library: Library, tiny_model: Path) -> None:
    result = cli("-v", "learn", ASTRONAUT, "--steps", "2", "--batch-size", "2", "--micro-batch", "1",
                 "--model", tiny_model, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "micro-batch 1 of batch 2 (asked for)" in result.stderr
    training = json.loads(result.stdout)["training"]
    assert (training["micro_batch"], training["micro_batch_reason"]) == (1, "asked for")
    assert training["batch_size"] == 2  # the batch (and so the result) is unchanged
    auto = cli("learn", ASTRONAUT, "--name", "auto", "--steps", "2", "--batch-size", "2", "--model", tiny_model)
    assert auto.exit_code == 0, auto.stderr
    assert "micro-batch" not in auto.stderr  # not split, not verbose: nothing to say
    record = library.get("auto").training
    assert record["micro_batch"] == 2 and record["micro_batch_reason"].startswith("fits: the whole batch needs ~")
    one, two = library.vectors("astronaut"), library.vectors("auto")
    assert np.allclose(one.learned, two.learned, rtol=0, atol=5e-6)


def test_learn_refuses_a_micro_batch_of_zero(cli, tiny_model: Path) -> None:
    result = cli("learn", ASTRONAUT, "--micro-batch", "0", "--model", tiny_model)
    assert result.exit_code == 2 and "--micro-batch" in result.stderr


def test_a_batch_manifest_takes_a_micro_batch_column(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    manifest = tmp_path / "people.csv"
    manifest.write_text("name,photos,micro_batch\nalice,a.jpg,2\nbob,a.jpg,\n")
    defaults = BatchEntry(mode="fast", seed=0, align=True, micro_batch=4)
    assert [j.micro_batch for j in read_manifest(manifest, defaults)] == [2, 4]
    manifest.write_text("name,photos,micro_batch\nalice,a.jpg,0\n")
    with pytest.raises(CrossinitError, match="people.csv:2: micro_batch must be at least 1, not 0"):
        read_manifest(manifest, defaults)


def test_learn_resume_continues_with_another_micro_batch(cli, library: Library, home: Path, tiny_model: Path) -> None:
    """A run killed mid-way goes on one image at a time (less memory) to the rows of an unsplit run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from crossinit_cli import checkpoint

    settings = ("--steps", "30", "--batch-size", "2", "--seed", "4", "--model", str(tiny_model))
    command = [sys.executable, "-m", "crossinit_cli", "learn", str(ASTRONAUT), "--name", "alice", *settings]
    process = subprocess.Popen(command, env={**os.environ, "CROSSINIT_HOME": str(home)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while (run := checkpoint.find(home, "alice")) is None or run.step < 5:
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1]
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert 5 <= checkpoint.find(home, "alice").step < 30
    resumed = cli("-v", "learn", "--resume", "alice", "--micro-batch", "1")
    assert resumed.exit_code == 0, resumed.stderr
    assert "micro-batch 1 of batch 2 (asked for)" in resumed.stderr
    assert library.get("alice").training["micro_batch"] == 1
    reference = cli("learn", ASTRONAUT, "--name", "reference", *settings, "--micro-batch", "2", "--quiet")
    assert reference.exit_code == 0, reference.stderr
    one, two = library.vectors("alice"), library.vectors("reference")
    assert np.allclose(one.learned, two.learned, rtol=0, atol=5e-6)
    assert library.get("alice").training["final_loss"] == pytest.approx(library.get("reference").training["final_loss"])


# ---- gradient checkpointing, chosen by memory (issue 31) -------------------------------------------


def test_checkpointing_learns_the_same_rows(tiny_model: Path, crops: list) -> None:
    """On and off: the same rows within float rounding, and on really recomputes (each block runs twice a step)."""
    results, block_calls = {}, {}
    for on in ("off", "on"):
        pipe = load_pipeline(str(tiny_model))
        init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
        calls: list[int] = []
        pipe.unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        config = train.TrainConfig(**SETTINGS)
        results[on] = train.run(
            train.ModelParts.of_pipeline(pipe), crops, init, config, CPU, memory=train.StepMemory(checkpointing=on)
        )
        block_calls[on] = len(calls)
        assert not pipe.unet.is_gradient_checkpointing  # left as it was found
    off, on = results["off"], results["on"]
    assert block_calls == {"off": SETTINGS["steps"], "on": 2 * SETTINGS["steps"]}
    assert np.allclose(on.learned, off.learned, rtol=0, atol=5e-6), np.abs(on.learned - off.learned).max()
    assert not np.allclose(on.learned, on.init, atol=1e-3)  # the rows moved: the comparison means something
    assert on.losses == pytest.approx(off.losses, rel=1e-5)
    assert (on.micro_batch.checkpointing, on.micro_batch.checkpointing_reason) == (True, "asked for")
    assert (off.micro_batch.checkpointing, off.micro_batch.checkpointing_reason) == (False, "asked for")


def test_checkpointing_is_on_only_where_an_image_would_not_fit_without_it() -> None:
    per_item = (4 * GIB, 1 * GIB)  # without, with checkpointing
    roomy = memory.plan(8, None, "auto", per_item, 40 * GIB)
    assert (roomy.checkpointing, roomy.size) == (False, 8)
    assert roomy.checkpointing_reason == "1 image needs ~4.0 GiB without it, 40.0 GiB is free: no recomputation"
    # 10 GiB free: one image fits without it, so the batch is split instead (no compute is added).
    split = memory.plan(8, None, "auto", per_item, 10 * GIB)
    assert (split.checkpointing, split.size) == (False, 2)
    # 4 GiB free: not one image without it; with it, 3 fit in 85%, so 8 goes in 3 + 3 + 2.
    tight = memory.plan(8, None, "auto", per_item, 4 * GIB)
    assert (tight.checkpointing, tight.size) == (True, 3)
    assert tight.checkpointing_reason == "1 image needs ~4.0 GiB without it, 4.0 GiB is free"
    # A micro-batch asked for is what has to fit without it.
    assert memory.plan(8, 4, "auto", per_item, 10 * GIB).checkpointing is True
    assert memory.plan(8, 2, "auto", per_item, 10 * GIB).checkpointing is False
    # Forced either way, whatever the memory; unknown memory: the family's default.
    assert memory.plan(8, None, "on", per_item, 40 * GIB).checkpointing is True
    assert memory.plan(8, None, "off", per_item, 1 * GIB).checkpointing is False
    assert memory.plan(8, None, "auto", per_item, None, default=True).checkpointing is True
    assert memory.plan(8, None, "auto", per_item, None, default=False).checkpointing is False
    assert "gradient checkpointing on (asked for)" in memory.plan(8, 2, "on", per_item, None).describe()


def test_sdxl_without_checkpointing_costs_its_measured_5_gb_an_image() -> None:
    """SDXL at 512 px in fp32: ~5.5 GB an image unsplit (measured), 1.6 GB checkpointed; SD 2.1's is unchanged."""
    sdxl = (320, 640, 1280)
    plain = memory.item_estimate(sdxl, 64, "fp32", "sdxl", checkpointing=False)
    checkpointed = memory.item_estimate(sdxl, 64, "fp32", "sdxl", checkpointing=True)
    assert 5.0e9 < plain < 6.0e9 and 1.4e9 < checkpointed < 1.8e9
    assert memory.item_estimate(SD21_UNET, 64, "fp32", "sd2", checkpointing=False) == memory.item_bytes(
        SD21_UNET, 64, "fp32"
    )
    assert memory.item_estimate(SD21_UNET, 64, "fp32", "sd2", checkpointing=True) < memory.item_bytes(
        SD21_UNET, 64, "fp32"
    )


def test_learn_records_whether_it_checkpointed_and_why(cli, library: Library, tiny_model: Path) -> None:
    common = ("--steps", "2", "--batch-size", "2", "--model", tiny_model)
    forced = cli("-v", "learn", ASTRONAUT, *common, "--checkpointing", "on", "--json")
    assert forced.exit_code == 0, forced.stderr
    assert "gradient checkpointing on (asked for)" in forced.stderr
    training = json.loads(forced.stdout)["training"]
    assert (training["checkpointing"], training["checkpointing_reason"]) == (True, "asked for")
    auto = cli("learn", ASTRONAUT, "--name", "auto", *common)
    assert auto.exit_code == 0, auto.stderr
    record = library.get("auto").training
    assert record["checkpointing"] is False and record["checkpointing_reason"].endswith("no recomputation")
    shown = cli("show", "auto", "--json")
    assert json.loads(shown.stdout)["training"]["checkpointing"] is False
    one, two = library.vectors("astronaut"), library.vectors("auto")
    assert np.allclose(one.learned, two.learned, rtol=0, atol=5e-6)
    wrong = cli("learn", ASTRONAUT, "--checkpointing", "sometimes", "--model", tiny_model)
    assert wrong.exit_code == 2 and "--checkpointing" in wrong.stderr
