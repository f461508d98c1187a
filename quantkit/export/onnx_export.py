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

Each of these is a method of :class:`OnnxExporter` (one object per export, holding all of its state);
:func:`export_onnx` runs them in order.
"""
from __future__ import annotations

import copy
import os
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

from ..api import check_example_inputs, check_finite, convert
from ..errors import ExportError, QuantkitError
from ..files import atomic_write_bytes, check_output_path
from ..log import get_logger
from ..nn.base import QuantModule
from ..nn.conv_pool import untile_conv_pools
from ..nn.fused_block import unfuse_blocks
from ..version import __version__
from .builder import GraphBuilder
from .emit import BINARY_FORMS, CUSTOM_DOMAIN, UNIFORM_FORMS, EmitContext, LayerExport, emit_custom, emitter_for
from .emit.uniform import integer_friendly_cleanup, quantize_before_reshapes, saturation_hint
from .tracing import (PLACEHOLDER_DOMAIN, TraceSession, fx_control_flow, is_exported_unit, swap_placeholders,
                      torch_export)
from .verify import LayerProbe, layer_tolerance, layerwise_check, ort_session, run_onnxruntime

log = get_logger("export")

#: opsets the exporter produces: 18 brings BitwiseAnd/BitwiseXor and Pad with axes; 21 brings INT4/UINT4
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 21, 21
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


# ---------------------------------------------------------------------------------------------- helpers
def as_inputs(example_inputs: Any, what: str = "export_onnx") -> tuple:
    """``example_inputs`` as a tuple of CPU tensors (ExportError for a missing input, a shape, a non-tensor)."""
    if example_inputs is None:
        raise ExportError(f"{what} needs example_inputs, a tuple of the model's positional inputs "
                          "(e.g. (torch.randn(1, 3, 32, 32),))")
    inputs = check_example_inputs(example_inputs)
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


def has_quant_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds simulated quantkit layers (then it is converted before export)."""
    return any(isinstance(m, QuantModule) for m in model.modules())


def deploy_and_simulated(model: nn.Module, what: str) -> tuple[nn.Module, nn.Module | None]:
    """The deploy model to export and the simulated model it came from (None when ``model`` is a deploy or float
    model). A model with CUDA tensors is copied to the CPU (the export and its checks run there; the input is
    kept)."""
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).cpu()
    if not has_quant_modules(model):
        try:
            check_finite(model, f"the model to {what}")
        except QuantkitError as exc:
            raise ExportError(str(exc)) from exc
        return model, None
    if not hasattr(model, "_quantkit_config"):
        name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, QuantModule))
        raise ExportError(f"layer {name!r} ({type(layer).__name__}) is a simulated quantkit layer in a model that "
                          "quantkit.prepare did not produce; export the prepared model, or its quantkit.convert result")
    try:
        return convert(model), model
    except QuantkitError as exc:
        raise ExportError(f"cannot convert the simulated model to its deploy form: {exc}") from exc


def traceable_copy(deploy: nn.Module) -> nn.Module:
    """An eval-mode copy of ``deploy`` to swap placeholders into (a single quantized layer gets a parent; fused
    binary blocks are split back into their layers, which export one by one)."""
    work = unfuse_blocks(untile_conv_pools(copy.deepcopy(deploy).eval()))
    return nn.Sequential(work) if is_exported_unit(work) else work


