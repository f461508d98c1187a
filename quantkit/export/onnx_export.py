"""ONNX export of quantized models that stock onnxruntime runs.

How it works
------------
1. The model is brought to its deploy form (``quantkit.convert``) when it is a simulated (prepared / calibrated /
   trained) model; the simulated model is kept for the three-way check.
2. Each deploy layer that has an emitter (:mod:`quantkit.export.emit`) is swapped for a placeholder. PyTorch's
   exporter traces the model: every float part (stems, BatchNorm, residual adds, LayerNorm, softmax, heads ...) is
   exported by PyTorch, each quantized layer becomes one placeholder node (its forward still runs the deploy layer,
   so the traced shapes and values are the real ones).
3. Each placeholder node is replaced by the nodes and initializers its emitter writes with ``onnx.helper``: packed
   uint8 bits for binary weights, INT4/INT8 codes for integer weights, exact epilogue constants -- initializers in
   exactly the dtype and layout quantkit chose, which a traced float module could not guarantee (the tracer
   constant-folds unpacking into float weights). With ``custom_ops=True`` each quantized layer is instead one
   compact node of the ``quantkit`` domain.
4. ``onnx.checker.check_model(full_check=True)``, then onnxruntime (CPU) runs the graph on the example inputs and the
   outputs are compared with the deploy and simulated models (the three-way agreement).
5. Only then is the file written, to a temporary file in the target folder that is renamed over ``path``: a failed
   export leaves nothing behind.
"""
from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import ExportError, QuantkitError
from .builder import GraphBuilder
from .emit import BINARY_FORMS, CUSTOM_DOMAIN, UNIFORM_FORMS, EmitContext, LayerExport, emit_custom, emitter_for, supported_types
from .emit.attention import prepare_attention

#: opsets the exporter produces: 18 brings BitwiseAnd/BitwiseXor and Pad with axes; 21 brings INT4/UINT4
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 21, 21
#: the highest opset PyTorch's TorchScript-based exporter writes; newer opsets only add types to the ops it uses
_TORCH_MAX_OPSET = 20
_PLACEHOLDER_DOMAIN = "quantkit_export_placeholder"
#: the binary form chosen by measurement (see benchmarks / the export docs): unpack is faster in onnxruntime
DEFAULT_BINARY_FORM = "unpack"


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Agreement:
    """Max abs differences between the three executions on the example inputs (None: not run)."""

    simulated_vs_deploy: float | None = None
    deploy_vs_onnxruntime: float | None = None
    simulated_vs_onnxruntime: float | None = None
    output_absmax: float | None = None
    #: when the whole-model difference exceeded float tolerance: the largest per-layer difference found
    layerwise_max: float | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        return agreement_table("onnxruntime", self.simulated_vs_deploy, self.deploy_vs_onnxruntime,
                               self.simulated_vs_onnxruntime, self.output_absmax, self.notes)


def agreement_table(runtime: str, simulated_vs_deploy: float | None, deploy_vs_runtime: float | None,
                    simulated_vs_runtime: float | None, output_absmax: float | None, notes: Sequence[str]) -> str:
    """The three-way agreement as printed by every exporter (``runtime``: the engine that ran the written file)."""
    def f(v: float | None) -> str:
        return "not run" if v is None else f"{v:.3g}"

    lines = ["three-way agreement on the example inputs (max abs difference):",
             f"  {'simulated vs deploy':<26}{f(simulated_vs_deploy)}",
             f"  {'deploy vs ' + runtime:<26}{f(deploy_vs_runtime)}",
             f"  {'simulated vs ' + runtime:<26}{f(simulated_vs_runtime)}"]
    if output_absmax is not None:
        lines.append(f"  (output magnitude: max |y| = {output_absmax:.3g})")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


