"""ONNX export of quantized models, checked in stock onnxruntime.

    result = quantkit.export_onnx(model, (x,), "model.onnx")       # simulated or deploy model
    print(result.agreement)                                         # simulated vs deploy vs onnxruntime

What the file contains (standard operators, opset 18-21, default 21):

* uniform schemes (``w8a8``, ``w4a4``): QDQ -- QuantizeLinear/DequantizeLinear on activations (per tensor; uint4
  zero point for 4 bits at opset 21), DequantizeLinear on integer weights (per output channel, ``axis=0``; INT4
  initializers at opset >= 21, INT8 otherwise), float Conv/MatMul;
* binary layers (``xnor``, ``adabin``, ``bivit`` linears): packed uint8 weight initializers, 8 weights a byte in the
  layout of :mod:`quantkit.ops.layout` (1/32 of the FP32 bytes), unpacked in the graph with BitShift/BitwiseAnd
  (``binary_form="unpack"``, the default: onnxruntime folds the unpacking at load time and runs one float Conv or
  MatMul of +-1 values) or never unpacked (``binary_form="xor"``: BitwiseXor + 256-entry popcount Gather +
  ReduceSum; measured far slower in onnxruntime, kept for runtimes with fast integer paths); XNOR-Net scales and
  AdaBin's affine terms exact, borders included -- see :mod:`quantkit.export.emit.binary`;
* BiViT's binary attention: sign via Where, MatMul of +-1 values, Softmax + ReduceMax + GreaterOrEqual for SAB (or
  Greater for BiBERT), MatMul with the binary values -- :mod:`quantkit.export.emit.attention`;
* adder layers (``adder_ptq{b}`` and full-precision AdderNet layers): per-group activation quantization (Div, Mul,
  Round, Clip), patches by a depthwise Conv with one-hot kernels, Sub/Abs/ReduceSum, integer weights as INT4 (2-4
  bits, opset 21) or INT8 initializers through DequantizeLinear -- :mod:`quantkit.export.emit.adder`;
* everything else (stems, BatchNorm, residual adds, LayerNorm, GELU, pooling, heads) exported by PyTorch's exporter.

``custom_ops=True`` writes each quantized layer as one compact node of the ``quantkit`` domain instead: op type =
the deploy layer's class name (``BinaryDeployConv2d`` for XNOR and AdaBin, ``AdderDeployConv2d``, ...); inputs =
the layer input(s) followed by the layer's tensors as initializers in their stored dtypes (packed int32 words,
int8 codes, float constants), listed by the string attribute ``tensor_names``; the other attributes are the layer's
settings (stride, padding, bits, ...). Useful for a runtime that implements quantkit's kernels; stock onnxruntime
cannot run such a file, so its onnxruntime check is skipped.

Every export checks itself: onnx.checker (full check), onnxruntime on the example inputs against the deploy and the
simulated model (the three-way :class:`Agreement`), a second batch size when the batch axis is dynamic, and -- when
the whole-model outputs differ beyond float tolerance -- each quantized layer on onnxruntime's own inputs. The file is
written only after all of that passed (atomically: a temporary file renamed over the target).
"""
from .inspect import OnnxSummary, inspect_onnx
from .onnx_export import DEFAULT_BINARY_FORM, DEFAULT_OPSET, Agreement, ExportResult, OnnxExporter, export_onnx
from .verify import onnx_accuracy, ort_session, run_onnxruntime

__all__ = ["export_onnx", "ExportResult", "Agreement", "DEFAULT_OPSET", "DEFAULT_BINARY_FORM", "ort_session",
           "run_onnxruntime", "onnx_accuracy", "inspect_onnx", "OnnxSummary", "OnnxExporter"]
