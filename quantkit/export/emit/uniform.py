"""Uniform (w8a8, w4a4, ...) deploy layers as standard QDQ: QuantizeLinear/DequantizeLinear on the activation (per
tensor), DequantizeLinear on the integer weight (per output channel, ``axis=0``) and on the int32 bias (scale
``s_x * s_w[o]``, the grid the simulated layer already rounds its bias to), then Conv / Gemm.

This is the pattern onnxruntime's optimizer fuses into integer kernels: ``DQ -> Gemm`` becomes ``QGemm`` (float
output), and ``DQ -> Conv -> [Relu] -> Q`` becomes ``QLinearConv`` (the requantization then happens in the integer
epilogue). The Q is either the next quantized layer's input QuantizeLinear (:func:`quantize_before_reshapes` extends
this to a conv that reaches it through a Flatten / Reshape), or, for a conv whose output feeds a residual Add (the
second conv of a ResNet block, a downsample conv, a stem conv before its max-pool), the layer's own output grid: the
uniform schemes round those outputs to 8 bits in simulation too (``quantize_residual``, :mod:`quantkit.graph.residual`),
so the layer emits ``[Relu ->] Q -> DQ`` after its Conv and every conv of a ResNet runs as QLinearConv. The Add itself
stays a float Add of dequantized values (it is cheap; a QLinearAdd would need the shortcut rounded too).
:func:`integer_friendly_cleanup` then removes what would keep onnxruntime in float between two integer kernels.

Three containers (``export_onnx(uniform_form=...)``):

* ``"int8"`` (default): activations as uint8; widths below 8 bits clip the uint8 codes to [0, 2^b - 1] with a uint8
  Clip between QuantizeLinear and DequantizeLinear -- the same integers as
  ``quantkit.quantizers.uniform.quantize_affine``. Weights as int8 codes, except in a layer whose codes could
  overflow a 16-bit pair sum (:func:`signed_weights_can_saturate`: 8-bit activations with weight codes beyond
  +-64, i.e. every full-range w8a8 layer): its codes are stored as uint8 ``q + 128`` with zero point 128, the same
  dequantized values. onnxruntime fuses both (the Clip stays as a cheap uint8 op) and picks its u8 x u8 kernels for
  the second, which are exact on every CPU; its u8 x s8 kernels on x86 without VNNI saturate such layers.
* ``"int8_signed"``: every weight as int8 (onnxruntime's u8 x s8 kernels everywhere). Exact on CPUs with VNNI
  (AVX-512 VNNI, AVX-VNNI) and on ARM; on x86 CPUs without it (AVX2 only, e.g. AMD Zen 3, Intel Skylake) the
  saturating layers give wrong outputs, which the export's onnxruntime check reports on such a machine.
* ``"int4"`` (opset >= 21): 4-bit weights as INT4 initializers and 4-bit activations with a UINT4 zero point
  (QuantizeLinear saturates to [0, 15]): half the weight bytes, but onnxruntime does not fuse it and runs
  dequantize + float Conv / Gemm.
"""
from __future__ import annotations

import numpy as np

from ..builder import GraphBuilder, to_numpy
from .base import EmitContext, LayerExport, register_emitter


def _int4(ctx: EmitContext) -> bool:
    return ctx.uniform_form == "int4" and ctx.opset >= 21


def _quant_dequant_input(b: GraphBuilder, x: str, m, ctx: EmitContext) -> str:
    if not bool(m.act_ready):
        return x
    bits = int(m.bits_a)
    scale = b.f32("act_scale", np.float32(float(m.act_scale)))
    zp_val = int(round(float(m.act_zero_point)))
    if bits == 4 and _int4(ctx):
        zp = b.init_int4("act_zero_point", np.array(zp_val), signed=False)
        q = b.op("QuantizeLinear", [x, scale, zp], "act_quant")
        return b.op("DequantizeLinear", [q, scale, zp], "act_dequant")
    zp = b.init("act_zero_point", np.uint8(zp_val))
    q = b.op("QuantizeLinear", [x, scale, zp], "act_quant")
    if bits < 8:
        q = b.op("Clip", [q, b.init("act_qmin", np.uint8(0)), b.init("act_qmax", np.uint8(2**bits - 1))], "act_clip")
    return b.op("DequantizeLinear", [q, scale, zp], "act_dequant")


#: x86 integer GEMMs without VNNI (onnxruntime's and oneDNN's AVX2 / AVX-512BW kernels) multiply u8 by s8 with
#: VPMADDUBSW, which adds two adjacent products into a saturating int16
PAIR_SUM_MAX = 2**15 - 1


