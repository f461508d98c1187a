"""Quantizers: each one's math as a small pure function (forward, surrogate gradient and paper in its docstring)
and a registered :class:`~quantkit.quantizers.base.Quantizer` object that owns its state and calls that function.
Importing this package registers every built-in quantizer (``get_quantizer(name)``, ``list_quantizers()``)."""
from . import adabin as _adabin  # noqa: F401  (registers adabin_weight, adabin_act)
from . import rsign as _rsign  # noqa: F401  (registers rsign)
from . import uniform as _uniform  # noqa: F401  (registers uniform_weight, uniform_act)
from .base import Quantizer, get_quantizer, list_quantizers, register_quantizer
from .binary import binary_sign, sign_ste, xnor_weight
from .softmax import (attention_binarization_errors, bibert_bool, bivit_sign, pws_binarize_weight, pws_sign,
                      sab_binarize, sab_optimal_threshold, sab_select, sab_threshold)

__all__ = ["Quantizer", "register_quantizer", "get_quantizer", "list_quantizers",
           "binary_sign", "sign_ste", "xnor_weight", "sab_binarize", "sab_select", "sab_threshold",
           "sab_optimal_threshold", "bibert_bool", "bivit_sign", "pws_sign", "pws_binarize_weight",
           "attention_binarization_errors"]
