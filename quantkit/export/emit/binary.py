"""Binary deploy layers (XNOR, AdaBin, BiViT linears) with packed 1-bit weight initializers.

Weights are stored as uint8, 8 signs a byte, in quantkit's bit order (element j in bit j%8 of byte j//8 along the
reduction dimension; :mod:`quantkit.ops.layout`), so a binary layer's file footprint is 1/32 of its FP32 weight.
Two graph forms compute the same thing:

``unpack`` (default)
    the packed weight is unpacked in the graph (``Unsqueeze -> BitShift -> BitwiseAnd -> Reshape -> Slice -> Cast``,
    constant-folded by onnxruntime when the session loads), the input is binarized with ``GreaterOrEqual -> Where``
    to +-1, and a float ``Conv`` / ``MatMul`` of +-1 values computes the integer dot products exactly (|sum| < 2^24);
    the epilogue follows as ``Mul`` / ``Add`` (onnxruntime may fuse it into the Conv).
``xor``
    never unpacks to float: the input's sign bits are packed 8 a byte in the graph, patches are extracted with
    ``Pad`` + strided ``Slice`` + ``Concat`` (convolutions), ``BitwiseXor`` with the packed weights, a 256-entry
    popcount table via ``Gather``, and ``ReduceSum`` give ``popcount(a XOR w)``; ``dot = n - 2 popcount``. Zero
    padding stays exact: padded taps are corrected with the per-tap popcount of the weight.

Both forms compute the layer's epilogue of the deploy kernels (quantkit.ops.binary)::

    y = scale * dot + act_sum_scale * sum(s_a) + weight_sum_scale * sum(s_w) + count_scale * n_valid + bias

(every sum over the valid, unpadded taps), which carries the XNOR-Net scale and AdaBin's affine terms exactly, borders
included (the input-independent terms as one constant map that onnxruntime folds at load time).
Layers with float inputs (AdaBin ``weight_only``; BiViT MLPs with FP activations) unpack the weight and run a float
Conv / MatMul with the same constants as their deploy forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ...ops.layout import conv2d_output_size
from ..builder import GraphBuilder, popcount_table, to_numpy, words_to_bytes
from .base import EmitContext, LayerExport, register_emitter, vec


@dataclass
class BinarySpec:
    """A binary deploy layer in normal form (what every binary deploy type reduces to)."""

    conv: bool
    words: object  # int32 packed words: conv OHWI (O, kh, kw, W), linear (O, W)
    k: int  # C_in (conv) / in_features (linear)
    input_mode: str  # "threshold" (bit = x >= t) or "float" (no binarization)
    threshold: np.ndarray | None = None
    scale: np.ndarray | None = None
    act_sum_scale: np.ndarray | None = None
    weight_sum_scale: np.ndarray | None = None
    count_scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    float_weight: str = "pm1"  # float input: "pm1" (y = (x W_pm1^T) * scale + bias) or "affine" (W = a s + b)
    w_alpha: np.ndarray | None = None
    w_beta: np.ndarray | None = None
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)

    @property
    def out_channels(self) -> int:
        return int(self.words.shape[0])


def _opt(m, name: str):
    t = getattr(m, name, None)
    return None if t is None else vec(t)


# ---------------------------------------------------------------------------------------------- spec extraction
def spec_binary_deploy(m) -> BinarySpec:
    """quantkit.nn.binary_deploy.BinaryDeployConv2d / BinaryDeployLinear: every binary-weight deploy layer (XNOR,
    AdaBin incl. weight-only, BiViT's PWS linears)."""
    conv = hasattr(m, "kernel_size")
    geo = dict(kernel=tuple(m.kernel_size), stride=tuple(m.stride), padding=tuple(m.padding),
               dilation=tuple(m.dilation)) if conv else {}
    k = m.in_channels if conv else m.in_features
    if m.float_input:
        if m.act_sum_scale is not None:  # W = alpha_w s_w + beta_w (AdaBin weight-only)
            return BinarySpec(conv, m.weight_packed, k, "float", float_weight="affine", w_alpha=_opt(m, "scale"),
                              w_beta=_opt(m, "act_sum_scale"), bias=_opt(m, "bias"), **geo)
        return BinarySpec(conv, m.weight_packed, k, "float", float_weight="pm1", scale=_opt(m, "scale"),
                          bias=_opt(m, "bias"), **geo)
    extra = dict(weight_sum_scale=_opt(m, "weight_sum_scale"), count_scale=_opt(m, "count_scale")) if conv else {}
    return BinarySpec(conv, m.weight_packed, k, "threshold", threshold=to_numpy(m.in_threshold, np.float32),
                      scale=_opt(m, "scale"), act_sum_scale=_opt(m, "act_sum_scale"), bias=_opt(m, "bias"),
                      **extra, **geo)


# ---------------------------------------------------------------------------------------------- graph pieces
def _bits_input(b: GraphBuilder, x: str, s: BinarySpec, as_sign: bool) -> str:
    """The layer's input binarization: +-1 float (``as_sign``) or the bit as float 1/0."""
    tv = np.asarray(s.threshold, np.float32)
    if tv.size == 1 and float(tv.reshape(-1)[0]) == 0.0:
        t = None
    elif tv.size == 1:
        t = b.f32("in_threshold", np.float32(tv.reshape(-1)[0]))
    else:
        t = b.f32("in_threshold", tv.reshape((1, -1, 1, 1) if s.conv else (-1,)))
    if as_sign:
        return b.sign_pm1(x, t, "act_sign")
    ge = b.op("GreaterOrEqual", [x, t if t is not None else b.f32("zero", np.float32(0.0))], "act_bit")
    return b.op("Cast", [ge], "act_bit_f", to=TensorProto.FLOAT)


def _per_channel(b: GraphBuilder, hint: str, v: np.ndarray, n: int, conv_nchw: bool) -> str:
    a = vec(v, n)
    return b.f32(hint, a.reshape((1, n, 1, 1)) if conv_nchw else a)


def _epilogue(b: GraphBuilder, s: BinarySpec, dot: str, asum: str | None, const_terms: str | None, nchw: bool) -> str:
    """y = scale*dot + act_sum_scale*asum + (weight/count terms) + bias."""
    n = s.out_channels
    y = dot
    if s.scale is not None:
        y = b.op("Mul", [y, _per_channel(b, "scale", s.scale, n, nchw)], "scale")
    if s.act_sum_scale is not None and asum is not None:
        t = b.op("Mul", [asum, _per_channel(b, "act_sum_scale", s.act_sum_scale, n, nchw)], "act_sum_term")
        y = b.op("Add", [y, t], "add_act_sum")
    if const_terms is not None:
        y = b.op("Add", [y, const_terms], "add_weight_terms")
    if s.bias is not None:
        y = b.op("Add", [y, _per_channel(b, "bias", s.bias, n, nchw)], "bias")
    return y


def _weight_pm1(b: GraphBuilder, s: BinarySpec) -> tuple[str, int]:
    """+-1 float weight from the packed uint8 initializer: conv (O, C, kh, kw), linear (O, K)."""
    wbytes = words_to_bytes(s.words, s.k)
    packed = b.init("weight_bits", wbytes)
    w = b.unpack_bits_pm1(packed, wbytes.shape, s.k, "weight_unpack")
    if s.conv:
        w = b.op("Transpose", [w], "weight_oihw", perm=[0, 3, 1, 2])
    return w, int(wbytes.nbytes)


def _ones(b: GraphBuilder, shape, hint: str) -> str:
    return b.op("ConstantOfShape", [b.i64(f"{hint}_shape", list(shape))], hint,
                value=_tensor_one())


def _tensor_one():
    from onnx import helper

    return helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])


