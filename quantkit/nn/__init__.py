"""Modules: full-precision adder layers, simulated quantized layers and their deploy forms. (Turning a CNN into an
AdderNet is a graph rewrite: :func:`quantkit.graph.adderize`.)"""
from . import uniform as _uniform  # noqa: F401  (registers the integer deploy form of the uniform quantizers)
from .adder import AdderConv2d, AdderLinear
from .layers import QuantConv2d, QuantLinear

__all__ = ["AdderConv2d", "AdderLinear", "QuantConv2d", "QuantLinear"]
