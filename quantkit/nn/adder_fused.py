"""A residual block of quantized adder deploy convs run as two kernel calls with the ReLUs and the residual add in
their epilogues (built by :func:`quantkit.graph.block_fusion.fuse_deploy_blocks` at ``quantkit.convert``).

The block it replaces computes (torchvision's BasicBlock with its BatchNorms folded into the adder layers)::

    y = relu(conv2(relu(conv1(x))) + shortcut(x))

as two adder convs, two ReLUs and an add: three passes over float activations besides the convs. Fused, conv1's
epilogue applies the ReLU and conv2's adds the shortcut and applies the ReLU, the same float operations in the same
order (``quantkit.ops.adder_conv2d_packed``), so the outputs are the unfused deploy block's, bit for bit. Children,
state dict and the original block: quantkit/nn/fused_block.py.
"""
from __future__ import annotations

from torch import Tensor

from .fused_block import FusedResidualBlock


class FusedAdderBlock(FusedResidualBlock):
    """``relu(conv2(relu(conv1(x))) + shortcut(x))`` on :meth:`AdderDeployConv2d.fused` (module docstring); a
    missing act is no ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        conv1, act1, conv2, shortcut, act2 = self._parts
        y1 = conv1.fused(x, relu=act1 is not None)
        identity = x
        for m in shortcut:
            identity = m(identity)
        return conv2.fused(y1, residual=identity, relu=act2 is not None)


__all__ = ["FusedAdderBlock"]
