"""Adder (l1-distance) layers with standard operators: quantized AdderNet PTQ deploy layers and full-precision
AdderConv2d / AdderLinear.

Quantized form (docs/algorithms.md#adder-ptq-integer-form; the arithmetic of ``quantkit.ops.adder``)::

    for each group g:   q_x = Clip(Round(Div(x, s_g) * c), lo, hi)         (the activations on group g's grid)
    S[o] = sum over taps and channels |q_x - m q_w[o]|                      (exact integers in float32)
    Y[o] = S[o] * (-delta[o]) + bias[o]

The weight codes are initializers at their bit width -- INT4 for 2-4 bits when the opset allows it (>= 21), INT8
otherwise -- and enter the graph through ``DequantizeLinear(q_w, scale=m)``, which yields ``m q_w`` exactly.
Convolutions extract patches with a depthwise ``Conv`` whose one-hot kernels are built in the graph (``EyeLike``,
``Tile``; exact: each output is one input value times 1), then ``Sub -> Abs -> ReduceSum`` over the patch; a padded
tap has ``q_x = 0``, exactly as in the integer kernels. Large layers are split by output channel so that one
temporary stays below :data:`CHUNK_ELEMENTS` per image. Output channels of each group are computed together
and put back in order with one ``Gather``.
"""
from __future__ import annotations

import numpy as np

from ...ops.layout import conv2d_output_size
from ..builder import GraphBuilder, to_numpy
from .base import EmitContext, LayerExport, register_emitter, vec


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _quantize(b: GraphBuilder, x: str, scale: float, bits: int, signed: bool, round_mode: str, g: int) -> str:
    """quantkit.quantizers.adder.quantize_act_codes: clamp(round((x / s) * c), lo, hi) as float codes."""
    levels = 2**bits - 1
    c = levels / 2.0 if signed else float(levels)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, levels)
    v = b.op("Mul", [b.op("Div", [x, b.f32(f"group{g}_scale", np.float32(scale))], f"g{g}_div"),
                     b.f32("grid", np.float32(c))], f"g{g}_grid")
    if round_mode == "half_away":
        mag = b.op("Floor", [b.op("Add", [b.op("Abs", [v], f"g{g}_abs"), b.f32("half", np.float32(0.5))],
                                  f"g{g}_half")], f"g{g}_floor")
        r = b.op("Mul", [b.op("Sign", [v], f"g{g}_sign"), mag], f"g{g}_round")
    else:  # ONNX Round is half to even, as torch.round
        r = b.op("Round", [v], f"g{g}_round")
    return b.op("Clip", [r, b.f32("qmin", np.float32(lo)), b.f32("qmax", np.float32(hi))], f"g{g}_codes")


def _weights(b: GraphBuilder, codes: np.ndarray, w_mult: int, bits: int, ctx: EmitContext, g: int) -> tuple[str, int]:
    """Integer codes at their bit width, dequantized to ``w_mult * q_w`` (float)."""
    if bits <= 4 and ctx.opset >= 21:
        q = b.init_int4(f"group{g}_weight_int4", codes, signed=True)
        zp = b.init_int4(f"group{g}_weight_zero_point", np.array(0), signed=True)
        nbytes = (codes.size + 1) // 2
    else:
        q = b.init(f"group{g}_weight_int8", codes.astype(np.int8))
        zp = b.init(f"group{g}_weight_zero_point", np.int8(0))
        nbytes = codes.size
    w = b.op("DequantizeLinear", [q, b.f32("w_mult", np.float32(w_mult)), zp], f"g{g}_weight")
    return w, nbytes


#: per-image bound on the |q_x - q_w| temporary (elements) of one node; larger layers are split by output channel
CHUNK_ELEMENTS = 1 << 22


def _patches(b: GraphBuilder, x: str, c: int, kh: int, kw: int, stride, padding, dilation, g: int) -> str:
    """im2col with standard ops: a depthwise Conv with one-hot kernels (built in the graph from EyeLike, folded when
    the session loads) -> (N, C*kh*kw, Ho, Wo), channel c*T + tap; padded taps are exact zeros."""
    taps = kh * kw
    eye = b.op("EyeLike", [b.op("ConstantOfShape", [b.i64("eye_shape", [taps, taps])], f"g{g}_eye_in")],
               f"g{g}_eye")
    onehot = b.op("Reshape", [eye, b.i64("onehot_shape", [taps, 1, kh, kw])], f"g{g}_onehot")
    kernel = b.op("Tile", [onehot, b.i64("onehot_tile", [c, 1, 1, 1])], f"g{g}_im2col_kernel")
    return b.op("Conv", [x, kernel], f"g{g}_im2col", group=c, strides=list(stride), dilations=list(dilation),
                pads=[padding[0], padding[1], padding[0], padding[1]])


