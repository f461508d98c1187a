"""OpenVINO IR export (``.xml`` + ``.bin``) of quantized models, with OpenVINO's native binary and int8 kernels.

How it works
------------
1. As :func:`quantkit.export_onnx`: a simulated model is converted to its deploy form (and kept for the three-way
   check); each quantized layer becomes a placeholder and PyTorch's ONNX exporter writes every full-precision part.
2. Layers with an OpenVINO emitter (:mod:`quantkit.export.ov`) stay placeholders: binary conv / linear layers
   (``xnor``, ``adabin``, BiViT's PWS linears) become ``BinaryConvolution`` with packed ``u1`` weights and an exact
   epilogue in standard ops, uniform layers (``w8a8``, ``w4a4``) ``FakeQuantize`` + int8 weights. Adder layers and
   BiViT's attention core are written with the standard ONNX operators of :mod:`quantkit.export.emit`.
3. OpenVINO's ONNX frontend reads that graph; a conversion extension builds each placeholder's OpenVINO nodes.
4. The model is compiled for the CPU and run on the example inputs (reshaped to their static batch: OpenVINO's CPU
   ``BinaryConvolution`` has no dynamic-shape kernel) and compared with the deploy and the simulated model; then at
   twice the batch when the batch axis is dynamic. A difference beyond ``atol + rtol * max|y|`` is explained layer
   by layer (OpenVINO's input of each quantized layer through the PyTorch deploy layer); NaN or inf anywhere fails.
5. Only then are the ``.xml`` and ``.bin`` written, into a temporary folder beside the target, and renamed into
   place (``.bin`` first): a failed export leaves nothing new behind.

Running the file: ``compile_openvino(path, batch=N)`` (or ``model = core.read_model(path);
model.reshape({0: [N, ...]})`` before ``core.compile_model``) when the IR has a dynamic batch and binary layers.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, QuantkitError
from ..files import check_output_path, fsync_file, publish_together, temporary_folder_beside
from ..log import get_logger
from ..version import __version__
from .builder import GraphBuilder
from .emit import EmitContext, LayerExport, emitter_for
from .emit.uniform import saturation_hint
from .onnx_export import (_max_diff, agreement_table, as_inputs, deploy_and_simulated, io_names, reference_outputs,
                          traceable_copy)
from .ov import ov_emitter_for
from .tracing import PLACEHOLDER_DOMAIN, TraceSession, swap_placeholders, torch_export
from .verify import LayerProbe, layer_tolerance

log = get_logger("export")

#: weights of uniform layers in the IR: "int8" (i8, or u8 - 128 where i8 could saturate on CPUs without VNNI:
#: exact everywhere) or "int8_signed" (i8 everywhere: integer kernels, exact only with VNNI)
OV_UNIFORM_FORMS = ("int8", "int8_signed")
#: the ONNX opset of the intermediate graph OpenVINO's frontend reads (int8 codes; no INT4 initializers needed)
_ONNX_OPSET = 18


def _openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError("the openvino package is not installed; `pip install quantkit[openvino]` (or "
                          "`pip install openvino`) to export OpenVINO IR") from exc
    return ov


# ---------------------------------------------------------------------------------------------- results
@dataclass
class OpenVINOAgreement:
    """Max abs differences between the three executions on the example inputs (None: not run)."""

    simulated_vs_deploy: float | None = None
    deploy_vs_openvino: float | None = None
    simulated_vs_openvino: float | None = None
    output_absmax: float | None = None
    #: when the whole-model difference exceeded float tolerance: the largest per-layer difference found
    layerwise_max: float | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        return agreement_table("OpenVINO", self.simulated_vs_deploy, self.deploy_vs_openvino,
                               self.simulated_vs_openvino, self.output_absmax, self.notes)


@dataclass
class OpenVINOExportResult:
    xml_path: str
    bin_path: str
    xml_bytes: int
    bin_bytes: int
    layers: list[LayerExport]
    agreement: OpenVINOAgreement
    input_names: list[str]
    output_names: list[str]
    #: layer types the CPU plugin executes (``layerType`` of the compiled runtime model) and how many of each
    runtime_layers: Counter = field(default_factory=Counter)
    dynamic_batch: bool = True

    @property
    def path(self) -> str:
        return self.xml_path

    @property
    def quantized_weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def fp32_weight_bytes(self) -> int:
        return sum(layer.fp32_weight_bytes for layer in self.layers)

    def summary(self) -> str:
        lines = [f"exported {self.xml_path} + {os.path.basename(self.bin_path)} (OpenVINO IR, .bin "
                 f"{self.bin_bytes / 1024:.1f} KiB, batch {'dynamic' if self.dynamic_batch else 'static'})"]
        if self.layers:
            w = max(len(layer.name) for layer in self.layers)
            for layer in self.layers:
                bits = f"W{layer.bits_w or 'fp'}A{layer.bits_a or 'fp'}"
                size = (f"{layer.weight_bytes} B (fp32 {layer.fp32_weight_bytes} B)" if layer.fp32_weight_bytes
                        else "")
                lines.append(f"  {layer.name:<{w}}  {layer.type_name:<24} {layer.kind:<16} {layer.form:<13} "
                             f"{bits:<8} {size}")
                lines += [f"    note: {n}" for n in layer.notes]
            q, f = self.quantized_weight_bytes, self.fp32_weight_bytes
            if f:
                lines.append(f"  quantized layers' weights: {q} B vs {f} B in FP32 ({f / max(q, 1):.1f}x smaller)")
        else:
            lines.append("  no quantized layer (a full-precision export)")
        if self.runtime_layers:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(self.runtime_layers.items(), key=lambda kv: -kv[1])
                              if k not in ("Input", "Output", "Const", "Reorder"))
            lines.append(f"  executed by the CPU plugin: {shown}")
        lines.append(self.agreement.table())
        if self.dynamic_batch and self.runtime_layers.get("BinaryConvolution"):
            lines.append("  run it with quantkit.export.openvino.compile_openvino(path, batch=N) or "
                         "model.reshape before compile_model: BinaryConvolution needs a static batch")
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------------------------- compiling
def _static_shapes(model, batch: int | None) -> None:
    """Give every input a static batch (``batch``, or 1 when it is dynamic and ``batch`` is None)."""
    ov = _openvino()
    shapes = {}
    for inp in model.inputs:
        ps = inp.get_partial_shape()
        if ps.rank.is_dynamic:
            raise ExportError("an OpenVINO model input has a dynamic rank; it cannot be given a static batch")
        dims = [d for d in ps]
        if batch is not None or (len(dims) and dims[0].is_dynamic):
            dims[0] = ov.Dimension(batch if batch is not None else 1)
        if any(d.is_dynamic for d in dims[1:]):
            raise ExportError(f"input {inp.get_any_name()!r} has dynamic dimensions beyond the batch ({ps}); "
                              "reshape it to a static shape before compiling")
        shapes[inp] = ov.PartialShape(dims)
    model.reshape(shapes)


def compile_openvino(model_or_path: Any, batch: int | None = None, *, threads: int | None = None,
                     core: Any = None, device: str = "CPU"):
    """Read (if a path), give the batch a static size (``batch``; 1 for a dynamic batch when None) and compile an
    OpenVINO model with float32 inference precision (the precision quantkit verified). Returns the compiled
    model."""
    ov = _openvino()
    core = core or ov.Core()
    if isinstance(model_or_path, (str, os.PathLike)):
        p = Path(model_or_path)
        if not p.is_file():
            raise ExportError(f"no OpenVINO IR at {str(p)!r}")
        try:
            model = core.read_model(str(p))
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot read {str(p)!r}: {_first_line(exc)}") from exc
    else:
        model = model_or_path.clone()
    _static_shapes(model, batch)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return core.compile_model(model, device, config)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot compile the model for {device}: {_first_line(exc)}") from exc


def runtime_layer_types(compiled) -> Counter:
    """``layerType`` of every node of the compiled runtime model (what the plugin actually executes)."""
    out: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        out[info["layerType"].astype(str) if "layerType" in info else op.get_type_name()] += 1
    return out


def run_openvino(compiled, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    try:
        res = compiled([t.detach().cpu().numpy() for t in inputs])
    except Exception as exc:
        raise ExportError(f"OpenVINO failed to run the exported model: {_first_line(exc)}") from exc
    return [np.asarray(res[o]) for o in compiled.outputs]


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------- the graph
def _split_placeholders(proto, session: TraceSession, ov_types: dict) -> tuple[list[LayerExport], list[LayerProbe]]:
    """Expand every placeholder of ``session``'s trace without an OpenVINO emitter into standard ONNX ops (its ONNX
    emitter); keep the others (recorded in ``ov_types``: call id -> record) for the conversion extension."""
    from onnx import helper

    graph = proto.graph
    shared: dict = {}
    new_nodes: list = []
    layers: list[LayerExport] = []
    probes: list[LayerProbe] = []
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        call_id, rec = session.record_of(node)
        type_name = type(rec.module).__name__
        probes.append(LayerProbe(rec.name, type_name, rec.module, list(node.input), node.output[0]))
        if ov_emitter_for(rec.module) is not None:
            ov_types[call_id] = rec
            new_nodes.append(node)
            continue
        ctx = EmitContext(rec.name, type_name, _ONNX_OPSET, "unpack", rec.input_shapes, rec.output_shapes)
        b = GraphBuilder(rec.name, _ONNX_OPSET, shared)
        try:
            y, info = emitter_for(rec.module)(rec.module, b, list(node.input), ctx)
        except QuantkitError:
            raise
        except Exception as exc:
            raise ExportError(f"layer {rec.name!r} ({type_name}): cannot be written with standard ops: {exc}") from exc
        for n in b.nodes:
            for i, o in enumerate(n.output):
                if o == y:
                    n.output[i] = node.output[0]
        if y in node.input:
            b.nodes.append(helper.make_node("Identity", [y], [node.output[0]], name=b.name("identity")))
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.initializers)
        info.name, info.type_name = rec.name, type_name
        if info.kind != "bivit-attention":
            layers.append(info)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    keep = [op for op in proto.opset_import if op.domain not in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", _ONNX_OPSET)] + keep)
    return layers, probes


def _to_openvino(proto, ov_layers: dict, layers: list[LayerExport], tmp: str, uniform_form: str):
    """OpenVINO's ONNX frontend with a conversion extension for the kept placeholders. The intermediate ONNX file
    lives in ``tmp``, which must outlive the returned model (OpenVINO may map its initializers instead of copying
    them)."""
    ov = _openvino()
    from openvino.frontend.onnx import ConversionExtension

    failures: list[BaseException] = []
    built: dict[int, LayerExport] = {}

    def convert(node) -> list:
        call_id = int(node.get_attribute("call_id"))
        rec = ov_layers[call_id]
        type_name = type(rec.module).__name__
        ctx = EmitContext(rec.name, type_name, _ONNX_OPSET, "binconv", rec.input_shapes, rec.output_shapes,
                          uniform_form)
        try:
            inputs = [node.get_input(i) for i in range(node.get_input_size())]
            y, info = ov_emitter_for(rec.module)(rec.module, inputs, ctx)
        except BaseException as exc:
            failures.append(exc)
            raise
        info.name, info.type_name = rec.name, type_name
        built[call_id] = info
        out = y.output(0) if hasattr(y, "output") else y
        return [out]

    onnx_path = os.path.join(tmp, "graph.onnx")
    with open(onnx_path, "wb") as f:
        f.write(proto.SerializeToString())
    try:
        model = ov.convert_model(onnx_path, extension=[ConversionExtension("Layer", PLACEHOLDER_DOMAIN, convert)])
    except Exception as exc:
        if failures:
            first = failures[0]
            if isinstance(first, QuantkitError):
                raise first from exc
            raise ExportError(f"an OpenVINO emitter failed: {first}") from exc
        raise ExportError(f"OpenVINO's ONNX frontend cannot read the model's graph: {_first_line(exc)}") from exc
    layers.extend(built[k] for k in sorted(built))
    return model


# ---------------------------------------------------------------------------------------------- checks
def _finite_or_fail(arrays: Sequence, what: str) -> None:
    for i, a in enumerate(arrays):
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        if a.size and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ExportError(f"{what} output {i} has {bad} NaN/inf value(s) on the example inputs; nothing was "
                              "written")


def layerwise_check_openvino(model, inputs: Sequence[torch.Tensor], probes: Sequence[LayerProbe],
                             batch: int) -> list[tuple[LayerProbe, float, float]]:
    """Run the OpenVINO model with every layer's inputs and output exposed; for each quantized layer run its PyTorch
    deploy module on OpenVINO's inputs and return ``(probe, max abs difference, max |output|)`` (NaN where OpenVINO
    produced NaN/inf, inf where it produced another shape)."""
    exposed = model.clone()
    known = {n for o in exposed.outputs for n in o.get_names()}
    wanted = []
    for p in probes:
        for n in p.input_names + [p.output_name]:
            if n and n not in known and n not in wanted:
                wanted.append(n)
    available = []
    for n in wanted:
        try:
            exposed.add_outputs([n])
            available.append(n)
        except Exception:  # a tensor name that OpenVINO fused away: that layer is not checked on its own
            continue
    compiled = compile_openvino(exposed, batch)
    res = compiled([t.detach().cpu().numpy() for t in inputs])
    values: dict[str, np.ndarray] = {}
    for o in compiled.outputs:
        for n in o.get_names():
            values[n] = np.asarray(res[o])
    for n, t in zip([i.get_any_name() for i in model.inputs], inputs):
        values[n] = t.detach().cpu().numpy()
    results = []
    for p in probes:
        if any(n not in values for n in p.input_names) or p.output_name not in values:
            continue
        args = [torch.from_numpy(np.ascontiguousarray(values[n])) for n in p.input_names]
        with torch.no_grad():
            ref = p.module(*args).detach().float().numpy()
        got = values[p.output_name]
        if ref.shape != got.shape:
            results.append((p, float("inf"), float(np.abs(ref).max()) if ref.size else 0.0))
            continue
        if got.size and not np.all(np.isfinite(got)):
            results.append((p, float("nan"), float(np.abs(ref).max()) if ref.size else 0.0))
            continue
        results.append((p, float(np.abs(ref - got).max()) if got.size else 0.0,
                        float(np.abs(ref).max()) if got.size else 0.0))
    return results


def _explain(agreement: OpenVINOAgreement, model, inputs: tuple, probes: list, atol: float, rtol: float, batch: int,
             warn: bool, uniform_form: str) -> None:
    checks = layerwise_check_openvino(model, inputs, probes, batch)
    for probe, diff, absmax in checks:
        if diff != diff:
            raise ExportError(f"layer {probe.name!r} ({probe.type_name}): OpenVINO's output has NaN/inf values where "
                              "the deploy layer's is finite on the same input; nothing was written. This is a bug in "
                              "its OpenVINO emitter: please report it")
        allowed = layer_tolerance(probe.module, absmax, atol, rtol)
        if not diff <= allowed:
            why = (f"layer {probe.name!r} ({probe.type_name}): OpenVINO's output differs from the deploy layer by "
                   f"{diff:.3g} on the same input (max |y| = {absmax:.3g}, allowed {allowed:.3g})")
            hint = saturation_hint(probe.module, uniform_form)
            if hint:
                raise ExportError(f"{why}: {hint}; nothing was written")
            raise ExportError(f"{why}; nothing was written. This is a bug in its OpenVINO emitter: please report it")
    worst = max((d for _, d, _ in checks), default=0.0)
    agreement.layerwise_max = worst
    agreement.notes.append(
        f"deploy vs OpenVINO ({agreement.deploy_vs_openvino:.3g}) is above float tolerance, but each of the "
        f"{len(checks)} quantized layers matches its deploy layer on OpenVINO's own input (max difference "
        f"{worst:.3g}): float rounding in the full-precision layers moved values across quantization thresholds, "
        "which the network amplifies. Check accuracy on real data")
    if warn:
        warnings.warn(f"quantkit OpenVINO export: {agreement.notes[-1]}", RuntimeWarning, stacklevel=7)


# ---------------------------------------------------------------------------------------------- writing
def _atomic_save(model, xml_path: Path, check=None) -> tuple[int, int]:
    """``ov.save_model`` into a temporary folder beside ``xml_path``; ``check(model read back from it)`` (the
    verification runs on exactly the files that will be renamed); then rename ``.bin`` and ``.xml`` into place (the
    previous ``.bin`` is restored if the ``.xml`` cannot be renamed). Returns (xml bytes, bin bytes)."""
    ov = _openvino()
    bin_path = xml_path.with_suffix(".bin")
    tmp = temporary_folder_beside(xml_path)
    try:
        tmp_xml = tmp / "model.xml"
        try:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        except Exception as exc:
            raise ExportError(f"cannot write {str(xml_path)!r}: OpenVINO's save_model failed: {_first_line(exc)}") \
                from exc
        tmp_bin = tmp / "model.bin"
        for f in (tmp_xml, tmp_bin):
            fsync_file(f)
        sizes = (tmp_xml.stat().st_size, tmp_bin.stat().st_size)
        if check is not None:
            try:
                saved = ov.Core().read_model(str(tmp_xml))
            except Exception as exc:
                raise ExportError(f"OpenVINO cannot read back the IR it wrote: {_first_line(exc)}") from exc
            check(saved)
            del saved
        publish_together([(tmp_bin, bin_path), (tmp_xml, xml_path)], tmp)  # the .xml names the .bin: it goes last
        return sizes
    except OSError as exc:
        raise ExportError(f"cannot write {str(xml_path)!r}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the export
def export_openvino(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool = True,
                    input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                    verify: bool = True, rtol: float = 1e-4, atol: float = 1e-4,
                    quiet: bool = False, uniform_form: str = "int8") -> OpenVINOExportResult:
    """Export a quantized model to OpenVINO IR (``path`` = ``model.xml``; ``model.bin`` is written beside it).

    Args:
        model: a simulated model (from ``quantkit.prepare`` / ``quantize`` / ``QAT``: it is converted) or a deploy
            model (``quantkit.convert``); a plain float model exports as is (an FP32 reference IR).
        example_inputs: tuple of positional inputs, used for tracing and for the three-way check.
        path: the ``.xml`` file to write (its ``.bin`` beside it); nothing is written if anything fails.
        dynamic_batch: dimension 0 of every input and output is dynamic in the IR (reshape it to a static size
            before compiling when the model has binary layers: :func:`compile_openvino`).
        input_names / output_names: model input/output names (default ``input``/``output``, numbered when several).
        verify: compile for the CPU and compare OpenVINO with the deploy model on the example inputs (and at twice
            the batch with ``dynamic_batch``). Beyond ``atol + rtol * max|y|`` every quantized layer is checked on
            OpenVINO's own input of it; a layer beyond that bound raises ExportError naming it; NaN or inf in any
            output raises. If every layer matches, float rounding in the full-precision parts moved values across
            quantization thresholds and the export passes with a warning saying so (as :func:`export_onnx`).
        quiet: do not log the summary (logger ``quantkit.export``, stdout by default: :mod:`quantkit.log`) nor
            warn about a float-rounding difference.
        uniform_form: weights of uniform (w8a8, w4a4) layers: ``"int8"`` (default) stores them as i8, which
            OpenVINO runs with integer kernels, except where u8 x i8 products could overflow the 16-bit pair sums of
            x86 CPUs without VNNI (full-range 8-bit weights with 8-bit activations): those are stored as u8 with a
            Subtract of 128, exact on every CPU, and OpenVINO runs them in f32. ``"int8_signed"``: i8 everywhere,
            integer kernels in every such layer, exact only on CPUs with VNNI (see
            :mod:`quantkit.export.ov.uniform`).
    """
    exporter = OpenVINOExporter(model, example_inputs, path, dynamic_batch=dynamic_batch, input_names=input_names,
                                output_names=output_names, verify=verify, rtol=rtol, atol=atol, warn=not quiet,
                                uniform_form=uniform_form)
    result = exporter.run()
    if not quiet:
        log.info(result.summary())
    return result


class OpenVINOExporter:
    """One OpenVINO IR export, step by step (:func:`export_openvino` runs them all, in this order):

    :meth:`validate` (output path, inputs) -> :meth:`convert` (deploy model, simulated model kept) ->
    :meth:`reference_run` (both models on the example inputs, and the deploy model at twice the batch) ->
    :meth:`trace` (PyTorch's exporter with one placeholder per quantized layer; layers without an OpenVINO emitter
    are expanded to standard ONNX ops) -> :meth:`to_openvino` (OpenVINO's ONNX frontend, with the OpenVINO emitters
    as a conversion extension) -> :meth:`write` (saved to a temporary folder, read back and :meth:`verify`-ed
    there, then renamed into place) -> :meth:`close` (removes the intermediate ONNX file). All state lives on the
    object; nothing is printed (``warn=False`` also silences the float-rounding warning).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool = True,
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                 verify: bool = True, rtol: float = 1e-4, atol: float = 1e-4, warn: bool = True,
                 uniform_form: str = "int8") -> None:
        self.model, self.example_inputs, self.path = model, example_inputs, path
        self.uniform_form = uniform_form
        self.dynamic_batch, self.input_names, self.output_names = dynamic_batch, input_names, output_names
        self.run_openvino, self.rtol, self.atol, self.warn = verify, rtol, atol, warn
        self.session = TraceSession(dynamic_batch)
        self.agreement = OpenVINOAgreement()
        self.runtime: Counter = Counter()
        self.xml_path: Path | None = None
        self.inputs: tuple = ()
        self.doubled: tuple | None = None
        self.deploy: nn.Module | None = None
        self.simulated: nn.Module | None = None
        self.ref_deploy: list = []
        self.ref_sim: list | None = None
        self.ref_doubled: list | None = None
        self.in_names: list[str] = []
        self.out_names: list[str] = []
        self.proto = None
        self.ov_layers: dict = {}
        self.layers: list[LayerExport] = []
        self.probes: list[LayerProbe] = []
        self.ov_model = None
        self._scratch: str | None = None  # the intermediate ONNX file's folder (OpenVINO may map its initializers)

    def run(self) -> OpenVINOExportResult:
        """Every step in order; returns what :meth:`write` returns."""
        try:
            self.validate()
            self.convert()
            self.reference_run()
            self.trace()
            self.to_openvino()
            return self.write()
        finally:
            self.close()

    # ---- steps
    def validate(self) -> None:
        """OpenVINO is installed, the output is an ``.xml`` in a writable folder, the example inputs are tensors."""
        _openvino()  # a clear error before any work when the package is missing
        if not isinstance(self.model, nn.Module):
            raise ExportError(f"export_openvino expects a torch.nn.Module, got {type(self.model).__name__}")
        self.xml_path = check_output_path(self.path)
        if self.xml_path.suffix.lower() != ".xml":
            raise ExportError(f"OpenVINO IR path {str(self.xml_path)!r}: use a file name ending in .xml (the .bin is "
                              "written beside it)")
        self.inputs = as_inputs(self.example_inputs, "export_openvino")
        if self.uniform_form not in OV_UNIFORM_FORMS:
            raise ExportError(f"uniform_form={self.uniform_form!r}; the OpenVINO export takes one of "
                              f"{OV_UNIFORM_FORMS}")

    def convert(self) -> None:
        """The deploy model (a simulated model is converted and kept for the three-way check)."""
        self.deploy, self.simulated = deploy_and_simulated(self.model, "export")

    def reference_run(self) -> None:
        """The models' outputs on the example inputs (and the deploy model's at twice the batch, for the dynamic
        batch check) and the IR's input/output names."""
        inputs = self.inputs
        self.doubled = tuple(torch.cat([t, t], 0) for t in inputs) if self.dynamic_batch and inputs[0].dim() else None
        self.ref_deploy, self.ref_sim, self.ref_doubled = reference_outputs(
            self.deploy, self.simulated, inputs, self.doubled if self.run_openvino else None)
        _finite_or_fail(self.ref_deploy, "the deploy model's")
        self.in_names, self.out_names = io_names(self.input_names, self.output_names, len(inputs),
                                                 len(self.ref_deploy))

    def trace(self) -> None:
        """PyTorch's exporter with placeholders; those without an OpenVINO emitter become standard ONNX ops."""
        work = traceable_copy(self.deploy)
        swap_placeholders(work, self.session)
        self.proto = torch_export(work, self.inputs, _ONNX_OPSET, self.in_names, self.out_names, self.dynamic_batch)
        self.layers, self.probes = _split_placeholders(self.proto, self.session, self.ov_layers)

    def to_openvino(self) -> None:
        """OpenVINO's model of the traced graph, with the IR's names, precision hint and quantkit version."""
        self._scratch = tempfile.mkdtemp(prefix="quantkit_ov_")
        ov_model = _to_openvino(self.proto, self.ov_layers, self.layers, self._scratch, self.uniform_form)
        order = {p.name: i for i, p in enumerate(self.probes)}
        self.layers.sort(key=lambda layer: order.get(layer.name, len(order)))
        for inp, n in zip(ov_model.inputs, self.in_names):
            inp.get_tensor().set_names({n})
        for out, n in zip(ov_model.outputs, self.out_names):
            out.get_tensor().set_names({n})
        ov_model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
        ov_model.set_rt_info(__version__, ["quantkit", "version"])
        self.ov_model = ov_model

    def verify(self, saved) -> OpenVINOAgreement:
        """Compile the IR as read back from disk for the CPU, run it on the example inputs (and at twice the batch)
        and compare with the deploy and simulated models; beyond tolerance each quantized layer is checked."""
        agreement, inputs, ref_deploy, ref_sim = self.agreement, self.inputs, self.ref_deploy, self.ref_sim
        atol, rtol = self.atol, self.rtol
        batch = int(inputs[0].shape[0]) if inputs[0].dim() else None
        compiled = compile_openvino(saved, batch)
        self.runtime.update(runtime_layer_types(compiled))
        got = run_openvino(compiled, inputs)
        _finite_or_fail(got, "OpenVINO's")
        agreement.deploy_vs_openvino = _max_diff(ref_deploy, got)
        if ref_sim is not None:
            agreement.simulated_vs_openvino = _max_diff(ref_sim, got)
        if not agreement.deploy_vs_openvino <= atol + rtol * agreement.output_absmax:
            _explain(agreement, saved, inputs, self.probes, atol, rtol, batch or 1, self.warn, self.uniform_form)
        if self.doubled is not None:
            got2 = run_openvino(compile_openvino(saved, 2 * batch), self.doubled)
            _finite_or_fail(got2, "OpenVINO's (batch doubled)")
            if got2 and self.ref_doubled[0].dim() and got2[0].shape[0] != 2 * ref_deploy[0].shape[0]:
                raise ExportError("the dynamic batch axis does not propagate to the output; export with "
                                  "dynamic_batch=False")
            d2 = _max_diff(self.ref_doubled, got2)
            scale2 = max((float(t.abs().max()) for t in self.ref_doubled if t.numel()), default=0.0)
            if not d2 <= atol + rtol * scale2 and agreement.layerwise_max is None:
                _explain(agreement, saved, self.doubled, self.probes, atol, rtol, 2 * batch, self.warn,
                         self.uniform_form)
        return agreement

    def write(self) -> OpenVINOExportResult:
        """Save the IR beside the target, verify the saved files (``verify=True``), rename them into place."""
        agreement = self.agreement
        if self.ref_sim is not None:
            agreement.simulated_vs_deploy = _max_diff(self.ref_sim, self.ref_deploy)
        else:
            agreement.notes.append("a deploy (or float) model was given: no simulated model to compare")
        agreement.output_absmax = max((float(t.abs().max()) for t in self.ref_deploy if t.numel()), default=0.0)
        if not self.run_openvino:
            agreement.notes.append("verify=False: OpenVINO was not run")
        sizes = _atomic_save(self.ov_model, self.xml_path, self.verify if self.run_openvino else None)
        return OpenVINOExportResult(str(self.xml_path), str(self.xml_path.with_suffix(".bin")), sizes[0], sizes[1],
                                    self.layers, agreement, self.in_names, self.out_names, self.runtime,
                                    self.dynamic_batch)

    def close(self) -> None:
        """Remove the intermediate ONNX file (after :meth:`write`, or after a failure)."""
        self.ov_model = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


