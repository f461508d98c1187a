"""XNOR-Net style binary layers (``xnor`` scheme): sign(W) scaled by mean|W| per output channel, sign(x) inputs."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers.binary import binary_sign, sign_ste, xnor_weight
from .base import NotQuantizable, QuantModule
from .binary_deploy import BinaryDeployConv2d, BinaryDeployLinear, affine_epilogue


class XnorConv2d(QuantModule, nn.Conv2d):
    """Binary conv: y = conv(sign(x), mean|W_o| * sign(W_o)) (+ bias). Zero padding is applied after the sign, so
    padded taps are 0, not -1/+1 (what the packed kernel computes exactly)."""

    bits_w, bits_a = 1, 1

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: Any, name: str) -> "XnorConv2d":
        if module.padding_mode != "zeros":
            raise NotQuantizable(f"padding_mode={module.padding_mode!r} is not supported by binary kernels")
        if module.groups != 1:
            raise NotQuantizable(f"grouped/depthwise conv (groups={module.groups}) is not binarized")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, 1, module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict())
        new.calibrating = False
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(sign_ste(x), xnor_weight(self.weight), self.bias)

    def to_deploy(self) -> BinaryDeployConv2d:
        w = self.weight.detach()
        epilogue = affine_epilogue(w.abs().flatten(1).mean(dim=1), bias=None if self.bias is None else self.bias.detach())
        return BinaryDeployConv2d.from_signs(binary_sign(w), epilogue, stride=self.stride, padding=self.padding,
                                             dilation=self.dilation)


class XnorLinear(QuantModule, nn.Linear):
    """Binary linear: y = sign(x) @ (mean|W_o| * sign(W_o))^T (+ bias)."""

    bits_w, bits_a = 1, 1

    @classmethod
    def from_float(cls, module: nn.Linear, config: Any, name: str) -> "XnorLinear":
        new = cls(module.in_features, module.out_features, module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict())
        new.calibrating = False
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(sign_ste(x), xnor_weight(self.weight), self.bias)

    def to_deploy(self) -> BinaryDeployLinear:
        w = self.weight.detach()
        epilogue = affine_epilogue(w.abs().mean(dim=1), bias=None if self.bias is None else self.bias.detach())
        return BinaryDeployLinear.from_signs(binary_sign(w), epilogue)