def _conv_attrs(s: BinarySpec) -> dict:
    ph, pw = s.padding
    return dict(strides=list(s.stride), pads=[ph, pw, ph, pw], dilations=list(s.dilation))


# ---------------------------------------------------------------------------------------------- unpack form
def _fold_weight(b: GraphBuilder, w: str, s: BinarySpec, conv: bool, first: np.ndarray | None,
                 second: np.ndarray | None, hint: str) -> str:
    """first[o] * s_w + second[o] (per output channel), written in the graph from the packed bits."""
    n = s.out_channels
    shp = (n, 1, 1, 1) if conv else (n, 1)
    if first is not None:
        w = b.op("Mul", [w, b.f32(f"{hint}_scale", vec(first, n).reshape(shp))], f"{hint}_scaled")
    if second is not None:
        w = b.op("Add", [w, b.f32(f"{hint}_shift", vec(second, n).reshape(shp))], f"{hint}_shifted")
    return w


def _emit_unpack(s: BinarySpec, b: GraphBuilder, x: str, ctx: EmitContext) -> tuple[str, int]:
    """Binary input: dot = Conv/MatMul(s_a, s_w) on +-1 values (exact integers, as the XNOR-popcount kernels), then
    the deploy epilogue ``scale * dot + act_sum_scale * sum(s_a) + border terms + bias``.

    The dot stays an exact integer on purpose: a binary layer's output often feeds the next sign (attention
    projections with zero bias give exact zeros), and ``sum of +-scale`` in float is not exactly 0 where the integer
    dot is. The input-independent border terms ``weight_sum_scale * sum(s_w) + count_scale * n_valid`` are one
    convolution of an all-ones (valid) input with ``weight_sum_scale * s_w + count_scale``, which onnxruntime folds
    into a constant map when the session loads (as it folds the unpacking of the weight)."""
    w, nbytes = _weight_pm1(b, s)
    if s.input_mode == "float":
        if s.float_weight == "affine":  # AdaBin weight_only: W = alpha_w s_w + beta_w, as its deploy forward
            # the bias is written only on this path (the others add it in the epilogue): no unused initializer
            bias = [b.f32("bias", s.bias)] if s.bias is not None else []
            w = _fold_weight(b, w, s, s.conv, s.w_alpha, s.w_beta, "weight")
            if s.conv:
                return b.op("Conv", [x, w] + bias, "conv", **_conv_attrs(s)), nbytes
            y = b.op("MatMul", [x, b.op("Transpose", [w], "weight_t", perm=[1, 0])], "matmul")
            return (b.op("Add", [y] + bias, "bias") if bias else y), nbytes
        # BiViT MLP with FP inputs: y = (x s_w^T) * scale + bias, as its deploy forward
        if s.conv:
            y = b.op("Conv", [x, w], "conv", **_conv_attrs(s))
        else:
            y = b.op("MatMul", [x, b.op("Transpose", [w], "weight_t", perm=[1, 0])], "matmul")
        return _epilogue(b, s, y, None, None, s.conv), nbytes
    sa = _bits_input(b, x, s, as_sign=True)
    if not s.conv:
        dot = b.op("MatMul", [sa, b.op("Transpose", [w], "weight_t", perm=[1, 0])], "xnor_matmul")
        asum = None
        if s.act_sum_scale is not None:
            asum = b.op("ReduceSum", [sa, b.i64("axis_last", [-1])], "act_sum", keepdims=1)
        return _epilogue(b, s, dot, asum, None, False), nbytes
    kh, kw = s.kernel
    dot = b.op("Conv", [sa, w], "xnor_conv", **_conv_attrs(s))
    asum = None
    if s.act_sum_scale is not None:
        asum = b.op("Conv", [sa, _ones(b, (1, s.k, kh, kw), "ones_kernel")], "act_sum", **_conv_attrs(s))
    border = None
    if s.weight_sum_scale is not None or s.count_scale is not None:
        h, wd = ctx.input_shapes[0][2], ctx.input_shapes[0][3]
        w_border = _fold_weight(b, w, s, True, s.weight_sum_scale if s.weight_sum_scale is not None
                                else np.zeros(s.out_channels, np.float32), s.count_scale, "border_kernel")
        border = b.op("Conv", [_ones(b, (1, s.k, h, wd), "ones_input"), w_border], "border_terms",
                      **_conv_attrs(s))
    return _epilogue(b, s, dot, asum, border, True), nbytes


