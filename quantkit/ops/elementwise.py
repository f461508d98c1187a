"""Fused elementwise ops of deploy models (compiled kernel + pure-PyTorch reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.ops._dispatch import register_fake, use_kernel


def maxout_reference(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """AdaBin's Maxout per channel c (dim 1), the official form ``pos * relu(x) - neg * relu(-x)``. Differentiable.
    It equals ``x * (pos[c] if x > 0 else neg[c])`` bit for bit (up to the sign of a zero), the kernel's form."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    pos, neg = pos.to(x.dtype).view(shape), neg.to(x.dtype).view(shape)
    return pos * F.relu(x) - neg * F.relu(-x)


def maxout(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """:func:`maxout_reference` in one memory pass (compiled kernel) for float32 CPU inputs that need no gradient;
    otherwise the reference."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or pos.requires_grad or neg.requires_grad)
    if not needs_grad and x.dtype == torch.float32 and x.dim() >= 2 and use_kernel("maxout", x.device):
        return torch.ops.quantkit.maxout(x, pos.detach(), neg.detach())
    return maxout_reference(x, pos, neg)


@register_fake("maxout")
def _maxout_fake(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    return torch.empty_like(x)


def quantize_groups_reference(x: Tensor, scale: Tensor, bits: int, signed: bool,
                              round_mode: str = "half_even") -> Tensor:
    """``(G, *x.shape)`` activation codes of ``x`` on each group's grid (AdderNet PTQ re-quantizes the activation once
    per output-channel group): :func:`quantkit.quantizers.adder.quantize_act_codes` per group, as int8 (signed) or
    uint8 (unsigned)."""
    from quantkit.quantizers.adder import quantize_act_codes

    dtype = torch.int8 if signed else torch.uint8
    codes = [quantize_act_codes(x, s.to(x.dtype), bits, signed, round_mode, ste=False) for s in scale]
    return torch.stack(codes).to(dtype)


def quantize_groups(x: Tensor, scale: Tensor, bits: int, signed: bool, round_mode: str = "half_even") -> Tensor:
    """:func:`quantize_groups_reference` in one pass (compiled kernel, identical codes) for float32 CPU inputs; a 4-D
    input's codes come back channels_last per group, the layout the adder kernels read."""
    if (x.dtype == torch.float32 and round_mode in ("half_even", "half_away") and scale.dim() == 1
            and use_kernel("quantize_groups", x.device)):
        return torch.ops.quantkit.quantize_groups(x, scale.detach(), bits, signed, round_mode == "half_even")
    return quantize_groups_reference(x, scale, bits, signed, round_mode)


@register_fake("quantize_groups")
def _quantize_groups_fake(x: Tensor, scale: Tensor, bits: int, is_signed: bool, half_even: bool) -> Tensor:
    dtype = torch.int8 if is_signed else torch.uint8
    if x.dim() == 4:
        n, c, h, w = x.shape
        return x.new_empty((scale.shape[0], n, h, w, c), dtype=dtype).permute(0, 1, 4, 2, 3)
    return x.new_empty((scale.shape[0], *x.shape), dtype=dtype)