def expand_placeholders(proto: onnx.ModelProto, session: TraceSession, opset: int, binary_form: str,
                        custom_ops: bool, uniform_form: str = "int8") -> tuple[list[LayerExport], list[LayerProbe]]:
    """Replace every placeholder node of ``session``'s trace by its emitter's nodes; returns the layers' records and,
    for the layer-wise check, (name, type, module, input names, output name) of every emitted unit."""
    graph = proto.graph
    shared: dict = {}
    new_nodes: list = []
    layers: list[LayerExport] = []
    probes: list[LayerProbe] = []
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        _, rec = session.record_of(node)
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
    imports = [op for op in proto.opset_import if op.domain not in ("", "ai.onnx", PLACEHOLDER_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset)] + imports)
    if custom_ops:
        proto.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    proto.producer_name = "quantkit"
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
        quiet: do not log the summary (logger ``quantkit.export``, which writes to stdout unless configured
            otherwise: :mod:`quantkit.log`). :class:`OnnxExporter` runs the steps one by one and never logs.
        uniform_form: container of uniform (w8a8, w4a4) layers: ``"int8"`` (default: 8-bit codes, a uint8 Clip
            below 8 bits; onnxruntime fuses it into QLinearConv / QGemm. Weights that could overflow the 16-bit pair
            sums of u8 x s8 kernels on x86 CPUs without VNNI -- full-range 8-bit weights with 8-bit activations --
            are stored as uint8 with zero point 128, so the file is exact on every CPU), ``"int8_signed"`` (every
            weight int8: exact only on CPUs with VNNI and on ARM) or ``"int4"`` (opset >= 21: INT4 weights and
            UINT4 4-bit activations, half the weight bytes, runs unfused); see :mod:`quantkit.export.emit.uniform`.

    Returns:
        :class:`ExportResult` (layers, sizes, the three-way :class:`Agreement`).
    """
    exporter = OnnxExporter(model, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch,
                            input_names=input_names, output_names=output_names, custom_ops=custom_ops,
                            binary_form=binary_form, verify=verify, rtol=rtol, atol=atol,
                            allow_mismatch=allow_mismatch, allow_traced_branch=allow_traced_branch,
                            uniform_form=uniform_form)
    result = exporter.run()
    if not quiet:
        log.info(result.summary())
    return result


class OnnxExporter:
    """One ONNX export, step by step (:func:`export_onnx` runs them all; each step needs the ones before it):

    :meth:`validate` (options, output path, inputs) -> :meth:`convert` (deploy model, simulated model kept) ->
    :meth:`reference_run` (both models on the example inputs) -> :meth:`trace` (PyTorch's exporter, one placeholder
    per quantized layer) -> :meth:`expand` (each placeholder becomes its emitter's nodes) -> :meth:`check`
    (onnx.checker) -> :meth:`verify` (simulated vs deploy vs onnxruntime) -> :meth:`rerun_dynamic_batch` (twice the
    batch) -> :meth:`write` (atomically). All state lives on the object (the trace's calls on its own
    :class:`~quantkit.export.tracing.TraceSession`), so several exports may run side by side. Nothing is printed:
    :meth:`write` returns the :class:`ExportResult`.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 dynamic_batch: bool = True, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, custom_ops: bool = False,
                 binary_form: str = DEFAULT_BINARY_FORM, verify: bool = True, rtol: float = 1e-4, atol: float = 1e-4,
                 allow_mismatch: bool = False, allow_traced_branch: bool = False,
                 uniform_form: str = "int8") -> None:
        self.model, self.example_inputs, self.path = model, example_inputs, path
        self.opset, self.dynamic_batch, self.custom_ops = opset, dynamic_batch, custom_ops
        self.input_names, self.output_names = input_names, output_names
        self.binary_form, self.uniform_form = binary_form, uniform_form
        self.run_onnxruntime, self.rtol, self.atol = verify, rtol, atol
        self.allow_mismatch, self.allow_traced_branch = allow_mismatch, allow_traced_branch
        self.session = TraceSession(dynamic_batch)
        self.agreement = Agreement()
        self.out_path: Path | None = None
        self.inputs: tuple = ()
        self.deploy: nn.Module | None = None
        self.simulated: nn.Module | None = None
        self.ref_deploy: list[torch.Tensor] = []
        self.ref_sim: list[torch.Tensor] | None = None
        self.in_names: list[str] = []
        self.out_names: list[str] = []
        self.proto: onnx.ModelProto | None = None
        self.inferred: onnx.ModelProto | None = None
        self.data: bytes = b""
        self.layers: list[LayerExport] = []
        self.probes: list[LayerProbe] = []

    def run(self) -> ExportResult:
        """Every step in order; returns what :meth:`write` returns."""
        self.validate()
        self.convert()
        self.reference_run()
        self.trace()
        self.expand()
        self.check()
        self.verify()
        self.rerun_dynamic_batch()
        return self.write()

    # ---- steps
    def validate(self) -> None:
        """Check the options, the output path (a writable folder) and the example inputs before any work."""
        if not isinstance(self.model, nn.Module):
            raise ExportError(f"export_onnx expects a torch.nn.Module, got {type(self.model).__name__}")
        opset = self.opset
        if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
            raise ExportError(f"opset={opset!r} is not supported; use an integer from {MIN_OPSET} to {MAX_OPSET} "
                              f"(default {DEFAULT_OPSET})")
        if self.binary_form not in BINARY_FORMS:
            raise ExportError(f"binary_form={self.binary_form!r}; use one of {BINARY_FORMS}")
        if self.uniform_form not in UNIFORM_FORMS:
            raise ExportError(f"uniform_form={self.uniform_form!r}; use one of {UNIFORM_FORMS}")
        self.out_path = check_output_path(self.path)
        self.inputs = as_inputs(self.example_inputs)

    def convert(self) -> None:
        """The deploy model (a simulated model is converted and kept for the three-way check)."""
        self.deploy, self.simulated = deploy_and_simulated(self.model, "export")

    def reference_run(self) -> None:
        """Both models' outputs on the example inputs (finite, or an error naming the first layer that is not) and
        the graph's input/output names."""
        self.ref_deploy, self.ref_sim = reference_outputs(self.deploy, self.simulated, self.inputs)
        _check_finite_outputs(self.deploy, self.inputs, self.ref_deploy, "deploy")
        if self.ref_sim is not None:
            _check_finite_outputs(self.simulated, self.inputs, self.ref_sim, "simulated")
        self.in_names, self.out_names = io_names(self.input_names, self.output_names, len(self.inputs),
                                                 len(self.ref_deploy))

    def trace(self) -> None:
        """PyTorch's exporter on a copy of the deploy model whose quantized layers are placeholders."""
        work = traceable_copy(self.deploy)
        swap_placeholders(work, self.session)
        self.proto = torch_export(work, self.inputs, self.opset, self.in_names, self.out_names, self.dynamic_batch,
                                  None if fx_control_flow(self.deploy) is None else self.allow_traced_branch)

    def expand(self) -> None:
        """Each placeholder node becomes its emitter's nodes and initializers (or one custom-domain node)."""
        self.layers, self.probes = expand_placeholders(self.proto, self.session, self.opset, self.binary_form,
                                                       self.custom_ops, self.uniform_form)
        if not self.custom_ops:
            quantize_before_reshapes(self.proto.graph)
            if any(integer_friendly_cleanup(self.proto.graph).values()):
                _drop_unused_initializers(self.proto.graph)

    def check(self) -> None:
        """Strict shape inference and onnx.checker; the serialized model must fit protobuf's 2 GiB."""
        self.inferred = _check(self.proto, self.custom_ops)  # the file keeps no value_info: runtimes re-infer it
        self.data = self.proto.SerializeToString()
        if len(self.data) >= 2**31:
            raise ExportError("the exported model is larger than 2 GiB, the protobuf limit; external data is not "
                              "supported by quantkit's exporter yet")

    def verify(self) -> Agreement:
        """The three-way agreement: simulated vs deploy, and (``verify=True``, standard ops) onnxruntime vs both;
        beyond tolerance each quantized layer is checked on its own (see :func:`export_onnx`)."""
        agreement, ref_deploy, ref_sim = self.agreement, self.ref_deploy, self.ref_sim
        if self.custom_ops:
            agreement.notes.append("custom quantkit ops: onnxruntime check skipped (stock onnxruntime does not "
                                   "implement the quantkit domain)")
        agreement.output_absmax = max((float(t.abs().max()) for t in ref_deploy if t.numel()), default=0.0)
        tolerance = self.atol + self.rtol * agreement.output_absmax
        if ref_sim is not None:
            agreement.simulated_vs_deploy = _max_diff(ref_sim, ref_deploy)
            if not agreement.simulated_vs_deploy <= tolerance:
                _explain_simulated_difference(agreement, self.simulated, self.deploy, self.inputs, self.atol,
                                              self.rtol, self.allow_mismatch)
        else:
            agreement.notes.append("a deploy (or float) model was given: no simulated model to compare")
        if self.run_onnxruntime and not self.custom_ops:
            ort_out = run_onnxruntime(self.data, self.in_names, self.inputs)
            agreement.deploy_vs_onnxruntime = _max_diff(ref_deploy, ort_out)
            if ref_sim is not None:
                agreement.simulated_vs_onnxruntime = _max_diff(ref_sim, ort_out)
            if not agreement.deploy_vs_onnxruntime <= tolerance:  # NaN never passes
                _explain_difference(agreement, self.inferred, self.in_names, self.inputs, self.probes, self.atol,
                                    self.rtol, self.allow_mismatch, ref_deploy, self.uniform_form)
        return agreement

    def rerun_dynamic_batch(self) -> None:
        """With a dynamic batch (and onnxruntime verification), run the file at twice the batch: it must run and
        its outputs must have the doubled batch."""
        inputs = self.inputs
        if not (self.run_onnxruntime and not self.custom_ops and self.dynamic_batch and inputs
                and inputs[0].dim() > 0):
            return
        doubled = tuple(torch.cat([t, t], 0) for t in inputs)
        try:
            out2 = run_onnxruntime(self.data, self.in_names, doubled)
        except ExportError as exc:
            raise ExportError(f"the exported graph does not run with another batch size ({exc}); the model "
                              "fixes its batch size somewhere: export with dynamic_batch=False") from exc
        if out2 and self.ref_deploy[0].dim() and out2[0].shape[0] != 2 * self.ref_deploy[0].shape[0]:
            raise ExportError("the dynamic batch axis does not propagate to the output; export with "
                              "dynamic_batch=False")

    def write(self) -> ExportResult:
        """Write the checked file atomically (a temporary file renamed over the target) and return the result."""
        atomic_write_bytes(self.out_path, self.data)
        return ExportResult(str(self.out_path), self.opset, self.binary_form, self.custom_ops, len(self.data),
                            self.layers, self.agreement, self.in_names, self.out_names)


