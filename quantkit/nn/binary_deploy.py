"""Deploy layers for binary (1-bit weights x 1-bit activations) convolutions and linears.

They hold only packed weights (int32 words, layout in :mod:`quantkit.ops.layout`) and per-channel float32 epilogue
constants, binarize + pack their float input (bit = x >= ``in_threshold``), and run the XNOR/popcount kernels of
:mod:`quantkit.ops.binary`. Any binary layer whose binarized operands are affine in the signs,

    a_b = alpha_a * s_a + c_a,     w_b[o] = alpha_w[o] * s_w[o] + beta_w[o],

maps onto them (the epilogue of ``binary_conv2d`` / ``binary_linear`` carries the affine terms, exact at padded
borders). XNOR-Net is the case alpha_a = 1, c_a = 0, beta_w = 0; AdaBin uses all four terms.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops


def _vec(v: Tensor | float | None, n: int) -> Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32).detach().clone()
    return t.expand(n).clone() if t.numel() == 1 else t.reshape(n).clone()


def affine_epilogue(alpha_w: Tensor, beta_w: Tensor | None, alpha_a: Tensor | float, c_a: Tensor | float,
                    bias: Tensor | None) -> dict[str, Tensor | None]:
    """Epilogue constants of the bitwise form (ALGORITHMS.md §2.4) for a_b = alpha_a s_a + c_a and
    w_b = alpha_w s_w + beta_w:  y = alpha_w alpha_a SUM(s_w s_a) + beta_w alpha_a SUM(s_a)
    + alpha_w c_a SUM(s_w) + n beta_w c_a + bias."""
    alpha_w = alpha_w.detach().float().flatten()
    n = alpha_w.numel()
    alpha_a = torch.as_tensor(alpha_a, dtype=torch.float32).detach()
    c_a = torch.as_tensor(c_a, dtype=torch.float32).detach()
    beta = None if beta_w is None else beta_w.detach().float().flatten()
    return {
        "scale": _vec(alpha_w * alpha_a, n),
        "act_sum_scale": None if beta is None else _vec(beta * alpha_a, n),
        "weight_sum_scale": None if not bool(c_a.abs().sum()) else _vec(alpha_w * c_a, n),
        "count_scale": None if beta is None or not bool(c_a.abs().sum()) else _vec(beta * c_a, n),
        "bias": None if bias is None else _vec(bias, n),
    }


class _BinaryDeploy(nn.Module):
    _EPILOGUE = ("scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias")

    def _register(self, weight_packed: Tensor, in_threshold: Tensor | float, epilogue: dict) -> None:
        self.register_buffer("weight_packed", weight_packed.contiguous())
        self.register_buffer("in_threshold", torch.as_tensor(in_threshold, dtype=torch.float32).detach().clone())
        for name in self._EPILOGUE:
            self.register_buffer(name, epilogue.get(name))

    def _epilogue_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in self._EPILOGUE}

    def _threshold_for(self, channels: int) -> Tensor | None:
        t = self.in_threshold
        if t.numel() == 1:
            return None if float(t) == 0.0 else t.expand(channels).to(torch.float32)
        return t


class BinaryDeployConv2d(_BinaryDeploy):
    """Packed binary conv2d: NCHW float input -> sign bits (x >= in_threshold) packed NHWC -> ``binary_conv2d``."""

    def __init__(self, weight_packed: Tensor, in_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], in_threshold: Tensor | float,
                 epilogue: dict) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(weight_packed.shape[0])
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._register(weight_packed, in_threshold, epilogue)

    @classmethod
    def from_weight(cls, weight: Tensor, *, scale: Tensor, bias: Tensor | None, stride, padding, dilation,
                    weight_center: Tensor | None = None, alpha_a: Tensor | float = 1.0, c_a: Tensor | float = 0.0,
                    in_threshold: Tensor | float = 0.0) -> "BinaryDeployConv2d":
        """From a float weight: s_w = sign(W - weight_center) per output channel, alpha_w = ``scale``."""
        w = weight.detach()
        centered = w if weight_center is None else w - weight_center.detach().view(-1, 1, 1, 1)
        epi = affine_epilogue(scale, weight_center, alpha_a, c_a, bias)
        return cls(ops.pack_conv_weight(centered), w.shape[1], w.shape[2:], stride, padding, dilation, in_threshold, epi)

    def forward(self, x: Tensor) -> Tensor:
        xp = ops.pack_activation_nhwc(x, self._threshold_for(x.shape[1]))
        return ops.binary_conv2d(xp, self.weight_packed, self.in_channels, self.stride, self.padding, self.dilation,
                                 **self._epilogue_kwargs())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, packed 1-bit weights")


class BinaryDeployLinear(_BinaryDeploy):
    """Packed binary linear: float input (..., K) -> sign bits (x >= in_threshold) -> ``binary_linear``."""

    def __init__(self, weight_packed: Tensor, in_features: int, in_threshold: Tensor | float, epilogue: dict) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(weight_packed.shape[0])
        if epilogue.get("weight_sum_scale") is not None or epilogue.get("count_scale") is not None:
            raise ValueError("BinaryDeployLinear: fold the SUM(s_w) and count terms into the bias (from_weight does)")
        self._register(weight_packed, in_threshold, epilogue)

    @classmethod
    def from_weight(cls, weight: Tensor, *, scale: Tensor, bias: Tensor | None, weight_center: Tensor | None = None,
                    alpha_a: Tensor | float = 1.0, c_a: Tensor | float = 0.0,
                    in_threshold: Tensor | float = 0.0) -> "BinaryDeployLinear":
        w = weight.detach()
        centered = w if weight_center is None else w - weight_center.detach().view(-1, 1)
        epi = affine_epilogue(scale, weight_center, alpha_a, c_a, bias)
        k = w.shape[1]
        folded = torch.zeros(w.shape[0]) if epi["bias"] is None else epi["bias"].clone()
        if epi["weight_sum_scale"] is not None:
            wsum = torch.where(centered >= 0, 1.0, -1.0).sum(dim=1).float()
            folded += epi["weight_sum_scale"] * wsum
        if epi["count_scale"] is not None:
            folded += epi["count_scale"] * k
        epi["bias"] = folded
        epi["weight_sum_scale"] = epi["count_scale"] = None
        return cls(ops.pack_linear_weight(centered), k, in_threshold, epi)

    def forward(self, x: Tensor) -> Tensor:
        xp = ops.pack_bits(x, self._threshold_for(x.shape[-1]))
        return ops.binary_linear(xp, self.weight_packed, self.in_features, scale=self.scale,
                                 act_sum_scale=self.act_sum_scale, bias=self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed 1-bit weights"
