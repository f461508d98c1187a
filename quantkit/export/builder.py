"""A small helper that writes ONNX nodes and initializers for one layer (used by the per-family emitters).

Every name it creates starts with the layer's qualified name (``layer1.0.conv1/weight_bits``), so an ONNX node or
initializer can always be traced back to the PyTorch layer it came from.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def to_numpy(t: Any, dtype: Any = None) -> np.ndarray:
    """A tensor / array / number as a C-contiguous numpy array (optionally cast)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    a = np.asarray(t)
    if dtype is not None:
        a = a.astype(dtype)
    return np.ascontiguousarray(a)


def int4_tensor(name: str, values: np.ndarray, signed: bool = True) -> TensorProto:
    """An INT4 / UINT4 initializer (opset >= 21), two values a byte, element 2i in the low nibble of byte i."""
    v = np.asarray(values).astype(np.int64).ravel()
    lo, hi = (-8, 7) if signed else (0, 15)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"{name}: values outside the 4-bit range [{lo}, {hi}]")
    nib = (v & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4 if signed else TensorProto.UINT4
    t.dims.extend(list(np.asarray(values).shape))
    t.raw_data = packed.tobytes()
    return t


class GraphBuilder:
    """Collects the nodes and initializers one layer contributes to the graph."""

    #: int64 constants up to this many elements (shapes, axes) are shared across the whole graph
    SHARED_MAX_ELEMENTS = 16

    def __init__(self, prefix: str, opset: int, shared: dict | None = None) -> None:
        self.prefix = prefix or "model"
        self.opset = opset
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._shared = shared if shared is not None else {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    # ---- initializers ---------------------------------------------------------------------------------
    def init(self, hint: str, value: Any, dtype: Any = None) -> str:
        arr = to_numpy(value, dtype)
        # shapes, axes and scalar constants are shared; tensors of a layer (weights, scales) never are
        if (arr.dtype == np.int64 and arr.size <= self.SHARED_MAX_ELEMENTS) or (arr.size == 1 and "weight" not in hint):
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            name = self._shared.get(key)
            if name is None:
                name = f"quantkit_const_{len(self._shared)}"
                self._shared[key] = name
                self.initializers.append(numpy_helper.from_array(arr, name))
            return name
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def init_int4(self, hint: str, values: Any, signed: bool = True) -> str:
        name = self.name(hint)
        self.initializers.append(int4_tensor(name, to_numpy(values), signed))
        return name

    def f32(self, hint: str, value: Any) -> str:
        return self.init(hint, value, np.float32)

    def i64(self, hint: str, value: Any) -> str:
        return self.init(hint, value, np.int64)

    # ---- nodes ----------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, *, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs: Any) -> Any:
        """Append a node; returns its output name (or a list of names when it has several outputs)."""
        if isinstance(outputs, int):
            outs = [self.name(hint or op_type) for _ in range(outputs)]
        else:
            outs = list(outputs)
        node = helper.make_node(op_type, list(inputs), outs, name=outs[0], domain=domain or None, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    # ---- common compositions ----------------------------------------------------------------------------
    def sign_pm1(self, x: str, threshold: str | None = None, hint: str = "sign") -> str:
        """+1 where x >= threshold (0 when None), -1 elsewhere (quantkit's sign convention), as float."""
        t = threshold if threshold is not None else self.f32("zero", np.float32(0.0))
        ge = self.op("GreaterOrEqual", [x, t], f"{hint}_ge")
        return self.op("Where", [ge, self.f32("plus_one", np.float32(1.0)), self.f32("minus_one", np.float32(-1.0))],
                       hint)

    def unpack_bits_pm1(self, packed: str, shape: Sequence[int], k: int, hint: str = "unpack") -> str:
        """Packed uint8 bits of static ``shape`` ``(..., ceil(k/8))`` (element j in bit j%8 of byte j//8) -> float
        +-1 ``(..., k)``, with standard operators only (Unsqueeze, BitShift, BitwiseAnd, Reshape, Slice, Cast).
        Every input is an initializer, so onnxruntime folds this once when the session loads."""
        shifts = self.init("bit_shifts", np.arange(8, dtype=np.uint8))
        one = self.init("bit_one", np.uint8(1))
        u = self.op("Unsqueeze", [packed, self.i64("axis_last", [-1])], f"{hint}_unsq")
        sh = self.op("BitShift", [u, shifts], f"{hint}_shift", direction="RIGHT")
        bits = self.op("BitwiseAnd", [sh, one], f"{hint}_and")
        lead = list(shape[:-1])
        flat = self.op("Reshape", [bits, self.i64("shape", lead + [shape[-1] * 8])], f"{hint}_flat")
        if shape[-1] * 8 != k:
            flat = self.op("Slice", [flat, self.i64("s0", [0]), self.i64("k", [k]), self.i64("axis_last", [-1])],
                           f"{hint}_cut")
        f = self.op("Cast", [flat], f"{hint}_cast", to=TensorProto.FLOAT)
        two = self.f32("two", np.float32(2.0))
        return self.op("Sub", [self.op("Mul", [f, two], f"{hint}_x2"), self.f32("one", np.float32(1.0))], hint)


def words_to_bytes(words: torch.Tensor, k: int) -> np.ndarray:
    """int32 words of quantkit's layout ``(..., ceil(k/32))`` -> uint8 ``(..., ceil(k/8))`` in the same bit order
    (element j in bit j%8 of byte j//8): byte b of word w holds bits 8b..8b+7 of that word, independent of the
    machine's byte order."""
    w = words.detach().cpu().to(torch.int64) & 0xFFFFFFFF
    parts = [((w >> (8 * b)) & 0xFF) for b in range(4)]
    by = torch.stack(parts, dim=-1).reshape(*words.shape[:-1], words.shape[-1] * 4)
    return by[..., : (k + 7) // 8].to(torch.uint8).numpy().copy()


def popcount_table() -> np.ndarray:
    """popcount of every byte value (256 entries)."""
    return np.array([bin(i).count("1") for i in range(256)], dtype=np.float32)


__all__ = ["GraphBuilder", "int4_tensor", "to_numpy", "words_to_bytes", "popcount_table"]