# ---------------------------------------------------------------------------------------------- inspect
@dataclass
class OpenVINOSummary:
    """What an OpenVINO IR holds (``quantkit inspect model.xml``)."""

    xml_path: str
    xml_bytes: int
    bin_bytes: int
    inputs: list[str]
    outputs: list[str]
    op_counts: Counter
    constants_by_type: dict[str, tuple[int, int, int]]  # element type -> (count, elements, bytes)
    #: one row per binary layer: (layer, weight shape, u1 bytes, FP32 bytes of the same weights)
    binary_layers: list[tuple[str, tuple, int, int]] = field(default_factory=list)
    runtime_layers: Counter = field(default_factory=Counter)
    runtime_note: str = ""

    def table(self) -> str:
        lines = [f"{self.xml_path}: OpenVINO IR, .xml {self.xml_bytes / 1024:.1f} KiB, "
                 f".bin {self.bin_bytes / 1024:.1f} KiB ({self.bin_bytes} B)",
                 f"inputs: {', '.join(self.inputs)}", f"outputs: {', '.join(self.outputs)}", "operations:"]
        for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {op:<28} {n}")
        lines.append("constants by element type:")
        for t, (count, elems, nbytes) in sorted(self.constants_by_type.items(), key=lambda kv: -kv[1][2]):
            lines.append(f"  {t:<8} {count:>5} tensors  {elems:>10} values  {nbytes / 1024:10.1f} KiB")
        if self.binary_layers:
            w = max(len(r[0]) for r in self.binary_layers)
            lines.append("binary layers (BinaryConvolution, u1 weights):")
            weights = [r for r in self.binary_layers if not r[0].endswith("/act_sum")]
            sums = [r for r in self.binary_layers if r[0].endswith("/act_sum")]
            for name, shape, nb, fp in weights:
                lines.append(f"  {name:<{w}}  {'x'.join(map(str, shape)):<16} {nb:>9} B u1 vs {fp:>10} B FP32")
            nb = sum(r[2] for r in weights)
            fp = sum(r[3] for r in weights)
            lines.append(f"  total: {nb} B of u1 weights vs {fp} B in FP32 ({fp / max(nb, 1):.1f}x smaller)")
            if sums:
                lines.append(f"  plus {len(sums)} all-ones u1 kernels ({sum(r[2] for r in sums)} B) computing the "
                             "activation sums of AdaBin's epilogue")
        if self.runtime_layers:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(self.runtime_layers.items(), key=lambda kv: -kv[1])
                              if k not in ("Input", "Output", "Const", "Reorder"))
            lines.append(f"executed by the CPU plugin (batch 1): {shown}")
        if self.runtime_note:
            lines.append(self.runtime_note)
        return "\n".join(lines)

    __str__ = table


