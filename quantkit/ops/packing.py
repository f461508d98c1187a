"""Bit packing and unpacking (layout: :mod:`quantkit.ops.layout`).

Public functions:

* :func:`pack_bits` -- float/bool ``(..., K)`` -> int32 words ``(..., ceil(K/32))``;
* :func:`unpack_bits` -- words -> +-1 values ``(..., K)``;
* :func:`pack_activation_nhwc` -- float NCHW activation -> channel-packed NHWC words (input of ``binary_conv2d``);
* :func:`pack_conv_weight` / :func:`pack_linear_weight` -- float weights -> packed OHWI / (N, W) words;
* ``*_reference`` -- the pure-PyTorch definitions the kernels are tested against (and run when the compiled
  kernels are missing).

Op schemas (``kernels/register.cpp``)::

    quantkit::pack_bits(Tensor x, Tensor? threshold=None) -> Tensor
    quantkit::unpack_bits(Tensor words, int k, ScalarType? dtype=None) -> Tensor
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.errors import KernelError
from quantkit.ops._dispatch import check_devices, register_fake, use_kernel
from quantkit.ops.layout import WORD_BITS, WORD_DTYPE, num_words

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- references
def bits_to_words_reference(bits: Tensor) -> Tensor:
    """Pack a bool tensor ``(..., K)`` into int32 words ``(..., ceil(K/32))`` (bit k%32 of word k//32; tail 0)."""
    k = bits.shape[-1]
    nw = num_words(k)
    padded = torch.zeros(*bits.shape[:-1], nw * WORD_BITS, dtype=torch.int64, device=bits.device)
    padded[..., :k] = bits.to(torch.int64)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=bits.device) << torch.arange(
        WORD_BITS, device=bits.device
    )
    words = (padded.reshape(*bits.shape[:-1], nw, WORD_BITS) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed 32-bit
    return words.to(WORD_DTYPE)


def words_to_bits_reference(words: Tensor, k: int) -> Tensor:
    """Unpack int32 words ``(..., W)`` into a bool tensor ``(..., k)``."""
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)[..., :k].bool()


def pack_bits_reference(x: Tensor, threshold: Tensor | None = None) -> Tensor:
    """Reference of :func:`pack_bits`: bit = ``x >= threshold`` (0 when None) for floats, ``x`` for bools."""
    if x.dtype == torch.bool:
        return bits_to_words_reference(x)
    t = 0.0 if threshold is None else threshold.to(x.dtype)
    return bits_to_words_reference(x >= t)


