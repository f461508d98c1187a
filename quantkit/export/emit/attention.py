"""BiViT's binary attention core with standard operators.

``BinaryAttentionDeploy`` keeps its packed projections (exported as binary linears) and calls its attention core
on per-head q, k, v; the export wraps that core in :class:`AttentionCore` so it becomes one exported unit:

    Q_b, K_b, V_b = Where(x >= 0, 1, -1)                   (quantkit's sign convention)
    z   = MatMul(Q_b, Transpose(K_b)) * logit_scale [+ FP bias / masks]   (exact integer counts in float)
    A_b = Cast(Softmax(z) >= beta * ReduceMax(Softmax(z)))  (SAB)  |  Cast(z > 0)  (BiBERT Bool)
    out = MatMul(A_b, V_b) [* basis]                        (exact integer counts)

Both operands of the attention products are activations (nothing to pack ahead of time), so the +-1 MatMul form is
used here: it is exact and it is what onnxruntime runs fastest.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto
from torch import Tensor, nn

from ..builder import GraphBuilder
from .base import EmitContext, LayerExport, register_emitter


class AttentionCore(nn.Module):
    """The attention core of a :class:`quantkit.nn.bivit.BinaryAttentionDeploy` as a module (export only)."""

    def __init__(self, method: str, beta: float, sab_scale: bool, logit_scale: float | None) -> None:
        super().__init__()
        self.method, self.beta, self.sab_scale, self.logit_scale = method, beta, sab_scale, logit_scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        from ...nn.bivit import binary_attention_packed

        return binary_attention_packed(q, k, v, method=self.method, beta=self.beta, sab_scale=self.sab_scale,
                                       bias=bias, logit_scale=self.logit_scale)


def _emit_sab_select(m: AttentionCore, b: GraphBuilder, z: str, qk: str, exact_scores: bool) -> tuple[str, str]:
    p = b.op("Softmax", [z], "softmax", axis=-1)
    mx = b.op("ReduceMax", [p, b.i64("axis_last", [-1])], "row_max", keepdims=1)
    thr = b.op("Mul", [mx, b.f32("beta", np.float32(m.beta))], "sab_threshold")
    return b.op("GreaterOrEqual", [p, thr], "sab_select"), p


def _emit_bool_select(m: AttentionCore, b: GraphBuilder, z: str, qk: str, exact_scores: bool) -> tuple[str, None]:
    # without a bias, z > 0 <=> the exact integer count qk > 0 (scale > 0): a runtime that moves the scale
    # into the product (OpenVINO's fused attention does) cannot turn an exact 0 into +-epsilon
    src = qk if exact_scores else z
    return b.op("Greater", [src, b.f32("zero", np.float32(0))], "bool_select"), None


#: the ONNX form of each attention binarizer of quantkit.nn.bivit.core.ATTENTION_BINARIZERS: (mask, softmax or None)
_SELECT_EMITTERS = {"sab": _emit_sab_select, "bibert": _emit_bool_select}


def emit_attention_core(m: AttentionCore, b: GraphBuilder, inputs: list[str], ctx: EmitContext):
    q, k, v = inputs[:3]
    bias = inputs[3] if len(inputs) > 3 else None
    rank = len(ctx.input_shapes[0])
    d = ctx.input_shapes[0][-1]
    scale = d ** -0.5 if m.logit_scale is None else m.logit_scale
    qs, ks, vs = (b.sign_pm1(t, None, f"{n}_sign") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    qk = b.op("MatMul", [qs, b.op("Transpose", [ks], "k_t", perm=perm)], "qk")
    z = b.op("Mul", [qk, b.f32("logit_scale", np.float32(scale))], "logits")
    if bias is not None:
        z = b.op("Add", [z, bias], "logits_bias")
    select = _SELECT_EMITTERS.get(m.method)
    if select is None:
        ctx.fail(f"attention method {m.method!r} has no ONNX form")
    mask, p = select(m, b, z, qk, bias is None and scale > 0)
    a = b.op("Cast", [mask], "attention_bits", to=TensorProto.FLOAT)
    out = b.op("MatMul", [a, vs], "attention_v")
    if m.sab_scale and p is not None:  # the basis of a binarizer that selects on probabilities
        num = b.op("ReduceSum", [b.op("Mul", [p, a], "p_sel"), b.i64("axis_last", [-1])], "basis_num", keepdims=1)
        den = b.op("ReduceSum", [a, b.i64("axis_last", [-1])], "basis_den", keepdims=1)
        out = b.op("Mul", [out, b.op("Div", [num, den], "basis")], "scaled")
    return out, LayerExport("bivit-attention", "standard", None, 1, 0, 0)


def prepare_attention(module: nn.Module, name: str, wrap) -> None:
    """Route a BinaryAttentionDeploy's core through an exported :class:`AttentionCore` (its projections are binary
    linears exported on their own), through the layer's ``attention_core`` hook."""
    core = AttentionCore(module.method, module.beta, module.sab_scale, module.logit_scale)
    module.attention_core = wrap(core, f"{name}.attention_core" if name else "attention_core")


def _register() -> None:
    register_emitter(AttentionCore, emit_attention_core)


_register()
