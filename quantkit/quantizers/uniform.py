"""Uniform affine quantization (per tensor, per channel) with the straight-through estimator."""
from __future__ import annotations

import torch
from torch import Tensor


ROUND_MODES = ("half_even", "half_away")


def round_half(x: Tensor, mode: str = "half_even") -> Tensor:
    """Round to the nearest integer; ties to even (``"half_even"``: ``torch.round``, and MindSpore ``ops.Round`` used
    by the official AdderNet-PTQ code) or away from zero (``"half_away"``: ``sign(x) * floor(|x| + 1/2)``).
    No gradient."""
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_away":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    from ..errors import ConfigError

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
