"""Packed convolution weights (packedconv.py): on the CPU in fp32 the frozen UNet's stride-1 convolutions run
on weights packed once for oneDNN, forward and backward. Same outputs and input gradients as the stock
convolutions within float rounding, the same rows learned, the modules as before after the run, and packed
only where the packs fit in the free memory (memory.with_packing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossinit_cli import crossinit, memory, packedconv, train
from crossinit_cli.devices import Placement, load_pipeline
from crossinit_cli.store import Library
from tests.test_microbatch import ASTRONAUT, GIB, SETTINGS

pytestmark = pytest.mark.skipif(not packedconv.available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize(
    ("channels", "kernel", "padding", "side"),
    [((8, 16), 3, 1, 12), ((16, 8), 1, 0, 9), ((6, 10), 3, 0, 7), ((4, 12), 5, 2, 10)],
)
def test_a_packed_convolution_gives_the_stock_output_and_input_gradient(channels, kernel, padding, side) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(*channels, kernel, padding=padding).requires_grad_(False)
    model = torch.nn.Sequential(conv, torch.nn.SiLU())
    x = torch.randn(2, channels[0], side, side)
    target = torch.randn_like(model(x))

    def output_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        inputs = x.clone().requires_grad_(True)
        out = model(inputs)
        (out - target).square().mean().backward()
        return out.detach(), inputs.grad

    stock = output_and_gradient()
    ran: list[int] = []
    with packedconv.packed(model):
        wrapper = vars(conv)["forward"]
        original = wrapper._run
        wrapper._run = lambda y, backward: ran.append(backward) or original(y, backward)
        packed = output_and_gradient()
        again = output_and_gradient()  # the packs are made once and used again
        assert (len(wrapper.ahead), len(wrapper.back)) == (1, 1)
    assert ran == [False, True, False, True]  # the forward and the input gradient, each time on the packs
    assert "forward" not in vars(conv)  # the module's own forward again
    for got, want in zip(packed, stock):
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert all(torch.equal(a, b) for a, b in zip(packed, again))
    assert torch.equal(output_and_gradient()[1], stock[1])  # unpacked: the stock numbers, bit for bit


def test_only_plain_stride_1_convolutions_are_packed() -> None:
    assert packedconv.packable(torch.nn.Conv2d(4, 4, 3, padding=1))
    assert packedconv.packable(torch.nn.Conv2d(4, 4, 1))
    assert not packedconv.packable(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1))  # the UNet's downsamplers
    assert not packedconv.packable(torch.nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not packedconv.packable(torch.nn.Conv2d(4, 4, 3, padding=1, dilation=2))
    assert not packedconv.packable(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not packedconv.packable(torch.nn.Conv2d(4, 4, 3, padding="same"))
    assert not packedconv.packable(torch.nn.Linear(4, 4))
    convs = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 8, 3, stride=2))
    assert packedconv.pack_bytes(convs) == 2 * 8 * 4 * 3 * 3 * 4  # forward and backward packs of the first


def test_packed_only_where_the_packs_fit_beside_the_step() -> None:
    per_item = (4 * GIB, 1 * GIB)  # one image's step without, with checkpointing
    roomy = memory.with_packing(memory.plan(2, None, "auto", per_item, 40 * GIB), per_item, 4 * GIB, 40 * GIB)
    assert roomy.packed is True
    assert roomy.packed_reason == "~4.0 GiB of packs beside a step of ~8.0 GiB, 40.0 GiB is free"
    assert "convolution weights packed (~4.0 GiB of packs" in roomy.describe()
    tight = memory.with_packing(memory.plan(2, None, "auto", per_item, 12 * GIB), per_item, 4 * GIB, 12 * GIB)
    assert (tight.size, tight.packed) == (2, False)  # the step fits, the packs beside it do not (85% of 12)
    assert "convolution weights not packed" in tight.describe()
    checkpointed = memory.plan(2, None, "on", per_item, 8 * GIB)
    assert memory.with_packing(checkpointed, per_item, 4 * GIB, 8 * GIB).packed is True  # 2 x 1 GiB + 4 GiB
    unknown = memory.with_packing(memory.plan(2, None, "auto", per_item, None), per_item, 1, None)
    assert (unknown.packed, unknown.packed_reason) == (False, "the free memory is unknown here")


@pytest.fixture(scope="module")
def crops() -> list:
    from crossinit_cli.faces import align_faces

    return [c.image for c in align_faces([ASTRONAUT], 64)]


def _learn(model: Path, crops: list, *, packing: bool, monkeypatch: pytest.MonkeyPatch):
    free = 64 * GIB if packing else 1  # as much free memory as the decision needs, or none to spare
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    pipe = load_pipeline(str(model))
    init = crossinit.cross_init(pipe.tokenizer, pipe.text_encoder, None)
    used: list[bool] = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: used.append("forward" in vars(m)))
    config = train.TrainConfig(**{**SETTINGS, "batch_size": 2})
    cpu = Placement("cpu", "fp32", "tests")
    result = train.run(train.ModelParts.of_pipeline(pipe), crops, init, config, cpu, memory=train.StepMemory(2, "off"))
    assert not any("forward" in vars(m) for m in pipe.unet.modules())  # left as it was found
    return result, used


def test_training_on_packed_convolutions_learns_the_same_rows(
    tiny_model: Path, crops: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed, used = _learn(tiny_model, crops, packing=True, monkeypatch=monkeypatch)
    stock, stock_used = _learn(tiny_model, crops, packing=False, monkeypatch=monkeypatch)
    assert set(used) == {True} and set(stock_used) == {False}
    assert (packed.micro_batch.packed, stock.micro_batch.packed) == (True, False)
    assert np.allclose(packed.learned, stock.learned, rtol=0, atol=5e-6), np.abs(packed.learned - stock.learned).max()
    assert not np.allclose(packed.learned, packed.init, atol=1e-3)  # the rows moved: the comparison means something
    assert packed.losses == pytest.approx(stock.losses, rel=1e-5)


def test_learn_records_whether_it_packed(cli, library: Library, tiny_model: Path) -> None:
    done = cli("-v", "learn", ASTRONAUT, "--steps", "1", "--model", tiny_model, "--json")
    assert done.exit_code == 0, done.stderr
    assert "convolution weights packed (~" in done.stderr  # a tiny model's packs fit anywhere
    assert json.loads(done.stdout)["training"]["packed_convolutions"] is True
    assert library.get("astronaut").training["packed_convolutions"] is True
