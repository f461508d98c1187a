"""Simulated and deploy layers of the uniform baselines (``w8a8``, ``w4a4``): per-channel symmetric weights,
per-tensor affine activations calibrated by an observer."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibrate.observers import make_observer
from ..errors import CalibrationDataError, UnsupportedModelError
from ..ops import int8 as int8_ops
from ..quantizers.uniform import (affine_params, fake_quantize_affine, fake_quantize_bias, qrange, quantize_affine,
                                   symmetric_scale)
from .base import QuantModule


def _weight_scale(w: Tensor, bits: int) -> Tensor:
    absmax = w.detach().abs().flatten(1).amax(dim=1)
    return symmetric_scale(absmax, bits).view(-1, *([1] * (w.dim() - 1)))


def output_grid_params(scale: Tensor, zero_point: Tensor) -> tuple[float, float, int]:
    """(s, 1 / s in float32, z) of an output grid as Python numbers, for :func:`round_to_output_grid`."""
    s = scale.detach().float().reshape(())
    return float(s), float(1.0 / s), int(zero_point)


def round_to_output_grid(y: Tensor, scale: float, inv_scale: float, zero_point: int, bits: int, qmin: int, *,
                         in_place: bool = False) -> Tensor:
    """A layer's output rounded to its unsigned ``bits``-bit affine grid (uniform affine quantization, Jacob et al.,
    CVPR 2018):

    forward:  y_hat = (clamp(round_half_even(y * (1 / s)) + z, qmin, 2^b - 1) - z) * s, with 1 / s in float32;
              ``qmin = z`` applies a ReLU first (codes below z are the negative values, which the ReLU sends to
              0 = code z), ``qmin = 0`` does not
    backward: dy_hat/dy = 1 where the code is inside [qmin, 2^b - 1], else 0 (straight-through estimator).

    ``in_place=True`` (deploy layers, on the fresh output of their kernel; no gradient) overwrites ``y`` op by op: it
    is memory-bound, and in place it costs about 1/10 of an out-of-place chain or of the fused fake-quantize op. The
    simulated layer uses ``torch.fake_quantize_per_tensor_affine`` (one op with the straight-through gradient);
    under torch.compile / torch.export, which have no fake kernel for that op, the same operations run one by one.
    All three give the same floats."""
    qmax = 2**bits - 1
    if in_place:
        return y.mul_(inv_scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    if not torch.compiler.is_compiling():
        return torch.fake_quantize_per_tensor_affine(y, scale, zero_point, qmin, qmax)
    return (torch.clamp(torch.round(y * inv_scale) + zero_point, qmin, qmax) - zero_point) * scale


class _UniformMixin(QuantModule):
    optional_state = ("act_scale", "act_zero_point", "act_ready", "out_scale", "out_zero_point", "out_ready")
    #: None: float output. Otherwise the output (after a ReLU when ``output_relu``) is rounded to an unsigned affine
    #: grid of this many bits, calibrated by a min/max observer: set by the scheme on convs whose output feeds a
    #: residual Add, so integer runtimes can requantize it in the conv's epilogue (see enable_output_quant)
    output_bits: int | None = None
    output_relu: bool = False

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

    def enable_output_quant(self, bits: int = 8, relu: bool = False) -> None:
        """Round this layer's output to a calibrated ``bits``-bit affine grid (applying the ReLU that follows it
        first when ``relu``: the model's own ReLU is then the identity on it). A conv whose output is summed with
        a residual branch has no later quantizer to requantize into; this grid lets onnxruntime run it as
        ``QLinearConv`` (integer requantization) instead of a float Conv, at the cost of one 8-bit rounding."""
        self.output_bits, self.output_relu = int(bits), bool(relu)
        self.out_observer = make_observer("minmax", 100.0)
        self.register_buffer("out_scale", torch.tensor(1.0))
        self.register_buffer("out_zero_point", torch.tensor(0.0))
        self.register_buffer("out_ready", torch.tensor(False))

    def quant_output(self, y: Tensor) -> Tensor:
        if self.output_bits is None:
            return y
        if self.calibrating or not bool(self.out_ready):
            y = F.relu(y) if self.output_relu else y
            if self.calibrating:
                self.out_observer.observe(y)
            return y
        scale, inv, zp = output_grid_params(self.out_scale, self.out_zero_point)
        return round_to_output_grid(y, scale, inv, zp, self.output_bits, zp if self.output_relu else 0)

    def quant_weight(self) -> Tensor:
        qmin, qmax = qrange(self.bits_w, signed=True)
        return fake_quantize_affine(self.weight, _weight_scale(self.weight, self.bits_w), torch.zeros(()), qmin, qmax)

    def quant_bias(self) -> Tensor | None:
        """The bias on the int32 grid of the accumulator (scale s_x * s_w[o]) once the input is calibrated, the
        form integer runtimes (onnxruntime QLinearConv / QGemm) add; the float bias before calibration."""
        if self.bias is None or not bool(self.act_ready):
            return self.bias
        return fake_quantize_bias(self.bias, self.act_scale * _weight_scale(self.weight, self.bits_w).reshape(-1))

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
        if self.output_bits is not None and self.out_observer.observed:
            lo, hi = self.out_observer.range()
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise CalibrationDataError(f"layer {self.layer_name!r}: output range is not finite ({lo}, {hi})")
            scale, zp = affine_params(lo, hi, self.output_bits)
            self.out_scale.copy_(scale)
            self.out_zero_point.copy_(zp)
            self.out_ready.fill_(True)

    def describe(self) -> dict[str, Any]:
        if not bool(self.act_ready):
            return {"act": "not calibrated"}
        info = {"act_scale": float(self.act_scale), "act_zp": int(self.act_zero_point)}
        if self.output_bits is not None and bool(self.out_ready):
            info.update(out_bits=self.output_bits, out_scale=float(self.out_scale), out_zp=int(self.out_zero_point))
        return info

    def _deploy_tensors(self) -> dict[str, Tensor]:
        qmin, qmax = qrange(self.bits_w, signed=True)
        w_scale = _weight_scale(self.weight, self.bits_w)
        bias = self.quant_bias()
        return {
            "weight_int": quantize_affine(self.weight.detach(), w_scale, torch.zeros(()), qmin, qmax).to(torch.int8),
            "weight_scale": w_scale.detach().clone(),
            "bias": None if bias is None else bias.detach().clone(),
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
        return self.quant_output(self._conv_forward(self.quant_input(x), self.quant_weight(), self.quant_bias()))

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
        return self.quant_output(F.linear(self.quant_input(x), self.quant_weight(), self.quant_bias()))

    def to_deploy(self) -> nn.Module:
        return UniformDeployLinear(self)


def _refresh_after_load(module: "_UniformDeploy", _incompatible_keys: Any) -> None:
    module._refresh()


class _UniformDeploy(nn.Module):
    """Deploy form: int8 weight codes (4-bit schemes use the int4 range of int8), per-channel scale, the int32-grid
    bias. A calibrated layer runs on the integer kernels (:mod:`quantkit.ops.int8`: the input is quantized to its
    unsigned grid, u8 x s8 -> int32 products, one fused dequantizing epilogue); an uncalibrated one (weights-only
    simulation) runs the float op on the dequantized weight.

    Derived tensors (packed weight, weight sums) are non-persistent buffers rebuilt whenever a state_dict is loaded,
    and which path runs is a Python attribute fixed at the same moments: forward has no data-dependent branch."""

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
        self.act_qmax = qrange(self.bits_a, signed=False)[1]
        # the output grid, when the simulated layer rounds its output (a calibrated one; else the output stays float)
        ready = sim.output_bits is not None and bool(sim.out_ready)
        self.output_bits, self.output_relu = (sim.output_bits, sim.output_relu) if ready else (None, False)
        if ready:
            self.register_buffer("out_scale", sim.out_scale.detach().clone())
            self.register_buffer("out_zero_point", sim.out_zero_point.detach().clone())
        self._refresh()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _flat_weight(self) -> Tensor:
        return self.weight_int.flatten(1)

    def _refresh(self) -> None:
        """Recompute the derived tensors from the stored codes (after construction and after load_state_dict)."""
        self.integer = bool(self.act_ready)
        # the output grid as Python numbers, so forward reads no tensor value (torch.export / compile)
        self.out_grid = (output_grid_params(self.out_scale, self.out_zero_point) if self.output_bits is not None
                         else None)
        flat = self._flat_weight().detach()
        self.register_buffer("weight_packed", int8_ops.pack_weight(flat), persistent=False)
        self.register_buffer("weight_sum", int8_ops.weight_sum(flat), persistent=False)

    def weight(self) -> Tensor:
        return self.weight_int.float() * self.weight_scale

    def quant_output(self, y: Tensor) -> Tensor:
        """The simulated layer's output rounding (same integers as its fake quantization)."""
        if self.output_bits is None:
            return y
        scale, inv, zp = self.out_grid
        return round_to_output_grid(y, scale, inv, zp, self.output_bits, zp if self.output_relu else 0, in_place=True)


