"""The frozen UNet's convolutions with their weights packed once for oneDNN, for a training run on the CPU
in fp32 (docs/performance.md#issue-31-third-pass).

At every call, oneDNN reorders a convolution's fp32 weights from PyTorch's layout into its own blocked
one, forward and again for the backward. The UNet is frozen for a whole run, so each stride-1
convolution's weights are packed once for each input size it meets (`torch._C._nn.mkldnn_reorder_conv2d_weight`,
as torch's inductor does for inference) and run through `torch.ops.mkldnn._convolution_pointwise`. Its
input gradient is the same kind of convolution over the output gradient, with the weights transposed
between input and output channels and flipped in space, packed likewise. Measured on SD 2.1's UNet at
512 px on 2 AVX2 cores: forward + backward 10.9 s against 12.4 s (`benchmarks/bench_kernels.py`); the
row gradient equal within 1e-6 of its size (float rounding).

The packs cost a second and a third copy of those weights (4.1 GiB for SD 2.1's UNet in fp32), so a run
packs only where they fit beside its step (`memory.plan`). Only the weights' layout changes: no weight
gradient is ever computed (the UNet is frozen), and the modules are as before once the run ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

ONES = [1, 1]


def available() -> bool:
    """Whether this torch build has the oneDNN operators the packing uses."""
    import torch

    ops = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
    return bool(torch.backends.mkldnn.is_available()) and ops


def packable(module: Any) -> bool:
    """A plain stride-1 2-D convolution (zero padding, no groups, no dilation, padding within the kernel)."""
    import torch

    if not isinstance(module, torch.nn.Conv2d) or isinstance(module.padding, str):
        return False
    plain = module.padding_mode == "zeros" and module.groups == 1 and module.dilation == (1, 1)
    inside = all(p <= k - 1 for p, k in zip(module.padding, module.kernel_size))
    return plain and inside and module.stride == (1, 1)


def pack_bytes(unet: Any) -> int:
    """The memory the packs of `unet`'s packable convolutions take: forward and backward, one input size each."""
    return 2 * sum(m.weight.numel() * m.weight.element_size() for m in unet.modules() if packable(m))


@contextlib.contextmanager
def packed(unet: Any, enabled: bool = True) -> Iterator[None]:
    """`unet`'s packable convolutions run on packed weights within the block (`enabled`), as before after it."""
    if not enabled:
        yield
        return
    convolutions = [m for m in unet.modules() if packable(m)]
    try:
        for module in convolutions:
            module.forward = _PackedConvolution(module)
        yield
    finally:
        for module in convolutions:
            vars(module).pop("forward", None)  # the class's forward again; the packs go with the wrapper


class _PackedConvolution:
    """A convolution's forward on its weights packed for each input size met, with a backward to match."""

    def __init__(self, conv: Any) -> None:
        self.conv = conv
        self.padding = list(conv.padding)
        self.back_padding = [k - 1 - p for k, p in zip(conv.kernel_size, conv.padding)]
        self.ahead: dict[tuple[int, ...], Any] = {}  # input shape -> forward pack
        self.back: dict[tuple[int, ...], Any] = {}  # output gradient shape -> backward pack
        self.function = self._function()

    def __call__(self, x: Any) -> Any:
        weight = self.conv.weight
        if x.device.type != "cpu" or x.dtype != weight.dtype or x.dim() != 4 or not x.is_contiguous():
            return type(self.conv).forward(self.conv, x)  # what the packs were not made for: the stock path
        return self.function.apply(x)

    def _pack(self, packs: dict[tuple[int, ...], Any], shape: Any, backward: bool) -> Any:
        import torch

        key = tuple(shape)
        if key not in packs:
            weight = self.conv.weight.detach()
            if backward:
                weight = weight.transpose(0, 1).flip(2, 3).contiguous()
            padding = self.back_padding if backward else self.padding
            packs[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, ONES, ONES, 1, key)
        return packs[key]

    def _run(self, x: Any, backward: bool) -> Any:
        import torch

        pack = self._pack(self.back if backward else self.ahead, x.shape, backward)
        bias = None if backward else self.conv.bias
        padding = self.back_padding if backward else self.padding
        out = torch.ops.mkldnn._convolution_pointwise(x, pack, bias, padding, ONES, ONES, 1, "none", [], "")
        return out.contiguous()  # oneDNN answers channels-last; the UNet runs in NCHW

    def _function(self) -> Any:
        import torch

        outer = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any) -> Any:
                return outer._run(x, backward=False)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                return outer._run(grad.contiguous(), backward=True)

        return Function
