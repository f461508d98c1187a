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
* the unused high bits of the last word (``K`` not a multiple of 32) are written **zero** by the packer, so
  ``popcount(a XOR w)`` and ``popcount(a AND w)`` never see tail bits;
* words are stored as ``torch.int32`` (bit 31 set gives a negative int32; treat words as raw 32-bit patterns);
* words that did not come from the packer may have tail bits set: every op **ignores** them (the compiled kernels
  clear them in a copy of such an operand first, the references unpack only ``K`` bits), so a result never
  depends on the tail.

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

from typing import Sequence

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


_INT64_MAX = 2**63 - 1


def int_pair(value: int | Sequence[int], name: str, minimum: int, op: str) -> tuple[int, int]:
    """``value`` (an int, or two ints: height, width) as an int pair, each >= ``minimum``; the op wrappers' argument
    check. Raises :class:`~quantkit.errors.KernelError` naming ``op`` and ``name`` otherwise (a bool is refused)."""
    from quantkit.errors import KernelError

    if isinstance(value, bool):
        raise KernelError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise KernelError(f"{op}: {name} must be an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2:
            raise KernelError(f"{op}: {name} must be an int or a pair of ints (height, width), got {value!r}")
    if min(pair) < minimum:
        raise KernelError(f"{op}: {name} must be >= {minimum}, got {pair}")
    return pair  # type: ignore[return-value]


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of one spatial axis of a convolution, PyTorch's formula with FLOOR division:
    ``(size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1`` (<= 0 when the kernel does not fit).
    Works on symbolic sizes; :func:`conv2d_output_hw` adds the checks."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_output_hw(
    name: str,
    in_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """Checked ``(Ho, Wo)`` of a 2-D convolution: the one definition behind every op wrapper and fake (meta)
    implementation, with the rules of the C++ kernels (``kernels/conv_shape.h``): kernel >= 1, stride >= 1,
    dilation >= 1, padding >= 0, the intermediates ``size + 2 * padding`` and ``dilation * (kernel - 1) + 1`` within
    int64, and a non-empty output. Raises :class:`~quantkit.errors.KernelError` naming ``name`` otherwise."""
    from quantkit.errors import KernelError

    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise KernelError(f"{name}: stride, padding and dilation must have 2 values each")
    out = []
    for axis, size, k, s, p, d in zip(("height", "width"), in_hw, kernel_hw, stride, padding, dilation):
        if k < 1:
            raise KernelError(f"{name}: the kernel has {k} taps along {axis}; it needs at least 1")
        if s < 1 or d < 1 or p < 0:
            raise KernelError(
                f"{name}: need stride >= 1, dilation >= 1 and padding >= 0 along {axis}, got stride {s}, "
                f"dilation {d}, padding {p}"
            )
        if size + 2 * p > _INT64_MAX:
            raise KernelError(f"{name}: padding {p} along {axis} overflows int64 (input size {size})")
        if d * (k - 1) >= _INT64_MAX:
            raise KernelError(f"{name}: dilation {d} x (kernel {k} - 1) along {axis} overflows int64")
        out.append(conv2d_output_size(size, k, s, p, d))
    ho, wo = out
    if ho < 1 or wo < 1:
        raise KernelError(
            f"{name}: input {in_hw[0]}x{in_hw[1]} is too small for kernel {kernel_hw[0]}x{kernel_hw[1]} with stride "
            f"{tuple(stride)}, padding {tuple(padding)} and dilation {tuple(dilation)}: the output would be {ho}x{wo}; "
            "enlarge the input or the padding"
        )
    return ho, wo


__all__ = ["WORD_BITS", "WORD_DTYPE", "num_words", "conv2d_output_size", "conv2d_output_hw"]
