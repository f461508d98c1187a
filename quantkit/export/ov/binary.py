"""Binary deploy layers (XNOR, AdaBin, BiViT's PWS linears) as OpenVINO ``BinaryConvolution`` with ``u1`` weights.

OpenVINO's ``BinaryConvolution`` (opset1, mode ``xnor-popcount``) takes 0/1 inputs and 0/1 weights, reads 0 as -1,
and returns ``sum(a * w)`` over *all* kernel taps, the padded ones filled with ``pad_value`` (+-1). quantkit's
deploy layers sum over the valid taps only (zero padding) and binarize with ``x >= threshold``. The graph::

    bits = FakeQuantize(x, t', t', 0, 1, levels=2)           t' = nextafter(t, -inf): x > t'  <=>  x >= t (float32)
    B    = BinaryConvolution(bits, W_u1, pad_value=+1)        the dot product, border taps counted as +1 * s_w
    A    = BinaryConvolution(bits, ones_u1, pad_value=+1)     sum of s_a (only where act_sum_scale is set)
    y    = scale * B + act_sum_scale * A + K

with one input-independent map ``K[o, y, x] = bias + weight_sum_scale * SUM_valid(s_w) + count_scale * n_valid
- scale * SUM_pad(s_w) - act_sum_scale * n_pad`` that removes every padded tap exactly, so the result equals the
deploy layer (``quantkit.nn.binary_deploy.affine_epilogue``) up to float rounding of the epilogue. ``K`` is written
as per-channel coefficients of two small constant convolutions (per-tap weight sums and tap counts over an all-ones
map), which the CPU plugin evaluates once when it compiles the model: the IR holds O*kh*kw floats per layer, not an
(O, Ho, Wo) map. A linear layer is the same with a 1x1 kernel on ``(-1, K, 1, 1)``.

Bit layout, measured on OpenVINO 2026.4's CPU plugin (the tests check it): the ``u1`` weight of a
``BinaryConvolution`` is the OIHW tensor flattened and packed 8 a byte with element ``i`` in bit ``i % 8`` of byte
``i // 8`` (least significant bit first), 1 = +1. OpenVINO's generic ``u1`` element access (``Convert``, ``Constant``
from a list) reads bits most significant first, so constants that are ``Convert``-ed (float-input layers) are packed
in that order instead. The CPU plugin's ``BinaryConvolution`` gives wrong results when the input channel count is
not a multiple of 8 (measured), and it does not run with dynamic shapes: such layers use a +-1 float
``Convolution`` of the same u1 weights (exact as well), and a dynamic-batch IR is reshaped to a static batch before
it is compiled (:func:`quantkit.export.openvino.compile_openvino`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..emit.base import EmitContext, LayerExport
from . import register_ov_emitter


def _ov():
    import openvino as ov
    import openvino.opset13 as ops

    return ov, ops


def u1_constant(bits: np.ndarray, lsb_first: bool):
    """A ``u1`` Constant of ``bits.shape`` (values 0/1), packed in the given bit order (module docstring)."""
    ov, _ = _ov()
    flat = np.ascontiguousarray(bits, dtype=np.uint8).reshape(-1)
    packed = np.packbits(flat, bitorder="little" if lsb_first else "big")
    return ov.op.Constant(ov.Tensor(packed, ov.Shape(list(bits.shape)), ov.Type.u1), shared_memory=False)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _vec(m, name: str) -> np.ndarray | None:
    t = getattr(m, name, None)
    return None if t is None else t.detach().double().reshape(-1).numpy()


def _named(node, name: str):
    node.set_friendly_name(name)
    return node


def _pm1_weight(ops, signs: np.ndarray, name: str):
    """+-1 float weight from a u1 constant (Convert reads bits most significant first); folded at compile time."""
    w = ops.convert(u1_constant(signs > 0, lsb_first=False), "f32")
    return _named(ops.subtract(ops.multiply(w, np.float32(2.0)), np.float32(1.0)), f"{name}/weight_pm1")


class _Geometry:
    def __init__(self, m, conv: bool, ctx: EmitContext, c_in: int, kh: int, kw: int) -> None:
        if conv:
            self.stride, self.padding, self.dilation = tuple(m.stride), tuple(m.padding), tuple(m.dilation)
            self.h, self.w = int(ctx.input_shapes[0][2]), int(ctx.input_shapes[0][3])
        else:
            self.stride, self.padding, self.dilation = (1, 1), (0, 0), (1, 1)
            self.h = self.w = 1
        self.c_in, self.kh, self.kw = c_in, kh, kw

    def constant_terms(self, ops, signs: np.ndarray, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, name: str):
        """The input-independent map ``c0 + c1 * SUM_valid(s_w) + c2 * n_valid`` (per output channel o, over the
        valid taps of every output position). Without padding both sums are constants; with padding they are two
        small convolutions of an all-ones (1, 1, H, W) map -- with the per-tap weight sums ``SUM_c s_w`` (O, 1, kh,
        kw) and with ones -- that OpenVINO folds when it compiles, so the IR holds O*kh*kw floats instead of the
        full (O, Ho, Wo) map."""
        n = signs.shape[0]
        col = (lambda v: _f32(v.reshape(1, n, 1, 1)))
        taps = signs.astype(np.float64).sum(axis=1, keepdims=True)  # (O, 1, kh, kw)
        if self.padding == (0, 0):
            return col(c0 + c1 * taps.reshape(n, -1).sum(axis=1) + c2 * (self.c_in * self.kh * self.kw))
        ones = ops.broadcast(np.float32(1.0), np.array([1, 1, self.h, self.w], np.int64))
        args = self.ov_conv_args()
        k = col(c0)
        if np.any(c1 != 0):
            wv = _named(ops.convolution(ones, _f32(taps), *args), f"{name}/weight_sum_valid")
            k = ops.add(k, ops.multiply(wv, col(c1)))
        if np.any(c2 != 0):
            nv = _named(ops.convolution(ones, np.full((1, 1, self.kh, self.kw), self.c_in, np.float32), *args),
                        f"{name}/count_valid")
            k = ops.add(k, ops.multiply(nv, col(c2)))
        return _named(k, f"{name}/epilogue_constants") if not isinstance(k, np.ndarray) else k

    def ov_conv_args(self) -> tuple:
        ph, pw = self.padding
        return list(self.stride), [ph, pw], [ph, pw], list(self.dilation)


def _per_channel(v: np.ndarray | None, n: int) -> np.ndarray | None:
    if v is None:
        return None
    v = np.asarray(v, np.float64).reshape(-1)
    return np.full(n, v.item()) if v.size == 1 else v


def _threshold(m, c: int) -> np.ndarray:
    t = m.in_threshold.detach().float().reshape(-1).numpy()
    return np.full(c, t.item(), np.float32) if t.size == 1 and c != 1 else t.astype(np.float32)


def open_threshold(t: np.ndarray) -> np.ndarray:
    """t' with ``x > t'  <=>  x >= t`` for every normal float32 x: the next float32 below t, kept out of the
    subnormal range (OpenVINO's fused kernels may flush subnormals to zero, which would turn 0 >= 0 into 0 > 0)."""
    t = np.asarray(t, np.float32)
    below = np.nextafter(t, np.float32(-np.inf)).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    return np.where(np.abs(below) < tiny, np.where(t > 0, np.float32(0.0), np.float32(-tiny)), below).astype(np.float32)


def _epilogue(ops, name: str, dot, asum, scale, act_sum_scale, const_map, n: int):
    y = dot
    if scale is not None:
        y = _named(ops.multiply(y, _f32(scale.reshape(1, n, 1, 1))), f"{name}/scale")
    if act_sum_scale is not None and asum is not None:
        t = _named(ops.multiply(asum, _f32(act_sum_scale.reshape(1, n, 1, 1))), f"{name}/act_sum_term")
        y = _named(ops.add(y, t), f"{name}/add_act_sum")
    if isinstance(const_map, np.ndarray):
        if np.any(const_map != 0):
            y = _named(ops.add(y, _f32(const_map)), f"{name}/add_constants")
    elif const_map is not None:
        y = _named(ops.add(y, const_map), f"{name}/add_constants")
    return y


def _emit_native(ops, m, x, signs, geo: _Geometry, name: str):
    """BinaryConvolution path (module docstring); x is (N, C, H, W)."""
    n = signs.shape[0]
    t = open_threshold(_threshold(m, geo.c_in))
    t = t.reshape(1, -1, 1, 1) if t.size > 1 else t.reshape(())
    bits = _named(ops.fake_quantize(x, t, t, np.float32(0.0), np.float32(1.0), 2), f"{name}/binarize")
    args = geo.ov_conv_args()
    dot = _named(ops.binary_convolution(bits, u1_constant(signs > 0, lsb_first=True), *args, "xnor-popcount", 1.0),
                 f"{name}/binary_conv")
    scale, asc = _per_channel(_vec(m, "scale"), n), _per_channel(_vec(m, "act_sum_scale"), n)
    wss, cs, bias = (_per_channel(_vec(m, k), n) for k in ("weight_sum_scale", "count_scale", "bias"))
    z = np.zeros(n)
    sc, ac = (scale if scale is not None else np.ones(n)), (asc if asc is not None else z)
    # B counts each padded tap as +1 * s_w and A as +1: K removes SUM_pad = SUM_full - SUM_valid exactly
    c0 = (bias if bias is not None else z) - sc * signs.reshape(n, -1).sum(axis=1) - ac * signs[0].size
    c1 = (wss if wss is not None else z) + sc
    c2 = (cs if cs is not None else z) + ac
    k = geo.constant_terms(ops, signs, c0, c1, c2, name)
    asum = None
    if asc is not None:
        ones = np.ones((1,) + signs.shape[1:], np.uint8)
        asum = _named(ops.binary_convolution(bits, u1_constant(ones, lsb_first=True), *args, "xnor-popcount", 1.0),
                      f"{name}/act_sum")
    return _epilogue(ops, name, dot, asum, scale, asc, k, n)


def _emit_pm1(ops, m, x, signs, geo: _Geometry, name: str):
    """+-1 float Convolution of the same u1 weights (input channels not a multiple of 8); zero padding is native."""
    n = signs.shape[0]
    t = _threshold(m, geo.c_in)
    t = t.reshape(1, -1, 1, 1) if t.size > 1 else t.reshape(())
    sa = _named(ops.select(ops.greater_equal(x, t), np.float32(1.0), np.float32(-1.0)), f"{name}/act_sign")
    args = geo.ov_conv_args()
    dot = _named(ops.convolution(sa, _pm1_weight(ops, signs, name), *args), f"{name}/pm1_conv")
    scale, asc = _per_channel(_vec(m, "scale"), n), _per_channel(_vec(m, "act_sum_scale"), n)
    wss, cs, bias = (_per_channel(_vec(m, k), n) for k in ("weight_sum_scale", "count_scale", "bias"))
    z = np.zeros(n)
    k = geo.constant_terms(ops, signs, bias if bias is not None else z, wss if wss is not None else z,
                           cs if cs is not None else z, name)
    asum = None
    if asc is not None:
        ones = np.ones((1,) + signs.shape[1:], np.float32)
        asum = _named(ops.convolution(sa, ones, *args), f"{name}/act_sum")
    return _epilogue(ops, name, dot, asum, scale, asc, k, n)


def _emit_float_input(ops, m, x, signs, conv: bool, geo: _Geometry, name: str):
    """Float input (AdaBin weight-only, BiViT MLPs at FP activations), as the deploy forward:
    y = scale * (x * s_w) + act_sum_scale * SUM(x) + bias."""
    n = signs.shape[0]
    scale, asc, bias = (_per_channel(_vec(m, k), n) for k in ("scale", "act_sum_scale", "bias"))
    w = _pm1_weight(ops, signs, name)
    if conv:
        args = geo.ov_conv_args()
        y = _named(ops.convolution(x, w, *args), f"{name}/conv")
        asum = None
        if asc is not None:
            asum = _named(ops.convolution(x, np.ones((1,) + signs.shape[1:], np.float32), *args), f"{name}/act_sum")
        k = None if bias is None else bias.reshape(1, n, 1, 1)
        return _epilogue(ops, name, y, asum, scale, asc, k, n)
    w2 = ops.reshape(w, [n, signs.shape[1]], False)
    y = _named(ops.matmul(x, w2, False, True), f"{name}/matmul")
    if scale is not None:
        y = ops.multiply(y, _f32(scale))
    if asc is not None:
        asum = ops.reduce_sum(x, np.int64(-1), True)
        y = ops.add(y, ops.multiply(asum, _f32(asc)))
    if bias is not None:
        y = ops.add(y, _f32(bias))
    return _named(y, f"{name}/epilogue")


def emit_binary(m, inputs: list, ctx: EmitContext) -> tuple:
    """BinaryDeployConv2d / BinaryDeployLinear -> OpenVINO (module docstring)."""
    ov, ops = _ov()
    from ...nn.binary_deploy import BinaryDeployConv2d

    conv = isinstance(m, BinaryDeployConv2d)
    signs = m.weight_signs(torch.float32).detach().numpy()
    if not conv:
        signs = signs[:, :, None, None]
    n, c, kh, kw = signs.shape
    geo = _Geometry(m, conv, ctx, c, kh, kw)
    name = ctx.name
    x = inputs[0]
    fp32_bytes = n * c * kh * kw * 4
    wbytes = (n * c * kh * kw + 7) // 8
    if m.float_input:
        y = _emit_float_input(ops, m, x, signs, conv, geo, name)
        return y, LayerExport("binary", "float-input", 1, None, wbytes, fp32_bytes)
    if not conv:
        x = ops.reshape(x, np.array([-1, c, 1, 1], np.int64), False)
    if c % 8 == 0:
        y, form = _emit_native(ops, m, x, signs, geo, name), "binconv"
    else:
        y, form = _emit_pm1(ops, m, x, signs, geo, name), "pm1-conv"
    if not conv:  # (N', O, 1, 1) -> (..., O)
        lead = ops.gather(ops.shape_of(inputs[0], "i64"), np.arange(len(ctx.input_shapes[0]) - 1, dtype=np.int64),
                          np.int64(0))
        y = _named(ops.reshape(y, ops.concat([lead, ops.constant(np.array([n], np.int64))], 0), False),
                   f"{name}/to_features")
    info = LayerExport("binary", form, 1, 1, wbytes, fp32_bytes)
    if form == "pm1-conv":
        info.notes.append(f"{c} input channels (not a multiple of 8): +-1 float Convolution of the u1 weights, "
                          "since OpenVINO's CPU BinaryConvolution miscomputes such layers")
    return y, info


def _register() -> None:
    from ...nn.binary_deploy import BinaryDeployConv2d, BinaryDeployLinear

    register_ov_emitter(BinaryDeployConv2d, emit_binary)
    register_ov_emitter(BinaryDeployLinear, emit_binary)


_register()
