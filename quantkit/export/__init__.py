"""ONNX export of quantized models (standard operators that stock onnxruntime runs; optionally compact
``quantkit.*`` custom ops) and its verification. See :func:`export_onnx`."""
from .onnx_export import DEFAULT_BINARY_FORM, DEFAULT_OPSET, Agreement, ExportResult, export_onnx
from .verify import ort_session, run_onnxruntime

__all__ = ["export_onnx", "ExportResult", "Agreement", "DEFAULT_OPSET", "DEFAULT_BINARY_FORM", "ort_session",
           "run_onnxruntime"]
