"""Sign binarizers and their surrogate gradients.

Convention for every binarizer in quantkit: ``binary_sign(x) = +1 if x >= 0 else -1``. This differs from
``torch.sign`` only at exact zero (torch gives 0); a binary set has two levels, and bit-packed kernels have no third
state, so zero maps to +1 (as in Larq). All surrogates below keep that forward.
"""
from __future__ import annotations

import torch
from torch import Tensor


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


def xnor_weight(w: Tensor) -> Tensor:
    """XNOR-Net weight binarization with a per-output-channel scale (Rastegari et al., ECCV 2016).

    forward:  W_b[o] = mean(|W[o]|) * sign(W[o])
    backward: dW_b/dW = 1[|W| <= 1] * mean|W[o]| through the sign (clipped STE), plus the gradient of the scale.
    """
    dims = tuple(range(1, w.dim()))
    scale = w.abs().mean(dim=dims, keepdim=True)
    return scale * sign_ste(w)