@dataclass
class ExportResult:
    path: str
    opset: int
    binary_form: str
    custom_ops: bool
    file_bytes: int
    layers: list[LayerExport]
    agreement: Agreement
    input_names: list[str]
    output_names: list[str]

    @property
    def quantized_weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def fp32_weight_bytes(self) -> int:
        return sum(layer.fp32_weight_bytes for layer in self.layers)

    def summary(self) -> str:
        binary = any(layer.form in ("unpack", "xor") for layer in self.layers)
        extra = f", binary form '{self.binary_form}'" if binary else ""
        if self.custom_ops:
            extra = ", custom quantkit ops"
        lines = [f"exported {self.path} (opset {self.opset}, {self.file_bytes / 1024:.1f} KiB{extra})"]
        if self.layers:
            w = max(len(layer.name) for layer in self.layers)
            for layer in self.layers:
                bits = f"W{layer.bits_w or 'fp'}A{layer.bits_a or 'fp'}"
                size = (f"{layer.weight_bytes} B (fp32 {layer.fp32_weight_bytes} B)" if layer.fp32_weight_bytes
                        else "")
                lines.append(f"  {layer.name:<{w}}  {layer.type_name:<24} {layer.kind:<16} {layer.form:<8} "
                             f"{bits:<8} {size}")
            q, f = self.quantized_weight_bytes, self.fp32_weight_bytes
            if f:
                lines.append(f"  quantized layers' weights: {q} B vs {f} B in FP32 ({f / max(q, 1):.1f}x smaller)")
        else:
            lines.append("  no quantized layer (a full-precision export)")
        lines.append(self.agreement.table())
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------------------------- placeholders
@dataclass
class _CallRecord:
    module: nn.Module
    name: str
    input_shapes: list = field(default_factory=list)
    output_shapes: list = field(default_factory=list)


_ACTIVE: dict[int, _CallRecord] = {}
_DYNAMIC_BATCH = [True]


class _LayerFn(torch.autograd.Function):
    """Runs the deploy layer (outside the tracer) and exports as one placeholder node carrying the call id."""

    @staticmethod
    def forward(ctx, call_id: int, *inputs):  # type: ignore[override]
        rec = _ACTIVE[call_id]
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
    def symbolic(g, call_id: int, *inputs):  # pragma: no cover - called by the exporter
        rec = _ACTIVE[call_id]
        out = g.op(f"{_PLACEHOLDER_DOMAIN}::Layer", *inputs, call_id_i=call_id)
        try:
            sizes: list = list(rec.output_shapes[0])
            if _DYNAMIC_BATCH[0] and sizes:
                sizes[0] = None  # a static batch here would be folded into later Reshapes by the exporter
            out.setType(inputs[0].type().with_dtype(torch.float32).with_sizes(sizes))
        except Exception:  # the type only helps PyTorch's own shape inference; the emitted graph is re-inferred
            pass
        return out


class _Placeholder(nn.Module):
    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.inner = module
        self.layer_name = name

    def forward(self, *inputs):
        call_id = len(_ACTIVE) + 1
        # a layer called several times in forward: each call gets its own node and initializer names
        calls = sum(1 for r in _ACTIVE.values() if r.module is self.inner) + 1
        name = self.layer_name if calls == 1 else f"{self.layer_name}/call{calls}"
        _ACTIVE[call_id] = _CallRecord(self.inner, name)
        tensors = [t for t in inputs if t is not None]
        return _LayerFn.apply(call_id, *tensors)


def _attention_types() -> tuple:
    try:
        from ..nn.bivit import BinaryAttentionDeploy
    except ImportError:
        return ()
    return (BinaryAttentionDeploy,)


#: quantkit modules that are plain PyTorch math and export as they are
def _plain_types() -> tuple:
    out = []
    try:
        from ..nn.adabin import Maxout

        out.append(Maxout)
    except ImportError:
        pass
    return tuple(out)


def _swap_placeholders(model: nn.Module) -> None:
    """Replace every emitter-handled layer below ``model`` by a placeholder (recursively, not into replaced ones)."""
    from ..nn.base import QuantModule

    attention = _attention_types()
    plain = _plain_types()

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, _Placeholder):
                continue
            if isinstance(child, QuantModule):
                raise ExportError(
                    f"layer {name!r} ({type(child).__name__}) is a simulated layer inside a deploy model; export the "
                    "simulated model itself (it is converted) or convert the whole model with quantkit.convert")
            if emitter_for(child) is not None:
                setattr(parent, child_name, _Placeholder(child, name))
                continue
            if attention and isinstance(child, attention):
                if not hasattr(type(child), "_attend"):
                    raise ExportError(f"layer {name!r} ({type(child).__name__}): its attention core is not reachable "
                                      "for export (no _attend method)")
                prepare_attention(child, name, lambda core, n: _Placeholder(core, n))
                visit(child, name)
                continue
            mod = type(child).__module__
            if mod.startswith("quantkit.nn") and not isinstance(child, plain):
                raise ExportError(
                    f"layer {name!r} ({type(child).__name__}): no ONNX emitter for this deploy layer type yet; "
                    f"exportable quantkit layers: {', '.join(supported_types())}")
            visit(child, name)

    visit(model, "")