def signed_weights_can_saturate(act_qmax: int, w_int: np.ndarray) -> bool:
    """Whether uint8 activation codes up to ``act_qmax`` times these int8 weight codes can overflow a 16-bit sum of
    two products, ``act_qmax * (|w_i| + |w_j|) > 32767``. The runtimes pair adjacent reduction elements in an order
    of their own, so the bound takes the two largest magnitudes: with 8-bit activations (codes up to 255) weights
    within +-64 are safe, and 4-bit activations are safe with any int8 weights."""
    w_max = int(np.abs(w_int.astype(np.int16)).max()) if w_int.size else 0
    return int(act_qmax) * 2 * w_max > PAIR_SUM_MAX


def _layer_can_saturate(m) -> bool:
    """A uniform layer on integer kernels (a quantized input) whose int8 weight codes could saturate them."""
    if not bool(m.act_ready):
        return False  # a float input runs a float Conv / Gemm: no integer kernel
    return signed_weights_can_saturate(2 ** int(m.bits_a) - 1, to_numpy(m.weight_int, np.int8))


def weights_stored_unsigned(m, ctx: EmitContext) -> bool:
    """The ``"int8"`` form stores this layer's weight codes as uint8 with zero point 128 (see the module doc)."""
    return ctx.uniform_form == "int8" and _layer_can_saturate(m)


def saturation_hint(m, uniform_form: str) -> str:
    """The likely cause when a uniform layer exported with signed weights differs from its deploy layer in a runtime
    (empty when the layer's codes cannot saturate, or it was exported in the exact form)."""
    from ...nn.uniform import UniformDeployConv2d, UniformDeployLinear

    if (uniform_form != "int8_signed" or not isinstance(m, (UniformDeployConv2d, UniformDeployLinear))
            or not _layer_can_saturate(m)):
        return ""
    w_max = int(np.abs(to_numpy(m.weight_int, np.int16)).max())
    return (f"its int8 weight codes (up to +-{w_max}) times {int(m.bits_a)}-bit activation codes overflow the 16-bit "
            "pair sums of this CPU's u8 x s8 integer kernels (x86 without VNNI); export with uniform_form='int8' "
            "(the default), which stores such weights as uint8 and is exact on every CPU")


def _dequant_weight(b: GraphBuilder, m, ctx: EmitContext) -> tuple[str, int]:
    w_int = to_numpy(m.weight_int, np.int8)
    scale = b.f32("weight_scale", to_numpy(m.weight_scale).reshape(-1))
    if int(m.bits_w) <= 4 and _int4(ctx):
        wq = b.init_int4("weight_int4", w_int, signed=True)
        zp = b.init_int4("weight_zero_point", np.zeros(w_int.shape[0], np.int8), signed=True)
        nbytes = (w_int.size + 1) // 2
    elif weights_stored_unsigned(m, ctx):
        wq = b.init("weight_uint8", (w_int.astype(np.int16) + 128).astype(np.uint8))
        zp = b.init("weight_zero_point", np.full(w_int.shape[0], 128, np.uint8))
        nbytes = w_int.size
    else:
        wq = b.init("weight_int8", w_int)
        zp = b.init("weight_zero_point", np.zeros(w_int.shape[0], np.int8))
        nbytes = w_int.size
    return b.op("DequantizeLinear", [wq, scale, zp], "weight_dequant", axis=0), nbytes


def _bias(b: GraphBuilder, m) -> str | None:
    """The bias input: DequantizeLinear of int32 codes on the accumulator grid s_x * s_w[o] (the deploy layer's
    bias already lies on that grid) once the input is quantized; a float initializer before calibration."""
    if m.bias is None:
        return None
    if not bool(m.act_ready):
        return b.f32("bias", m.bias)
    scale = (np.float32(float(m.act_scale)) * to_numpy(m.weight_scale, np.float32).reshape(-1)).astype(np.float32)
    codes = np.round(to_numpy(m.bias, np.float64) / scale.astype(np.float64))
    codes = np.clip(codes, -(2**31 - 1), 2**31 - 1).astype(np.int32)
    return b.op("DequantizeLinear", [b.init("bias_int32", codes), b.f32("bias_scale", scale),
                                     b.init("bias_zero_point", np.zeros(codes.shape[0], np.int32))],
                "bias_dequant", axis=0)


