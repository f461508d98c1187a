"""Uniform affine quantization (per tensor, per channel) with the straight-through estimator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..calibrate.observers import make_observer
from ..errors import CalibrationDataError, ConfigError
from .base import Quantizer, register_quantizer

ROUND_MODES = ("half_even", "half_away")


def round_half(x: Tensor, mode: str = "half_even") -> Tensor:
    """Round to the nearest integer; ties to even (``"half_even"``: ``torch.round``, and MindSpore ``ops.Round`` used
    by the official AdderNet-PTQ code) or away from zero (``"half_away"``: ``sign(x) * floor(|x| + 1/2)``).
    No gradient."""
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_away":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    raise ConfigError(f"round_mode={mode!r}; use one of {ROUND_MODES}")


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mode: str) -> Tensor:
        return round_half(x, mode)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def round_ste(x: Tensor, mode: str = "half_even") -> Tensor:
    """Rounding with the straight-through estimator: forward ``round_half(x, mode)`` (exact), backward ``1``."""
    return _RoundSTE.apply(x, mode)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a b-bit grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes q = clamp(round(x / scale) + zero_point, qmin, qmax) (no gradient; for deploy/export)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def fake_quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Uniform affine fake quantization (Jacob et al., CVPR 2018).

    forward:  x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s
    backward: dx_hat/dx = 1 inside the representable range [(qmin - z) s, (qmax - z) s], 0 outside (STE on round,
              exact gradient of the clamp).
    ``scale``/``zero_point`` broadcast against ``x`` (per tensor: scalars; per channel: shaped (C, 1, ...)).
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quantize_bias(bias: Tensor, scale: Tensor) -> Tensor:
    """Bias on the int32 grid of an integer accumulator (the form QLinearConv / QGemm / TFLite add).

    forward:  b_hat = clamp(round(b / s), -(2^31 - 1), 2^31 - 1) * s, with s = s_x * s_w[o] per output channel
    backward: db_hat/db = 1 (STE on round; the clamp is never reached by real biases)
    """
    limit = float(2**31 - 1)
    return torch.clamp(round_ste(bias / scale), -limit, limit) * scale


def symmetric_scale(absmax: Tensor, bits: int) -> Tensor:
    """Scale of a symmetric signed grid that represents [-absmax, absmax]: s = absmax / (2^(b-1) - 1)."""
    return torch.clamp(absmax, min=1e-8) / (2 ** (bits - 1) - 1)


def affine_params(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of an unsigned b-bit grid covering [min(lo, 0), max(hi, 0)] (0 exactly representable)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    qmax = 2**bits - 1
    scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero_point


def per_channel_symmetric_scale(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel scale of a symmetric signed b-bit weight grid, s[o] = max|W[o]| / (2^(b-1) - 1), shaped
    ``(C_out, 1, ...)`` to broadcast against ``w`` (no gradient)."""
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


# ---------------------------------------------------------------------------------------------- quantizer objects


@dataclass
class UniformWeightOptions:
    """``bits_w``: weight bits (per-channel symmetric grid)."""

    bits_w: int = 8


@dataclass
class UniformActOptions:
    """``bits_a``: activation bits (per-tensor unsigned affine grid); ``observer``: "minmax" or "percentile";
    ``percentile``: the percentile observer's clip."""

    bits_a: int = 8
    observer: str = "minmax"
    percentile: float = 99.99


@register_quantizer("uniform_weight")
class UniformWeight(Quantizer):
    """Per-channel symmetric fake quantization of weights (:func:`fake_quantize_affine` on the grid of
    :func:`per_channel_symmetric_scale`); the bias goes on the accumulator's int32 grid once the input is
    calibrated. Deploys as integer codes (UniformDeploy*, :mod:`quantkit.ops.int8`)."""

    kind = "weight"
    deploy = "uniform"
    Options = UniformWeightOptions

    def __init__(self, *, weight: Tensor, channels: int, bits_w: int) -> None:
        super().__init__()
        self.bits = int(bits_w)

    def scale(self, w: Tensor) -> Tensor:
        return per_channel_symmetric_scale(w, self.bits)

    def forward(self, w: Tensor) -> Tensor:
        qmin, qmax = qrange(self.bits, signed=True)
        return fake_quantize_affine(w, self.scale(w), torch.zeros(()), qmin, qmax)

    def codes(self, w: Tensor) -> Tensor:
        """int8 weight codes (a 4-bit grid uses the int4 range of int8)."""
        qmin, qmax = qrange(self.bits, signed=True)
        return quantize_affine(w.detach(), self.scale(w), torch.zeros(()), qmin, qmax).to(torch.int8)

    def bias(self, bias: Tensor | None, w: Tensor, inputs: Quantizer | None) -> Tensor | None:
        """The bias on the int32 grid of the accumulator (scale s_x * s_w[o]) once the input is calibrated, the
        form integer runtimes (onnxruntime QLinearConv / QGemm) add; the float bias before calibration."""
        if bias is None or inputs is None or not bool(inputs.act_ready):
            return bias
        return fake_quantize_bias(bias, inputs.act_scale * self.scale(w).reshape(-1))


