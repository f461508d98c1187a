"""XNOR-Net layers (Rastegari et al., ECCV 2016): sign(W) scaled by mean|W| per output channel, sign(x) inputs --
the generic layers of :mod:`quantkit.nn.layers` with the ``sign_ste`` / ``xnor_weight`` quantizers."""
from __future__ import annotations

from dataclasses import dataclass

from .layers import LayerQuantizers, QuantConv2d, QuantLinear


@dataclass
class XnorOptions(LayerQuantizers):
    """The XNOR quantizers (any registered input/weight quantizer may replace them, e.g. ``input_quantizer="rsign"``)."""

    input_quantizer: str | None = "sign_ste"
    weight_quantizer: str = "xnor_weight"


class XnorConv2d(QuantConv2d):
    """Binary conv: y = conv(sign(x), mean|W_o| * sign(W_o)) (+ bias)."""

    Options = XnorOptions


class XnorLinear(QuantLinear):
    """Binary linear: y = sign(x) @ (mean|W_o| * sign(W_o))^T (+ bias)."""

    Options = XnorOptions


__all__ = ["XnorConv2d", "XnorLinear", "XnorOptions"]