def _explain_difference(agreement: Agreement, inferred: onnx.ModelProto, in_names: list[str], inputs: tuple,
                        probes: list, atol: float, rtol: float, allow_mismatch: bool, ref_deploy: list,
                        uniform_form: str) -> None:
    """Whole-model outputs differ beyond tolerance: check each quantized layer on onnxruntime's own inputs."""
    checks = layerwise_check(inferred, in_names, inputs, probes)
    for probe, diff, absmax in checks:
        allowed = layer_tolerance(probe.module, absmax, atol, rtol)
        if not diff <= allowed:
            if not np.isfinite(diff) and not np.isfinite(absmax):
                why = "its deploy layer gives NaN/Inf on onnxruntime's input of the layer"
            else:
                why = (f"onnxruntime's output differs from the deploy layer by {diff:.3g} on the same input (max |y| "
                       f"= {absmax:.3g}, allowed {allowed:.3g})")
            hint = saturation_hint(probe.module, uniform_form)
            if hint:
                raise ExportError(f"layer {probe.name!r} ({probe.type_name}): {why}: {hint}; nothing was written")
            raise ExportError(f"layer {probe.name!r} ({probe.type_name}): {why}; nothing was written. This is a bug "
                              "in its ONNX emitter: please report it")
    worst = _nan_max(d for _, d, _ in checks)
    agreement.layerwise_max = worst
    head = (f"deploy vs onnxruntime ({agreement.deploy_vs_onnxruntime:.3g}) is beyond the tolerance "
            f"(atol={atol:g} + rtol={rtol:g} * max|y|), but each of the {len(checks)} quantized layers matches its "
            f"deploy layer on onnxruntime's own input (max difference {worst:.3g})")
    # Exposing every layer's tensors for that check also stops onnxruntime fusing across them (a conv with its
    # requantization, say), so the layers may have run other kernels than in the file as deployed: run the whole
    # graph once more without graph optimizations to tell the two causes apart.
    unoptimized = _max_diff(ref_deploy, run_onnxruntime(ort_session(inferred.SerializeToString(), optimize=False),
                                                        in_names, inputs))
    tolerance = atol + rtol * agreement.output_absmax
    if unoptimized <= tolerance:
        hints = {saturation_hint(p.module, uniform_form) for p in probes} - {""}
        note = (f"{head}, and the graph run without onnxruntime's graph optimizations agrees with the deploy model "
                f"({unoptimized:.3g}): onnxruntime's fused kernels compute differently"
                + (f"; the likely cause: {sorted(hints)[0]}" if hints else ""))
    else:
        note = (f"{head}: float rounding in the full-precision layers (computed in another order by onnxruntime) "
                "moved values across quantization thresholds, which the network amplifies")
    _mismatch(agreement, note, allow_mismatch)


