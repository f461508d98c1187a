"""Uniform (w8a8, w4a4, ...) deploy layers as OpenVINO's quantized pattern, which its CPU plugin runs with integer
kernels (low-precision transformations):

    x_q = FakeQuantize(x, lo, hi, lo, hi, levels = 2^b_a)      lo = (0 - z) s,  hi = (2^b_a - 1 - z) s
    W   = Convert(W_int8) * weight_scale[o]                     (the integer codes stored as i8 in the .bin)
    y   = Convolution / GroupConvolution / MatMul(x_q, W) + bias

FakeQuantize maps x to ``round((x - lo) / (hi - lo) * (levels - 1))`` steps of ``s`` above ``lo``, i.e. to
``(clamp(round(x / s) + z, 0, 2^b_a - 1) - z) s`` -- quantkit's ``quantize_affine`` -- for an integer zero point.
4-bit weight codes are stored as i8 too (their range is that of the 4-bit grid).

On x86 CPUs without VNNI, OpenVINO's integer convolutions (oneDNN) add pairs of u8 x i8 products in saturating
16-bit lanes, so a layer whose codes can exceed that (:func:`~quantkit.export.emit.uniform.signed_weights_can_saturate`:
8-bit activations with weights beyond +-64) gives wrong outputs there. The default ``uniform_form="int8"`` stores
such a layer's weights as ``W = (Convert(W_int8 + 128) - 128) * weight_scale[o]`` instead: the same values, which
OpenVINO's low-precision transformations leave to a float convolution (measured with OpenVINO 2026.4 on an AVX2
CPU), exact everywhere. ``uniform_form="int8_signed"`` keeps i8 in every layer: integer kernels, exact only with VNNI.
"""
from __future__ import annotations

import numpy as np

from ..emit.base import EmitContext, LayerExport
from ..emit.uniform import weights_stored_unsigned
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


def _weight(ops, m, ctx: EmitContext):
    import openvino as ov

    w_int = m.weight_int.detach().to(dtype=m.weight_int.dtype).numpy().astype(np.int8)
    scale = m.weight_scale.detach().float().reshape(-1).numpy()
    shape = (-1,) + (1,) * (w_int.ndim - 1)
    if weights_stored_unsigned(m, ctx):
        q = ov.op.Constant(np.ascontiguousarray((w_int.astype(np.int16) + 128).astype(np.uint8)))
        codes = ops.subtract(ops.convert(q, "f32"), np.float32(128))
    else:
        codes = ops.convert(ov.op.Constant(np.ascontiguousarray(w_int)), "f32")
    w = ops.multiply(codes, np.ascontiguousarray(scale.reshape(shape), np.float32))
    w.set_friendly_name(f"{ctx.name}/weight_dequantize")
    return w, w_int


def emit_uniform_conv(m, inputs: list, ctx: EmitContext) -> tuple:
    import openvino.opset13 as ops

    x = _quant_input(ops, inputs[0], m, ctx.name)
    w, w_int = _weight(ops, m, ctx)
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
    return y, _layer_export(m, ctx, bits_a, w_int)


def emit_uniform_linear(m, inputs: list, ctx: EmitContext) -> tuple:
    import openvino.opset13 as ops

    x = _quant_input(ops, inputs[0], m, ctx.name)
    w, w_int = _weight(ops, m, ctx)
    y = ops.matmul(x, w, False, True)
    y.set_friendly_name(f"{ctx.name}/matmul")
    if m.bias is not None:
        y = ops.add(y, m.bias.detach().float().numpy())
    y = _quant_output(ops, y, m, ctx.name)
    bits_a = m.bits_a if bool(m.act_ready) else None
    return y, _layer_export(m, ctx, bits_a, w_int)


def _layer_export(m, ctx: EmitContext, bits_a, w_int: np.ndarray) -> LayerExport:
    notes = (["weights stored as u8 - 128 (i8 codes would saturate integer kernels on x86 without VNNI); OpenVINO "
              "runs this layer in f32"] if weights_stored_unsigned(m, ctx) else [])
    return LayerExport("uniform", "fake-quantize", m.bits_w, bits_a, w_int.size, w_int.size * 4, notes=notes)


def _register() -> None:
    from ...nn.uniform import UniformDeployConv2d, UniformDeployLinear

    register_ov_emitter(UniformDeployConv2d, emit_uniform_conv)
    register_ov_emitter(UniformDeployLinear, emit_uniform_linear)


_register()
