"""The uniform baselines (``w8a8``, ``w4a4``): per-channel symmetric weights, per-tensor affine activations
calibrated by an observer. Simulated: the generic :class:`~quantkit.nn.layers.QuantConv2d` / ``QuantLinear`` with the
``uniform_act`` / ``uniform_weight`` quantizers; deploy: the integer layers below."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..ops import int8 as int8_ops
from ..quantizers.uniform import (UniformActOptions, UniformWeightOptions, qrange, quantize_affine,
                                   output_grid_params, round_to_output_grid)
from .layers import LayerQuantizers, QuantConv2d, QuantLinear, register_deploy


@dataclass
class UniformOptions(LayerQuantizers, UniformActOptions, UniformWeightOptions):
    """The uniform quantizers and their options (bits, observer)."""

    input_quantizer: str | None = "uniform_act"
    weight_quantizer: str = "uniform_weight"


def uniform_deploy(sim: QuantConv2d | QuantLinear) -> nn.Module:
    """The integer deploy layer of a generic layer with the ``uniform_weight`` quantizer."""
    return UniformDeployConv2d(sim) if isinstance(sim, nn.Conv2d) else UniformDeployLinear(sim)


def _deploy_tensors(sim: QuantConv2d | QuantLinear) -> dict[str, Tensor]:
    wq = sim.weight_quantizer
    bias = wq.bias(sim.bias, sim.weight, sim.input_quantizer)
    return {"weight_int": wq.codes(sim.weight), "weight_scale": wq.scale(sim.weight).detach().clone(),
            "bias": None if bias is None else bias.detach().clone()}


def _refresh_after_load(module: "_UniformDeploy", _incompatible_keys: Any) -> None:
    module._refresh()


class _UniformDeploy(nn.Module):
    """Deploy form: int8 weight codes (4-bit schemes use the int4 range of int8), per-channel scale, the int32-grid
    bias. A calibrated layer runs on the integer kernels (:mod:`quantkit.ops.int8`: the input is quantized to its
    unsigned grid, u8 x s8 -> int32 products, one fused dequantizing epilogue); an uncalibrated one (weights-only
    simulation) runs the float op on the dequantized weight.

    Derived tensors (packed weight, weight sums) are non-persistent buffers rebuilt whenever a state_dict is loaded,
    and which path runs is a Python attribute fixed at the same moments: forward has no data-dependent branch."""

    def __init__(self, sim: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        if not bool(sim.act_ready):
            # without a calibrated activation grid there is no integer input to deploy: refuse instead of
            # silently deploying a weights-only layer
            raise UnsupportedModelError(
                f"layer {sim.layer_name!r} ({type(sim).__name__}) was not calibrated (calibrate never ran, or no "
                "calibration batch reached it); run quantkit.calibrate(model, data) (or quantkit.quantize) with data "
                "that exercises it before convert / export")
        self.bits_w, self.bits_a = sim.bits_w, sim.bits_a
        for k, v in _deploy_tensors(sim).items():
            self.register_buffer(k, v)
        self.register_buffer("act_scale", sim.act_scale.detach().clone())
        self.register_buffer("act_zero_point", sim.act_zero_point.detach().clone())
        self.register_buffer("act_ready", sim.act_ready.detach().clone())
        self.act_qmax = qrange(self.bits_a, signed=False)[1]
        # the output grid, when the simulated layer rounds its output (a calibrated one; else the output stays float)
        oq = sim.output_quantizer
        ready = oq is not None and bool(oq.out_ready)
        self.output_bits, self.output_relu = (oq.bits, oq.relu) if ready else (None, False)
        if ready:
            self.register_buffer("out_scale", oq.out_scale.detach().clone())
            self.register_buffer("out_zero_point", oq.out_zero_point.detach().clone())
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
        # the same grid for the int8 kernels, which round in their epilogue instead of six passes over the output
        self.kernel_grid = None
        if self.out_grid is not None:
            scale, inv, zp = self.out_grid
            self.kernel_grid = int8_ops.OutputGrid(scale, inv, zp, zp if self.output_relu else 0, self.output_bits)
        flat = self._flat_weight().detach()
        self.register_buffer("weight_packed", int8_ops.pack_weight(flat), persistent=False)
        self.register_buffer("weight_sum", int8_ops.weight_sum(flat), persistent=False)

    def weight(self) -> Tensor:
        return self.weight_int.float() * self.weight_scale

    def quant_output(self, y: Tensor) -> Tensor:
        """The simulated layer's output rounding (the same floats as its ``uniform_output`` quantizer), in place on
        the float op's fresh output (the integer kernels take :attr:`kernel_grid` instead)."""
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
            return int8_ops.int8_conv2d(x, self.act_scale, self.act_zero_point, self.act_qmax, self.weight_int,
                                        self.weight_packed, self.weight_sum, self.weight_scale, self.bias,
                                        self.stride, padding, self.dilation, self.kernel_grid)
        if self.integer:  # grouped / string-padded convs: the same integers through the float op
            q = quantize_affine(x, self.act_scale, self.act_zero_point, 0, self.act_qmax)
            x = (q - self.act_zero_point) * self.act_scale
        return self.quant_output(F.conv2d(x, self.weight(), self.bias, self.stride, padding, self.dilation,
                                          self.groups))


class UniformDeployLinear(_UniformDeploy):
    def forward(self, x: Tensor) -> Tensor:
        if self.integer:
            return int8_ops.int8_linear(x, self.act_scale, self.act_zero_point, self.act_qmax, self.weight_int,
                                        self.weight_packed, self.weight_sum, self.weight_scale, self.bias,
                                        self.kernel_grid)
        return self.quant_output(F.linear(x, self.weight(), self.bias))


register_deploy("uniform", uniform_deploy)

__all__ = ["QuantConv2d", "QuantLinear", "UniformOptions", "UniformDeployConv2d", "UniformDeployLinear"]
