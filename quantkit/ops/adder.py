"""Integer l1 ("adder") GEMM and conv2d: the deploy arithmetic of AdderNet PTQ (docs/kernels.md#adder-integer-math).

Math (one output channel ``o`` of group ``g = group_index[o]``)::

    S[m, o] = sum_k | xq[g, m, k] - w_mult * wq[o, k] |          (exact integer l1 sum, int32)
    Y[m, o] = -delta[o] * S[m, o] + bias[o]                        (float32)

* ``xq`` carries a leading group dimension ``G``: the activations are re-quantized once per group, each group on its
  own grid (step 4). Output channel ``o`` reads ``xq[group_index[o]]``.
* ``w_mult`` selects the integer form of step 5:
  ``w_mult=1``: the signed (Fig. 3) form ``|q_x - q_w|``, ``Y = -delta_g * S + bias``;
  ``w_mult=2``: the unsigned code form ``|q_x - 2 q_w|`` with ``q_x`` in ``[0, 2^b - 1]`` and ``q_w`` signed
  ``b``-bit, ``Y = -delta_x * S + bias`` where ``delta_x = s_g / (2^b - 1)``. Weights therefore stay stored at
  their own bit width (int8 for b <= 8); the doubling is done inside the kernel and is exact.
* Conv uses ZERO padding in the integer domain: a padded tap has ``q_x = 0`` and contributes ``|0 - w_mult * q_w|``,
  which is exactly what the float AdderNet with zero padding computes (a padded ``x = 0`` quantizes to ``q_x = 0``
  on every symmetric grid).

Integer inputs may have any integer dtype (int8/uint8/int16/int32/int64) and any strides; the output is int32
(raw sums) or float32, and conv outputs come in channels-last memory format. The compiled CPU kernel
(``kernels/cpu/adder.cpp``):

* maps the activations to a common unsigned grid and clamps the weights into it with an exact per-channel
  correction (``|x - w| = |x - clamp(w, lo, hi)| + dist(w, [lo, hi])`` whenever ``lo <= x <= hi``), so every form
  whose activations span at most 256 consecutive integers -- all forms for b <= 8, the 8-bit code form included --
  runs on u8 ``VPSADBW``; wider activations use an exact u16 path (portable loops);
* runs conv as an indirect GEMM over channels-last rows (no im2col copy); padded taps read a row of ``q_x = 0``;
* sorts output channels by group so a 16-channel block reads one group's activations (sorted ``group_index`` is
  fastest, any order is exact);
* packs the weights on every call of these four ops; deploy layers pack once instead, at ``convert``, with
  :func:`adder_prepack`, keep the packing as buffers and call :func:`adder_conv2d_packed` /
  :func:`adder_linear_packed`, which also fuse the per-group activation re-quantization into the kernel's input side
  (float input, no ``(G, ...)`` code tensor);
* picks AVX-512BW, AVX2 or portable code at run time (``QUANTKIT_CPU_ISA=portable|avx2|avx512`` lowers it) and
  runs on PyTorch's intra-op thread pool.

Sums must fit int32: the kernels and the references reject, with the reason, operands outside the int32 range or
with ``(max|x| + max|w_mult * w|) * K > 2^31 - 1`` (``K`` = taps x channels) before any arithmetic that could
overflow (for example int64 operands near +-2^63).

Each op has a pure-PyTorch reference (``*_reference``, int64 math, chunked so memory stays bounded), used when the
compiled kernels are missing (with one loud warning) and by the tests.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from quantkit.errors import KernelError
from quantkit.ops._dispatch import check_devices, has_op, register_fake, use_kernel
from quantkit.ops.layout import conv2d_output_hw, conv2d_output_size, int_pair
from quantkit.quantizers.uniform import qrange

__all__ = [
    "adder_l1",
    "adder_linear",
    "adder_l1_conv2d",
    "adder_conv2d",
    "adder_l1_reference",
    "adder_linear_reference",
    "adder_l1_conv2d_reference",
    "adder_conv2d_reference",
    "adder_conv2d_output_size",
    "adder_prepack",
    "adder_conv2d_packed",
    "adder_linear_packed",
    "has_packed_kernels",
]

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# Bound on the elements of the int64 |x - w| temporaries of the references (32 MiB).
_REF_CHUNK_ELEMS = 1 << 22
_INT32_MAX = 2**31 - 1

IntPair = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------------------------
# validation (the Python wrappers raise KernelError before the C++ TORCH_CHECKs would)
# ---------------------------------------------------------------------------------------------------------------
def _pair(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    return int_pair(value, name, minimum, "adder_conv2d")


def _check_int(t: torch.Tensor, name: str, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise KernelError(
            f"{fn}: {name} must be an integer tensor (int8/uint8/int16/int32/int64), got {t.dtype}; "
            "quantize it first (e.g. torch.round(x / step).to(torch.int8))"
        )


def _check_epilogue(
    fn: str, n_out: int, device: torch.device, delta: torch.Tensor, bias: Optional[torch.Tensor]
) -> None:
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point() or tuple(delta.shape) != (n_out,):
        got = f"{tuple(delta.shape)} {delta.dtype}" if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise KernelError(f"{fn}: delta must be a float tensor of shape ({n_out},) (one step per output channel), got {got}")
    if delta.device != device:
        raise KernelError(f"{fn}: delta is on {delta.device} but the operands are on {device}; move it with .to()")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (n_out,):
            got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise KernelError(f"{fn}: bias must be None or a float tensor of shape ({n_out},), got {got}")
        if bias.device != device:
            raise KernelError(f"{fn}: bias is on {bias.device} but the operands are on {device}; move it with .to()")


def _check_groups(fn: str, group_index: torch.Tensor, n_out: int, groups: int, device: torch.device) -> None:
    if not isinstance(group_index, torch.Tensor) or group_index.dtype not in _INT_DTYPES or group_index.dim() != 1:
        raise KernelError(f"{fn}: group_index must be a 1-D integer tensor (the group of each output channel)")
    if group_index.numel() != n_out:
        raise KernelError(
            f"{fn}: group_index has {group_index.numel()} entries but the weight has {n_out} output channels"
        )
    if group_index.device != device:
        raise KernelError(f"{fn}: group_index is on {group_index.device} but the operands are on {device}")
    if torch.compiler.is_compiling() or group_index.device.type == "meta":
        return  # value checks are data-dependent; the compiled kernel checks the range itself
    if n_out and (int(group_index.min()) < 0 or int(group_index.max()) >= groups):
        raise KernelError(
            f"{fn}: group_index values must lie in [0, {groups}) (xq has {groups} groups in its first dimension), "
            f"got range [{int(group_index.min())}, {int(group_index.max())}]"
        )


def _check_w_mult(fn: str, w_mult: int) -> None:
    if not isinstance(w_mult, int) or w_mult not in (1, 2):
        raise KernelError(f"{fn}: w_mult must be 1 (signed form |q_x - q_w|) or 2 (code form |q_x - 2 q_w|), got {w_mult!r}")


def _check_linear(xq: torch.Tensor, wq: torch.Tensor, group_index: torch.Tensor, w_mult: int, fn: str) -> None:
    _check_int(xq, "xq", fn)
    _check_int(wq, "wq", fn)
    _check_w_mult(fn, w_mult)
    if xq.dim() != 3:
        raise KernelError(f"{fn}: xq must have shape (G, M, K) (one re-quantized copy per group), got {tuple(xq.shape)}")
    if wq.dim() != 2:
        raise KernelError(f"{fn}: wq must have shape (N, K), got {tuple(wq.shape)}")
    if xq.shape[2] != wq.shape[1]:
        raise KernelError(f"{fn}: reduction lengths differ: xq has K={xq.shape[2]}, wq has K={wq.shape[1]}")
    if xq.shape[0] < 1:
        raise KernelError(f"{fn}: xq needs at least one group (its first dimension is 0)")
    if wq.device != xq.device:
        raise KernelError(f"{fn}: xq is on {xq.device} and wq on {wq.device}; put them on one device")
    _check_groups(fn, group_index, wq.shape[0], xq.shape[0], xq.device)


def adder_conv2d_output_size(
    height: int, width: int, kernel: Tuple[int, int], stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1
) -> Tuple[int, int]:
    """(Ho, Wo) of a convolution: ``(H + 2 p - d (k - 1) - 1) // s + 1`` per spatial dimension (floor division;
    <= 0 when the kernel does not fit). :func:`quantkit.ops.layout.conv2d_output_hw` is the checked form."""
    s, p, d = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    return (conv2d_output_size(height, kernel[0], s[0], p[0], d[0]),
            conv2d_output_size(width, kernel[1], s[1], p[1], d[1]))


def _check_conv(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    w_mult: int,
    fn: str,
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    _check_int(xq, "xq", fn)
    _check_int(wq, "wq", fn)
    _check_w_mult(fn, w_mult)
    if xq.dim() != 5:
        raise KernelError(f"{fn}: xq must have shape (G, N, C, H, W) (one re-quantized copy per group), got {tuple(xq.shape)}")
    if wq.dim() != 4:
        raise KernelError(f"{fn}: wq must have shape (Cout, C, kh, kw), got {tuple(wq.shape)}")
    if xq.shape[2] != wq.shape[1]:
        raise KernelError(
            f"{fn}: input channels differ: xq has C={xq.shape[2]}, wq has C={wq.shape[1]} (grouped convolution is not supported)"
        )
    if xq.shape[0] < 1:
        raise KernelError(f"{fn}: xq needs at least one group (its first dimension is 0)")
    if wq.device != xq.device:
        raise KernelError(f"{fn}: xq is on {xq.device} and wq on {wq.device}; put them on one device")
    s, p, d = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    conv2d_output_hw(fn, xq.shape[3:5], wq.shape[2:4], s, p, d)
    _check_groups(fn, group_index, wq.shape[0], xq.shape[0], xq.device)
    return s, p, d


# ---------------------------------------------------------------------------------------------------------------
# references (int64 math, chunked)
# ---------------------------------------------------------------------------------------------------------------
def _check_sum_range(fn: str, xq: torch.Tensor, wq: torch.Tensor, w_mult: int, taps: int, padded: bool) -> None:
    """The kernels' rule, before any int64 arithmetic: operands within int32 and ``(max|x| + max|w_mult w|) * K``
    within int32 (so no |x - w| term and no sum can overflow)."""
    i32 = _INT32_MAX
    xlo = int(xq.min()) if xq.numel() else 0
    xhi = int(xq.max()) if xq.numel() else 0
    if padded:
        xlo, xhi = min(xlo, 0), max(xhi, 0)
    if xlo < -i32 or xhi > i32:
        raise KernelError(
            f"{fn}: the activations span [{xlo}, {xhi}], outside [-(2^31 - 1), 2^31 - 1]; their l1 sums cannot be "
            "represented in int32 (integer l1 kernels are for 2-8-bit operands)"
        )
    wlo = int(wq.min()) if wq.numel() else 0
    whi = int(wq.max()) if wq.numel() else 0
    if wlo < -(i32 // w_mult) or whi > i32 // w_mult:
        raise KernelError(
            f"{fn}: the weights span [{wlo}, {whi}]; with w_mult={w_mult} they leave the int32 range, so their l1 "
            "sums cannot be represented in int32 (integer l1 kernels are for 2-8-bit operands)"
        )
    k = taps * wq.shape[1] if wq.dim() > 1 else 0
    xmax, wmax = max(-xlo, xhi), max(-wlo, whi) * w_mult
    if k and xmax + wmax > i32 // k:
        raise KernelError(
            f"{fn}: the l1 sums could overflow int32 (K={k}, |x| <= {xmax}, |w_mult*w| <= {wmax}); the operands are "
            "far outside 2-8 bits"
        )


def _to_int32_checked(s: torch.Tensor, fn: str) -> torch.Tensor:
    if s.numel() and int(s.max()) > _INT32_MAX:
        raise KernelError(f"{fn}: an l1 sum exceeds int32 ({int(s.max())}); the operands are far outside 2-8 bits")
    return s.to(torch.int32)


def _epilogue_reference(s: torch.Tensor, delta: torch.Tensor, bias: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    shape = [1] * s.dim()
    shape[channel_dim] = -1
    y = -delta.to(torch.float64).view(shape) * s.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64).view(shape)
    return y.to(torch.float32)


def adder_l1_reference(xq: torch.Tensor, wq: torch.Tensor, group_index: torch.Tensor, w_mult: int = 1) -> torch.Tensor:
    """Reference of :func:`adder_l1`: ``S[m, o] = sum_k |xq[group_index[o], m, k] - w_mult * wq[o, k]|`` (int32)."""
    _check_linear(xq, wq, group_index, w_mult, "adder_l1_reference")
    _check_sum_range("adder_l1_reference", xq, wq, w_mult, 1, False)
    groups, m, k = xq.shape
    n = wq.shape[0]
    out = torch.zeros(m, n, dtype=torch.int64, device=xq.device)
    w64 = wq.to(torch.int64) * w_mult
    gi = group_index.to(torch.int64)
    for g in range(groups):
        chans = torch.nonzero(gi == g).flatten()
        if chans.numel() == 0:
            continue
        xg = xq[g].to(torch.int64)
        wg = w64[chans]
        n_step = max(1, min(chans.numel(), _REF_CHUNK_ELEMS // max(1, k)))
        m_step = max(1, _REF_CHUNK_ELEMS // max(1, k * n_step))
        for n0 in range(0, chans.numel(), n_step):
            wc = wg[n0 : n0 + n_step]
            for m0 in range(0, m, m_step):
                part = (xg[m0 : m0 + m_step, None, :] - wc[None, :, :]).abs_().sum(-1)
                out[m0 : m0 + m_step, chans[n0 : n0 + n_step]] = part
    return _to_int32_checked(out, "adder_l1_reference")


def adder_linear_reference(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    delta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    w_mult: int = 1,
) -> torch.Tensor:
    """Reference of :func:`adder_linear`: ``-delta[o] * S[m, o] + bias[o]`` in float64, returned as float32."""
    _check_epilogue("adder_linear_reference", wq.shape[0], xq.device, delta, bias)
    return _epilogue_reference(adder_l1_reference(xq, wq, group_index, w_mult), delta, bias, 1)


def adder_l1_conv2d_reference(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    w_mult: int = 1,
) -> torch.Tensor:
    """Reference of :func:`adder_l1_conv2d`: per tap, a strided view of the zero-padded input, int64 |x - w| sums."""
    s, p, d = _check_conv(xq, wq, group_index, stride, padding, dilation, w_mult, "adder_l1_conv2d_reference")
    _check_sum_range("adder_l1_conv2d_reference", xq, wq, w_mult, wq.shape[2] * wq.shape[3], max(p) > 0)
    groups, batch, chans, height, width = xq.shape
    cout, _, kh, kw = wq.shape
    ho, wo = adder_conv2d_output_size(height, width, (kh, kw), s, p, d)
    xp = torch.nn.functional.pad(xq.to(torch.int64), (p[1], p[1], p[0], p[0]))  # zero padding: q_x = 0
    w64 = wq.to(torch.int64) * w_mult
    gi = group_index.to(torch.int64)
    out = torch.zeros(batch, cout, ho, wo, dtype=torch.int64, device=xq.device)
    per_image = chans * ho * wo
    b_step = max(1, _REF_CHUNK_ELEMS // max(1, per_image))
    for g in range(groups):
        outs = torch.nonzero(gi == g).flatten()
        if outs.numel() == 0:
            continue
        o_step = max(1, _REF_CHUNK_ELEMS // max(1, per_image * min(b_step, batch)))
        # a single output row/column needs no step (and a huge step would overflow the slicing arithmetic)
        sh, sw = (s[0] if ho > 1 else 1), (s[1] if wo > 1 else 1)
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * d[0], j * d[1]
                tap = xp[g, :, :, r0 : r0 + sh * (ho - 1) + 1 : sh, c0 : c0 + sw * (wo - 1) + 1 : sw]
                for o0 in range(0, outs.numel(), o_step):
                    oc = outs[o0 : o0 + o_step]
                    wt = w64[oc, :, i, j][None, :, :, None, None]  # (1, oc, C, 1, 1)
                    for b0 in range(0, batch, b_step):
                        xt = tap[b0 : b0 + b_step, None]  # (b, 1, C, Ho, Wo)
                        out[b0 : b0 + b_step, oc] += (xt - wt).abs_().sum(2)
    return _to_int32_checked(out, "adder_l1_conv2d_reference")


def adder_conv2d_reference(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    delta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    w_mult: int = 1,
) -> torch.Tensor:
    """Reference of :func:`adder_conv2d`: ``-delta[o] * S[n, o, y, x] + bias[o]`` in float64, returned as float32."""
    _check_epilogue("adder_conv2d_reference", wq.shape[0], xq.device, delta, bias)
    s = adder_l1_conv2d_reference(xq, wq, group_index, stride, padding, dilation, w_mult)
    return _epilogue_reference(s, delta, bias, 1)


# ---------------------------------------------------------------------------------------------------------------
# public ops: compiled kernel when available, reference otherwise
# ---------------------------------------------------------------------------------------------------------------
def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32)


def adder_l1(xq: torch.Tensor, wq: torch.Tensor, group_index: torch.Tensor, w_mult: int = 1) -> torch.Tensor:
    """Integer l1 GEMM, raw sums: ``S[m, o] = sum_k |xq[group_index[o], m, k] - w_mult * wq[o, k]|``.

    Args:
        xq: (G, M, K) integer activations, one re-quantized copy per group.
        wq: (N, K) integer weights (at their bit width, e.g. int8).
        group_index: (N,) integer group of each output channel, values in [0, G).
        w_mult: 1 for the signed form |q_x - q_w|, 2 for the unsigned code form |q_x - 2 q_w|.
    Returns:
        (M, N) int32, exact.
    """
    _check_linear(xq, wq, group_index, w_mult, "adder_l1")
    if not use_kernel("adder_l1", xq.device):
        return adder_l1_reference(xq, wq, group_index, w_mult)
    return torch.ops.quantkit.adder_l1(xq, wq, group_index, w_mult)


def adder_linear(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    delta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    w_mult: int = 1,
) -> torch.Tensor:
    """Integer l1 linear layer: ``Y[m, o] = -delta[o] * sum_k |xq[g(o), m, k] - w_mult * wq[o, k]| + bias[o]``.

    Args:
        xq: (G, M, K) integer activations (G groups, each on its own grid).
        wq: (N, K) integer weights.
        group_index: (N,) group of each output channel, values in [0, G).
        delta: (N,) float step multiplying the integer sum of each channel (its group's step, repeated per channel;
            Δ_g for the signed form, Δ_x = s_g / (2^b - 1) for the code form).
        bias: optional (N,) float (the lossless-clamp compensation plus any layer bias).
        w_mult: 1 (signed form) or 2 (code form, |q_x - 2 q_w|).
    Returns:
        (M, N) float32. The integer sum is exact; the epilogue is one float32 multiply-add per output.
    """
    _check_linear(xq, wq, group_index, w_mult, "adder_linear")
    _check_epilogue("adder_linear", wq.shape[0], xq.device, delta, bias)
    if not use_kernel("adder_linear", xq.device):
        return adder_linear_reference(xq, wq, group_index, delta, bias, w_mult)
    return torch.ops.quantkit.adder_linear(xq, wq, group_index, _f32(delta), _f32(bias), w_mult)


def adder_l1_conv2d(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    w_mult: int = 1,
) -> torch.Tensor:
    """Integer l1 conv2d, raw sums ``S[n, o, y, x] = sum_{c,i,j} |xq_pad[g(o), n, c, y s + i d, x s + j d] - w_mult wq[o, c, i, j]|``.

    Zero padding: padded taps have ``q_x = 0`` (exact for the adder, see the module docstring).

    Args:
        xq: (G, N, C, H, W) integer activations (any strides; channels-last is the cheapest to read).
        wq: (Cout, C, kh, kw) integer weights.
        group_index: (Cout,) group of each output channel, values in [0, G).
        stride, padding, dilation: ints or pairs, as in ``torch.nn.functional.conv2d`` (groups=1).
        w_mult: 1 (signed form) or 2 (code form).
    Returns:
        (N, Cout, Ho, Wo) int32, exact. The compiled kernel returns it in channels-last memory format.
    """
    s, p, d = _check_conv(xq, wq, group_index, stride, padding, dilation, w_mult, "adder_l1_conv2d")
    if not use_kernel("adder_l1_conv2d", xq.device):
        return adder_l1_conv2d_reference(xq, wq, group_index, s, p, d, w_mult)
    return torch.ops.quantkit.adder_l1_conv2d(xq, wq, group_index, list(s), list(p), list(d), w_mult)


def adder_conv2d(
    xq: torch.Tensor,
    wq: torch.Tensor,
    group_index: torch.Tensor,
    delta: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    w_mult: int = 1,
) -> torch.Tensor:
    """Integer l1 conv2d layer: ``Y[n, o, y, x] = -delta[o] * S[n, o, y, x] + bias[o]`` (S from :func:`adder_l1_conv2d`).

    Args: as :func:`adder_l1_conv2d`, plus ``delta`` (Cout,) float and optional ``bias`` (Cout,) float.
    Returns:
        (N, Cout, Ho, Wo) float32 (channels-last memory format from the compiled kernel).
    """
    s, p, d = _check_conv(xq, wq, group_index, stride, padding, dilation, w_mult, "adder_conv2d")
    _check_epilogue("adder_conv2d", wq.shape[0], xq.device, delta, bias)
    if not use_kernel("adder_conv2d", xq.device):
        return adder_conv2d_reference(xq, wq, group_index, delta, bias, s, p, d, w_mult)
    return torch.ops.quantkit.adder_conv2d(xq, wq, group_index, _f32(delta), _f32(bias), list(s), list(p), list(d), w_mult)


# ---------------------------------------------------------------------------------------------------------------
# fake (meta) implementations, for torch.compile / torch.export tracing of deploy models
# ---------------------------------------------------------------------------------------------------------------
@register_fake("adder_l1")
def _adder_l1_fake(xq, wq, group_index, w_mult=1):
    check_devices("adder_l1", xq=xq, wq=wq, group_index=group_index)
    torch._check(xq.dim() == 3 and wq.dim() == 2 and xq.shape[2] == wq.shape[1])
    return xq.new_empty((xq.shape[1], wq.shape[0]), dtype=torch.int32)


@register_fake("adder_linear")
def _adder_linear_fake(xq, wq, group_index, delta, bias=None, w_mult=1):
    check_devices("adder_linear", xq=xq, wq=wq, group_index=group_index, delta=delta, bias=bias)
    torch._check(xq.dim() == 3 and wq.dim() == 2 and xq.shape[2] == wq.shape[1])
    return xq.new_empty((xq.shape[1], wq.shape[0]), dtype=torch.float32)


def _conv_fake_out(name, xq, wq, stride, padding, dilation, dtype):
    torch._check(xq.dim() == 5 and wq.dim() == 4 and xq.shape[2] == wq.shape[1])
    ho, wo = conv2d_output_hw(name, xq.shape[3:5], wq.shape[2:4], stride, padding, dilation)
    out = xq.new_empty((xq.shape[1], wq.shape[0], ho, wo), dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last)


@register_fake("adder_l1_conv2d")
def _adder_l1_conv2d_fake(xq, wq, group_index, stride=(1, 1), padding=(0, 0), dilation=(1, 1), w_mult=1):
    check_devices("adder_l1_conv2d", xq=xq, wq=wq, group_index=group_index)
    return _conv_fake_out("adder_l1_conv2d", xq, wq, stride, padding, dilation, torch.int32)


@register_fake("adder_conv2d")
def _adder_conv2d_fake(xq, wq, group_index, delta, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), w_mult=1):
    check_devices("adder_conv2d", xq=xq, wq=wq, group_index=group_index, delta=delta, bias=bias)
    return _conv_fake_out("adder_conv2d", xq, wq, stride, padding, dilation, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# deploy path: weights packed once (adder_prepack), activation re-quantization fused into the kernel's input side
# ---------------------------------------------------------------------------------------------------------------
def has_packed_kernels() -> bool:
    """Whether the compiled CPU kernels provide the prepacked, fused-input ops."""
    return has_op("adder_prepack") and has_op("adder_conv2d_packed") and has_op("adder_linear_packed")


PACKED_FORMS = ("auto", "bytes", "thermometer")


def adder_prepack(wq: torch.Tensor, group_index: torch.Tensor, w_mult: int, bits: int, signed: bool,
                  form: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack integer weights once for :func:`adder_conv2d_packed` / :func:`adder_linear_packed` (CPU).

    The weights ``w_mult * wq`` are clamped into the activation code grid of ``bits`` / ``signed`` (which holds the
    zero padding) with an exact per-channel correction, channels sorted by group into 16-lane blocks.

    Args:
        wq: (N, K) or (Cout, C, kh, kw) integer weight codes (CPU).
        group_index: (Cout,) group of each output channel.
        w_mult: 1 (signed form) or 2 (code form ``|q_x - 2 q_w|``).
        bits, signed: the activation codes the packing will be used with.
        form: how a tap row is stored -- ``"bytes"`` (one value per byte, VPSADBW), ``"thermometer"`` (2-bit grids
            only: 3-bit thermometer codes, ``|a - b| = popcount(T(a) xor T(b))``, VPOPCNTQ) or ``"auto"``
            (thermometer for 2-bit codes with more than 64 input channels on AVX-512 CPUs, where it measured
            faster; else bytes). Every form
            runs on every ISA level with the same results (docs/kernels.md#cpu-adder-micro-kernel).
    Returns:
        ``(packed_weight, packed_meta)``: flat uint8 and (4, L) int32 tensors (layout in ``kernels/cpu/adder.cpp``).
    """
    fn = "adder_prepack"
    _check_int(wq, "wq", fn)
    if wq.dim() not in (2, 4):
        raise KernelError(f"{fn}: wq must be (N, K) or (Cout, C, kh, kw), got shape {tuple(wq.shape)}")
    if w_mult not in (1, 2):
        raise KernelError(f"{fn}: w_mult must be 1 (|q_x - q_w|) or 2 (|q_x - 2 q_w|), got {w_mult!r}")
    groups = int(group_index.max()) + 1 if isinstance(group_index, torch.Tensor) and group_index.numel() else 1
    _check_groups(fn, group_index, wq.shape[0], groups, wq.device)
    if wq.device.type != "cpu" or not has_packed_kernels():
        raise KernelError(f"{fn}: needs the compiled CPU kernels and CPU tensors (got {wq.device})")
    if form not in PACKED_FORMS:
        raise KernelError(f"{fn}: form must be one of {PACKED_FORMS}, got {form!r}")
    lo, hi = qrange(int(bits), bool(signed))  # the activation code grid
    if form == "thermometer" and hi - lo > 3:
        raise KernelError(f"{fn}: the thermometer form holds 2-bit codes only, got bits={bits}; use form='auto' or "
                          "'bytes'")
    packed_weight, packed_meta = torch.ops.quantkit.adder_prepack(wq, group_index, int(w_mult), lo, hi, form)
    return packed_weight, packed_meta


