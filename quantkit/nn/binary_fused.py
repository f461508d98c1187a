"""A residual block of binary deploy convs run as two fused kernel calls (built by
:func:`quantkit.graph.block_fusion.fuse_deploy_blocks` at ``quantkit.convert``).

The block it replaces computes (torchvision's BasicBlock after BatchNorm folding; ``act`` a Maxout or nothing)::

    y = act2(conv2(act1(conv1(x))) + shortcut(x))

as conv1 (float out) -> Maxout -> pack -> conv2 (float out) -> add -> Maxout: six passes over float activations.
Fused, it is

    bits1 = conv1(pack(x)) with epilogue  act1, then >= conv2's input threshold   (packed bits, no float tensor)
    y     = conv2(bits1)   with epilogue  + shortcut(x), then act2                (one float store)

with the same float operations in the same order as the unfused layers (docs/kernels.md#fused-epilogues), so the
outputs are the unfused deploy block's (a 1x1 projection shortcut runs as one matrix product without its bias,
:func:`~quantkit.nn.fused_block.pointwise_conv_bias_apart`, the bias added to conv2's own in its epilogue: its sums
and that addition may round differently from torch's conv).

Block to block: when ``y`` is the input of another fused block (ResNet's stages, linked at convert by
:func:`quantkit.graph.block_fusion.link_block_chain`), conv2's epilogue also packs ``y`` against that block's
input threshold, and hands the bits over (a stem kernel before the first block does the same,
:class:`HandsOutputBits`); that block uses them instead of packing ``y`` again (one pass over the
largest float tensor less) when its input is that very tensor, unmodified, and packs as usual otherwise. The
hand-over is by value identity, so a model run on other inputs, or threads sharing one model, are always correct
(at worst they pack themselves). Children, state dict and the original block: quantkit/nn/fused_block.py.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .. import ops
from .fused_block import FusedResidualBlock, is_pointwise_conv, pointwise_conv, pointwise_conv_bias_apart


class HandsOutputBits:
    """Mixin of deploy modules whose output can be the input of a :class:`FusedBinaryBlock` (module docstring): the
    module packs its output against that block's input threshold in its own last pass and hands the bits over.
    Linked at convert by :func:`quantkit.graph.block_fusion.link_block_chain`."""

    _consumer: tuple = ()  # (the block whose input is our output,) or ()

    def hand_output_to(self, block: "FusedBinaryBlock | None") -> None:
        """Pack this module's output for ``block`` (whose input it is); None stops it."""
        if block is not None and not isinstance(block, FusedBinaryBlock):
            raise TypeError(f"hand_output_to: expected a FusedBinaryBlock, got {type(block).__name__}")
        self._consumer = () if block is None else (block,)

    @property
    def consumer(self) -> "FusedBinaryBlock | None":
        return self._consumer[0] if self._consumer else None

    def _consumer_threshold(self) -> Tensor | None:
        """The consumer's input threshold to pack against now, or None (no consumer; a traced graph gets no side
        channel)."""
        if not self._consumer or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        return self._consumer[0]._parts[0].in_threshold_vector()

    def _hand_over(self, y: Tensor, bits: Tensor) -> None:
        self._consumer[0]._handed[0] = (weakref.ref(y), y._version, bits)


class FusedBinaryBlock(HandsOutputBits, FusedResidualBlock):
    """``act2(conv2(act1(conv1(x))) + shortcut(x))`` on :meth:`BinaryDeployConv2d.fused` (module docstring); the
    acts are Maxouts."""

    link = "bits"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # one slot, written by the module before us: (weakref to our input tensor, its version, its packed bits);
        # a list, so handing over is an item store, not an nn.Module attribute assignment
        self._handed: list[tuple | None] = [None]
        # the shortcut is one 1x1 projection (then only nn.Identity, e.g. a BatchNorm folded into it)
        sc = self._parts[3]
        self._shortcut_is_pointwise = (len(sc) > 0 and is_pointwise_conv(sc[0])
                                       and all(type(m) is nn.Identity for m in sc[1:]))

    @staticmethod
    def _slopes(act: nn.Module | None) -> tuple[Tensor, Tensor] | None:
        if act is None:
            return None
        p = act._parameters  # direct (per call); detached only where autograd would see them
        pos, neg = p["pos_scale"], p["neg_scale"]
        return (pos.detach(), neg.detach()) if torch.is_grad_enabled() else (pos, neg)

    def _input_bits(self, x: Tensor, conv1: nn.Module) -> Tensor:
        slot = self._handed
        handed, slot[0] = slot[0], None  # read once and clear: another thread may be writing it
        if handed is not None and handed[0]() is x and handed[1] == x._version:
            return handed[2]
        return ops.pack_activation_nhwc(x, conv1.in_threshold_vector())

    def forward(self, x: Tensor) -> Tensor:
        conv1, act1, conv2, shortcut, act2 = self._parts
        rank_ok = isinstance(x, Tensor) and x.dim() == 4
        conv1._check_input(x, rank_ok, "an (N, C, H, W)", conv1.in_channels, x.shape[1] if rank_ok else -1)
        xb = self._input_bits(x, conv1)
        _, bits1 = conv1.fused(xb, maxout=self._slopes(act1), threshold=conv2.in_threshold_vector(),
                               float_out=False)
        identity, bias_add = x, None
        if self._shortcut_is_pointwise:  # its bias goes into conv2's (the epilogue adds a bias anyway)
            identity, bias_add = pointwise_conv_bias_apart(shortcut[0], x)
        else:
            for m in shortcut:
                identity = pointwise_conv(m, identity) if is_pointwise_conv(m) else m(identity)
        threshold = self._consumer_threshold()
        y, bits = conv2.fused(bits1, residual=identity, maxout=self._slopes(act2), threshold=threshold,
                              float_out=True, bias_add=bias_add)
        if threshold is not None:
            self._hand_over(y, bits)
        return y

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_handed"] = [None]  # a weakref does not pickle (nor deep-copy usefully); it is per call anyway
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + (", packs its output for the next block" if self._consumer else "")


__all__ = ["FusedBinaryBlock", "HandsOutputBits"]