def _quant_dequant_output(b: GraphBuilder, y: str, m) -> str:
    """``[Relu ->] QuantizeLinear -> DequantizeLinear`` of a layer that rounds its output (a conv feeding a residual
    Add): onnxruntime folds ``Conv [-> Relu] -> QuantizeLinear`` into QLinearConv's integer epilogue."""
    if m.output_bits is None:
        return y
    if m.output_relu:
        y = b.op("Relu", [y], "out_relu")
    scale = b.f32("out_scale", np.float32(float(m.out_scale)))
    zp = b.init("out_zero_point", np.uint8(int(round(float(m.out_zero_point)))))
    q = b.op("QuantizeLinear", [y, scale, zp], "out_quant")
    if int(m.output_bits) < 8:
        q = b.op("Clip", [q, b.init("out_qmin", np.uint8(0)), b.init("out_qmax", np.uint8(2**int(m.output_bits) - 1))],
                 "out_clip")
    return b.op("DequantizeLinear", [q, scale, zp], "out_dequant")


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
    bias = _bias(b, m)
    inputs_conv = [x, w] + ([bias] if bias is not None else [])
    y = b.op("Conv", inputs_conv, "conv", strides=list(m.stride), pads=pads, dilations=list(m.dilation),
             group=int(m.groups))
    y = _quant_dequant_output(b, y, m)
    return y, _layer_export(m, ctx, nbytes)


def emit_uniform_linear(m, b: GraphBuilder, inputs: list[str], ctx: EmitContext) -> tuple[str, LayerExport]:
    x = _quant_dequant_input(b, inputs[0], m, ctx)
    w, nbytes = _dequant_weight(b, m, ctx)
    bias = _bias(b, m)
    rank = len(ctx.input_shapes[0]) if ctx.input_shapes else 2
    if rank == 2:  # Gemm (transB): onnxruntime fuses DQ -> Gemm into QGemm
        y = b.op("Gemm", [x, w] + ([bias] if bias is not None else []), "gemm", transB=1)
    else:  # (..., K) inputs: MatMul (fused into MatMulIntegerToFloat) + Add
        wt = b.op("Transpose", [w], "weight_t", perm=[1, 0])
        y = b.op("MatMul", [x, wt], "matmul")
        if bias is not None:
            y = b.op("Add", [y, bias], "bias")
    y = _quant_dequant_output(b, y, m)
    return y, _layer_export(m, ctx, nbytes)


def _layer_export(m, ctx: EmitContext, nbytes: int) -> LayerExport:
    notes = (["weights stored as uint8 with zero point 128 (int8 codes would saturate u8 x s8 kernels on x86 "
              "without VNNI)"] if weights_stored_unsigned(m, ctx) else [])
    return LayerExport("uniform", "qdq", m.bits_w, m.bits_a if bool(m.act_ready) else None, nbytes,
                       int(np.prod(m.weight_int.shape)) * 4, notes=notes)


def _register() -> None:
    from ...nn.uniform import UniformDeployConv2d, UniformDeployLinear

    register_emitter(UniformDeployConv2d, emit_uniform_conv)
    register_emitter(UniformDeployLinear, emit_uniform_linear)


_register()


_SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def quantize_before_reshapes(graph) -> int:
    """Graph pass: where a uniform layer's QuantizeLinear reads a Flatten / Reshape / Squeeze / Unsqueeze whose output
    feeds nothing else (``Conv -> Relu -> Flatten -> Q``: the classifier of a CNN), insert the same
    ``QuantizeLinear [-> Clip] -> DequantizeLinear`` before the shape op. Exact: dequantized codes quantize back to
    the same codes and a shape op moves values unchanged, so the later Q sees the grid it would produce anyway. It
    lets onnxruntime fuse the producer into ``QLinearConv`` (its QDQ fusion does not look through shape ops).
    Returns how many were inserted."""
    from onnx import helper

    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    before: dict[int, list] = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        shape = producers.get(q.input[0])
        if (shape is None or shape.op_type not in _SHAPE_OPS or q.input[0] in outputs
                or len(consumers.get(q.input[0], [])) != 1 or shape.input[0] in outputs):
            continue
        after_q = consumers.get(q.output[0], [])
        clip = after_q[0] if len(after_q) == 1 and after_q[0].op_type == "Clip" else None
        base = f"{q.name or q.output[0]}/before_{shape.op_type.lower()}"
        nodes = [helper.make_node("QuantizeLinear", [shape.input[0], q.input[1], q.input[2]], [base + "_q"],
                                  name=base + "_q", **{a.name: helper.get_attribute_value(a) for a in q.attribute})]
        codes = base + "_q"
        if clip is not None:
            nodes.append(helper.make_node("Clip", [codes] + list(clip.input[1:]), [base + "_clip"], name=base + "_clip"))
            codes = base + "_clip"
        nodes.append(helper.make_node("DequantizeLinear", [codes, q.input[1], q.input[2]], [base + "_dq"],
                                      name=base + "_dq"))
        before[id(shape)] = nodes
        shape.input[0] = base + "_dq"
    if not before:
        return 0
    ordered = []
    for n in graph.node:
        ordered.extend(before.get(id(n), []))
        ordered.append(n)
    del graph.node[:]
    graph.node.extend(ordered)
    return len(before)


