"""Running exported files in onnxruntime (CPU provider) for the export's self-check, the CLI and the tests."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import torch

from ..errors import ExportError


def ort_session(model: bytes | str | os.PathLike, *, threads: int | None = None, optimize: bool = True):
    """An onnxruntime InferenceSession on the CPU provider (clear error when onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a test dependency
        raise ExportError("onnxruntime is not installed; `pip install onnxruntime` to verify exports "
                          "(or pass verify=False)") from exc
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions; no console noise
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported model: {str(exc).strip().splitlines()[0]}") from exc


def run_onnxruntime(model: bytes | str | os.PathLike | object, input_names: Sequence[str],
                    inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run ``inputs`` (torch tensors) through an exported model (bytes, a path or a session)."""
    sess = model if hasattr(model, "run") else ort_session(model)  # type: ignore[arg-type]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs)}
    try:
        return list(sess.run(None, feed))
    except Exception as exc:
        raise ExportError(f"onnxruntime failed to run the exported model: {str(exc).strip().splitlines()[0]}") from exc


def layer_tolerance(module: object, absmax: float, atol: float, rtol: float) -> float:
    """The difference one layer may show in the layer-wise checks: ``atol + rtol * max|y|``, plus one step of the
    layer's output grid when it rounds its output (``output_bits``: a conv feeding a residual Add). Two float
    computations of the value before that rounding differ in the last bits, which moves an element lying on a
    rounding threshold by exactly one step."""
    step = float(module.out_scale) if getattr(module, "output_bits", None) is not None else 0.0
    return atol + rtol * absmax + step


@dataclass
class LayerProbe:
    """Where one exported layer sits in the graph (for the layer-wise check)."""

    name: str
    type_name: str
    module: object
    input_names: list[str]
    output_name: str


def layerwise_check(model: onnx.ModelProto, input_names: Sequence[str], inputs: Sequence[torch.Tensor],
                    probes: Sequence[LayerProbe]) -> list[tuple[LayerProbe, float, float]]:
    """Run the graph once with every layer's inputs and output exposed; for each layer run its PyTorch deploy module
    on onnxruntime's inputs and return ``(probe, max abs difference, max |output|)``. ``model`` must carry inferred
    value_info (the types of the exposed tensors)."""
    from onnx import helper, numpy_helper

    exposed = copy.deepcopy(model)
    graph = exposed.graph
    value_info = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    initializers = {t.name: t for t in graph.initializer}
    have = {o.name for o in graph.output}
    wanted = []
    for p in probes:
        for n in p.input_names + [p.output_name]:
            if n in initializers or n in have or n in wanted or not n:
                continue
            vi = value_info.get(n)
            if vi is None:
                continue
            wanted.append(n)
            graph.output.append(vi if vi.type.HasField("tensor_type") else helper.make_value_info(n, vi.type))
    sess = ort_session(exposed.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, run_onnxruntime(sess, input_names, inputs)))
    values.update({n: t for n, t in zip(input_names, (i.numpy() for i in inputs))})
    results = []
    for p in probes:
        args = []
        for n in p.input_names:
            if n in values:
                args.append(torch.from_numpy(np.ascontiguousarray(values[n])))
            elif n in initializers:
                args.append(torch.from_numpy(numpy_helper.to_array(initializers[n]).copy()))
            else:
                break
        if len(args) != len(p.input_names) or p.output_name not in values:
            continue
        with torch.no_grad():
            ref = p.module(*args)
        got = values[p.output_name]
        ref_np = ref.detach().float().numpy()
        if ref_np.shape != got.shape:
            results.append((p, float("inf"), 0.0))
            continue
        results.append((p, float(np.abs(ref_np - got).max()) if got.size else 0.0,
                        float(np.abs(ref_np).max()) if got.size else 0.0))
    return results


def onnx_accuracy(path: str, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[float, np.ndarray]:
    """Top-1 accuracy in percent of an exported ONNX classifier in onnxruntime (CPU), and its predictions."""
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: x[i:i + batch_size].numpy()})[0].argmax(-1)
                            for i in range(0, len(y), batch_size)])
    return 100.0 * float((preds == y.numpy()).mean()), preds


__all__ = ["ort_session", "run_onnxruntime", "LayerProbe", "layerwise_check", "onnx_accuracy", "layer_tolerance"]
