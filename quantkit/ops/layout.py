"""The bit layout of every packed binary tensor in quantkit -- CPU kernels, CUDA kernels and ONNX export all use
this one layout, and this module is the single place it is written down.

Packing
-------
A tensor of binary values ``s in {-1, +1}`` with shape ``(..., K)`` is packed **along its last dimension** (the
reduction dimension: ``in_features`` of a linear layer, channels of an NHWC activation, channels of an OHWI conv
weight) into ``num_words(K) = ceil(K / 32)`` little-endian ``int32`` words:

* element ``k`` sits in bit ``k % 32`` of word ``k // 32`` (bit 0 = least significant);
* bit 1 means ``+1`` and bit 0 means ``-1``; from a float tensor the bit is ``x >= 0`` (so ``sign(0) = +1`` and
  ``-0.0`` gives +1, NaN gives -1), from a bool tensor the bit is the bool itself;
* the unused high bits of the last word (``K`` not a multiple of 32) are **zero in every operand** -- kernels rely
  on it: ``popcount(a XOR w)`` and ``popcount(a AND w)`` never see tail bits;
* words are stored as ``torch.int32`` (bit 31 set gives a negative int32; treat words as raw 32-bit patterns).

Products
--------
For two packed rows ``a, w`` of true length ``K``:

* ``sum_k s_a[k] * s_w[k] = K - 2 * popcount(a XOR w)``  (XNOR-popcount; use the TRUE ``K``, not the padded one);
* the same from AND: ``4 * popcount(a AND w) - 2 * popcount(a) - 2 * popcount(w) + K``;
* ``sum_k s_a[k] = 2 * popcount(a) - K``;
* {0, 1} x {-1, +1} (BiViT's ``A_b @ V_b``; ``a`` holds bit 1 for value 1 and bit 0 for value 0):
  ``sum_k a[k] * s_v[k] = 2 * popcount(a AND v) - popcount(a)``.

Tensors
-------
* linear / GEMM: activations ``(..., M, W)``, weights ``(N, W)``, ``W = num_words(in_features)``;
* conv2d: activations **NHWC** ``(batch, H, W, num_words(C_in))`` (channels packed), weights **OHWI**
  ``(C_out, kh, kw, num_words(C_in))``;
* attention: ``Q_b (B, M, W)``, ``K_b (B, N, W)`` packed along the head dim; for ``A_b @ V_b`` the attention bits are
  packed along the key/token axis ``(B, M, W)`` and ``V_b`` is given transposed, packed along tokens ``(B, D, W)``.

Zero padding of a binary convolution is *exact*: a padded tap contributes 0 to every sum (it is neither +1 nor
-1), exactly like ``F.conv2d`` on the +-1 tensor with zero padding. Kernels repack weights internally into their
micro-kernel order; the layout above is the only one crossing an API boundary.
"""
from __future__ import annotations

import torch

WORD_BITS: int = 32
"""Bits per packed word."""

WORD_DTYPE: torch.dtype = torch.int32
"""Storage dtype of packed words."""


def num_words(k: int) -> int:
    """Number of 32-bit words holding ``k`` packed values (``ceil(k / 32)``; 0 for ``k == 0``)."""
    if k < 0:
        raise ValueError(f"num_words: k must be >= 0, got {k}")
    return (k + WORD_BITS - 1) // WORD_BITS


def conv2d_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int
) -> int:
    """Output length of one spatial axis of a convolution (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


__all__ = ["WORD_BITS", "WORD_DTYPE", "num_words", "conv2d_output_size"]