def _scalar(initializers: dict, name: str):
    """The value of a scalar initializer (``None`` for anything else)."""
    from onnx import numpy_helper

    t = initializers.get(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    return a.reshape(()).item() if a.size == 1 else None


def _same_grid(initializers: dict, a, b) -> bool:
    """Whether two QuantizeLinear / DequantizeLinear nodes use the same per-tensor scale and zero point (and dtype)."""
    from onnx import numpy_helper

    if len(a.input) < 3 or len(b.input) < 3 or a.attribute or b.attribute:
        return False
    za, zb = initializers.get(a.input[2]), initializers.get(b.input[2])
    if za is None or zb is None or za.data_type != zb.data_type:
        return False
    sa, sb = _scalar(initializers, a.input[1]), _scalar(initializers, b.input[1])
    return (sa is not None and sa == sb and numpy_helper.to_array(za).size == 1
            and _scalar(initializers, a.input[2]) == _scalar(initializers, b.input[2]))


def integer_friendly_cleanup(graph) -> dict[str, int]:
    """Exact rewrites after the QDQ graph is built, so onnxruntime keeps more of it in uint8:

    * a ``Relu`` reading a ``DequantizeLinear`` with a uint8 zero point of 0 is dropped: every dequantized value is
      ``q * s >= 0``, the ReLU is the identity (the model's ReLU after a conv that rounded ``relu(y)`` already);
    * a ``MaxPool`` reading such a ``DequantizeLinear`` gets ``QuantizeLinear -> DequantizeLinear`` on the same
      grid after it: the maximum of values on a grid lies on the grid, so the pair is exact, and onnxruntime then
      runs the MaxPool on uint8 codes;
    * ``DequantizeLinear -> QuantizeLinear`` on the same grid is dropped (the codes quantize back to themselves).

    Returns how many of each were rewritten."""
    from onnx import TensorProto, helper

    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    counts = {"relu": 0, "maxpool": 0, "dq_q": 0}

    def producers() -> dict:
        return {o: n for n in graph.node for o in n.output}

    def rename_input(old: str, new: str) -> None:
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new

    def zero_point_zero_dq(node) -> bool:
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.attribute:
            return False
        zp = initializers.get(node.input[2])
        return zp is not None and zp.data_type == TensorProto.UINT8 and _scalar(initializers, node.input[2]) == 0

    prod = producers()
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        if relu.output[0] in outputs or not zero_point_zero_dq(prod.get(relu.input[0])):
            continue
        rename_input(relu.output[0], relu.input[0])
        graph.node.remove(relu)
        counts["relu"] += 1

    prod = producers()
    inserted: dict[int, list] = {}
    for pool in graph.node:
        dq = prod.get(pool.input[0]) if pool.op_type == "MaxPool" else None
        if dq is None or len(pool.output) != 1 or pool.output[0] in outputs or dq.op_type != "DequantizeLinear":
            continue
        if len(dq.input) < 3 or dq.attribute or _scalar(initializers, dq.input[1]) is None:
            continue
        base = f"{pool.name or pool.output[0]}/requant"
        q = helper.make_node("QuantizeLinear", [base + "_in", dq.input[1], dq.input[2]], [base + "_q"],
                             name=base + "_q")
        d = helper.make_node("DequantizeLinear", [base + "_q", dq.input[1], dq.input[2]], [base + "_dq"],
                             name=base + "_dq")
        rename_input(pool.output[0], base + "_dq")
        q.input[0] = pool.output[0]
        inserted[id(pool)] = [q, d]
        counts["maxpool"] += 1
    if inserted:
        ordered = []
        for n in graph.node:
            ordered.append(n)
            ordered.extend(inserted.get(id(n), []))
        del graph.node[:]
        graph.node.extend(ordered)

    prod = producers()
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        dq = prod.get(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or q.output[0] in outputs or not _same_grid(
                initializers, dq, q):
            continue
        rename_input(q.output[0], dq.input[0])
        graph.node.remove(q)
        counts["dq_q"] += 1
    if counts["dq_q"]:  # a DequantizeLinear whose only reader was that QuantizeLinear is dead now
        used = {i for n in graph.node for i in n.input} | outputs
        for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            graph.node.remove(dq)
    return counts
