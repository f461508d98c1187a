"""Simulated and deploy layers of the uniform baselines (``w8a8``, ``w4a4``): per-channel symmetric weights,
per-tensor affine activations calibrated by an observer."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibrate.observers import make_observer
from ..errors import CalibrationDataError, UnsupportedModelError
from ..quantizers.uniform import (affine_params, fake_quantize_affine, qrange, quantize_affine, symmetric_scale)
from .base import QuantModule


def _weight_scale(w: Tensor, bits: int) -> Tensor:
    absmax = w.detach().abs().flatten(1).amax(dim=1)
    return symmetric_scale(absmax, bits).view(-1, *([1] * (w.dim() - 1)))


class _UniformMixin(QuantModule):
    optional_state = ("act_scale", "act_zero_point", "act_ready")

    def _init_quant(self, config: Any, name: str) -> None:
        self.bits_w, self.bits_a = config.bits_w, config.bits_a
        self.layer_name = name
        self.observer = make_observer(config.observer, config.percentile)
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("act_zero_point", torch.tensor(0.0))
        self.register_buffer("act_ready", torch.tensor(False))

    def quant_input(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observer.observe(x)
            return x
        if not bool(self.act_ready):
            return x  # not calibrated yet: weights-only simulation
        qmin, qmax = qrange(self.bits_a, signed=False)
        return fake_quantize_affine(x, self.act_scale, self.act_zero_point, qmin, qmax)

    def quant_weight(self) -> Tensor:
        qmin, qmax = qrange(self.bits_w, signed=True)
        return fake_quantize_affine(self.weight, _weight_scale(self.weight, self.bits_w), torch.zeros(()), qmin, qmax)

    def finish_calibration(self) -> None:
        super().finish_calibration()
        if not self.observer.observed:
            return  # the layer did not run on the calibration data; it keeps weights-only simulation
        lo, hi = self.observer.range()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CalibrationDataError(f"layer {self.layer_name!r}: activation range is not finite ({lo}, {hi})")
        scale, zp = affine_params(lo, hi, self.bits_a)
        self.act_scale.copy_(scale)
        self.act_zero_point.copy_(zp)
        self.act_ready.fill_(True)

    def describe(self) -> dict[str, Any]:
        if not bool(self.act_ready):
            return {"act": "not calibrated"}
        return {"act_scale": float(self.act_scale), "act_zp": int(self.act_zero_point)}

    def _deploy_tensors(self) -> dict[str, Tensor]:
        qmin, qmax = qrange(self.bits_w, signed=True)
        w_scale = _weight_scale(self.weight, self.bits_w)
        return {
            "weight_int": quantize_affine(self.weight.detach(), w_scale, torch.zeros(()), qmin, qmax).to(torch.int8),
            "weight_scale": w_scale.detach().clone(),
        }


class QuantConv2d(_UniformMixin, nn.Conv2d):
    """Conv2d with fake-quantized weights (per channel, symmetric) and input (per tensor, affine)."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: Any, name: str) -> "QuantConv2d":
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        new.calibrating = False
        new._init_quant(config, name)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)

    def to_deploy(self) -> nn.Module:
        return UniformDeployConv2d(self)


class QuantLinear(_UniformMixin, nn.Linear):
    """Linear with fake-quantized weights (per row, symmetric) and input (per tensor, affine)."""

    @classmethod
    def from_float(cls, module: nn.Linear, config: Any, name: str) -> "QuantLinear":
        new = cls(module.in_features, module.out_features, module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        new.calibrating = False
        new._init_quant(config, name)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def to_deploy(self) -> nn.Module:
        return UniformDeployLinear(self)


class _UniformDeploy(nn.Module):
    """Deploy form: int8 weight codes (4-bit schemes use the int4 range of int8) + per-channel scale; the input is
    quantized to its calibrated unsigned grid and both operands dequantized (exact integer values, float GEMM)."""

    def __init__(self, sim: _UniformMixin) -> None:
        super().__init__()
        if not bool(sim.act_ready):
            # without a calibrated activation grid there is no integer input to deploy: refuse instead of
            # silently deploying a weights-only layer
            raise UnsupportedModelError(
                f"layer {sim.layer_name!r} ({type(sim).__name__}) was not calibrated (calibrate never ran, or no "
                "calibration batch reached it); run quantkit.calibrate(model, data) (or quantkit.quantize) with data "
                "that exercises it before convert / export")
        self.bits_w, self.bits_a = sim.bits_w, sim.bits_a
        for k, v in sim._deploy_tensors().items():
            self.register_buffer(k, v)
        self.register_buffer("act_scale", sim.act_scale.detach().clone())
        self.register_buffer("act_zero_point", sim.act_zero_point.detach().clone())
        self.register_buffer("act_ready", sim.act_ready.detach().clone())
        self.register_buffer("bias", None if sim.bias is None else sim.bias.detach().clone())

    def dequant_input(self, x: Tensor) -> Tensor:
        # always calibrated (checked when built): no data-dependent branch, so torch.export / compile trace it
        qmin, qmax = qrange(self.bits_a, signed=False)
        q = quantize_affine(x, self.act_scale, self.act_zero_point, qmin, qmax)
        return (q - self.act_zero_point) * self.act_scale

    def weight(self) -> Tensor:
        return self.weight_int.float() * self.weight_scale


class UniformDeployConv2d(_UniformDeploy):
    def __init__(self, sim: QuantConv2d) -> None:
        super().__init__(sim)
        self.stride, self.padding, self.dilation, self.groups = sim.stride, sim.padding, sim.dilation, sim.groups
        self.padding_mode = sim.padding_mode
        self._rp = sim._reversed_padding_repeated_twice

    def forward(self, x: Tensor) -> Tensor:
        x = self.dequant_input(x)
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self._rp, mode=self.padding_mode), self.weight(), self.bias, self.stride, 0,
                            self.dilation, self.groups)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class UniformDeployLinear(_UniformDeploy):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.dequant_input(x), self.weight(), self.bias)
