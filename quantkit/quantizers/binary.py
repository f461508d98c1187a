"""Sign binarizers and their surrogate gradients.

Convention for every binarizer in quantkit: ``binary_sign(x) = +1 if x >= 0 else -1``. This differs from
``torch.sign`` only at exact zero (torch gives 0); a binary set has two levels, and bit-packed kernels have no third
state, so zero maps to +1 (as in Larq). All surrogates below keep that forward.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Quantizer, register_quantizer


def binary_sign(x: Tensor) -> Tensor:
    """Forward of every binarizer: +1 where x >= 0, -1 elsewhere (same dtype as ``x``). No gradient."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clip: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(x: Tensor, clip: float = 1.0) -> Tensor:
    """Sign with the clipped straight-through estimator (BinaryNet, Courbariaux et al. 2016; XNOR-Net).

    forward:  b = sign(x)            (+1 for x >= 0)
    backward: db/dx = 1[|x| <= clip]  (clip = 1 by default; closed window, as BinaryNet's 1[|r| <= 1])

    BiViT's official code passes the gradient on the open window |x| < 1 instead:
    :func:`quantkit.quantizers.softmax.bivit_sign`.
    """
    return _SignClippedSTE.apply(x, clip)


def xnor_weight_scale(w: Tensor) -> Tensor:
    """XNOR-Net's per-output-channel weight scale mean(|W[o]|), shaped to broadcast against ``w``."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


def xnor_weight(w: Tensor) -> Tensor:
    """XNOR-Net weight binarization with a per-output-channel scale (Rastegari et al., ECCV 2016).

    forward:  W_b[o] = mean(|W[o]|) * sign(W[o])
    backward: dW_b/dW = 1[|W| <= 1] * mean|W[o]| through the sign (clipped STE), plus the gradient of the scale.
    """
    return xnor_weight_scale(w) * sign_ste(w)


# ---------------------------------------------------------------------------------------------- quantizer objects


@register_quantizer("sign_ste")
class SignSTE(Quantizer):
    """Binary input: :func:`sign_ste` (clipped STE). Deploy: bit = (x >= 0), a_b = s."""

    kind = "input"

    def __init__(self, *, weight: Tensor, channels: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return sign_ste(x)

    def threshold(self) -> float:
        return 0.0

    def affine(self) -> tuple[Any, Any]:
        return 1.0, 0.0


@register_quantizer("xnor_weight")
class XnorWeight(Quantizer):
    """Binary weight: :func:`xnor_weight`. Deploy: signs sign(W), scale mean|W[o]|, no center."""

    kind = "weight"

    def __init__(self, *, weight: Tensor, channels: int) -> None:
        super().__init__()

    def forward(self, w: Tensor) -> Tensor:
        return xnor_weight(w)

    def signs(self, w: Tensor) -> Tensor:
        return binary_sign(w)

    def affine(self, w: Tensor) -> tuple[Tensor, None]:
        return xnor_weight_scale(w).flatten(), None