def adder_conv2d_packed(
    x: torch.Tensor,
    scale: torch.Tensor,
    packed_weight: torch.Tensor,
    packed_meta: torch.Tensor,
    delta: torch.Tensor,
    bias: Optional[torch.Tensor],
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    bits: int,
    signed: bool,
    round_mode: str = "half_even",
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
) -> torch.Tensor:
    """Deploy adder conv on prepacked weights with the activation re-quantization fused in:
    ``adder_conv2d(quantize_groups(x, scale, bits, signed, round_mode), wq, ...)`` in one op, plus NaN in every
    output whose window reads a NaN input (as the float model). ``x`` is float32 (N, C, H, W), channels-last memory
    is read in place; the output is (N, Cout, Ho, Wo) float32 in channels-last memory.

    Block epilogue: ``y = y + residual`` (float32, the output's shape) when given, then ``y = torch.relu(y)`` when
    ``relu`` -- a residual block's ``out += identity; relu(out)`` without two more passes over the output, the same
    float operations in the same order (bit for bit)."""
    k = _pair(kernel_size, "kernel_size", 1)
    s, p, d = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    return torch.ops.quantkit.adder_conv2d_packed(x, scale, packed_weight, packed_meta, _f32(delta), _f32(bias),
                                                  list(k), list(s), list(p), list(d), int(bits), bool(signed),
                                                  round_mode == "half_even", residual, bool(relu))


