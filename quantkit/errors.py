"""The exception hierarchy. Every error a user can trigger is a :class:`QuantkitError` whose message names the
layer, argument or file involved and says how to fix it."""
from __future__ import annotations


class QuantkitError(Exception):
    """Base class of every error raised by quantkit."""


class UnknownSchemeError(QuantkitError, KeyError):
    """A scheme name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(QuantkitError, ValueError):
    """A scheme option or override is out of range or of the wrong type (e.g. bits outside the supported range)."""


class CalibrationDataError(QuantkitError, ValueError):
    """Calibration data is empty, contains NaN/Inf, or does not fit the model."""


class NoQuantizableLayerError(QuantkitError):
    """The model has no layer the scheme can quantize (after the rules were applied)."""


class UnsupportedModelError(QuantkitError):
    """The model (or a layer of it) cannot be processed by the requested operation."""


class KernelError(QuantkitError, ValueError):
    """A kernel was called with bad shapes, dtypes or devices."""


class ExportError(QuantkitError):
    """An ONNX export failed; the message names the node or layer and why."""


__all__ = [
    "QuantkitError",
    "UnknownSchemeError",
    "ConfigError",
    "CalibrationDataError",
    "NoQuantizableLayerError",
    "UnsupportedModelError",
    "KernelError",
    "ExportError",
]
