"""Quantizer objects and their registry.

A quantizer is a small ``nn.Module`` that owns the state of one binarizer or quantizer (learnable thresholds and
scales, schedule buffers, observers) and calls the one pure function that holds its math (the functions in
:mod:`quantkit.quantizers.binary`, ``.adabin``, ``.softmax``, ``.uniform``, whose docstrings give the forward, the
surrogate gradient and the paper). The generic layers of :mod:`quantkit.nn.layers` hold an ``input_quantizer`` and a
``weight_quantizer`` chosen by registered name, so a new binarizer is one registered class, not a new layer.

The contract (``kind`` says which operand a quantizer is for):

- ``forward(t)``: the simulated (fake-quantized) tensor, with its surrogate gradient;
- ``schedule(epoch, epochs)``: optional per-epoch schedule (AdaBin's EDE temperature); default nothing;
- ``affine()`` (inputs) / ``affine(w)`` (weights): the ``(scale, center)`` of the binary levels,
  ``q = scale * s + center`` with ``s`` in {-1, +1} -- what :func:`quantkit.nn.binary_deploy.affine_epilogue` takes;
  ``center`` is ``None`` (weights) or ``0.0`` (inputs) when it is identically zero;
- inputs: ``threshold()``, the value the deploy kernel compares with (bit = x >= threshold, s = +1);
- weights: ``signs(w)``, exactly the +-1 signs the simulated forward uses, which the deploy layer packs;
- ``describe()``: facts for the report; ``check_deployable(layer)``: raise if the simulated form has no exact
  deploy form.

Options: every value a quantizer is built from is a field of its ``Options`` dataclass. Scheme configs inherit those
dataclasses, so each default is written once; :meth:`Quantizer.build` reads the fields from the scheme config (or
takes the ``Options`` defaults when no config is given).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import ConfigError


@dataclasses.dataclass
class NoOptions:
    """A quantizer without options."""


class Quantizer(nn.Module):
    """Base class of registered quantizers (module docstring)."""

    #: registry name (set by :func:`register_quantizer`)
    name: ClassVar[str] = ""
    #: "input" (activations), "weight" or "output" (a layer's output grid)
    kind: ClassVar[str] = "input"
    #: how a layer with this weight quantizer deploys: "binary" (packed signs + affine epilogue, BinaryDeploy*) or
    #: "uniform" (integer codes, UniformDeploy*)
    deploy: ClassVar[str] = "binary"
    #: the dataclass whose fields this quantizer is built from
    Options: ClassVar[type] = NoOptions
    #: tensors a float checkpoint does not carry (loading without them keeps their initial values)
    optional_state: ClassVar[tuple[str, ...]] = ()
    #: plain attributes a layer shows as its own (read-only), besides the quantizer's parameters and buffers
    exposed: ClassVar[tuple[str, ...]] = ()
    #: weights only: apply the scale after the product (``(x . s_w) * scale``) so a binary dot product is an exact
    #: integer in float arithmetic, as in the packed kernel
    scale_after_product: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.calibrating = False
        self.bits: int | None = 1

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: Any, weight: Tensor, channels: int) -> "Quantizer":
        """The quantizer for a layer whose float weight is ``weight``; ``channels`` is the input channel count for an
        input quantizer and the output channel count for a weight quantizer. Options come from ``config`` (a scheme
        config inheriting ``cls.Options``) or, when it is None, from the ``Options`` defaults."""
        source = cls.Options() if config is None else config
        options = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls.Options)}
        return cls(weight=weight, channels=channels, **options)

    # ---- the contract ----------------------------------------------------------------------------------------
    def schedule(self, epoch: int, epochs: int) -> None:
        """Per-epoch schedule; default nothing."""

    def start_calibration(self) -> None:
        self.calibrating = True

    def finish_calibration(self, layer: str) -> None:
        self.calibrating = False

    def affine(self, *weight: Tensor) -> tuple[Any, Any]:
        raise NotImplementedError(f"quantizer {self.name!r} has no binary (scale, center) form")

    def threshold(self) -> Tensor | float:
        raise NotImplementedError(f"quantizer {self.name!r} has no binary threshold")

    def signs(self, weight: Tensor) -> Tensor:
        raise NotImplementedError(f"quantizer {self.name!r} has no binary signs")

    def bias(self, bias: Tensor | None, weight: Tensor, inputs: "Quantizer | None") -> Tensor | None:
        """Weights only: the bias the simulated layer adds (default: the float bias)."""
        return bias

    def factors(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Weights with ``scale_after_product`` only: ``(signs, scale)`` with ``forward(w) = scale * signs``."""
        raise NotImplementedError(f"quantizer {self.name!r} applies its scale inside the weight")

    def check_deployable(self, layer: str) -> None:
        """Raise :class:`~quantkit.errors.ConfigError` when the simulated form has no exact deploy form."""

    def describe(self) -> dict[str, Any]:
        return {}

    # ---- state_dict: float checkpoints load into prepared models -------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        optional = {prefix + n for n in self.optional_state}
        kept = [k for k in missing_keys[before:] if not any(k == o or k.startswith(o + ".") for o in optional)]
        del missing_keys[before:]
        missing_keys.extend(kept)


_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str):
    """Class decorator: register a :class:`Quantizer` subclass under ``name``."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"quantizer name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_quantizer(name: str, kind: str | None = None) -> type[Quantizer]:
    """The registered quantizer class called ``name`` (checking its ``kind`` when given)."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown quantizer {name!r}; registered quantizers: {', '.join(list_quantizers())}")
    if kind is not None and cls.kind != kind:
        ok = ", ".join(n for n, c in sorted(_REGISTRY.items()) if c.kind == kind)
        raise ConfigError(f"quantizer {name!r} quantizes {cls.kind}s, not {kind}s; {kind} quantizers: {ok}")
    return cls


def list_quantizers() -> list[str]:
    return sorted(_REGISTRY)


__all__ = ["Quantizer", "NoOptions", "register_quantizer", "get_quantizer", "list_quantizers"]
