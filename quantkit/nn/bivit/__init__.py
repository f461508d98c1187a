"""BiViT layers (He et al., "BiViT: Extremely Compressed Binary Vision Transformers", ICCV 2023, arXiv 2211.07091).

- :mod:`.linear` -- :class:`BinaryLinearPWS`: binary weights with parameterized weight scales (a preset of the
  generic :class:`~quantkit.nn.layers.QuantLinear`);
- :mod:`.core` -- the attention math, simulated (:func:`binary_attention`) and on packed bits
  (:func:`binary_attention_packed`), with the registered "sab" | "bibert" choice (``ATTENTION_BINARIZERS``);
- :mod:`.heads` -- heads / masks plumbing; :mod:`.swin` -- torchvision Swin's windowed attention around a core;
- :mod:`.wrappers` -- the simulated modules replacing ``nn.MultiheadAttention``, timm-style qkv/proj attention and
  torchvision's ``ShiftedWindowAttention``;
- :mod:`.deploy` -- their deploy forms (packed projections, ``binary_bmm`` / ``binary_bmm_01`` core).

With ``binarize=True`` (the default) Q, K, V are ``sign`` of the projections (clipped STE), the attention is
binarized by SAB (or Bool for ``bibert``), ``A_b V_b`` is an integer count (no normalisation; the next layer only
sees its sign), and the projections are :class:`BinaryLinearPWS` with binary inputs.
"""
from .core import ATTENTION_BINARIZERS, ATTENTION_METHODS, attention_binarizer, binary_attention, binary_attention_packed
from .deploy import (BinaryAttentionDeploy, MultiheadAttentionDeploy, QKVAttentionDeploy,
                     ShiftedWindowAttentionDeploy)
from .linear import BinaryLinearPWS, BiViTLinearOptions
from .swin import shifted_window_attention_forward
from .wrappers import (BinaryAttentionOptions, BinaryMultiheadAttention, BinaryQKVAttention,
                       BinaryShiftedWindowAttention)

__all__ = ["BinaryLinearPWS", "BiViTLinearOptions", "BinaryAttentionOptions", "binary_attention",
           "binary_attention_packed", "ATTENTION_BINARIZERS", "ATTENTION_METHODS", "attention_binarizer",
           "BinaryMultiheadAttention", "BinaryQKVAttention", "BinaryShiftedWindowAttention", "BinaryAttentionDeploy",
           "MultiheadAttentionDeploy", "QKVAttentionDeploy", "ShiftedWindowAttentionDeploy",
           "shifted_window_attention_forward"]