@register_quantizer("uniform_act")
class UniformAct(Quantizer):
    """Per-tensor affine fake quantization of activations (:func:`fake_quantize_affine`) on the unsigned grid of
    :func:`affine_params` over the range an observer saw during calibration. Before calibration it passes the input
    through (weights-only simulation)."""

    kind = "input"
    Options = UniformActOptions
    optional_state = ("act_scale", "act_zero_point", "act_ready")

    def __init__(self, *, weight: Tensor, channels: int, bits_a: int, observer: str, percentile: float) -> None:
        super().__init__()
        self.bits = int(bits_a)
        self.observer = make_observer(observer, percentile)
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("act_zero_point", torch.tensor(0.0))
        self.register_buffer("act_ready", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observer.observe(x)
            return x
        if not bool(self.act_ready):
            return x  # not calibrated yet: weights-only simulation
        qmin, qmax = qrange(self.bits, signed=False)
        return fake_quantize_affine(x, self.act_scale, self.act_zero_point, qmin, qmax)

    def finish_calibration(self, layer: str) -> None:
        super().finish_calibration(layer)
        if not self.observer.observed:
            return  # the layer did not run on the calibration data; it keeps weights-only simulation
        lo, hi = self.observer.range()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CalibrationDataError(f"layer {layer!r}: activation range is not finite ({lo}, {hi})")
        scale, zp = affine_params(lo, hi, self.bits)
        self.act_scale.copy_(scale)
        self.act_zero_point.copy_(zp)
        self.act_ready.fill_(True)

    def describe(self) -> dict[str, Any]:
        if not bool(self.act_ready):
            return {"act": "not calibrated"}
        return {"act_scale": float(self.act_scale), "act_zp": int(self.act_zero_point)}


@register_quantizer("uniform_output")
class UniformOutput(Quantizer):
    """A layer's output rounded to a calibrated unsigned affine grid (:func:`round_to_output_grid`, min/max
    observer), after the ReLU that follows the layer when ``relu``. The uniform schemes put one on each conv whose
    output feeds a residual Add: nothing later requantizes that output, and with this grid integer runtimes run the
    conv as ``QLinearConv`` (requantization in its epilogue) instead of a float Conv. Before calibration it passes
    the output through (after the ReLU)."""

    kind = "output"
    optional_state = ("out_scale", "out_zero_point", "out_ready")

    def __init__(self, *, bits: int = 8, relu: bool = False) -> None:
        super().__init__()
        self.bits, self.relu = int(bits), bool(relu)
        self.observer = make_observer("minmax", 100.0)
        self.register_buffer("out_scale", torch.tensor(1.0))
        self.register_buffer("out_zero_point", torch.tensor(0.0))
        self.register_buffer("out_ready", torch.tensor(False))

    def grid(self) -> tuple[float, float, int, int]:
        """(s, 1 / s, z, qmin) of the calibrated grid as Python numbers (what a deploy layer keeps)."""
        scale, inv, zp = output_grid_params(self.out_scale, self.out_zero_point)
        return scale, inv, zp, zp if self.relu else 0

    def forward(self, y: Tensor) -> Tensor:
        if self.calibrating or not bool(self.out_ready):
            y = F.relu(y) if self.relu else y
            if self.calibrating:
                self.observer.observe(y)
            return y
        scale, inv, zp, qmin = self.grid()
        return round_to_output_grid(y, scale, inv, zp, self.bits, qmin)

    def finish_calibration(self, layer: str) -> None:
        super().finish_calibration(layer)
        if not self.observer.observed:
            return
        lo, hi = self.observer.range()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CalibrationDataError(f"layer {layer!r}: output range is not finite ({lo}, {hi})")
        scale, zp = affine_params(lo, hi, self.bits)
        self.out_scale.copy_(scale)
        self.out_zero_point.copy_(zp)
        self.out_ready.fill_(True)

    def describe(self) -> dict[str, Any]:
        if not bool(self.out_ready):
            return {}
        return {"out_bits": self.bits, "out_scale": float(self.out_scale), "out_zp": int(self.out_zero_point)}
