"""The shared part of fused residual blocks (deploy models only, built at ``quantkit.convert``):
``act2(conv2(act1(conv1(x))) + shortcut(x))`` computed by two kernel calls whose epilogues do the activations and
the residual add (:class:`~quantkit.nn.binary_fused.FusedBinaryBlock`,
:class:`~quantkit.nn.adder_fused.FusedAdderBlock`).

A fused block keeps the original block's children under their names (the state dict is unchanged) and the original
block itself in :attr:`FusedResidualBlock.unfused`, which exporters use (:func:`unfuse_blocks`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def is_pointwise_conv(m: nn.Module) -> bool:
    """Whether ``m`` is a plain 1x1 ``nn.Conv2d`` (any stride; no padding, dilation or groups): ResNet's
    projection shortcut, which :func:`pointwise_conv` runs as one matrix product."""
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.padding == (0, 0) and m.dilation == (1, 1)
            and m.groups == 1)


def _pointwise_operands(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int, int]] | None:
    """``(rows, weight matrix, (n, ho, wo))`` of :func:`pointwise_conv`'s product, or None where it runs the module."""
    w = conv.weight
    if not (x.is_cpu and x.dtype == torch.float32 and w.dtype == torch.float32 and w.is_cpu and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return None
    sh, sw = conv.stride
    xs = x if (sh, sw) == (1, 1) else x[:, :, ::sh, ::sw]
    n, c, ho, wo = xs.shape
    return xs.permute(0, 2, 3, 1).reshape(n * ho * wo, c), w.reshape(w.shape[0], c).t(), (n, ho, wo)


def pointwise_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a :func:`is_pointwise_conv` conv on a channels_last float32 CPU input, as
    ``rows(x[:, :, ::s, ::s]) @ W^T + b``: the strided pixels gathered into an ``(N*Ho*Wo, C_in)`` matrix (one copy;
    none at stride 1), one ``addmm`` against the weight viewed as ``(C_in, C_out)`` (a (C_out, C_in, 1, 1) weight
    is that matrix transposed in either memory format, so no copy and nothing to keep in sync), the result viewed
    back as channels_last ``(N, C_out, Ho, Wo)``. The same products as the conv, without its per-call weight
    reorder; the sums may round differently from torch's (mkldnn blocks them by shape). Any other input (another
    device, dtype or layout, or under autograd) runs the module itself."""
    ops = _pointwise_operands(conv, x)
    if ops is None:
        return conv(x)
    rows, wmat, (n, ho, wo) = ops
    b = conv.bias
    y = torch.mm(rows, wmat) if b is None else torch.addmm(b, rows, wmat)
    return y.view(n, ho, wo, wmat.shape[1]).permute(0, 3, 1, 2)


def pointwise_conv_bias_apart(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """:func:`pointwise_conv` with its bias left for the consumer to add: ``(rows @ W^T, bias)``, where the caller
    adds ``bias`` per channel (a fused block adds it to the next conv's own bias, which its epilogue adds anyway:
    addmm's bias costs a broadcast copy of the whole output first). Where :func:`pointwise_conv` would run the
    module itself, and where autograd would need the bias: ``(pointwise_conv(conv, x), None)``."""
    ops = _pointwise_operands(conv, x)
    b = conv.bias
    if ops is None or b is None or (torch.is_grad_enabled() and b.requires_grad):
        return pointwise_conv(conv, x), None
    rows, wmat, (n, ho, wo) = ops
    return torch.mm(rows, wmat).view(n, ho, wo, wmat.shape[1]).permute(0, 3, 1, 2), b


class FusedResidualBlock(nn.Module):
    """Base of the fused blocks. ``conv1, act1, conv2, shortcut, act2`` are attribute paths inside ``block`` (acts
    may be None; ``shortcut`` the modules applied in order to ``x``, empty for the identity); subclasses define
    ``forward`` on :attr:`_parts` (the modules themselves)."""

    def __init__(self, block: nn.Module, conv1: str, act1: str | None, conv2: str, shortcut: Sequence[str],
                 act2: str | None) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self._unfused = (block,)  # a tuple: not a registered child (its children are already ours)
        get = block.get_submodule
        # the modules in a tuple, so they are not registered twice (they are children under their own names)
        self._parts = (get(conv1), None if act1 is None else get(act1), get(conv2), tuple(get(n) for n in shortcut),
                       None if act2 is None else get(act2))
        self.plan = (conv1, act1, conv2, tuple(shortcut), act2)

    @property
    def unfused(self) -> nn.Module:
        """The original block (same child modules), computing the same values layer by layer."""
        return self._unfused[0]

    def extra_repr(self) -> str:
        c1, a1, c2, sc, a2 = self.plan
        return (f"fused: {c1}{' -> ' + a1 if a1 else ''} -> {self.link} -> {c2} + "
                f"{' -> '.join(sc) if sc else 'identity'}{' -> ' + a2 if a2 else ''}")

    link = "y"  # what conv1's epilogue hands to conv2 (for the repr)


def unfuse_blocks(model: nn.Module) -> nn.Module:
    """Replace every fused block in ``model`` (in place) by its original block; returns ``model`` (or the original
    block when ``model`` itself is fused). Exporters use it: they emit the block layer by layer."""
    if isinstance(model, FusedResidualBlock):
        return model.unfused
    for name, child in list(model.named_children()):
        if isinstance(child, FusedResidualBlock):
            setattr(model, name, child.unfused)
        else:
            unfuse_blocks(child)
    return model


__all__ = ["FusedResidualBlock", "unfuse_blocks", "is_pointwise_conv", "pointwise_conv", "pointwise_conv_bias_apart"]
