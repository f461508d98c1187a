"""What an ONNX file holds: operator counts, initializers by element type (bit widths) and sizes, custom domains."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from ..errors import ExportError

#: bits per element of each initializer type
_BITS = {TensorProto.FLOAT: 32, TensorProto.DOUBLE: 64, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16,
         TensorProto.INT64: 64, TensorProto.INT32: 32, TensorProto.INT16: 16, TensorProto.UINT16: 16,
         TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.BOOL: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4}


@dataclass
class OnnxSummary:
    path: str
    file_bytes: int
    opsets: dict[str, int]
    inputs: list[str]
    outputs: list[str]
    op_counts: Counter
    init_by_type: dict[str, tuple[int, int, int]]  # type -> (count, elements, bytes)
    packed_binary: list[tuple[str, tuple, int]] = field(default_factory=list)  # name, shape, bytes
    int4: list[tuple[str, tuple, int]] = field(default_factory=list)
    custom_nodes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.path}: {self.file_bytes / 1024:.1f} KiB, opsets "
                 + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opsets.items())),
                 f"inputs: {', '.join(self.inputs)}", f"outputs: {', '.join(self.outputs)}", "operators:"]
        for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {op:<28} {n}")
        lines.append("initializers by element type (bits per value):")
        for t, (count, elems, nbytes) in sorted(self.init_by_type.items(), key=lambda kv: -kv[1][2]):
            lines.append(f"  {t:<8} {_BITS.get(TensorProto.DataType.Value(t), 0):>2} bit  {count:>5} tensors  "
                         f"{elems:>10} values  {nbytes / 1024:10.1f} KiB")
        if self.packed_binary:
            nb = sum(b for _, _, b in self.packed_binary)
            lines.append(f"packed 1-bit weights (uint8, 8 per byte): {len(self.packed_binary)} tensors, "
                         f"{nb / 1024:.1f} KiB = {nb * 8} binary weights")
        if self.int4:
            lines.append(f"4-bit weights (INT4): {len(self.int4)} tensors, "
                         f"{sum(b for _, _, b in self.int4) / 1024:.1f} KiB")
        if self.custom_nodes:
            lines.append(f"custom-domain nodes (need a runtime implementing them): {len(self.custom_nodes)}")
        return "\n".join(lines)

    __str__ = table


def _nbytes(t: TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    elems = 1
    for d in t.dims:
        elems *= d
    return (elems * _BITS.get(t.data_type, 32) + 7) // 8


def inspect_onnx(path: str | os.PathLike) -> OnnxSummary:
    """Summarize an ONNX file (raises ExportError if it is missing or not an ONNX model)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ExportError(f"{p!r} is a folder; give an .onnx file")
    if not os.path.isfile(p):
        raise ExportError(f"no such file: {p!r}")
    try:
        model = onnx.load(p)
    except Exception as exc:
        raise ExportError(f"{p!r} is not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from exc
    if not model.graph.node and not model.graph.input:
        raise ExportError(f"{p!r} is not a readable ONNX model (empty graph)")
    g = model.graph
    ops = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in g.node)
    by_type: dict[str, list[int]] = {}
    packed, int4 = [], []
    for t in g.initializer:
        tname = TensorProto.DataType.Name(t.data_type)
        elems = 1
        for d in t.dims:
            elems *= d
        nb = _nbytes(t)
        acc = by_type.setdefault(tname, [0, 0, 0])
        acc[0] += 1
        acc[1] += elems
        acc[2] += nb
        if t.data_type == TensorProto.UINT8 and "weight_bits" in t.name:
            packed.append((t.name, tuple(t.dims), nb))
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4) and "weight" in t.name:
            int4.append((t.name, tuple(t.dims), nb))
    custom = [n.name for n in g.node if n.domain not in ("", "ai.onnx")]
    init_names = {t.name for t in g.initializer}
    return OnnxSummary(p, os.path.getsize(p), {o.domain: o.version for o in model.opset_import},
                       [i.name for i in g.input if i.name not in init_names], [o.name for o in g.output], ops,
                       {k: tuple(v) for k, v in by_type.items()}, packed, int4, custom)


__all__ = ["inspect_onnx", "OnnxSummary"]