def unpack_bits_reference(words: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference of :func:`unpack_bits`: +1 for bit 1, -1 for bit 0 (``dtype=torch.bool`` gives the raw bits)."""
    bits = words_to_bits_reference(words, k)
    if dtype == torch.bool:
        return bits
    return bits.to(dtype) * 2 - 1


# ---------------------------------------------------------------------------------------------- validation
def _check_pack_input(x: Tensor, threshold: Tensor | None) -> None:
    if not isinstance(x, Tensor):
        raise KernelError(f"pack_bits: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES and x.dtype != torch.bool:
        raise KernelError(
            f"pack_bits: x has dtype {x.dtype}; expected a float (bit = x >= 0) or bool tensor. "
            "Convert it with x.float() first."
        )
    if x.dim() < 1:
        raise KernelError("pack_bits: x must have at least one dimension (the packed, last dimension)")
    if threshold is not None:
        if x.dtype == torch.bool:
            raise KernelError("pack_bits: threshold is only meaningful for float inputs; pass threshold=None")
        if threshold.shape != (x.shape[-1],):
            raise KernelError(
                f"pack_bits: threshold must have shape ({x.shape[-1]},) (one value per element of the last "
                f"dimension), got {tuple(threshold.shape)}"
            )
        if threshold.device != x.device:
            raise KernelError(f"pack_bits: threshold is on {threshold.device} but x is on {x.device}")


def check_words(name: str, arg: str, words: Tensor, k: int | None = None) -> None:
    """Raise KernelError unless ``words`` is an int32 packed tensor (with ``num_words(k)`` words when k given)."""
    if not isinstance(words, Tensor):
        raise KernelError(f"{name}: {arg} must be a Tensor, got {type(words).__name__}")
    if words.dtype != WORD_DTYPE:
        raise KernelError(
            f"{name}: {arg} must hold packed int32 words (quantkit.ops.pack_bits), got dtype {words.dtype}"
        )
    if words.dim() < 1:
        raise KernelError(f"{name}: {arg} must have at least one dimension (the packed words)")
    if k is not None:
        if k < 0:
            raise KernelError(f"{name}: k must be >= 0, got {k}")
        if words.shape[-1] != num_words(k):
            raise KernelError(
                f"{name}: {arg} has {words.shape[-1]} words in its last dimension but k={k} needs "
                f"num_words(k)={num_words(k)}; pack along the reduction dimension with pack_bits"
            )


# ---------------------------------------------------------------------------------------------- public ops
def pack_bits(x: Tensor, threshold: Tensor | None = None) -> Tensor:
    """Pack ``x (..., K)`` along its last dimension into int32 words ``(..., ceil(K/32))``.

    Float input: bit = ``x >= threshold`` elementwise along the last dimension (``threshold`` of shape ``(K,)``,
    default 0 -- quantkit's sign convention, ``sign(0) = +1``). Bool input: bit = ``x``. Any strides are accepted.
    See :mod:`quantkit.ops.layout` for the layout.
    """
    _check_pack_input(x, threshold)
    if use_kernel("pack_bits", x.device):
        return torch.ops.quantkit.pack_bits(x, threshold)
    return pack_bits_reference(x, threshold)


def unpack_bits(words: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack int32 words ``(..., ceil(k/32))`` into ``(..., k)`` values: +1 for bit 1, -1 for bit 0, in ``dtype``
    (``torch.bool`` returns the raw bits). Bits of the last word past ``k`` are ignored."""
    check_words("unpack_bits", "words", words, k)
    if dtype not in _FLOAT_DTYPES + (torch.bool, torch.int8, torch.int32, torch.int64):
        raise KernelError(f"unpack_bits: unsupported dtype {dtype}; use a float, int or bool dtype")
    if use_kernel("unpack_bits", words.device):
        return torch.ops.quantkit.unpack_bits(words, k, dtype)
    return unpack_bits_reference(words, k, dtype)


def pack_activation_nhwc(x: Tensor, threshold: Tensor | None = None) -> Tensor:
    """Float activation ``(N, C, H, W)`` (any memory format) -> packed NHWC words ``(N, H, W, ceil(C/32))``:
    the input layout of :func:`quantkit.ops.binary_conv2d`. ``threshold`` is per channel ``(C,)``.
    A channels_last input packs without a transpose copy."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise KernelError(
            f"pack_activation_nhwc: expected a 4-D (N, C, H, W) tensor, got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    return pack_bits(x.permute(0, 2, 3, 1), threshold)


def pack_conv_weight(weight: Tensor) -> Tensor:
    """Float conv weight ``(C_out, C_in, kh, kw)`` -> packed OHWI words ``(C_out, kh, kw, ceil(C_in/32))``
    (bit = weight >= 0). Binarize first (e.g. subtract the AdaBin center) if the sign is not of the raw weight."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise KernelError("pack_conv_weight: expected a 4-D (C_out, C_in, kh, kw) weight")
    return pack_bits(weight.detach().permute(0, 2, 3, 1))


def pack_linear_weight(weight: Tensor) -> Tensor:
    """Float linear weight ``(N, K)`` -> packed words ``(N, ceil(K/32))`` (bit = weight >= 0)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise KernelError("pack_linear_weight: expected a 2-D (out_features, in_features) weight")
    return pack_bits(weight.detach())


# ---------------------------------------------------------------------------------------------- fake impls
@register_fake("pack_bits")
def _pack_bits_fake(x: Tensor, threshold: Tensor | None = None) -> Tensor:
    check_devices("pack_bits", x=x, threshold=threshold)
    return x.new_empty((*x.shape[:-1], num_words(x.shape[-1])), dtype=WORD_DTYPE)


@register_fake("unpack_bits")
def _unpack_bits_fake(words: Tensor, k: int, dtype: torch.dtype | None = None) -> Tensor:
    return words.new_empty((*words.shape[:-1], k), dtype=dtype or torch.float32)


__all__ = [
    "pack_bits",
    "unpack_bits",
    "pack_activation_nhwc",
    "pack_conv_weight",
    "pack_linear_weight",
    "pack_bits_reference",
    "unpack_bits_reference",
    "bits_to_words_reference",
    "words_to_bits_reference",
    "check_words",
]
