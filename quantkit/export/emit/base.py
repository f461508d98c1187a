"""The emitter registry: deploy-layer type -> function writing that layer's ONNX nodes and initializers.

An emitter has the signature ``emit(module, builder, input_names, ctx) -> (output_name, LayerExport)``. It reads only
the deploy module's frozen tensors (packed bits, integer codes, epilogue constants), so what runs in onnxruntime is
what the deploy model computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from ...errors import ExportError
from ..builder import GraphBuilder, to_numpy

#: binary forms: "unpack" (packed uint8 weights unpacked in the graph with BitShift/BitwiseAnd, then float
#: Conv/MatMul of +-1 values) or "xor" (activations packed in the graph, BitwiseXor with the packed weights,
#: 256-entry popcount Gather, ReduceSum; never unpacks to float)
BINARY_FORMS = ("unpack", "xor")
#: uniform (w8a8, w4a4) containers: "int8" (8-bit codes, uint8 Clip below 8 bits: onnxruntime fuses it into
#: QLinearConv / QGemm; weights that could saturate u8 x s8 kernels stored as uint8, exact on every CPU),
#: "int8_signed" (every weight int8: exact only where the CPU has VNNI or is ARM) or "int4" (INT4 weights, UINT4
#: 4-bit activations at opset >= 21: smaller, runs unfused)
UNIFORM_FORMS = ("int8", "int8_signed", "int4")


@dataclass
class LayerExport:
    """What one exported layer became (for the summary and ``quantkit inspect``)."""

    kind: str
    form: str
    bits_w: int | None
    bits_a: int | None
    weight_bytes: int
    fp32_weight_bytes: int
    name: str = ""
    type_name: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class EmitContext:
    name: str
    type_name: str
    opset: int
    binary_form: str
    input_shapes: list[tuple]
    output_shapes: list[tuple]
    #: container of uniform layers: one of UNIFORM_FORMS
    uniform_form: str = "int8"

    def fail(self, why: str) -> None:
        raise ExportError(f"layer {self.name!r} ({self.type_name}): {why}")


Emitter = Callable[[nn.Module, GraphBuilder, list, EmitContext], tuple]
_EMITTERS: dict[type, Emitter] = {}


def register_emitter(cls: type, fn: Emitter) -> None:
    _EMITTERS[cls] = fn


def emitter_for(module: nn.Module) -> Emitter | None:
    for cls in type(module).__mro__:
        if cls in _EMITTERS:
            return _EMITTERS[cls]
    return None


def supported_types() -> list[str]:
    return sorted(c.__name__ for c in _EMITTERS)


# ---------------------------------------------------------------------------------------------- custom-domain ops
CUSTOM_DOMAIN = "quantkit"


def _attr_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)):
        return v
    if isinstance(v, (tuple, list)) and v and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return [int(e) for e in v]
    if isinstance(v, (tuple, list)) and v and all(isinstance(e, (int, float)) for e in v):
        return [float(e) for e in v]
    return None


def emit_custom(m: nn.Module, b: GraphBuilder, inputs: list[str], ctx: EmitContext,
                op_type: str | None = None) -> tuple[str, LayerExport]:
    """One compact node ``quantkit.<DeployType>`` holding the layer's frozen tensors as initializers (in their
    stored dtypes: packed int32 words, int8 codes, float constants) and its settings as attributes. Runs only in a
    runtime that implements the quantkit domain (stock onnxruntime does not)."""
    tensor_inputs = list(inputs)
    names = []
    nbytes = 0
    for bname, t in list(m.named_buffers(recurse=True)) + list(m.named_parameters(recurse=True)):
        if t is None:
            continue
        arr = to_numpy(t)
        tensor_inputs.append(b.init(bname.replace(".", "_"), arr))
        names.append(bname)
        nbytes += arr.nbytes
    attrs = {"tensor_names": ",".join(["x"] * len(inputs) + names)}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        val = _attr_value(v)
        if val is not None:
            attrs[k] = val
    from onnx import helper

    y = b.name("custom")
    b.nodes.append(helper.make_node(op_type or type(m).__name__, tensor_inputs, [y], name=y, domain=CUSTOM_DOMAIN,
                                    **attrs))
    bits_w = getattr(m, "bits_w", None)
    return y, LayerExport("custom", "custom", bits_w, getattr(m, "bits_a", None), nbytes, 0)


def vec(t: Any, n: int | None = None) -> np.ndarray:
    a = to_numpy(t, np.float32).reshape(-1)
    if n is not None and a.size == 1 and n != 1:
        a = np.full(n, a.item(), np.float32)
    return a


__all__ = ["LayerExport", "EmitContext", "register_emitter", "emitter_for", "emit_custom", "supported_types",
           "BINARY_FORMS", "CUSTOM_DOMAIN", "vec"]