def adder_linear_packed(
    x: torch.Tensor,
    scale: torch.Tensor,
    packed_weight: torch.Tensor,
    packed_meta: torch.Tensor,
    delta: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    signed: bool,
    round_mode: str = "half_even",
) -> torch.Tensor:
    """Deploy adder linear layer on prepacked weights, activation re-quantization fused in (see
    :func:`adder_conv2d_packed`): ``x`` float32 (M, K) -> (M, N) float32; a row with a NaN gives a NaN row."""
    return torch.ops.quantkit.adder_linear_packed(x, scale, packed_weight, packed_meta, _f32(delta), _f32(bias),
                                                  int(bits), bool(signed), round_mode == "half_even")


@register_fake("adder_conv2d_packed")
def _adder_conv2d_packed_fake(x, scale, packed_weight, packed_meta, delta, bias, kernel_size, stride, padding,
                              dilation, bits, is_signed, half_even, residual=None, relu=False):
    check_devices("adder_conv2d_packed", x=x, scale=scale, packed_weight=packed_weight, packed_meta=packed_meta,
                  delta=delta, bias=bias, residual=residual)
    torch._check(x.dim() == 4 and packed_weight.dim() == 1)
    ho, wo = conv2d_output_hw("adder_conv2d_packed", x.shape[2:4], kernel_size, stride, padding, dilation)
    out = x.new_empty((x.shape[0], delta.shape[0], ho, wo), dtype=torch.float32)
    return out.contiguous(memory_format=torch.channels_last)


@register_fake("adder_linear_packed")
def _adder_linear_packed_fake(x, scale, packed_weight, packed_meta, delta, bias, bits, is_signed, half_even):
    check_devices("adder_linear_packed", x=x, scale=scale, packed_weight=packed_weight, packed_meta=packed_meta,
                  delta=delta, bias=bias)
    torch._check(x.dim() == 2)
    return x.new_empty((x.shape[0], delta.shape[0]), dtype=torch.float32)