def _l1_conv(b: GraphBuilder, x: str, w: str, w_np_shape: tuple, ctx: EmitContext, stride, padding, dilation,
             g: int) -> str:
    """S[n, o, p] = sum_k |patch[n, k, p] - w[o, k]|  ->  (N, O_g, Ho, Wo), in output-channel chunks."""
    _, _, h, wd = ctx.input_shapes[0]
    o, c, kh, kw = w_np_shape
    k = c * kh * kw
    ho = conv2d_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv2d_output_size(wd, kw, stride[1], padding[1], dilation[1])
    cols = _patches(b, x, c, kh, kw, stride, padding, dilation, g)
    cols = b.op("Reshape", [cols, b.i64("cols_shape", [0, 1, k, ho * wo])], f"g{g}_cols")  # (N, 1, K, P)
    wk = b.op("Reshape", [w, b.i64("w_shape", [1, o, k, 1])], f"g{g}_wcols")  # (1, O, K, 1)
    step = max(1, min(o, CHUNK_ELEMENTS // max(1, k * ho * wo)))
    parts = []
    for o0 in range(0, o, step):
        wc = wk if step >= o else b.op("Slice", [wk, b.i64("o_start", [o0]), b.i64("o_end", [min(o, o0 + step)]),
                                                 b.i64("axis1", [1])], f"g{g}_wchunk{o0}")
        d = b.op("Abs", [b.op("Sub", [cols, wc], f"g{g}_diff{o0}")], f"g{g}_abs{o0}")
        parts.append(b.op("ReduceSum", [d, b.i64("axis2", [2])], f"g{g}_sum{o0}", keepdims=0))  # (N, O_c, P)
    s = parts[0] if len(parts) == 1 else b.op("Concat", parts, f"g{g}_chunks", axis=1)
    return b.op("Reshape", [s, b.i64("out_shape", [0, o, ho, wo])], f"g{g}_l1")


def _l1_linear(b: GraphBuilder, x: str, w: str, g: int) -> str:
    xu = b.op("Unsqueeze", [x, b.i64("axis_m2", [-2])], f"g{g}_unsq")  # (..., 1, K)
    return b.op("ReduceSum", [b.op("Abs", [b.op("Sub", [xu, w], f"g{g}_diff")], f"g{g}_abs"),
                              b.i64("axis_last", [-1])], f"g{g}_sum", keepdims=0)  # (..., O)


def _emit(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext, quantized: bool) -> tuple[str, LayerExport]:
    conv = m.weight_int.dim() == 4 if quantized else m.weight.dim() == 4
    x = inputs[0]
    weight = to_numpy(m.weight_int if quantized else m.weight)
    out_ch = weight.shape[0]
    chan_axis = 1 if conv else -1
    if quantized:
        gi = to_numpy(m.group_index).astype(np.int64)
        scales = to_numpy(m.group_scale, np.float32).reshape(-1)
        groups = [(g, np.nonzero(gi == g)[0]) for g in range(scales.size)]
        groups = [(g, idx) for g, idx in groups if idx.size]
    else:
        groups = [(0, np.arange(out_ch))]
    sums, order, nbytes = [], [], 0
    stride = _pair(getattr(m, "stride", 1))
    padding = _pair(getattr(m, "padding", 0))
    dilation = _pair(getattr(m, "dilation", 1))
    for g, idx in groups:
        if quantized:
            xg = _quantize(b, x, float(scales[g]), int(m.bits_a), bool(m.signed_act), m.round_mode, g)
            w, nb = _weights(b, weight[idx], int(m.w_mult), int(m.bits_w), ctx, g)
            nbytes += nb
        else:
            xg, w = x, b.f32(f"group{g}_weight", weight[idx])
            nbytes += weight[idx].size * 4
        s = _l1_conv(b, xg, w, weight[idx].shape, ctx, stride, padding, dilation, g) if conv else \
            _l1_linear(b, xg, w, g)
        sums.append(s)
        order.append(idx)
    s = sums[0] if len(sums) == 1 else b.op("Concat", sums, "groups", axis=chan_axis)
    perm = np.concatenate(order)
    if len(sums) > 1 and not np.array_equal(perm, np.arange(out_ch)):
        s = b.op("Gather", [s, b.i64("channel_order", np.argsort(perm))], "channel_order", axis=chan_axis)
    shape = (1, out_ch, 1, 1) if conv else (out_ch,)
    if quantized:
        y = b.op("Mul", [s, b.f32("neg_delta", (-vec(m.delta, out_ch)).reshape(shape))], "step")
        bias = m.bias
    else:
        y = b.op("Neg", [s], "neg_l1")
        bias = m.bias
    if bias is not None:
        y = b.op("Add", [y, b.f32("bias", vec(bias, out_ch).reshape(shape))], "bias")
    bits = int(m.bits_w) if quantized else None
    return y, LayerExport("adder" if quantized else "adder-fp", "l1", bits, bits, nbytes, weight.size * 4)


def emit_adder_deploy(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext) -> tuple[str, LayerExport]:
    return _emit(m, b, inputs, ctx, quantized=True)


def emit_adder_fp(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext) -> tuple[str, LayerExport]:
    return _emit(m, b, inputs, ctx, quantized=False)


def _register() -> None:
    try:
        from ...nn.adder import AdderConv2d, AdderLinear
    except ImportError:
        return
    register_emitter(AdderConv2d, emit_adder_fp)
    register_emitter(AdderLinear, emit_adder_fp)
    try:
        from ...nn.adder_quant import AdderDeployConv2d, AdderDeployLinear
    except ImportError:
        return
    register_emitter(AdderDeployConv2d, emit_adder_deploy)
    register_emitter(AdderDeployLinear, emit_adder_deploy)


_register()