def _mismatch(agreement: Agreement, note: str, allow_mismatch: bool) -> None:
    """Fail (the default) or, with allow_mismatch=True, warn and record the diagnosis."""
    if not allow_mismatch:
        raise ExportError(f"{note}. Nothing was written; pass allow_mismatch=True to export anyway (then check "
                          "accuracy on real data)")
    agreement.notes.append(f"{note}; exported anyway (allow_mismatch=True): check accuracy on real data")
    warnings.warn(f"quantkit export: {agreement.notes[-1]}", RuntimeWarning, stacklevel=6)


def _explain_simulated_difference(agreement: Agreement, simulated: nn.Module, deploy: nn.Module, inputs: tuple,
                                  atol: float, rtol: float, allow_mismatch: bool) -> None:
    """Simulated and deploy outputs differ beyond tolerance: run each deploy layer on its simulated layer's input."""
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
    _mismatch(agreement, note, allow_mismatch)


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
        if name and not any(True for _ in mod.children()) or isinstance(mod, QuantModule):
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


__all__ = ["export_onnx", "OnnxExporter", "ExportResult", "Agreement", "DEFAULT_OPSET", "DEFAULT_BINARY_FORM",
           "agreement_table", "reference_outputs", "io_names", "as_inputs", "deploy_and_simulated", "traceable_copy",
           "expand_placeholders", "simulated_layerwise_check"]
