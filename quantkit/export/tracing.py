"""Tracing a deploy model for export: each quantized layer becomes one placeholder node.

PyTorch's (TorchScript) ONNX exporter traces the model; every deploy layer that has an emitter is wrapped in a
:class:`Placeholder` whose forward still runs the real layer (so traced shapes and values are the real ones) and
whose symbolic function writes one ``quantkit_export_placeholder::Layer`` node carrying a call id. The emitters
later replace each such node by the layer's ONNX nodes.

The calls of one export are recorded on its own :class:`TraceSession` (passed to every placeholder, and to the
symbolic function as an argument of the traced op): no module-level state, so exports do not interfere with each
other, even when their steps interleave. (Exports in several *threads* at once are not supported: torch.fx and
PyTorch's tracer patch process-wide state, ``nn.Module.__call__`` included, while they trace.)
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import ExportError, QuantkitError
from ..nn.adabin import Maxout
from ..nn.base import QuantModule
from ..nn.bivit import BinaryAttentionDeploy
from .emit import emitter_for, supported_types
from .emit.attention import prepare_attention

PLACEHOLDER_DOMAIN = "quantkit_export_placeholder"
#: the highest opset PyTorch's TorchScript-based exporter writes; newer opsets only add types to the ops it uses
TORCH_MAX_OPSET = 20
#: quantkit modules that are plain PyTorch math and export as they are
_PLAIN_TYPES = (Maxout,)


@dataclass
class CallRecord:
    """One call of a quantized layer during the trace (a layer called twice in forward has two records)."""

    module: nn.Module
    name: str
    session: "TraceSession"
    input_shapes: list = field(default_factory=list)
    output_shapes: list = field(default_factory=list)


class TraceSession:
    """The placeholder calls of one export's trace: call id -> :class:`CallRecord`.

    ``dynamic_batch``: the placeholders' output type leaves dimension 0 symbolic (a static batch there would be
    folded into later Reshapes by PyTorch's exporter)."""

    def __init__(self, dynamic_batch: bool = True) -> None:
        self.dynamic_batch = dynamic_batch
        self.calls: dict[int, CallRecord] = {}

    def new_call(self, module: nn.Module, layer_name: str) -> tuple[int, CallRecord]:
        call_id = len(self.calls) + 1
        # a layer called several times in forward: each call gets its own node and initializer names
        n = sum(1 for r in self.calls.values() if r.module is module) + 1
        rec = CallRecord(module, layer_name if n == 1 else f"{layer_name}/call{n}", self)
        self.calls[call_id] = rec
        return call_id, rec

    def record_of(self, node: onnx.NodeProto) -> tuple[int, CallRecord]:
        """The call id and record of a placeholder node of this session's trace."""
        call_id = next(a.i for a in node.attribute if a.name == "call_id")
        return call_id, self.calls[call_id]


class _LayerFn(torch.autograd.Function):
    """Runs the deploy layer (outside the tracer) and exports as one placeholder node carrying the call id."""

    @staticmethod
    def forward(ctx, call_id: int, rec: CallRecord, *inputs):  # type: ignore[override]
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                out = rec.module(*inputs)
        finally:
            torch._C._set_tracing_state(state)
        if not isinstance(out, torch.Tensor):
            raise ExportError(f"layer {rec.name!r} ({type(rec.module).__name__}) returned "
                              f"{type(out).__name__}; an exported layer must return one tensor")
        rec.input_shapes = [tuple(t.shape) for t in inputs]
        rec.output_shapes = [tuple(out.shape)]
        return out.contiguous().float()

    @staticmethod
    def symbolic(g, call_id: int, rec: CallRecord, *inputs):  # pragma: no cover - called by the exporter
        out = g.op(f"{PLACEHOLDER_DOMAIN}::Layer", *inputs, call_id_i=call_id)
        try:
            sizes: list = list(rec.output_shapes[0])
            if rec.session.dynamic_batch and sizes:
                sizes[0] = None
            out.setType(inputs[0].type().with_dtype(torch.float32).with_sizes(sizes))
        except Exception:  # the type only helps PyTorch's own shape inference; the emitted graph is re-inferred
            pass
        return out


class Placeholder(nn.Module):
    """Stands for one quantized layer while the model is traced (see the module doc)."""

    def __init__(self, module: nn.Module, name: str, session: TraceSession) -> None:
        super().__init__()
        self.inner = module
        self.layer_name = name
        self.session = session

    def forward(self, *inputs):
        call_id, rec = self.session.new_call(self.inner, self.layer_name)
        return _LayerFn.apply(call_id, rec, *[t for t in inputs if t is not None])


