"""Pure quantizer functions with their surrogate gradients (math in each docstring, paper cited)."""
from .binary import binary_sign, sign_ste, xnor_weight
from .softmax import (attention_binarization_errors, bibert_bool, bivit_sign, pws_binarize_weight, pws_sign,
                      sab_binarize, sab_optimal_threshold, sab_select, sab_threshold)

__all__ = ["binary_sign", "sign_ste", "xnor_weight", "sab_binarize", "sab_select", "sab_threshold",
           "sab_optimal_threshold", "bibert_bool", "bivit_sign", "pws_sign", "pws_binarize_weight",
           "attention_binarization_errors"]