# ---------------------------------------------------------------------------------------------- xor form
_POWERS = np.array([1, 2, 4, 8, 16, 32, 64, 128], np.float32)


def _pack_last(b: GraphBuilder, bits_f: str, k: int, rank: int, hint: str) -> str:
    """float 0/1 bits (..., k) of rank ``rank`` -> uint8 (..., ceil(k/8)) in quantkit's bit order."""
    kb = (k + 7) // 8
    if kb * 8 != k:
        bits_f = b.op("Pad", [bits_f, b.i64("pad_tail", [0, kb * 8 - k]), "", b.i64("axis_last", [-1])],
                      f"{hint}_padk")
    r = b.op("Reshape", [bits_f, b.i64("shape_bytes", [0] * (rank - 1) + [kb, 8])], f"{hint}_bytes")
    v = b.op("MatMul", [r, b.f32("bit_weights", _POWERS)], f"{hint}_pack")
    return b.op("Cast", [v], f"{hint}_u8", to=TensorProto.UINT8)


def _popcount_sum(b: GraphBuilder, packed: str, lut: str, hint: str, keepdims: int) -> str:
    idx = b.op("Cast", [packed], f"{hint}_idx", to=TensorProto.INT32)
    counts = b.op("Gather", [lut, idx], f"{hint}_lut", axis=0)
    return b.op("ReduceSum", [counts, b.i64("axis_last", [-1])], f"{hint}_sum", keepdims=keepdims)


