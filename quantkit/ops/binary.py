"""Binary (XNOR / AND-popcount) products on packed operands (layout: :mod:`quantkit.ops.layout`).

Public functions (each has a ``*_reference`` twin in pure PyTorch, float64/int math on unpacked +-1 values):

* :func:`binary_linear` -- ``(..., W) x (N, W) -> (..., N)`` with the AdaBin/XNOR affine epilogue;
* :func:`binary_conv2d` -- channel-packed NHWC input, OHWI packed weight, exact zero padding, AdaBin epilogue,
  float output (NCHW logical shape, channels_last memory) or packed-bit output for a following binary layer;
* :func:`binary_bmm` -- batched ``Q_b @ K_b^T`` of +-1 operands (exact int32 counts);
* :func:`binary_bmm_01` -- batched ``A_b @ V_b`` with ``A_b in {0,1}`` and ``V_b in {-1,+1}`` (exact int32).

Op schemas (``kernels/register.cpp``)::

    quantkit::binary_linear(Tensor x, Tensor w, int k, Tensor? scale=None, Tensor? act_sum_scale=None,
                            Tensor? bias=None, Tensor? threshold=None) -> Tensor
    quantkit::binary_conv2d(Tensor x, Tensor w, int c_in, int[2] stride, int[2] padding, int[2] dilation,
                            Tensor? scale=None, Tensor? act_sum_scale=None, Tensor? weight_sum_scale=None,
                            Tensor? count_scale=None, Tensor? bias=None, Tensor? threshold=None) -> Tensor
    quantkit::binary_bmm(Tensor a, Tensor b, int k) -> Tensor
    quantkit::binary_bmm_01(Tensor a, Tensor b, int k) -> Tensor

The ops take per-channel parameters as float32 vectors and contiguous int32 words; the Python wrappers below
validate (raising :class:`~quantkit.errors.KernelError`), convert and broadcast, then call the op (or the reference
when the compiled kernels are missing).

Epilogue of the linear/conv ops, per output position ``p`` and output channel ``o`` (every term optional; a
missing ``scale`` means 1, any other missing term means 0)::

    y[p, o] = scale[o] * dot[p, o] + act_sum_scale[o] * asum[p] + weight_sum_scale[o] * wsum[p, o]
              + count_scale[o] * n_valid[p] + bias[o]

with, over the VALID (unpadded) taps only: ``dot = sum s_a s_w``, ``asum = sum s_a``, ``wsum = sum s_w`` and
``n_valid`` = number of valid elements (valid taps x c_in). For AdaBin (docs/algorithms.md#adabin-bitwise-form,
``a_b = alpha_a s_a + c_a``, ``w_b = alpha_w s_w + beta_w``): ``scale = alpha_w alpha_a``,
``act_sum_scale = beta_w alpha_a``, ``weight_sum_scale = alpha_w c_a``, ``count_scale = beta_w c_a``; then ``y``
equals ``F.conv2d(a_b, w_b)`` with zero padding, position by position, borders included. (For the linear op there
is no padding: ``wsum`` and ``n_valid`` are constants that fold into ``bias``.)

With ``threshold`` given, the op returns packed bits ``y >= threshold[o]`` along the output channels instead of
``y`` (int32 ``(..., ceil(N/32))``; NHWC for conv), ready for the next binary layer.

Tail bits: when the reduction length ``k`` is not a multiple of 32, the bits of the last word past ``k`` are
**ignored** (masked) by every op, kernel and reference alike -- words from :func:`~quantkit.ops.pack_bits` have them
zero; words from elsewhere may carry anything there without changing the result. (The compiled kernels check one
word per row and clear the tails in a copy only when some are set, so packed inputs pay nothing.)

Empty operands are fine (``M``, ``N``, batch or ``k`` equal to 0): ``k = 0`` gives sums of 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.errors import KernelError
from quantkit.ops._dispatch import check_devices, register_fake, use_kernel
from quantkit.ops.layout import WORD_DTYPE, conv2d_output_hw, num_words
from quantkit.ops.packing import bits_to_words_reference, check_words, unpack_bits_reference, words_to_bits_reference


# ---------------------------------------------------------------------------------------------- references
def _vec(t: Tensor | None, n: int, default: float, device: torch.device) -> Tensor:
    if t is None:
        return torch.full((n,), default, dtype=torch.float64, device=device)
    return t.to(device=device, dtype=torch.float64).reshape(n)


def _finish(y64: Tensor, threshold: Tensor | None) -> Tensor:
    """float64 result (..., N) -> float32, or packed bits (float32 y >= threshold) along the last dim."""
    y = y64.to(torch.float32)
    if threshold is None:
        return y
    return bits_to_words_reference(y >= threshold.to(device=y.device, dtype=torch.float32))


def binary_linear_reference(
    x: Tensor,
    w: Tensor,
    k: int,
    scale: Tensor | None = None,
    act_sum_scale: Tensor | None = None,
    bias: Tensor | None = None,
    threshold: Tensor | None = None,
) -> Tensor:
    """``y[..., n] = scale[n] * sum_k s_x s_w + act_sum_scale[n] * sum_k s_x + bias[n]`` on unpacked +-1 (float64)."""
    xs = unpack_bits_reference(x, k, torch.float64)
    ws = unpack_bits_reference(w, k, torch.float64)
    n = w.shape[0]
    dev = x.device
    y = (xs @ ws.T) * _vec(scale, n, 1.0, dev)
    y = y + xs.sum(-1, keepdim=True) * _vec(act_sum_scale, n, 0.0, dev) + _vec(bias, n, 0.0, dev)
    return _finish(y, threshold)


def binary_conv2d_reference(
    x: Tensor,
    w: Tensor,
    c_in: int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    scale: Tensor | None = None,
    act_sum_scale: Tensor | None = None,
    weight_sum_scale: Tensor | None = None,
    count_scale: Tensor | None = None,
    bias: Tensor | None = None,
    threshold: Tensor | None = None,
) -> Tensor:
    """Binary conv2d via ``F.conv2d`` in float64 on unpacked +-1 tensors with zero padding (padded taps are 0).

    ``asum`` = conv of the activation with an all-ones kernel, ``wsum`` = conv of an all-ones (valid) input with the
    weight, ``n_valid`` = conv of all-ones with all-ones: each term is exactly "over the valid taps".
    Returns float32 ``(N, C_out, Ho, Wo)`` (channels_last memory), or int32 packed ``(N, Ho, Wo, ceil(C_out/32))``.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    xs = unpack_bits_reference(x, c_in, torch.float64).permute(0, 3, 1, 2)  # (N, C, H, W)
    ws = unpack_bits_reference(w, c_in, torch.float64).permute(0, 3, 1, 2)  # (O, C, kh, kw)
    cout = ws.shape[0]
    dev = x.device
    conv = lambda a, b: F.conv2d(a, b, None, stride, padding, dilation)  # noqa: E731
    ones_x = torch.ones_like(xs[:1])
    ones_w = torch.ones_like(ws[:1])
    per_ch = lambda t, d: _vec(t, cout, d, dev).view(1, cout, 1, 1)  # noqa: E731
    y = conv(xs, ws) * per_ch(scale, 1.0)
    if act_sum_scale is not None:
        y = y + conv(xs, ones_w) * per_ch(act_sum_scale, 0.0)
    if weight_sum_scale is not None:
        y = y + conv(ones_x, ws) * per_ch(weight_sum_scale, 0.0)
    if count_scale is not None:
        y = y + conv(ones_x, ones_w) * per_ch(count_scale, 0.0)
    y = y + per_ch(bias, 0.0)
    if threshold is None:
        return y.to(torch.float32).contiguous(memory_format=torch.channels_last)
    return _finish(y.permute(0, 2, 3, 1), threshold)