# ---------------------------------------------------------------------------------------------- helpers
def _as_inputs(example_inputs: Any) -> tuple:
    from ..api import _check_example_inputs

    if example_inputs is None:
        raise ExportError("export_onnx needs example_inputs, a tuple of the model's positional inputs "
                          "(e.g. (torch.randn(1, 3, 32, 32),))")
    inputs = _check_example_inputs(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"example_inputs[{i}] is a {type(t).__name__}; only tensor inputs are exported")
    return tuple(t.detach().cpu() for t in inputs)


def reference_outputs(deploy: nn.Module, simulated: nn.Module | None, inputs: tuple,
                      *more_inputs: tuple | None) -> tuple[list[torch.Tensor], ...]:
    """The deploy model's outputs on ``inputs`` (and on each of ``more_inputs``, None where that is None) and the
    simulated model's on ``inputs`` (None without one), both run in eval mode without gradients; each model's
    train/eval mode is restored. A model that does not run on the inputs is an ExportError saying so."""
    modes = [(m, m.training) for m in (deploy, simulated) if m is not None]
    try:
        with torch.no_grad():
            for m, _ in modes:
                m.eval()
            ref_deploy = _flatten_outputs(deploy(*inputs))
            ref_sim = None if simulated is None else _flatten_outputs(simulated(*inputs))
            more = [None if x is None else _flatten_outputs(deploy(*x)) for x in more_inputs]
    except QuantkitError:
        raise
    except Exception as exc:
        raise ExportError(f"the model does not run on example_inputs of shape(s) "
                          f"{[tuple(t.shape) for t in inputs]}: {str(exc).splitlines()[0]}") from exc
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return (ref_deploy, ref_sim, *more)


def io_names(input_names: Sequence[str] | None, output_names: Sequence[str] | None, n_inputs: int,
             n_outputs: int) -> tuple[list[str], list[str]]:
    """Graph input/output names: the caller's, checked against the model, or ``input``/``output`` (numbered)."""
    in_names = list(input_names) if input_names else (
        ["input"] if n_inputs == 1 else [f"input_{i}" for i in range(n_inputs)])
    out_names = list(output_names) if output_names else (
        ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)])
    if len(in_names) != n_inputs:
        raise ExportError(f"input_names has {len(in_names)} name(s) but the model takes {n_inputs} input(s)")
    if len(out_names) != n_outputs:
        raise ExportError(f"output_names has {len(out_names)} name(s) but the model returns {n_outputs} tensor(s)")
    return in_names, out_names


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        res: list[torch.Tensor] = []
        for o in out:
            res += _flatten_outputs(o)
        return res
    if out is None:
        return []
    raise ExportError(f"model output of type {type(out).__name__} is not exportable; return tensors or tuples")


def _has_quant_modules(model: nn.Module) -> bool:
    from ..nn.base import QuantModule

    return any(isinstance(m, QuantModule) for m in model.modules())


