"""quantkit: low-bit quantization and binarization of vision models (AdaBin, AdderNet PTQ, BiViT) with bit-packed
CPU/CUDA kernels and ONNX export.

    qmodel = quantkit.quantize(model, "adder_ptq4", calib_data=loader)   # post-training quantization
    qat = quantkit.QAT(model, "adabin")                                   # quantization-aware training
    deployed = quantkit.convert(qmodel)                                   # packed / integer kernels
    quantkit.export_onnx(qmodel, (x,), "model.onnx")                      # runs in stock onnxruntime
    quantkit.export_openvino(qmodel, (x,), "model.xml")                   # OpenVINO IR, native binary kernels

``import quantkit`` loads the compiled kernels, so ``torch.ops.quantkit.*`` (the ops of :mod:`quantkit.ops`) can be
called directly right after it; without a build, quantkit still imports and runs every op's PyTorch reference.
"""
from . import ops  # noqa: F401  (loads the compiled kernels: registers torch.ops.quantkit.* and their fake impls)
from .api import calibrate, convert, prepare, quantize, report, schemes
from .calibrate.sources import calibration_samples
from .errors import (CalibrationDataError, ConfigError, ExportError, KernelError, NoQuantizableLayerError,
                     QuantkitError, UnknownSchemeError, UnsupportedModelError)
from .qat import QAT, distillation_loss
from .schemes.base import SchemeConfig, get_scheme, register_scheme
from .version import __version__



def export_onnx(*args, **kwargs):
    """Export a quantized model to ONNX that stock onnxruntime runs (see :mod:`quantkit.export`)."""
    from .export import export_onnx as _export

    return _export(*args, **kwargs)


def export_openvino(*args, **kwargs):
    """Export a quantized model to OpenVINO IR with native BinaryConvolution / int8 kernels (see
    :mod:`quantkit.export.openvino`; needs ``pip install quantkit[openvino]``)."""
    from .export.openvino import export_openvino as _export

    return _export(*args, **kwargs)


__all__ = ["prepare", "calibrate", "quantize", "convert", "report", "schemes", "calibration_samples", "QAT",
           "distillation_loss", "export_onnx", "export_openvino", "SchemeConfig", "get_scheme", "register_scheme",
           "QuantkitError", "UnknownSchemeError", "ConfigError", "CalibrationDataError", "NoQuantizableLayerError",
           "UnsupportedModelError", "KernelError", "ExportError", "__version__"]
