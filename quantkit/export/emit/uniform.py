"""Uniform (w8a8, w4a4, ...) deploy layers as standard QDQ: QuantizeLinear/DequantizeLinear on the activation (per
tensor), DequantizeLinear on the integer weight (per output channel, ``axis=0``), then the float Conv / MatMul.

Weights of 4 bits or fewer are stored as INT4 initializers when the opset allows it (>= 21), otherwise int8.
Activations of 8 bits use a uint8 zero point; 4 bits a uint4 zero point (opset >= 21, QuantizeLinear saturates to
[0, 15]); any other width quantizes to uint8 and clips to [0, 2^b - 1] before dequantizing -- the same integers as
``quantkit.quantizers.uniform.quantize_affine``.
"""
from __future__ import annotations

import numpy as np

from ..builder import GraphBuilder, to_numpy
from .base import EmitContext, LayerExport, register_emitter


def _quant_dequant_input(b: GraphBuilder, x: str, m, ctx: EmitContext) -> str:
    if not bool(m.act_ready):
        return x
    bits = int(m.bits_a)
    scale = b.f32("act_scale", np.float32(float(m.act_scale)))
    zp_val = int(round(float(m.act_zero_point)))
    if bits == 4 and ctx.opset >= 21:
        zp = b.init_int4("act_zero_point", np.array(zp_val), signed=False)
        q = b.op("QuantizeLinear", [x, scale, zp], "act_quant")
        return b.op("DequantizeLinear", [q, scale, zp], "act_dequant")
    zp = b.init("act_zero_point", np.uint8(zp_val))
    q = b.op("QuantizeLinear", [x, scale, zp], "act_quant")
    if bits < 8:
        q = b.op("Clip", [q, b.init("act_qmin", np.uint8(0)), b.init("act_qmax", np.uint8(2**bits - 1))], "act_clip")
    return b.op("DequantizeLinear", [q, scale, zp], "act_dequant")


def _dequant_weight(b: GraphBuilder, m, ctx: EmitContext) -> tuple[str, int]:
    w_int = to_numpy(m.weight_int, np.int8)
    scale = b.f32("weight_scale", to_numpy(m.weight_scale).reshape(-1))
    if int(m.bits_w) <= 4 and ctx.opset >= 21:
        wq = b.init_int4("weight_int4", w_int, signed=True)
        zp = b.init_int4("weight_zero_point", np.zeros(w_int.shape[0], np.int8), signed=True)
        nbytes = (w_int.size + 1) // 2
    else:
        wq = b.init("weight_int8", w_int)
        zp = b.init("weight_zero_point", np.zeros(w_int.shape[0], np.int8))
        nbytes = w_int.size
    return b.op("DequantizeLinear", [wq, scale, zp], "weight_dequant", axis=0), nbytes


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def emit_uniform_conv(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext) -> tuple[str, LayerExport]:
    x = _quant_dequant_input(b, inputs[0], m, ctx)
    w, nbytes = _dequant_weight(b, m, ctx)
    ph, pw = m.padding if not isinstance(m.padding, str) else (0, 0)
    pads = [int(ph), int(pw), int(ph), int(pw)]
    if m.padding_mode != "zeros":
        mode = _PAD_MODES.get(m.padding_mode)
        if mode is None or (mode == "wrap" and ctx.opset < 19):
            ctx.fail(f"padding_mode={m.padding_mode!r} needs opset >= 19 (Pad mode 'wrap')")
        left, right, top, bottom = m._rp
        x = b.op("Pad", [x, b.i64("pads", [top, left, bottom, right]), "", b.i64("pad_axes", [2, 3])], "pad",
                 mode=mode)
        pads = [0, 0, 0, 0]
    inputs_conv = [x, w] + ([b.f32("bias", m.bias)] if m.bias is not None else [])
    y = b.op("Conv", inputs_conv, "conv", strides=list(m.stride), pads=pads, dilations=list(m.dilation),
             group=int(m.groups))
    return y, LayerExport("uniform", "qdq", m.bits_w, m.bits_a if bool(m.act_ready) else None, nbytes,
                          int(np.prod(m.weight_int.shape)) * 4)


def emit_uniform_linear(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext) -> tuple[str, LayerExport]:
    x = _quant_dequant_input(b, inputs[0], m, ctx)
    w, nbytes = _dequant_weight(b, m, ctx)
    wt = b.op("Transpose", [w], "weight_t", perm=[1, 0])
    y = b.op("MatMul", [x, wt], "matmul")
    if m.bias is not None:
        y = b.op("Add", [y, b.f32("bias", m.bias)], "bias")
    return y, LayerExport("uniform", "qdq", m.bits_w, m.bits_a if bool(m.act_ready) else None, nbytes,
                          int(np.prod(m.weight_int.shape)) * 4)


def _register() -> None:
    from ...nn.uniform import UniformDeployConv2d, UniformDeployLinear

    register_emitter(UniformDeployConv2d, emit_uniform_conv)
    register_emitter(UniformDeployLinear, emit_uniform_linear)


_register()