def check_output_path(path: str | os.PathLike) -> Path:
    """Raise ExportError unless ``path`` names a file in an existing, writable folder."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ExportError(f"output path {str(p)!r} is a folder; give a file name such as model.onnx")
    if not folder.is_dir():
        why = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ExportError(f"cannot write {str(p)!r}: folder {str(folder)!r} {why}")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems all show here
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"cannot write {str(p)!r}: folder {str(folder)!r} is not writable "
                          f"({exc.strerror or exc})") from exc
    return p


def new_file_mode() -> int:
    """The permission bits a newly created file gets from the process umask (0o666 & ~umask), as ``open()`` would
    give it (``mkstemp`` always creates 0o600)."""
    mask = None
    try:  # Linux: read it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path`` (never a partial file); the
    file gets the permissions the umask gives new files."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
        raise


# ---------------------------------------------------------------------------------------------- the export
def _torch_export(model: nn.Module, inputs: tuple, opset: int, input_names: list[str], output_names: list[str],
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
            torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=min(opset, _TORCH_MAX_OPSET),
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


def _fx_control_flow(model: nn.Module) -> str | None:
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
                  stacklevel=4)


def _expand_placeholders(proto: onnx.ModelProto, opset: int, binary_form: str,
                         custom_ops: bool, uniform_form: str = "int8") -> tuple[list[LayerExport], list]:
    """Replace every placeholder node by its emitter's nodes; returns the layers' records and, for the layer-wise
    check, (name, type, module, input names, output name) of every emitted unit."""
    from .verify import LayerProbe

    graph = proto.graph
    shared: dict = {}
    new_nodes: list = []
    layers: list[LayerExport] = []
    probes: list[LayerProbe] = []
    for node in graph.node:
        if node.domain != _PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        call_id = next(a.i for a in node.attribute if a.name == "call_id")
        rec = _ACTIVE[call_id]
        ctx = EmitContext(rec.name, type(rec.module).__name__, opset, binary_form, rec.input_shapes,
                          rec.output_shapes, uniform_form)
        b = GraphBuilder(rec.name, opset, shared)
        try:
            if custom_ops:
                y, info = emit_custom(rec.module, b, list(node.input), ctx)
            else:
                y, info = emitter_for(rec.module)(rec.module, b, list(node.input), ctx)
        except QuantkitError:
            raise
        except Exception as exc:
            raise ExportError(f"layer {rec.name!r} ({ctx.type_name}): cannot be written as ONNX: {exc}") from exc
        # the emitter's last output becomes the placeholder's output name
        for n in b.nodes:
            for i, o in enumerate(n.output):
                if o == y:
                    n.output[i] = node.output[0]
        if y in node.input:  # a layer that is the identity on its input
            b.nodes.append(helper.make_node("Identity", [y], [node.output[0]], name=b.name("identity")))
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.initializers)
        info.name, info.type_name = rec.name, ctx.type_name
        if info.kind != "bivit-attention" or custom_ops:
            layers.append(info)
        probes.append(LayerProbe(rec.name, ctx.type_name, rec.module, list(node.input), node.output[0]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    del graph.value_info[:]
    imports = [op for op in proto.opset_import if op.domain not in ("", "ai.onnx", _PLACEHOLDER_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset)] + imports)
    if custom_ops:
        proto.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    proto.producer_name = "quantkit"
    from .. import __version__

    proto.producer_version = __version__
    return layers, probes


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node reads (onnxruntime warns "Removing initializer ... not used" for each, and
    they only take space in the file)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _check(proto: onnx.ModelProto, custom_ops: bool) -> onnx.ModelProto:
    """Strict shape inference + the full checker; returns the inferred copy."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=not custom_ops)
        onnx.checker.check_model(inferred, full_check=not custom_ops)
    except Exception as exc:  # onnx raises ValidationError / InferenceError naming the node
        raise ExportError(f"the exported graph does not pass onnx.checker: {str(exc).strip()}") from exc
    return inferred


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, custom_ops: bool = False,
                binary_form: str = DEFAULT_BINARY_FORM, verify: bool = True, rtol: float = 1e-4,
                atol: float = 1e-4, quiet: bool = False, allow_mismatch: bool = False,
                allow_traced_branch: bool = False, uniform_form: str = "int8") -> ExportResult:
    """Export a quantized model to ONNX that stock onnxruntime runs, check it, and write it atomically.

    Args:
        model: a simulated model (from ``quantkit.prepare`` / ``quantize`` / ``QAT``: it is converted) or a deploy
            model (from ``quantkit.convert``). A plain float model exports as is (an FP32 reference file).
        example_inputs: tuple of positional inputs (``(torch.randn(1, 3, 32, 32),)``); used for tracing and for the
            three-way check.
        path: the ``.onnx`` file to write (nothing is written if anything fails).
        opset: ONNX opset, 18 to 21 (default 21; 4-bit weights are INT4 initializers from 21 on, int8 before).
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
        input_names / output_names: graph input/output names (default ``input``/``output``, numbered when several).
        custom_ops: emit each quantized layer as one compact ``quantkit.<Type>`` node (domain ``quantkit``) holding
            its packed tensors, for runtimes that implement those ops; stock onnxruntime cannot run such a file,
            so the onnxruntime check is skipped. Default False: standard operators only.
        binary_form: ``"unpack"`` (default, the faster in onnxruntime) or ``"xor"`` (never unpacks to float); see
            :mod:`quantkit.export.emit.binary`.
        verify: run onnxruntime on the example inputs and compare with the deploy model (``verify=False`` skips
            onnxruntime; the simulated-vs-deploy check below always runs).
        rtol / atol: the tolerance of every comparison: two outputs agree when ``max|a - b| <= atol + rtol *
            max|y|`` (``y`` the deploy model's output; defaults 1e-4 and 1e-4). NaN or Inf never agrees: NaN/Inf in
            a weight or an output raises ExportError naming the first layer that produces it.
            The simulated model (when one was given) must agree with its deploy model, and onnxruntime with the
            deploy model. Beyond tolerance every quantized layer is checked on its own, on the same input (the
            simulated layer's input for simulated vs deploy, onnxruntime's input of that layer for onnxruntime vs
            deploy). A layer that differs raises ExportError naming it. If every layer matches, the whole-model
            difference comes from float rounding (another order of operations) moving values across quantization
            thresholds, which deep binary networks amplify; the export still fails, with that per-layer diagnosis,
            unless ``allow_mismatch=True``.
        allow_mismatch: accept outputs beyond tolerance (simulated vs deploy, deploy vs onnxruntime) and warn with
            the per-layer diagnosis instead of failing. Check accuracy on real data when you use it.
        allow_traced_branch: PyTorch's exporter records one execution: a data-dependent Python branch
            (``if x.sum() > 0:``) is baked in with the branch the example inputs took, and inputs that take the
            other branch give other results. Such a model is refused (ExportError) unless
            ``allow_traced_branch=True``, which exports it with a warning.
        quiet: do not print the summary.
        uniform_form: container of uniform (w8a8, w4a4) layers: ``"int8"`` (default: int8 / uint8 codes, a uint8
            Clip below 8 bits; onnxruntime fuses it into QLinearConv / QGemm, the fast form) or ``"int4"`` (opset
            >= 21: INT4 weights and UINT4 4-bit activations, half the weight bytes, runs unfused); see
            :mod:`quantkit.export.emit.uniform`.

    Returns:
        :class:`ExportResult` (layers, sizes, the three-way :class:`Agreement`).
    """
    from ..api import convert

    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset!r} is not supported; use an integer from {MIN_OPSET} to {MAX_OPSET} "
                          f"(default {DEFAULT_OPSET})")
    if binary_form not in BINARY_FORMS:
        raise ExportError(f"binary_form={binary_form!r}; use one of {BINARY_FORMS}")
    if uniform_form not in UNIFORM_FORMS:
        raise ExportError(f"uniform_form={uniform_form!r}; use one of {UNIFORM_FORMS}")
    out_path = check_output_path(path)
    inputs = _as_inputs(example_inputs)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != "cpu" for t in tensors):
        model = copy.deepcopy(model).cpu()  # the export and its onnxruntime check run on the CPU; the input is kept

    simulated = model if _has_quant_modules(model) else None
    if simulated is not None and not hasattr(model, "_quantkit_config"):
        from ..nn.base import QuantModule

        name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, QuantModule))
        raise ExportError(f"layer {name!r} ({type(layer).__name__}) is a simulated quantkit layer in a model that "
                          "quantkit.prepare did not produce; export the prepared model, or its quantkit.convert result")
    if simulated is not None:
        try:
            deploy = convert(simulated)
        except QuantkitError as exc:
            raise ExportError(f"cannot convert the simulated model to its deploy form: {exc}") from exc
    else:
        from ..api import check_finite

        try:
            check_finite(model, "the model to export")
        except QuantkitError as exc:
            raise ExportError(str(exc)) from exc
        deploy = model
    ref_deploy, ref_sim = reference_outputs(deploy, simulated, inputs)
    _check_finite_outputs(deploy, inputs, ref_deploy, "deploy")
    if ref_sim is not None:
        _check_finite_outputs(simulated, inputs, ref_sim, "simulated")

    in_names, out_names = io_names(input_names, output_names, len(inputs), len(ref_deploy))

    work = copy.deepcopy(deploy).eval()
    if emitter_for(work) is not None or isinstance(work, _attention_types()):
        work = nn.Sequential(work)  # a single quantized layer exported on its own
    _ACTIVE.clear()
    _DYNAMIC_BATCH[0] = dynamic_batch
    try:
        _swap_placeholders(work)
        proto = _torch_export(work, inputs, opset, in_names, out_names, dynamic_batch,
                              None if _fx_control_flow(deploy) is None else allow_traced_branch)
        layers, probes = _expand_placeholders(proto, opset, binary_form, custom_ops, uniform_form)
        if not custom_ops:
            from .emit.uniform import integer_friendly_cleanup, quantize_before_reshapes

            quantize_before_reshapes(proto.graph)
            if any(integer_friendly_cleanup(proto.graph).values()):
                _drop_unused_initializers(proto.graph)
    finally:
        _ACTIVE.clear()
    inferred = _check(proto, custom_ops)  # the file keeps no value_info: every runtime re-infers shapes anyway
    data = proto.SerializeToString()
    if len(data) >= 2**31:
        raise ExportError("the exported model is larger than 2 GiB, the protobuf limit; external data is not "
                          "supported by quantkit's exporter yet")

    agreement = Agreement()
    if custom_ops:
        agreement.notes.append("custom quantkit ops: onnxruntime check skipped (stock onnxruntime does not "
                               "implement the quantkit domain)")
    agreement.output_absmax = max((float(t.abs().max()) for t in ref_deploy if t.numel()), default=0.0)
    tolerance = atol + rtol * agreement.output_absmax
    if ref_sim is not None:
        agreement.simulated_vs_deploy = _max_diff(ref_sim, ref_deploy)
        if not agreement.simulated_vs_deploy <= tolerance:
            _explain_simulated_difference(agreement, simulated, deploy, inputs, atol, rtol, allow_mismatch, quiet)
    else:
        agreement.notes.append("a deploy (or float) model was given: no simulated model to compare")
    if verify and not custom_ops:
        from .verify import run_onnxruntime

        ort_out = run_onnxruntime(data, in_names, inputs)
        agreement.deploy_vs_onnxruntime = _max_diff(ref_deploy, ort_out)
        if ref_sim is not None:
            agreement.simulated_vs_onnxruntime = _max_diff(ref_sim, ort_out)
        if not agreement.deploy_vs_onnxruntime <= tolerance:  # NaN never passes
            _explain_difference(agreement, inferred, in_names, inputs, probes, atol, rtol, allow_mismatch, quiet)
        if dynamic_batch and inputs and inputs[0].dim() > 0:
            doubled = tuple(torch.cat([t, t], 0) for t in inputs)
            try:
                out2 = run_onnxruntime(data, in_names, doubled)
            except ExportError as exc:
                raise ExportError(f"the exported graph does not run with another batch size ({exc}); the model "
                                  "fixes its batch size somewhere: export with dynamic_batch=False") from exc
            if out2 and ref_deploy[0].dim() and out2[0].shape[0] != 2 * ref_deploy[0].shape[0]:
                raise ExportError("the dynamic batch axis does not propagate to the output; export with "
                                  "dynamic_batch=False")
    atomic_write_bytes(out_path, data)
    result = ExportResult(str(out_path), opset, binary_form, custom_ops, len(data), layers, agreement, in_names,
                          out_names)
    if not quiet:
        print(result.summary())
    return result


