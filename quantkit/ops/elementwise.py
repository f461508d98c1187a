"""Fused elementwise ops of deploy models (compiled kernel + pure-PyTorch reference).

Op schemas (``kernels/register.cpp``)::

    quantkit::maxout(Tensor x, Tensor pos, Tensor neg) -> Tensor
    quantkit::quantize_groups(Tensor x, Tensor scale, int bits, bool is_signed, bool half_even) -> Tensor
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.errors import KernelError
from quantkit.ops._dispatch import check_devices, register_fake, use_kernel

_ROUND_MODES = ("half_even", "half_away")


def maxout_reference(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """AdaBin's Maxout per channel c (dim 1), the official form ``pos * relu(x) - neg * relu(-x)``. Differentiable.
    It equals ``x * (pos[c] if x > 0 else neg[c])`` for finite slopes (up to the sign of a zero); with a NaN or
    infinite slope every output of that channel is NaN (``inf * 0``), in the kernel too."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    pos, neg = pos.to(x.dtype).view(shape), neg.to(x.dtype).view(shape)
    return pos * F.relu(x) - neg * F.relu(-x)


def _check_maxout(x: Tensor, pos: Tensor, neg: Tensor) -> None:
    for name, t in (("x", x), ("pos", pos), ("neg", neg)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise KernelError(f"maxout: {name} must be a float tensor, got {got}")
    if x.dim() < 2:
        raise KernelError(
            f"maxout: x must be (N, C, ...) with the channels in dim 1, got shape {tuple(x.shape)}; add the batch "
            "dimension with x.unsqueeze(0)"
        )
    c = x.shape[1]
    if pos.numel() != c or neg.numel() != c:
        raise KernelError(
            f"maxout: pos and neg need one value per channel ({c}), got shapes {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    check_devices("maxout", x=x, pos=pos, neg=neg)


def maxout(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """:func:`maxout_reference` in one memory pass (compiled kernel, the same values bit for bit, NaN and Inf
    included) for float32 CPU inputs that need no gradient; otherwise the reference. ``x`` is ``(N, C, ...)``."""
    _check_maxout(x, pos, neg)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or pos.requires_grad or neg.requires_grad)
    if not needs_grad and x.dtype == torch.float32 and use_kernel("maxout", x.device):
        return torch.ops.quantkit.maxout(x, pos.detach(), neg.detach())
    return maxout_reference(x, pos, neg)


@register_fake("maxout")
def _maxout_fake(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    check_devices("maxout", x=x, pos=pos, neg=neg)
    torch._check(x.dim() >= 2 and pos.numel() == x.shape[1] and neg.numel() == x.shape[1])
    return torch.empty_like(x)


def _check_quantize_groups(x: Tensor, scale: Tensor, bits: int, round_mode: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise KernelError(f"quantize_groups: x must be a float tensor, got {got}")
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        got = scale.dtype if isinstance(scale, Tensor) else type(scale).__name__
        raise KernelError(f"quantize_groups: scale must be a float tensor of group scales, got {got}")
    if scale.dim() != 1 or scale.numel() < 1:
        raise KernelError(
            f"quantize_groups: scale must be 1-D (G,) with one scale per group, got shape {tuple(scale.shape)}; "
            "for a single group pass scale.reshape(1)"
        )
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise KernelError(f"quantize_groups: bits must be an int in 2..8 (the codes are int8 / uint8), got {bits!r}")
    if round_mode not in _ROUND_MODES:
        raise KernelError(f"quantize_groups: round_mode must be one of {_ROUND_MODES}, got {round_mode!r}")
    check_devices("quantize_groups", x=x, scale=scale)
    # a value check costs a device sync elsewhere; the CPU kernel repeats it itself
    if scale.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise KernelError(f"quantize_groups: every group scale must be finite and > 0, got {scale.tolist()}")


def quantize_groups_reference(x: Tensor, scale: Tensor, bits: int, signed: bool,
                              round_mode: str = "half_even") -> Tensor:
    """``(G, *x.shape)`` activation codes of ``x`` on each group's grid (AdderNet PTQ re-quantizes the activation once
    per output-channel group): :func:`quantkit.quantizers.adder.quantize_act_codes` per group, as int8 (signed) or
    uint8 (unsigned). NaN has no integer code: it becomes code 0, as in the kernel."""
    from quantkit.quantizers.adder import quantize_act_codes

    dtype = torch.int8 if signed else torch.uint8
    codes = [quantize_act_codes(x, s.to(x.dtype), bits, signed, round_mode, ste=False) for s in scale]
    return torch.nan_to_num(torch.stack(codes), nan=0.0).to(dtype)


def quantize_groups(x: Tensor, scale: Tensor, bits: int, signed: bool, round_mode: str = "half_even") -> Tensor:
    """:func:`quantize_groups_reference` in one pass (compiled kernel, identical codes) for float32 CPU inputs; a 4-D
    input's codes come back channels_last per group, the layout the adder kernels read.

    ``scale`` is ``(G,)``, finite and > 0; ``bits`` in 2..8. NaN in ``x`` becomes code 0 (an integer code cannot
    hold it): the adder deploy layers propagate NaN to their outputs themselves, as the simulated model does;
    +-Inf clamps to the ends of the grid."""
    _check_quantize_groups(x, scale, bits, round_mode)
    if x.dtype == torch.float32 and use_kernel("quantize_groups", x.device):
        return torch.ops.quantkit.quantize_groups(x, scale.detach(), bits, signed, round_mode == "half_even")
    return quantize_groups_reference(x, scale, bits, signed, round_mode)


@register_fake("quantize_groups")
def _quantize_groups_fake(x: Tensor, scale: Tensor, bits: int, is_signed: bool, half_even: bool) -> Tensor:
    check_devices("quantize_groups", x=x, scale=scale)
    torch._check(scale.dim() == 1 and scale.shape[0] >= 1 and 2 <= bits <= 8)
    dtype = torch.int8 if is_signed else torch.uint8
    if x.dim() == 4:
        n, c, h, w = x.shape
        return x.new_empty((scale.shape[0], n, h, w, c), dtype=dtype).permute(0, 1, 4, 2, 3)
    return x.new_empty((scale.shape[0], *x.shape), dtype=dtype)
