"""Modules: full-precision adder layers, simulated quantized layers and their deploy forms."""
from .adder import AdderConv2d, AdderLinear, adderize

__all__ = ["AdderConv2d", "AdderLinear", "adderize"]