def _explain_difference(agreement: Agreement, inferred: onnx.ModelProto, in_names: list[str], inputs: tuple,
                        probes: list, atol: float, rtol: float, allow_mismatch: bool, quiet: bool) -> None:
    """Whole-model outputs differ beyond tolerance: check each quantized layer on onnxruntime's own inputs."""
    from .verify import layer_tolerance, layerwise_check

    checks = layerwise_check(inferred, in_names, inputs, probes)
    for probe, diff, absmax in checks:
        allowed = layer_tolerance(probe.module, absmax, atol, rtol)
        if not diff <= allowed:
            if not np.isfinite(diff) and not np.isfinite(absmax):
                why = "its deploy layer gives NaN/Inf on onnxruntime's input of the layer"
            else:
                why = (f"onnxruntime's output differs from the deploy layer by {diff:.3g} on the same input (max |y| "
                       f"= {absmax:.3g}, allowed {allowed:.3g})")
            raise ExportError(f"layer {probe.name!r} ({probe.type_name}): {why}; nothing was written. This is a bug "
                              "in its ONNX emitter: please report it")
    worst = _nan_max(d for _, d, _ in checks)
    agreement.layerwise_max = worst
    note = (f"deploy vs onnxruntime ({agreement.deploy_vs_onnxruntime:.3g}) is beyond the tolerance "
            f"(atol={atol:g} + rtol={rtol:g} * max|y|), but each of the {len(checks)} quantized layers matches its "
            f"deploy layer on onnxruntime's own input (max difference {worst:.3g}): float rounding in the "
            "full-precision layers (computed in another order by onnxruntime) moved values across quantization "
            "thresholds, which the network amplifies")
    _mismatch(agreement, note, allow_mismatch, quiet)


