"""Pure quantizer functions with their surrogate gradients (math in each docstring, paper cited)."""
from .binary import binary_sign, sign_ste, xnor_weight

__all__ = ["binary_sign", "sign_ste", "xnor_weight"]
