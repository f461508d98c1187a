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