def _tap_patches(b: GraphBuilder, t: str, s: BinarySpec, ho: int, wo: int, hint: str) -> str:
    """NHWC (N, H, W, B) -> (N, Ho, Wo, kh*kw*B): zero-pad H, W, one strided Slice per kernel tap, Concat."""
    ph, pw = s.padding
    if ph or pw:
        t = b.op("Pad", [t, b.i64("pads_hw", [ph, pw, ph, pw]), "", b.i64("axes_hw", [1, 2])], f"{hint}_pad")
    (kh, kw), (sh, sw), (dh, dw) = s.kernel, s.stride, s.dilation
    taps = []
    for i in range(kh):
        for j in range(kw):
            st = [i * dh, j * dw]
            en = [st[0] + (ho - 1) * sh + 1, st[1] + (wo - 1) * sw + 1]
            taps.append(b.op("Slice", [t, b.i64("starts", st), b.i64("ends", en), b.i64("axes_hw", [1, 2]),
                                       b.i64("steps", [sh, sw])], f"{hint}_tap{i}{j}"))
    return taps[0] if len(taps) == 1 else b.op("Concat", taps, f"{hint}_patches", axis=-1)


def _emit_xor(s: BinarySpec, b: GraphBuilder, x: str, ctx: EmitContext) -> tuple[str, int]:
    wbytes = words_to_bytes(s.words, s.k)  # conv (O, kh, kw, Cb), linear (O, Kb)
    n = s.out_channels
    lut = b.f32("popcount_table", popcount_table())
    bits_f = _bits_input(b, x, s, as_sign=False)
    if not s.conv:
        rank = len(ctx.input_shapes[0])
        packed = _pack_last(b, bits_f, s.k, rank, "act_pack")
        wb = b.init("weight_bits", wbytes)
        xo = b.op("BitwiseXor", [b.op("Unsqueeze", [packed, b.i64("axis_m2", [-2])], "act_unsq"), wb], "xor")
        pc = _popcount_sum(b, xo, lut, "xor_popcount", 0)
        dot = b.op("Sub", [b.f32("k", np.float32(s.k)), b.op("Mul", [pc, b.f32("two", np.float32(2))], "pc2")], "dot")
        asum = None
        if s.act_sum_scale is not None:
            pa = _popcount_sum(b, packed, lut, "act_popcount", 1)
            asum = b.op("Sub", [b.op("Mul", [pa, b.f32("two", np.float32(2))], "pa2"), b.f32("k", np.float32(s.k))],
                        "act_sum")
        return _epilogue(b, s, dot, asum, None, False), int(wbytes.nbytes)
    _, _, h, wd = ctx.input_shapes[0]
    (kh, kw) = s.kernel
    ho = conv2d_output_size(h, kh, s.stride[0], s.padding[0], s.dilation[0])
    wo = conv2d_output_size(wd, kw, s.stride[1], s.padding[1], s.dilation[1])
    taps = kh * kw
    cb = wbytes.shape[-1]
    nhwc = b.op("Transpose", [bits_f], "act_nhwc", perm=[0, 2, 3, 1])
    packed = _pack_last(b, nhwc, s.k, 4, "act_pack")  # (N, H, W, Cb)
    patches = _tap_patches(b, packed, s, ho, wo, "act")  # (N, Ho, Wo, T*Cb)
    wb = b.init("weight_bits", wbytes.reshape(n, taps * cb))
    xo = b.op("BitwiseXor", [b.op("Unsqueeze", [patches, b.i64("axis_m2", [-2])], "act_unsq"), wb], "xor")
    pc = _popcount_sum(b, xo, lut, "xor_popcount", 0)  # (N, Ho, Wo, O), padded taps count popcount(w_tap)
    # validity of each tap at each output position (1, Ho, Wo, T), from an all-ones map (folded at load time)
    valid = _tap_patches(b, _ones(b, (1, h, wd, 1), "ones_map"), s, ho, wo, "valid")
    wpop = np.array([[bin(int(v)).count("1") for v in row] for row in wbytes.reshape(n * taps, cb)],
                    np.float32).sum(axis=1).reshape(n, taps).T  # (T, O)
    invalid = b.op("Sub", [b.f32("one", np.float32(1)), valid], "invalid")
    corr = b.op("MatMul", [invalid, b.f32("weight_tap_popcount", wpop)], "pad_correction")
    pcv = b.op("Sub", [pc, corr], "popcount_valid")
    nvalid = b.op("Mul", [b.op("ReduceSum", [valid, b.i64("axis_last", [-1])], "valid_taps", keepdims=1),
                          b.f32("c_in", np.float32(s.k))], "n_valid")  # (1, Ho, Wo, 1)
    dot = b.op("Sub", [nvalid, b.op("Mul", [pcv, b.f32("two", np.float32(2))], "pc2")], "dot")
    asum = None
    if s.act_sum_scale is not None:
        pa = _popcount_sum(b, patches, lut, "act_popcount", 1)
        asum = b.op("Sub", [b.op("Mul", [pa, b.f32("two", np.float32(2))], "pa2"), nvalid], "act_sum")
    terms = []
    if s.weight_sum_scale is not None:
        wsum = b.op("MatMul", [valid, b.f32("weight_tap_sum", 2 * wpop - s.k)], "weight_sum")
        terms.append(b.op("Mul", [wsum, b.f32("weight_sum_scale", vec(s.weight_sum_scale, n))], "weight_sum_term"))
    if s.count_scale is not None:
        terms.append(b.op("Mul", [nvalid, b.f32("count_scale", vec(s.count_scale, n))], "count_term"))
    const_terms = None if not terms else (terms[0] if len(terms) == 1 else b.op("Add", terms, "weight_terms"))
    y = _epilogue(b, s, dot, asum, const_terms, False)  # NHWC
    return b.op("Transpose", [y], "to_nchw", perm=[0, 3, 1, 2]), int(wbytes.nbytes)


# ---------------------------------------------------------------------------------------------- entry points
def emit_spec(s: BinarySpec, b: GraphBuilder, inputs: list[str], ctx: EmitContext, kind: str,
              bits_a: int | None) -> tuple[str, LayerExport]:
    form = ctx.binary_form if s.input_mode != "float" else "unpack"
    if form == "xor":
        y, nbytes = _emit_xor(s, b, inputs[0], ctx)
    else:
        y, nbytes = _emit_unpack(s, b, inputs[0], ctx)
    fp32 = s.out_channels * s.k * (s.kernel[0] * s.kernel[1] if s.conv else 1) * 4
    return y, LayerExport(kind, form, 1, bits_a if s.input_mode != "float" else None, nbytes, fp32)


def _make(spec_fn, kind: str):
    def emit(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext) -> tuple[str, LayerExport]:
        return emit_spec(spec_fn(m), b, inputs, ctx, kind, 1)

    return emit


def _register() -> None:
    from ...nn.binary_deploy import BinaryDeployConv2d, BinaryDeployLinear

    register_emitter(BinaryDeployConv2d, _make(spec_binary_deploy, "binary"))
    register_emitter(BinaryDeployLinear, _make(spec_binary_deploy, "binary"))


_register()
