"""Uniform affine quantization (per tensor, per channel) with the straight-through estimator."""
from __future__ import annotations

import torch
from torch import Tensor


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even) with the straight-through estimator: forward round(x), backward 1."""
    return _RoundSTE.apply(x)


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
