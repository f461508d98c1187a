"""Running exported files in onnxruntime (CPU provider) for the export's self-check, the CLI and the tests."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
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


__all__ = ["ort_session", "run_onnxruntime"]
