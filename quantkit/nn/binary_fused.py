"""A residual block of binary deploy convs run as two fused kernel calls (built by
:func:`quantkit.graph.block_fusion.fuse_deploy_blocks` at ``quantkit.convert``).

The block it replaces computes (torchvision's BasicBlock after BatchNorm folding; ``act`` a Maxout or nothing)::

    y = act2(conv2(act1(conv1(x))) + shortcut(x))

as conv1 (float out) -> Maxout -> pack -> conv2 (float out) -> add -> Maxout: six passes over float activations.
Fused, it is

    bits1 = conv1(pack(x)) with epilogue  act1, then >= conv2's input threshold   (packed bits, no float tensor)
    y     = conv2(bits1)   with epilogue  + shortcut(x), then act2                (one float store)

with the same float operations in the same order as the unfused layers (docs/kernels.md#fused-epilogues), so the
outputs are the unfused deploy block's. Children, state dict and the original block: quantkit/nn/fused_block.py.
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .fused_block import FusedResidualBlock


class FusedBinaryBlock(FusedResidualBlock):
    """``act2(conv2(act1(conv1(x))) + shortcut(x))`` on :meth:`BinaryDeployConv2d.fused` (module docstring); the
    acts are Maxouts."""

    link = "bits"

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


__all__ = ["FusedBinaryBlock"]
