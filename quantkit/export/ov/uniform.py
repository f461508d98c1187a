"""Uniform (w8a8, w4a4, ...) deploy layers as OpenVINO's quantized pattern, which its CPU plugin runs with integer
kernels (low-precision transformations):

    x_q = FakeQuantize(x, lo, hi, lo, hi, levels = 2^b_a)      lo = (0 - z) s,  hi = (2^b_a - 1 - z) s
    W   = Convert(W_int8) * weight_scale[o]                     (the integer codes stored as i8 in the .bin)
    y   = Convolution / GroupConvolution / MatMul(x_q, W) + bias

FakeQuantize maps x to ``round((x - lo) / (hi - lo) * (levels - 1))`` steps of ``s`` above ``lo``, i.e. to
``(clamp(round(x / s) + z, 0, 2^b_a - 1) - z) s`` -- quantkit's ``quantize_affine`` -- for an integer zero point.
4-bit weight codes are stored as i8 too (their range is that of the 4-bit grid).
"""
from __future__ import annotations

import numpy as np

from ..emit.base import EmitContext, LayerExport
from . import register_ov_emitter

_PAD_MODES = {"reflect": "reflect", "replicate": "edge"}


def _quant_input(ops, x, m, name: str):
    if not bool(m.act_ready):
        return x
    bits = int(m.bits_a)
    s = float(m.act_scale)
    z = float(np.round(float(m.act_zero_point)))
    qmax = 2**bits - 1
    lo, hi = np.float32((0 - z) * s), np.float32((qmax - z) * s)
    fq = ops.fake_quantize(x, lo, hi, lo, hi, qmax + 1)
    fq.set_friendly_name(f"{name}/act_fake_quantize")
    return fq


def _quant_output(ops, y, m, name: str):
    """A layer that rounds its output (a conv feeding a residual Add): [ReLU ->] FakeQuantize on the output grid."""
    if m.output_bits is None:
        return y
    if m.output_relu:
        y = ops.relu(y)
    s, z = float(m.out_scale), float(np.round(float(m.out_zero_point)))
    qmax = 2 ** int(m.output_bits) - 1
    lo, hi = np.float32((0 - z) * s), np.float32((qmax - z) * s)
    fq = ops.fake_quantize(y, lo, hi, lo, hi, qmax + 1)
    fq.set_friendly_name(f"{name}/out_fake_quantize")
    return fq


def _weight(ops, m, name: str):
    import openvino as ov

    w_int = m.weight_int.detach().to(dtype=m.weight_int.dtype).numpy().astype(np.int8)
    scale = m.weight_scale.detach().float().reshape(-1).numpy()
    shape = (-1,) + (1,) * (w_int.ndim - 1)
    q = ov.op.Constant(np.ascontiguousarray(w_int))
    w = ops.multiply(ops.convert(q, "f32"), np.ascontiguousarray(scale.reshape(shape), np.float32))
    w.set_friendly_name(f"{name}/weight_dequantize")
    return w, w_int


def emit_uniform_conv(m, inputs: list, ctx: EmitContext) -> tuple:
    import openvino.opset13 as ops

    x = _quant_input(ops, inputs[0], m, ctx.name)
    w, w_int = _weight(ops, m, ctx.name)
    ph, pw = m.padding if not isinstance(m.padding, str) else (0, 0)
    pads = [int(ph), int(pw)]
    if m.padding_mode != "zeros":
        mode = _PAD_MODES.get(m.padding_mode)
        if mode is None:
            ctx.fail(f"padding_mode={m.padding_mode!r} has no OpenVINO Pad mode (reflect and replicate do)")
        left, right, top, bottom = m._rp
        x = ops.pad(x, np.array([0, 0, top, left], np.int64), np.array([0, 0, bottom, right], np.int64), mode)
        pads = [0, 0]
    args = (list(m.stride), pads, pads, list(m.dilation))
    g = int(m.groups)
    if g == 1:
        y = ops.convolution(x, w, *args)
    else:
        o = w_int.shape[0]
        wg = ops.reshape(w, np.array([g, o // g] + list(w_int.shape[1:]), np.int64), False)
        y = ops.group_convolution(x, wg, *args)
    y.set_friendly_name(f"{ctx.name}/conv")
    if m.bias is not None:
        y = ops.add(y, m.bias.detach().float().numpy().reshape(1, -1, 1, 1))
    y = _quant_output(ops, y, m, ctx.name)
    bits_a = m.bits_a if bool(m.act_ready) else None
    return y, LayerExport("uniform", "fake-quantize", m.bits_w, bits_a, w_int.size, w_int.size * 4)


def emit_uniform_linear(m, inputs: list, ctx: EmitContext) -> tuple:
    import openvino.opset13 as ops

    x = _quant_input(ops, inputs[0], m, ctx.name)
    w, w_int = _weight(ops, m, ctx.name)
    y = ops.matmul(x, w, False, True)
    y.set_friendly_name(f"{ctx.name}/matmul")
    if m.bias is not None:
        y = ops.add(y, m.bias.detach().float().numpy())
    y = _quant_output(ops, y, m, ctx.name)
    bits_a = m.bits_a if bool(m.act_ready) else None
    return y, LayerExport("uniform", "fake-quantize", m.bits_w, bits_a, w_int.size, w_int.size * 4)


def _register() -> None:
    from ...nn.uniform import UniformDeployConv2d, UniformDeployLinear

    register_ov_emitter(UniformDeployConv2d, emit_uniform_conv)
    register_ov_emitter(UniformDeployLinear, emit_uniform_linear)


_register()
