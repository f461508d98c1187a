"""OpenVINO emitters: deploy-layer type -> function building that layer's OpenVINO nodes.

An emitter has the signature ``emit(module, inputs, ctx) -> (output, LayerExport)``: ``inputs`` are the OpenVINO
outputs feeding the layer, ``ctx`` the :class:`quantkit.export.emit.EmitContext` of the layer (name, traced shapes).
Layer types without an OpenVINO emitter (adder layers, BiViT's attention core) are written with the standard ONNX
operators of :mod:`quantkit.export.emit`, which OpenVINO's ONNX frontend reads.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

Emitter = Callable[..., tuple]
_EMITTERS: dict[type, Emitter] = {}


def register_ov_emitter(cls: type, fn: Emitter) -> None:
    _EMITTERS[cls] = fn


def ov_emitter_for(module: nn.Module) -> Emitter | None:
    for cls in type(module).__mro__:
        if cls in _EMITTERS:
            return _EMITTERS[cls]
    return None


from . import binary  # noqa: E402,F401
from . import uniform  # noqa: E402,F401

__all__ = ["register_ov_emitter", "ov_emitter_for"]
