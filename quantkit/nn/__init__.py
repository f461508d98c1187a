"""Modules: full-precision adder layers, simulated quantized layers and their deploy forms. (Turning a CNN into an
AdderNet is a graph rewrite: :func:`quantkit.graph.adderize`.)"""
from .adder import AdderConv2d, AdderLinear

__all__ = ["AdderConv2d", "AdderLinear"]