def _mismatch(agreement: Agreement, note: str, allow_mismatch: bool, quiet: bool) -> None:
    """Fail (the default) or, with allow_mismatch=True, warn and record the diagnosis."""
    if not allow_mismatch:
        raise ExportError(f"{note}. Nothing was written; pass allow_mismatch=True to export anyway (then check "
                          "accuracy on real data)")
    agreement.notes.append(f"{note}; exported anyway (allow_mismatch=True): check accuracy on real data")
    warnings.warn(f"quantkit export: {agreement.notes[-1]}", RuntimeWarning, stacklevel=3)


def _explain_simulated_difference(agreement: Agreement, simulated: nn.Module, deploy: nn.Module, inputs: tuple,
                                  atol: float, rtol: float, allow_mismatch: bool, quiet: bool) -> None:
    """Simulated and deploy outputs differ beyond tolerance: run each deploy layer on its simulated layer's input."""
    from .verify import layer_tolerance

    checks = simulated_layerwise_check(simulated, deploy, inputs)
    layers = dict(deploy.named_modules())
    bad = [(n, t, d, m) for n, t, d, m in checks if not d <= layer_tolerance(layers.get(n), m, atol, rtol)]
    worst = _nan_max(d for _, _, d, _ in checks)
    agreement.layerwise_max = worst
    total = agreement.simulated_vs_deploy
    head = (f"simulated vs deploy differs by {total:.3g} on the example inputs (max |y| = "
            f"{agreement.output_absmax:.3g}, tolerance atol={atol:g} + rtol={rtol:g} * max|y|)")
    if bad:
        listed = "; ".join(f"{n!r} ({t}): {d:.3g} (max |y| {m:.3g})" for n, t, d, m in bad[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        note = (f"{head}; {len(bad)} of {len(checks)} quantized layers differ from their simulated layer on the same "
                f"input: {listed}{more}")
    else:
        note = (f"{head}, but each of the {len(checks)} quantized layers matches its simulated layer on the same "
                f"input (max difference {worst:.3g}{_one_step_note(deploy)}): float rounding (the deploy kernels "
                "sum in another order) moved values across quantization thresholds, which the network amplifies")
    _mismatch(agreement, note, allow_mismatch, quiet)


def _one_step_note(deploy: nn.Module) -> str:
    """The layer-wise allowance, when some layer rounds its output (see :func:`.verify.layer_tolerance`)."""
    if any(getattr(m, "output_bits", None) is not None for m in deploy.modules()):
        return "; layers that round their output may differ by one step of that grid"
    return ""


def simulated_layerwise_check(simulated: nn.Module, deploy: nn.Module, inputs: tuple
                              ) -> list[tuple[str, str, float, float]]:
    """For every converted layer: run its deploy layer on the input the simulated layer received (in one forward
    pass of the simulated model) and compare with the simulated output (the output of the BatchNorm after it when
    convert folded that BatchNorm into the deploy layer). Returns ``(name, deploy type, max abs diff, max |y|)``."""
    from ..nn.base import QuantModule

    report = getattr(deploy, "_quantkit_report", None)
    folded = dict(getattr(report, "folded", []) or [])
    names = [n for n, m in simulated.named_modules() if isinstance(m, QuantModule)]
    top = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    sim_modules = dict(simulated.named_modules())
    watch = set(top) | {folded[n] for n in top if n in folded}
    seen: dict[str, list] = {}
    handles = []

    def hook(name: str):
        def fn(_mod, args, kwargs, out):
            # copies: later in-place ops (ReLU(inplace=True), += identity) would change the recorded tensors
            seen.setdefault(name, []).append(tree_map(_clone, (args, kwargs, out)))
        return fn

    for n in watch:
        if n in sim_modules:
            handles.append(sim_modules[n].register_forward_hook(hook(n), with_kwargs=True))
    was_training = simulated.training
    simulated.eval()
    try:
        with torch.no_grad():
            simulated(*inputs)
    finally:
        simulated.train(was_training)
        for h in handles:
            h.remove()
    deploy_modules = dict(deploy.named_modules())
    results = []
    for n in top:
        layer = deploy_modules.get(n)
        if layer is None or n not in seen:
            continue
        refs = seen.get(folded[n], []) if n in folded else seen[n]
        for (args, kwargs, _), (_, _, ref) in zip(seen[n], refs):
            with torch.no_grad():
                got = layer(*args, **kwargs)
            a, b = _flatten_outputs(got)[:1], _flatten_outputs(ref)[:1]
            if not a or not b or a[0].shape != b[0].shape:
                continue
            absmax = float(b[0].abs().max()) if b[0].numel() else 0.0
            results.append((n, type(layer).__name__, _max_diff(b, a), absmax))
    return results


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def _check_finite_outputs(model: nn.Module, inputs: tuple, outputs: list, which: str) -> None:
    """ExportError naming the first layer (in call order) whose output holds NaN/Inf, if any model output does."""
    if all(bool(torch.isfinite(t).all()) for t in outputs if t.is_floating_point()):
        return
    if not all(bool(torch.isfinite(t).all()) for t in inputs if t.is_floating_point()):
        raise ExportError("example_inputs hold NaN/Inf values; give finite example inputs")
    first: list[str] = []
    handles = []

    def hook(name: str):
        def fn(mod, _args, out):
            if not first and any(not bool(torch.isfinite(t).all()) for t in _flatten_outputs(out)
                                 if t.is_floating_point()):
                first.append(f"{name!r} ({type(mod).__name__})")
        return fn

    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()) or isinstance(mod, _quant_types()):
            handles.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:
        pass
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    where = f"layer {first[0]}" if first else "the model (no single layer's output)"
    raise ExportError(f"the {which} model's output holds NaN/Inf on the example inputs; it first appears in the "
                      f"output of {where}; nothing was written")


def _quant_types() -> tuple:
    from ..nn.base import QuantModule

    return (QuantModule,)


def _nan_max(values) -> float:
    """max of ``values`` where NaN wins (Python's max drops NaN depending on the order)."""
    worst = 0.0
    for v in values:
        if v != v:
            return float("nan")
        worst = max(worst, v)
    return worst


def _max_diff(a: list, b: list) -> float:
    if len(a) != len(b):
        raise ExportError(f"output count differs: {len(a)} vs {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float64)
        y = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y, np.float64)
        if x.shape != y.shape:
            raise ExportError(f"output shapes differ: {x.shape} vs {y.shape}")
        if x.size:
            d = np.abs(x - y)
            if not np.isfinite(d).all():  # NaN never counts as a match (a plain max would drop it)
                return float("nan") if np.isnan(d).any() else float("inf")
            worst = max(worst, float(d.max()))
    return worst


__all__ = ["export_onnx", "ExportResult", "Agreement", "DEFAULT_OPSET", "DEFAULT_BINARY_FORM", "atomic_write_bytes",
           "check_output_path", "new_file_mode"]