class UniformDeployConv2d(_UniformDeploy):
    def __init__(self, sim: QuantConv2d) -> None:
        super().__init__(sim)
        self.stride, self.padding, self.dilation, self.groups = sim.stride, sim.padding, sim.dilation, sim.groups
        self.padding_mode = sim.padding_mode
        self._rp = sim._reversed_padding_repeated_twice

    def _flat_weight(self) -> Tensor:
        return int8_ops.flatten_conv_weight(self.weight_int)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._rp, mode=self.padding_mode)  # the simulated layer pads the same way, then quantizes
            padding = (0, 0)
        if self.integer and self.groups == 1 and not isinstance(padding, str):
            return self.quant_output(int8_ops.int8_conv2d(
                x, self.act_scale, self.act_zero_point, self.act_qmax, self.weight_int, self.weight_packed,
                self.weight_sum, self.weight_scale, self.bias, self.stride, padding, self.dilation))
        if self.integer:  # grouped / string-padded convs: the same integers through the float op
            q = quantize_affine(x, self.act_scale, self.act_zero_point, 0, self.act_qmax)
            x = (q - self.act_zero_point) * self.act_scale
        return self.quant_output(F.conv2d(x, self.weight(), self.bias, self.stride, padding, self.dilation,
                                          self.groups))


class UniformDeployLinear(_UniformDeploy):
    def forward(self, x: Tensor) -> Tensor:
        if self.integer:
            return self.quant_output(int8_ops.int8_linear(x, self.act_scale, self.act_zero_point, self.act_qmax,
                                                          self.weight_int, self.weight_packed, self.weight_sum,
                                                          self.weight_scale, self.bias))
        return self.quant_output(F.linear(x, self.weight(), self.bias))