def inspect_openvino(path: str | os.PathLike, *, compile_model: bool = True) -> OpenVINOSummary:
    """Read an OpenVINO IR: operation counts, constants by element type, the binary layers' u1 weight bytes vs
    FP32, the ``.bin`` size; with ``compile_model`` also the layer types the CPU plugin executes (at batch 1)."""
    ov = _openvino()
    p = Path(path)
    bin_path = p.with_suffix(".bin")
    if not p.is_file():
        raise ExportError(f"no OpenVINO IR at {str(p)!r}")
    if not bin_path.is_file():
        raise ExportError(f"{str(p)!r}: its weights file {str(bin_path)!r} is missing (an IR is the .xml and the "
                          ".bin beside it)")
    core = ov.Core()
    try:
        model = core.read_model(str(p))
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot read {str(p)!r}: {_first_line(exc)}") from exc
    ops_count: Counter = Counter()
    consts: dict[str, list[int]] = {}
    binary: list[tuple[str, tuple, int, int]] = []
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        ops_count[t] += 1
        if t == "Constant":
            et = op.get_output_element_type(0).get_type_name()
            row = consts.setdefault(et, [0, 0, 0])
            shape = tuple(op.get_output_shape(0))
            row[0] += 1
            row[1] += int(np.prod(shape)) if shape else 1
            row[2] += int(op.get_byte_size())
        if t == "BinaryConvolution":
            w = op.input_value(1).get_node()
            if w.get_type_name() == "Constant":
                shape = tuple(w.get_output_shape(0))
                binary.append((op.get_friendly_name(), shape, int(w.get_byte_size()), int(np.prod(shape)) * 4))
    summary = OpenVINOSummary(str(p), p.stat().st_size, bin_path.stat().st_size,
                              [f"{i.get_any_name()} {i.get_partial_shape()}" for i in model.inputs],
                              [f"{o.get_any_name()} {o.get_partial_shape()}" for o in model.outputs], ops_count,
                              {k: tuple(v) for k, v in consts.items()}, binary)
    if compile_model:
        try:
            summary.runtime_layers = runtime_layer_types(compile_openvino(model, 1, core=core))
        except ExportError as exc:
            summary.runtime_note = f"not compiled for the CPU: {exc}"
    return summary


__all__ = ["export_openvino", "OpenVINOExporter", "OpenVINOExportResult", "OpenVINOAgreement", "compile_openvino", "run_openvino",
           "runtime_layer_types", "layerwise_check_openvino", "inspect_openvino", "OpenVINOSummary"]
