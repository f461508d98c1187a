"""Full-precision AdderNet layers (Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?",
CVPR 2020; official code ``huawei-noah/AdderNet`` ``adder.py``), and the pass that turns a CNN into an adder network.

Forward (per output channel ``o`` and output position ``p``; ``X_p`` the zero-padded input patch)::

    Y[n, o, p] = -sum_{c,i,j} |X_p[n](c, i, j) - W[o](c, i, j)|

Backward (not the true gradient; docs/algorithms.md#addernet-backward)::

    dY/dW = X - W                         full-precision gradient instead of sgn(X - W)
    dY/dX = HT(W - X) = clamp(W - X, -1, 1)   HardTanh-clipped
    grad_W <- eta * sqrt(numel(W)) * grad_W / max(||grad_W||_2, 1e-12)    adaptive learning-rate scaling

with ``eta = 0.2`` as in the official code (``/ 5``). The scaling uses the norm over the whole layer and one batch and is
applied inside the backward (before momentum / weight decay), as the official code does; ``eta=None`` turns it off.

Memory: the forward is ``torch.cdist(p=1)`` on the im2col patches (no ``N x C_out x K x L`` difference tensor);
``grad_W`` reduces to two matrix products (``G^T P - W * colsum(G)``); only ``grad_X`` needs the element-wise HardTanh,
computed in chunks of at most :func:`get_chunk_elements` elements. The largest temporaries are the patches
``(N L, K)`` and the output ``(N L, C_out)``, as for an im2col convolution.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..errors import ConfigError, UnsupportedModelError

_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 per temporary of the input-gradient loop


def get_chunk_elements() -> int:
    """Bound on the elements of one temporary of the chunked adder backward (default 2^24)."""
    return _CHUNK_ELEMENTS


def set_chunk_elements(n: int) -> int:
    """Set the bound of :func:`get_chunk_elements`; returns the previous value."""
    global _CHUNK_ELEMENTS
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"set_chunk_elements: n={n!r} must be a positive integer")
    old, _CHUNK_ELEMENTS = _CHUNK_ELEMENTS, n
    return old


def neg_l1_distance(patches: Tensor, weight: Tensor) -> Tensor:
    """``Y[r, o] = -sum_k |patches[r, k] - weight[o, k]|`` (no autograd rule of its own; memory ``R x O``)."""
    return -torch.cdist(patches.unsqueeze(0), weight.unsqueeze(0), p=1).squeeze(0)


def adder_input_grad(patches: Tensor, weight: Tensor, grad_out: Tensor, chunk_elements: int | None = None) -> Tensor:
    """``grad_P[r, k] = sum_o clamp(W[o, k] - P[r, k], -1, 1) * G[r, o]`` in chunks of ``(r, o, K)`` elements."""
    budget = chunk_elements or _CHUNK_ELEMENTS
    rows, k = patches.shape
    outs = weight.shape[0]
    o_step = max(1, min(outs, budget // max(1, k)))
    r_step = max(1, budget // max(1, o_step * k))
    grad = torch.zeros_like(patches)
    for r0 in range(0, rows, r_step):
        p = patches[r0:r0 + r_step]
        acc = grad[r0:r0 + r_step]
        for o0 in range(0, outs, o_step):
            diff = (weight[None, o0:o0 + o_step, :] - p[:, None, :]).clamp_(-1.0, 1.0)  # (r, o, K)
            g = grad_out[r0:r0 + r_step, None, o0:o0 + o_step]  # (r, 1, o)
            acc += torch.bmm(g, diff).squeeze(1)
    return grad


class _AdderL1(torch.autograd.Function):
    """``Y = -||P_r - W_o||_1`` with the AdderNet surrogate gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx, patches: Tensor, weight: Tensor, eta: float | None) -> Tensor:
        ctx.save_for_backward(patches, weight)
        ctx.eta = eta
        return neg_l1_distance(patches, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        patches, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_p = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_p = adder_input_grad(patches, weight, grad_out)
        if ctx.needs_input_grad[1]:
            # sum_r (P[r, k] - W[o, k]) G[r, o] = (G^T P)[o, k] - W[o, k] sum_r G[r, o]
            grad_w = grad_out.t().mm(patches) - weight * grad_out.sum(0).unsqueeze(1)
            if ctx.eta is not None:
                norm = grad_w.norm().clamp_min(1e-12)
                grad_w = grad_w * (ctx.eta * math.sqrt(weight.numel()) / norm)
        return grad_p, grad_w, None


def adder_linear_fp(x: Tensor, weight: Tensor, bias: Tensor | None = None, eta: float | None = 0.2) -> Tensor:
    """Full-precision adder linear layer: ``Y[..., o] = -sum_k |x[..., k] - W[o, k]| (+ bias[o])``.

    ``eta`` is the adaptive learning-rate scale of the filter gradient (None: plain full-precision gradient)."""
    lead = x.shape[:-1]
    y = _AdderL1.apply(x.reshape(-1, x.shape[-1]), weight, eta)
    y = y.reshape(*lead, weight.shape[0])
    return y if bias is None else y + bias


def adder_conv2d_fp(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, eta: float | None = 0.2) -> Tensor:
    """Full-precision adder convolution (zero padding, groups = 1): ``Y[n, o, p] = -sum |X_p[n] - W[o]| (+ bias[o])``.

    ``x``: (N, C, H, W); ``weight``: (C_out, C, kh, kw). Output (N, C_out, Ho, Wo), Ho/Wo as for ``F.conv2d``."""
    n, c, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    if c != cin:
        raise UnsupportedModelError(f"adder_conv2d: input has {c} channels, the weight expects {cin}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, K, L)
    patches = cols.transpose(1, 2).reshape(n * ho * wo, cin * kh * kw)
    y = _AdderL1.apply(patches, weight.reshape(cout, -1), eta)  # (N L, C_out)
    y = y.reshape(n, ho * wo, cout).transpose(1, 2).reshape(n, cout, ho, wo)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class AdderConv2d(nn.Module):
    """Adder convolution ``Y = -sum |X - W|`` (zero padding, stride, dilation; groups = 1), with the AdderNet
    gradients and adaptive learning-rate scaling ``eta`` (default 0.2, the official code's value; None disables it).
    Filters are initialised i.i.d. N(0, 1) and the optional bias U(0, 1), as in the official code. Follow it with
    BatchNorm (its output is <= 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = False, eta: float | None = 0.2,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if groups != 1:
            raise ConfigError(f"AdderConv2d: groups={groups} is not supported (only groups=1)")
        if isinstance(padding, str):
            raise ConfigError(f"AdderConv2d: padding={padding!r}; pass integers (zero padding)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = 1
        self.eta = eta
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # official adder2d: filters N(0, 1), optional bias U(0, 1) (nn.init.uniform_ with its default bounds)
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.uniform_(self.bias, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return adder_conv2d_fp(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.eta)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, eta={self.eta}")


class AdderLinear(nn.Module):
    """Adder fully connected layer ``Y[o] = -sum_k |x_k - W[o, k]|`` with the AdderNet gradients (see AdderConv2d)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eta: float | None = 0.2,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.eta = eta
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # official adder2d: filters N(0, 1), optional bias U(0, 1) (nn.init.uniform_ with its default bounds)
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.uniform_(self.bias, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return adder_linear_fp(x, self.weight, self.bias, self.eta)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, eta={self.eta}"


__all__ = ["AdderConv2d", "AdderLinear", "adder_conv2d_fp", "adder_linear_fp", "neg_l1_distance",
           "adder_input_grad", "get_chunk_elements", "set_chunk_elements"]
