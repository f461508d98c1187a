"""A residual block of binary deploy convs run as two fused kernel calls (built by
:func:`quantkit.graph.binary_fusion.fuse_binary_deploy` at ``quantkit.convert``).

The block it replaces computes (torchvision's BasicBlock after BatchNorm folding; ``act`` a Maxout or nothing)::

    y = act2(conv2(act1(conv1(x))) + shortcut(x))

as conv1 (float out) -> Maxout -> pack -> conv2 (float out) -> add -> Maxout: six passes over float activations.
Fused, it is

    bits1 = conv1(pack(x)) with epilogue  act1, then >= conv2's input threshold   (packed bits, no float tensor)
    y     = conv2(bits1)   with epilogue  + shortcut(x), then act2                (one float store)

with the same float operations in the same order as the unfused layers (docs/kernels.md#fused-epilogues), so the
outputs are the unfused deploy block's. The block keeps the original block's children under their names (the
state dict is unchanged) and the original block itself in :attr:`unfused`, which exporters use.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .binary_deploy import BinaryDeployConv2d


class FusedBinaryBlock(nn.Module):
    """``act2(conv2(act1(conv1(x))) + shortcut(x))`` on :meth:`BinaryDeployConv2d.fused` (module docstring).

    ``names``: the attribute paths, inside ``block``, of conv1, act1 (or None), conv2, the shortcut modules applied
    in order to ``x`` (empty: the identity) and act2 (or None)."""

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

    @staticmethod
    def _slopes(act: nn.Module | None) -> tuple[Tensor, Tensor] | None:
        return None if act is None else (act.pos_scale.detach(), act.neg_scale.detach())

    def forward(self, x: Tensor) -> Tensor:
        conv1, act1, conv2, shortcut, act2 = self._parts
        rank_ok = isinstance(x, Tensor) and x.dim() == 4
        conv1._check_input(x, rank_ok, "an (N, C, H, W)", conv1.in_channels, x.shape[1] if rank_ok else -1)
        xb = ops.pack_activation_nhwc(x, conv1.in_threshold_vector())
        _, bits1 = conv1.fused(xb, maxout=self._slopes(act1), threshold=conv2.in_threshold_vector(),
                               float_out=False)
        identity = x
        for m in shortcut:
            identity = m(identity)
        y, _ = conv2.fused(bits1, residual=identity, maxout=self._slopes(act2), float_out=True)
        return y

    def extra_repr(self) -> str:
        c1, a1, c2, sc, a2 = self.plan
        return (f"fused: {c1}{' -> ' + a1 if a1 else ''} -> bits -> {c2} + "
                f"{' -> '.join(sc) if sc else 'identity'}{' -> ' + a2 if a2 else ''}")


def unfuse_binary_blocks(model: nn.Module) -> nn.Module:
    """Replace every :class:`FusedBinaryBlock` in ``model`` (in place) by its original block; returns ``model`` (or
    the original block when ``model`` itself is fused). Exporters use it: they emit the block layer by layer."""
    if isinstance(model, FusedBinaryBlock):
        return model.unfused
    for name, child in list(model.named_children()):
        if isinstance(child, FusedBinaryBlock):
            setattr(model, name, child.unfused)
        else:
            unfuse_binary_blocks(child)
    return model


__all__ = ["FusedBinaryBlock", "unfuse_binary_blocks"]