def is_exported_unit(module: nn.Module) -> bool:
    """A layer exported as placeholders (one emitter, or an attention block whose parts have emitters)."""
    return emitter_for(module) is not None or isinstance(module, BinaryAttentionDeploy)


def swap_placeholders(model: nn.Module, session: TraceSession) -> None:
    """Replace every emitter-handled layer below ``model`` by a placeholder of ``session`` (recursively, not into
    replaced ones)."""

    def wrap(module: nn.Module, name: str) -> Placeholder:
        return Placeholder(module, name, session)

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, Placeholder):
                continue
            if isinstance(child, QuantModule):
                raise ExportError(
                    f"layer {name!r} ({type(child).__name__}) is a simulated layer inside a deploy model; export the "
                    "simulated model itself (it is converted) or convert the whole model with quantkit.convert")
            if emitter_for(child) is not None:
                setattr(parent, child_name, wrap(child, name))
                continue
            if isinstance(child, BinaryAttentionDeploy):
                prepare_attention(child, name, wrap)
                visit(child, name)
                continue
            if type(child).__module__.startswith("quantkit.nn") and not isinstance(child, _PLAIN_TYPES):
                raise ExportError(
                    f"layer {name!r} ({type(child).__name__}): no ONNX emitter for this deploy layer type yet; "
                    f"exportable quantkit layers: {', '.join(supported_types())}")
            visit(child, name)

    visit(model, "")


def torch_export(model: nn.Module, inputs: tuple, opset: int, input_names: list[str], output_names: list[str],
                 dynamic_batch: bool, allow_traced_branch: bool | None = None) -> onnx.ModelProto:
    """PyTorch's (TorchScript) ONNX export; ``allow_traced_branch``: None = do not look for traced value branches,
    False = refuse them, True = warn."""
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=min(opset, TORCH_MAX_OPSET),
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
        except QuantkitError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"PyTorch's ONNX exporter failed on the model's full-precision part: {msg}") from exc
    if allow_traced_branch is not None:
        _check_traced_branches(caught, allow_traced_branch)
    return onnx.load_from_string(buf.getvalue())


class _OpaqueQuantkitTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("quantkit.") or super().is_leaf_module(m, qualname)


def fx_control_flow(model: nn.Module) -> str | None:
    """Why torch.fx cannot trace ``model`` when the reason is Python control flow on traced values, else None."""
    try:
        _OpaqueQuantkitTracer().trace(model)
    except Exception as exc:  # fx raises TraceError (control flow) and many others for untraceable Python
        msg = str(exc)
        return msg.splitlines()[0] if "control flow" in msg else None
    return None


def _check_traced_branches(caught: list, allow_traced_branch: bool) -> None:
    """The tracer warns when Python branches on a traced tensor: the recorded graph then holds only the branch the
    example inputs took. Refuse, or with allow_traced_branch=True warn loudly. Called only when torch.fx too found
    Python control flow on traced values (the tracer alone also warns for branches on shapes, e.g. in torch's own
    asserts); branches inside torch itself are not reported."""
    torch_dir = str(Path(torch.__file__).parent)
    branches = []
    for w in caught:
        if (issubclass(w.category, torch.jit.TracerWarning) and "Python boolean" in str(w.message)
                and not str(w.filename).startswith(torch_dir)):
            where = f"{Path(w.filename).name}:{w.lineno}"
            if where not in branches:
                branches.append(where)
    if not branches:
        return
    msg = (f"the model branches on tensor values in Python ({', '.join(branches[:5])}): the exported graph holds only "
           "the branch the example inputs took, and inputs that take another branch would give other results")
    if not allow_traced_branch:
        raise ExportError(f"{msg}. Nothing was written; make the branch a tensor operation (torch.where) or pass "
                          "allow_traced_branch=True to export the traced branch anyway")
    warnings.warn(f"quantkit export: {msg} (exported anyway: allow_traced_branch=True)", RuntimeWarning,
                  stacklevel=6)


__all__ = ["TraceSession", "CallRecord", "Placeholder", "swap_placeholders", "is_exported_unit", "torch_export",
           "fx_control_flow", "PLACEHOLDER_DOMAIN", "TORCH_MAX_OPSET"]
