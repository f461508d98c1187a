"""Modules: full-precision adder layers, simulated quantized layers and their deploy forms."""
from . import uniform as _uniform  # noqa: F401  (registers the integer deploy form of the uniform quantizers)
from .adder import AdderConv2d, AdderLinear, adderize
from .layers import QuantConv2d, QuantLinear

__all__ = ["AdderConv2d", "AdderLinear", "adderize", "QuantConv2d", "QuantLinear"]