def binary_bmm_reference(a: Tensor, b: Tensor, k: int) -> Tensor:
    """``out[..., m, n] = sum_k s_a[..., m, k] s_b[..., n, k]`` (+-1 x +-1), int32. Leading dims broadcast."""
    av = unpack_bits_reference(a, k, torch.float64)
    bv = unpack_bits_reference(b, k, torch.float64)
    return torch.matmul(av, bv.transpose(-1, -2)).round().to(torch.int32)


def binary_bmm_01_reference(a: Tensor, b: Tensor, k: int) -> Tensor:
    """``out[..., m, n] = sum_k a[..., m, k] s_b[..., n, k]`` with ``a in {0, 1}`` (bit value) and ``s_b in {-1,+1}``,
    int32 (BiViT's ``A_b @ V_b``, with ``V_b`` given transposed and packed along tokens)."""
    av = words_to_bits_reference(a, k).to(torch.float64)
    bv = unpack_bits_reference(b, k, torch.float64)
    return torch.matmul(av, bv.transpose(-1, -2)).round().to(torch.int32)


# ---------------------------------------------------------------------------------------------- validation
def _pair(v: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise KernelError(f"expected an int or a pair of ints, got {v}")
    return v  # type: ignore[return-value]


def _channel_vec(name: str, arg: str, t: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """Validate a per-output-channel parameter and return it as a contiguous float32 (n,) vector."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=torch.float32)
    if t.numel() == 1 and n != 1:
        t = t.reshape(1).expand(n)
    if t.numel() != n:
        raise KernelError(f"{name}: {arg} must have one value per output channel ({n}), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise KernelError(f"{name}: {arg} must be a float tensor, got {t.dtype}")
    if t.device != device:
        raise KernelError(f"{name}: {arg} is on {t.device} but the activations are on {device}")
    return t.detach().reshape(n).to(torch.float32).contiguous()


def binary_linear(
    x: Tensor,
    w: Tensor,
    k: int,
    *,
    scale: Tensor | None = None,
    act_sum_scale: Tensor | None = None,
    bias: Tensor | None = None,
    threshold: Tensor | None = None,
) -> Tensor:
    """Binary linear layer on packed operands.

    ``x``: packed activations ``(..., W)``; ``w``: packed weights ``(N, W)``; ``W = num_words(k)``.
    Returns float32 ``(..., N)``::

        y[..., n] = scale[n] * sum_k s_x s_w + act_sum_scale[n] * sum_k s_x + bias[n]

    or, with ``threshold (N,)``, int32 packed bits ``(..., ceil(N/32))`` of ``y >= threshold``. Bits of the last
    word past ``k`` are ignored (module docstring, "Tail bits").
    """
    name = "binary_linear"
    check_words(name, "x", x, k)
    check_words(name, "w", w, k)
    if w.dim() != 2:
        raise KernelError(f"{name}: w must be 2-D (out_features, words), got shape {tuple(w.shape)}")
    if w.device != x.device:
        raise KernelError(f"{name}: w is on {w.device} but x is on {x.device}")
    n = w.shape[0]
    vecs = [_channel_vec(name, a, t, n, x.device) for a, t in
            (("scale", scale), ("act_sum_scale", act_sum_scale), ("bias", bias), ("threshold", threshold))]
    if use_kernel(name, x.device):
        return torch.ops.quantkit.binary_linear(x.contiguous(), w.contiguous(), k, *vecs)
    return binary_linear_reference(x, w, k, *vecs)


def binary_conv2d(
    x: Tensor,
    w: Tensor,
    c_in: int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    *,
    scale: Tensor | None = None,
    act_sum_scale: Tensor | None = None,
    weight_sum_scale: Tensor | None = None,
    count_scale: Tensor | None = None,
    bias: Tensor | None = None,
    threshold: Tensor | None = None,
) -> Tensor:
    """Binary conv2d with exact zero padding (module docstring has the epilogue).

    ``x``: channel-packed NHWC activations ``(N, H, W, num_words(c_in))`` (:func:`pack_activation_nhwc`);
    ``w``: packed OHWI weights ``(C_out, kh, kw, num_words(c_in))`` (:func:`pack_conv_weight`).
    Returns float32 ``(N, C_out, Ho, Wo)`` in channels_last memory, or with ``threshold`` the packed bits
    ``(N, Ho, Wo, ceil(C_out/32))`` of ``y >= threshold[o]``. Bits of each tap's last word past ``c_in`` are
    ignored; ``Ho``/``Wo`` follow :func:`quantkit.ops.layout.conv2d_output_hw` (an empty output raises).
    """
    name = "binary_conv2d"
    check_words(name, "x", x, c_in)
    check_words(name, "w", w, c_in)
    if x.dim() != 4 or w.dim() != 4:
        raise KernelError(
            f"{name}: expected x (N, H, W, words) and w (C_out, kh, kw, words), got {tuple(x.shape)} and "
            f"{tuple(w.shape)}"
        )
    if w.device != x.device:
        raise KernelError(f"{name}: w is on {w.device} but x is on {x.device}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    conv2d_output_hw(name, x.shape[1:3], w.shape[1:3], stride, padding, dilation)
    cout = w.shape[0]
    vecs = [_channel_vec(name, a, t, cout, x.device) for a, t in (
        ("scale", scale), ("act_sum_scale", act_sum_scale), ("weight_sum_scale", weight_sum_scale),
        ("count_scale", count_scale), ("bias", bias), ("threshold", threshold))]
    if use_kernel(name, x.device):
        return torch.ops.quantkit.binary_conv2d(
            x.contiguous(), w.contiguous(), c_in, list(stride), list(padding), list(dilation), *vecs
        )
    return binary_conv2d_reference(x, w, c_in, stride, padding, dilation, *vecs)


# ---------------------------------------------------------------------------------------------- prepacked conv
PANEL_CHANNELS = 16  # output channels per weight panel (the CPU micro-kernel's register width in int32 lanes)


def binary_conv_prepack_reference(w: Tensor, c_in: int) -> tuple[Tensor, Tensor]:
    """Reference of :func:`binary_conv_prepack`: OHWI words ``(O, kh, kw, Cw)`` -> ``panels (NB, T * Cw, 16)``
    (channels past ``O`` zero words) and ``wpop (NB, T + 1, 16)`` (per-tap popcounts, then their sum)."""
    o, kh, kw, cw = w.shape
    nb = -(-o // PANEL_CHANNELS)
    t = kh * kw
    bits = unpack_bits_reference(w, c_in, torch.bool)  # tail bits past c_in dropped
    words = bits_to_words_reference(bits).reshape(o, t, cw)
    full = torch.zeros(nb * PANEL_CHANNELS, t, cw, dtype=WORD_DTYPE, device=w.device)
    full[:o] = words
    panels = full.reshape(nb, PANEL_CHANNELS, t * cw).permute(0, 2, 1).contiguous()
    pop = torch.zeros(nb * PANEL_CHANNELS, t, dtype=torch.int32, device=w.device)
    pop[:o] = bits.reshape(o, t, c_in).sum(-1).to(torch.int32)
    pop = pop.reshape(nb, PANEL_CHANNELS, t).permute(0, 2, 1)
    wpop = torch.cat([pop, pop.sum(1, keepdim=True, dtype=torch.int32)], dim=1).contiguous()
    return panels, wpop


def unprepack_conv_weight(panels: Tensor, c_out: int, kernel_size: Sequence[int]) -> Tensor:
    """The OHWI words ``(c_out, kh, kw, Cw)`` that ``panels`` was prepacked from (inverse of the panel layout)."""
    nb, tcw, _ = panels.shape
    kh, kw = _pair(kernel_size)
    cw = tcw // (kh * kw)
    return panels.permute(0, 2, 1).reshape(nb * PANEL_CHANNELS, tcw)[:c_out].reshape(c_out, kh, kw, cw)


def binary_conv_prepack(w: Tensor, c_in: int) -> tuple[Tensor, Tensor]:
    """Prepack conv weights once, for :func:`binary_conv2d_prepacked`: ``w`` OHWI words ``(C_out, kh, kw,
    num_words(c_in))`` -> ``(panels, wpop)``: int32 ``(ceil(C_out/16), kh*kw*num_words(c_in), 16)`` (sixteen
    channels' words side by side, the order the CPU micro-kernel loads them) and int32 ``(ceil(C_out/16), kh*kw + 1,
    16)`` (each tap's weight popcount, last row their sum; the epilogue's border correction). Deploy layers keep
    both as buffers, so no call repacks or re-tabulates weights."""
    name = "binary_conv_prepack"
    check_words(name, "w", w, c_in)
    if w.dim() != 4:
        raise KernelError(f"{name}: w must be OHWI packed (C_out, kh, kw, words), got shape {tuple(w.shape)}")
    if use_kernel(name, w.device):
        return tuple(torch.ops.quantkit.binary_conv_prepack(w.contiguous(), c_in))  # type: ignore[return-value]
    return binary_conv_prepack_reference(w, c_in)


AMX_GROUP = 64  # input channels per AMX k-step (one 64-byte tile row of int8)


def binary_conv_prepack_amx_reference(w: Tensor, c_in: int) -> Tensor:
    """Reference of :func:`binary_conv_prepack_amx`: OHWI words ``(O, kh, kw, Cw)`` -> int64 masks
    ``(NBp, G * T, 16)``; k-step ``g * T + t`` (64-channel group ``g``, tap ``t``), row ``r`` holds the sign of input
    channel ``64 g + 4 r + j`` of output channel ``16 b + n`` at bit ``4 n + j`` (1 = +1; 0 past ``c_in`` / ``O``)."""
    o, kh, kw, _ = w.shape
    t = kh * kw
    nb = -(-o // PANEL_CHANNELS)
    nbp = nb + nb % 2
    groups = -(-c_in // AMX_GROUP)
    bits = torch.zeros(nbp * PANEL_CHANNELS, t, groups * AMX_GROUP, dtype=torch.bool, device=w.device)
    bits[:o, :, :c_in] = unpack_bits_reference(w, c_in, torch.bool).reshape(o, t, c_in)
    # (block, n, t, g, r, j) -> (block, g, t, r, n, j): bit index 4 n + j within row r of k-step (g, t)
    b6 = bits.reshape(nbp, PANEL_CHANNELS, t, groups, 16, 4).permute(0, 3, 2, 4, 1, 5)
    weights = torch.ones(64, dtype=torch.int64, device=w.device) << torch.arange(64, device=w.device)
    masks = (b6.reshape(nbp, groups, t, 16, 64).to(torch.int64) * weights).sum(-1)  # distinct bits: sum == OR
    return masks.reshape(nbp, groups * t, 16).contiguous()


def binary_conv_prepack_amx(w: Tensor, c_in: int) -> Tensor:
    """Prepack conv weights for the AMX-INT8 path of :func:`binary_conv2d_prepacked` (its ``amx_weights``): the bit
    masks of the int8 weight tiles, int64 ``(NBp, ceil(c_in/64) * kh * kw, 16)`` with ``NBp`` = ``ceil(C_out/16)``
    rounded up to even (layout: :func:`binary_conv_prepack_amx_reference`). The same size as the packed weights;
    the kernel expands them to int8 +-1 per call, a channel-block pair at a time. Deploy layers build them once,
    where :func:`quantkit.ops.cpu_amx_supported` says the CPU can use them."""
    name = "binary_conv_prepack_amx"
    check_words(name, "w", w, c_in)
    if w.dim() != 4:
        raise KernelError(f"{name}: w must be OHWI packed (C_out, kh, kw, words), got shape {tuple(w.shape)}")
    if use_kernel(name, w.device):
        return torch.ops.quantkit.binary_conv_prepack_amx(w.contiguous(), c_in)
    return binary_conv_prepack_amx_reference(w, c_in)


def _maxout_ref(y: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    from quantkit.ops.elementwise import maxout_reference

    return maxout_reference(y, pos, neg)


def binary_conv2d_prepacked_reference(
    x: Tensor, panels: Tensor, wpop: Tensor, c_in: int, c_out: int, kernel_size: Sequence[int],
    stride: Sequence[int] | int = 1, padding: Sequence[int] | int = 0, dilation: Sequence[int] | int = 1,
    scale: Tensor | None = None, act_sum_scale: Tensor | None = None, weight_sum_scale: Tensor | None = None,
    count_scale: Tensor | None = None, bias: Tensor | None = None, residual: Tensor | None = None,
    maxout_pos: Tensor | None = None, maxout_neg: Tensor | None = None, threshold: Tensor | None = None,
    float_out: bool = True,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`binary_conv2d_prepacked`: :func:`binary_conv2d_reference` on the unprepacked weights,
    then ``+ residual``, Maxout and the threshold in float32."""
    w = unprepack_conv_weight(panels, c_out, kernel_size)
    y = binary_conv2d_reference(x, w, c_in, stride, padding, dilation, scale, act_sum_scale, weight_sum_scale,
                                count_scale, bias)
    if residual is not None:
        y = y + residual
    if maxout_pos is not None:
        y = _maxout_ref(y, maxout_pos, maxout_neg)
    y = y.contiguous(memory_format=torch.channels_last)
    bits = (bits_to_words_reference(y.permute(0, 2, 3, 1) >= threshold.to(y.device, torch.float32))
            if threshold is not None else x.new_empty((0,)))
    return (y if float_out else y.new_empty((0,))), bits


def binary_conv2d_prepacked(
    x: Tensor,
    panels: Tensor,
    wpop: Tensor,
    c_in: int,
    c_out: int,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    *,
    scale: Tensor | None = None,
    act_sum_scale: Tensor | None = None,
    weight_sum_scale: Tensor | None = None,
    count_scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    maxout_pos: Tensor | None = None,
    maxout_neg: Tensor | None = None,
    threshold: Tensor | None = None,
    float_out: bool = True,
    amx_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`binary_conv2d` on weights from :func:`binary_conv_prepack`, with a fused epilogue: per position and
    channel ``y`` (the affine epilogue), then ``y += residual`` (float32 ``(N, C_out, Ho, Wo)``), then Maxout
    ``y * (maxout_pos if y > 0 else maxout_neg)`` (:func:`quantkit.ops.maxout`'s values), then both or either of:
    the float32 ``y`` (channels_last; ``float_out``) and the packed bits of ``y >= threshold``, the input of the
    next binary layer. Returns ``(y, bits)``, an empty tensor in place of an output not asked for. One pass over
    the output instead of the conv, add, Maxout and packing passes.

    ``amx_weights`` (from :func:`binary_conv_prepack_amx`, optional) lets the CPU kernel run on AMX-INT8 tiles where
    the CPU has them (:func:`quantkit.ops.cpu_amx`); the values are the same either way."""
    name = "binary_conv2d_prepacked"
    check_words(name, "x", x, c_in)
    if x.dim() != 4:
        raise KernelError(f"{name}: expected x (N, H, W, words), got {tuple(x.shape)}")
    kernel_size, stride, padding, dilation = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    for arg, t in (("panels", panels), ("wpop", wpop)):
        if not isinstance(t, Tensor) or t.dtype != WORD_DTYPE or t.device != x.device:
            raise KernelError(f"{name}: {arg} must be an int32 tensor from binary_conv_prepack on {x.device}")
    if not float_out and threshold is None:
        raise KernelError(f"{name}: nothing to compute: pass float_out=True and/or a threshold")
    if (maxout_pos is None) != (maxout_neg is None):
        raise KernelError(f"{name}: maxout_pos and maxout_neg go together")
    ho, wo = conv2d_output_hw(name, x.shape[1:3], kernel_size, stride, padding, dilation)
    if residual is not None and (residual.dtype != torch.float32 or tuple(residual.shape) != (x.shape[0], c_out, ho, wo)):
        raise KernelError(f"{name}: residual must be float32 {(x.shape[0], c_out, ho, wo)}, got "
                          f"{residual.dtype} {tuple(residual.shape)}")
    vecs = [_channel_vec(name, a, t, c_out, x.device) for a, t in (
        ("scale", scale), ("act_sum_scale", act_sum_scale), ("weight_sum_scale", weight_sum_scale),
        ("count_scale", count_scale), ("bias", bias))]
    mo = [_channel_vec(name, a, t, c_out, x.device) for a, t in (("maxout_pos", maxout_pos),
                                                                  ("maxout_neg", maxout_neg))]
    thr = _channel_vec(name, "threshold", threshold, c_out, x.device)
    if amx_weights is not None:
        nb = -(-c_out // PANEL_CHANNELS)
        want = (nb + nb % 2, -(-c_in // 64) * kernel_size[0] * kernel_size[1], PANEL_CHANNELS)
        if (not isinstance(amx_weights, Tensor) or amx_weights.dtype != torch.int64
                or tuple(amx_weights.shape) != want):
            raise KernelError(f"{name}: amx_weights must be int64 {want} from binary_conv_prepack_amx")
    if use_kernel(name, x.device):
        return tuple(torch.ops.quantkit.binary_conv2d_prepacked(  # type: ignore[return-value]
            x.contiguous(), panels, wpop, c_in, c_out, list(kernel_size), list(stride), list(padding),
            list(dilation), *vecs, residual, *mo, thr, float_out,
            amx_weights if amx_weights is not None and amx_weights.device.type == "cpu" else None))
    return binary_conv2d_prepacked_reference(x, panels, wpop, c_in, c_out, kernel_size, stride, padding, dilation,
                                             *vecs, residual, *mo, thr, float_out)


def _bmm_operands(name: str, a: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    check_words(name, "a", a, k)
    check_words(name, "b", b, k)
    if a.dim() < 2 or b.dim() < 2:
        raise KernelError(f"{name}: a and b must be (..., M, words) and (..., N, words)")
    if a.device != b.device:
        raise KernelError(f"{name}: a is on {a.device} but b is on {b.device}")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as exc:
        raise KernelError(f"{name}: batch dims {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} do not broadcast") from exc
    nbatch = 1
    for d in batch:
        nbatch *= d
    # explicit batch count: reshape(-1, ...) cannot infer it when M, N or the word count is 0
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(nbatch, *a.shape[-2:]).contiguous()
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(nbatch, *b.shape[-2:]).contiguous()
    return a3, b3, tuple(batch)


def binary_bmm(a: Tensor, b: Tensor, k: int) -> Tensor:
    """``Q_b @ K_b^T`` for +-1 operands: ``a (..., M, W)``, ``b (..., N, W)`` (leading dims broadcast) ->
    exact int32 ``(..., M, N)`` with ``out = sum_k s_a s_b = k - 2 popcount(a XOR b)`` (tail bits past ``k``
    ignored; ``M``, ``N``, ``k`` or the batch may be 0)."""
    a3, b3, batch = _bmm_operands("binary_bmm", a, b, k)
    if use_kernel("binary_bmm", a.device):
        out = torch.ops.quantkit.binary_bmm(a3, b3, k)
    else:
        out = binary_bmm_reference(a3, b3, k)
    return out.reshape(*batch, a.shape[-2], b.shape[-2])


def binary_bmm_01(a: Tensor, b: Tensor, k: int) -> Tensor:
    """``A_b @ V_b`` with ``A_b in {0, 1}`` packed along the reduction (token) axis ``a (..., M, W)`` and
    ``V_b in {-1, +1}`` given transposed ``b (..., D, W)`` -> exact int32 ``(..., M, D)``,
    ``out = 2 popcount(a AND b) - popcount(a)`` (tail bits past ``k`` ignored; empty operands allowed)."""
    a3, b3, batch = _bmm_operands("binary_bmm_01", a, b, k)
    if use_kernel("binary_bmm_01", a.device):
        out = torch.ops.quantkit.binary_bmm_01(a3, b3, k)
    else:
        out = binary_bmm_01_reference(a3, b3, k)
    return out.reshape(*batch, a.shape[-2], b.shape[-2])


# ---------------------------------------------------------------------------------------------- fake impls
@register_fake("binary_linear")
def _binary_linear_fake(x, w, k, scale=None, act_sum_scale=None, bias=None, threshold=None):
    check_devices("binary_linear", x=x, w=w, scale=scale, act_sum_scale=act_sum_scale, bias=bias, threshold=threshold)
    torch._check(x.dim() >= 1 and w.dim() == 2 and x.shape[-1] == num_words(k) and w.shape[1] == num_words(k))
    n = w.shape[0]
    if threshold is not None:
        return x.new_empty((*x.shape[:-1], num_words(n)), dtype=WORD_DTYPE)
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@register_fake("binary_conv2d")
def _binary_conv2d_fake(x, w, c_in, stride, padding, dilation, scale=None, act_sum_scale=None,
                        weight_sum_scale=None, count_scale=None, bias=None, threshold=None):
    check_devices("binary_conv2d", x=x, w=w, scale=scale, act_sum_scale=act_sum_scale,
                  weight_sum_scale=weight_sum_scale, count_scale=count_scale, bias=bias, threshold=threshold)
    torch._check(x.dim() == 4 and w.dim() == 4 and x.shape[3] == num_words(c_in) and w.shape[3] == num_words(c_in))
    ho, wo = conv2d_output_hw("binary_conv2d", x.shape[1:3], w.shape[1:3], stride, padding, dilation)
    if threshold is not None:
        return x.new_empty((x.shape[0], ho, wo, num_words(w.shape[0])), dtype=WORD_DTYPE)
    return x.new_empty((x.shape[0], w.shape[0], ho, wo), dtype=torch.float32).contiguous(
        memory_format=torch.channels_last
    )


@register_fake("binary_conv_prepack")
def _binary_conv_prepack_fake(w, c_in):
    check_devices("binary_conv_prepack", w=w)
    torch._check(w.dim() == 4 and w.shape[3] == num_words(c_in))
    nb = (w.shape[0] + PANEL_CHANNELS - 1) // PANEL_CHANNELS
    t = w.shape[1] * w.shape[2]
    return (w.new_empty((nb, t * w.shape[3], PANEL_CHANNELS), dtype=WORD_DTYPE),
            w.new_empty((nb, t + 1, PANEL_CHANNELS), dtype=WORD_DTYPE))


@register_fake("binary_conv_prepack_amx")
def _binary_conv_prepack_amx_fake(w, c_in):
    check_devices("binary_conv_prepack_amx", w=w)
    torch._check(w.dim() == 4 and w.shape[3] == num_words(c_in))
    nb = (w.shape[0] + PANEL_CHANNELS - 1) // PANEL_CHANNELS
    return w.new_empty((nb + nb % 2, -(-c_in // AMX_GROUP) * w.shape[1] * w.shape[2], PANEL_CHANNELS),
                       dtype=torch.int64)


@register_fake("binary_conv2d_prepacked")
def _binary_conv2d_prepacked_fake(x, panels, wpop, c_in, c_out, kernel_size, stride, padding, dilation, scale=None,
                                  act_sum_scale=None, weight_sum_scale=None, count_scale=None, bias=None,
                                  residual=None, maxout_pos=None, maxout_neg=None, threshold=None, float_out=True,
                                  amx_weights=None):
    check_devices("binary_conv2d_prepacked", x=x, panels=panels, wpop=wpop, scale=scale, bias=bias,
                  residual=residual, threshold=threshold, amx_weights=amx_weights)
    torch._check(x.dim() == 4 and x.shape[3] == num_words(c_in))
    ho, wo = conv2d_output_hw("binary_conv2d_prepacked", x.shape[1:3], kernel_size, stride, padding, dilation)
    y = (x.new_empty((x.shape[0], c_out, ho, wo), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
         if float_out else x.new_empty((0,), dtype=torch.float32))
    bits = (x.new_empty((x.shape[0], ho, wo, num_words(c_out)), dtype=WORD_DTYPE) if threshold is not None
            else x.new_empty((0,), dtype=WORD_DTYPE))
    return y, bits


def _bmm_fake(name, a, b, k):
    check_devices(name, a=a, b=b)
    torch._check(a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0])
    torch._check(a.shape[2] == num_words(k) and b.shape[2] == num_words(k))
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.int32)


@register_fake("binary_bmm")
def _binary_bmm_fake(a, b, k):
    return _bmm_fake("binary_bmm", a, b, k)


@register_fake("binary_bmm_01")
def _binary_bmm_01_fake(a, b, k):
    return _bmm_fake("binary_bmm_01", a, b, k)


__all__ = [
    "binary_conv_prepack",
    "binary_conv2d_prepacked",
    "binary_conv_prepack_reference",
    "binary_conv2d_prepacked_reference",
    "unprepack_conv_weight",
    "binary_linear",
    "binary_conv2d",
    "binary_bmm",
    "binary_bmm_01",
    "binary_linear_reference",
    "binary_conv2d_reference",
    "binary_bmm_reference",
    "binary_bmm_01_reference",
]
