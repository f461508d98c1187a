"""Scheme configs: one small dataclass per recipe, registered by name.

A scheme says *which* layers change (``targets``: float module type -> simulated layer class, plus the selection
rules below) and *how* (its own fields: bits, percentiles, ...). Everything a user may override per call is a field,
so ``quantkit.quantize(model, "w4a4", percentile=99.9)`` and ``W4A4Config(percentile=99.9)`` are the same thing.

Layer-selection rules (``rules``, ``skip``, ``only``) -- precedence, highest first:

1. an exact qualified name (``"layer1.0.conv1"``),
2. a regular expression (a compiled ``re.Pattern``, or a string starting with ``"re:"``; full match),
3. a module type (``nn.Conv2d``),
4. the scheme default (``targets`` plus ``keep_first`` / ``keep_last``).

A rule's value is ``None`` (keep full precision) or a dict of field overrides for that layer
(e.g. ``{"bits": 8}``). ``skip=[...]`` is shorthand for rules with value ``None``; ``only=[...]`` restricts
quantization to layers matching one of its entries (names, patterns or types).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from ..errors import ConfigError
from ..graph.passes import SwapPass
from ..quantizers import get_quantizer

RuleKey = Any  # str (exact name or "re:<pattern>"), re.Pattern, or a module type


@dataclass
class SchemeConfig:
    """Base of every scheme config. Subclasses set ``name``/``description``/``mode`` and implement ``targets``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: "ptq" (calibrate, no training), "qat" (train with quantkit.QAT) or "both"
    mode: ClassVar[str] = "ptq"

    keep_first: bool = False
    keep_last: bool = False
    skip: tuple = ()
    only: tuple | None = None
    rules: dict = field(default_factory=dict)

    # ---- what a scheme provides ---------------------------------------------------------------------------
    def targets(self) -> dict[type, type]:
        """Float module type -> simulated layer class (with a ``from_float(module, config, name)``)."""
        raise NotImplementedError

    def passes(self) -> list:
        """The graph passes this scheme runs, in order (default: one module-swap pass over ``targets``)."""
        return [SwapPass(self.targets())]

    def label(self) -> str:
        """The scheme name for messages: the name the config was requested by (an override such as ``bits=`` can
        rename a family member, and an invalid one would name a scheme that does not exist)."""
        return getattr(self, "_requested_name", None) or self.name

    def _check_field_types(self) -> None:
        """Every bool / int / float / str field holds a value of that type (int accepted for float)."""
        expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
        for f in dataclasses.fields(self):
            hint = _field_hints(type(self)).get(f.name)
            value = getattr(self, f.name)
            if hint not in expected:
                continue
            ok = isinstance(value, expected[hint]) and (hint is bool or not isinstance(value, bool))
            if not ok:
                raise ConfigError(
                    f"scheme {self.label()!r}: {f.name}={value!r} must be of type {hint.__name__} "
                    f"(got {type(value).__name__}; default {f.default!r})"
                )

    def validate(self) -> None:
        """Raise ConfigError for out-of-range fields. Subclasses extend (and call super)."""
        self._check_field_types()
        if not isinstance(self.rules, dict):
            raise ConfigError(f"scheme {self.label()!r}: rules= must be a dict {{layer key: None | overrides}}, "
                              f"got {type(self.rules).__name__}")
        for key in list(self.rules) + list(self.skip) + list(self.only or ()):
            if not isinstance(key, (str, re.Pattern, type)):
                raise ConfigError(
                    f"scheme {self.label()!r}: layer rule key {key!r} must be a qualified name, a regex "
                    "(re.compile(...) or 're:<pattern>') or a module type"
                )
            if isinstance(key, str) and key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise ConfigError(
                        f"scheme {self.label()!r}: layer rule key {key!r} is not a valid regular expression "
                        f"({exc}); for a literal layer name drop the 're:' prefix, or escape it with re.escape()"
                    ) from None
        for field_name, kind in (("input_quantizer", "input"), ("weight_quantizer", "weight")):
            qname = getattr(self, field_name) if field_name in self._field_names() else None
            if qname is not None:
                try:
                    get_quantizer(qname, kind)
                except ConfigError as exc:
                    raise ConfigError(f"scheme {self.label()!r}: {field_name}={qname!r}: {exc}") from None
        for key, value in self.rules.items():
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"scheme {self.label()!r}: rule for {key!r} must be None (keep full precision) or a dict of "
                    f"overrides, got {value!r}"
                )

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def calibrate_finish(self, model: nn.Module,
                         run_batches: Callable[[int | None], int]) -> list[tuple[str, str]] | None:
        """Scheme-wide step after every layer's ``finish_calibration`` (e.g. BN re-estimation).
        ``run_batches(n)`` re-runs up to ``n`` calibration batches (all if None) through the model in its current
        train/eval mode, under no_grad, and returns how many ran. Returns the (layer, BatchNorm) pairs it folded, for
        the report. Default: nothing."""

    def epoch_start(self, model: nn.Module, epoch: int, total_epochs: int) -> None:
        """Scheme-wide QAT schedule hook (called by QAT.epoch_start after the per-layer hooks). Default: nothing."""

    # ---- serialization ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The whole config as JSON-safe data: ``{"scheme": name, "options": {field: value}}``. Layer-rule keys
        that are not plain names are written as ``"re:<regex>"`` (a compiled ``re.Pattern``: the same rule) and
        ``"type:<module>.<class>"`` (a module type). :meth:`from_dict` rebuilds an equal config."""
        options = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rules":
                value = {_encode_key(k): v for k, v in value.items()}
            elif f.name in ("skip", "only"):
                value = None if value is None else [_encode_key(k) for k in value]
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise ConfigError(f"scheme {self.label()!r}: option {f.name}={value!r} is not JSON-serializable "
                                  "(use plain numbers, strings, lists and dicts)") from None
            options[f.name] = value
        return {"scheme": self.label(), "options": options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SchemeConfig":
        """The config written by :meth:`to_dict` (resolved by its registered name, then validated)."""
        if not isinstance(data, dict) or not isinstance(data.get("scheme"), str) or not isinstance(
                data.get("options"), dict):
            raise ConfigError("SchemeConfig.from_dict: expected {'scheme': <name>, 'options': {...}} as written by "
                              f"to_dict(), got {data!r}")
        options = dict(data["options"])
        if "rules" in options:
            options["rules"] = {_decode_key(k): v for k, v in options["rules"].items()}
        for name in ("skip", "only"):
            if options.get(name) is not None:
                options[name] = tuple(_decode_key(k) for k in options[name])
        return get_scheme(data["scheme"], **options)

    def with_overrides(self, **overrides: Any) -> "SchemeConfig":
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ConfigError(
                f"scheme {self.name!r} has no option(s) {bad}; its options are: {sorted(names)}"
            )
        if "skip" in overrides and overrides["skip"] is not None:
            overrides["skip"] = tuple(overrides["skip"]) if not isinstance(overrides["skip"], (str, type)) else (overrides["skip"],)
        if "only" in overrides and overrides["only"] is not None:
            overrides["only"] = tuple(overrides["only"]) if not isinstance(overrides["only"], (str, type)) else (overrides["only"],)
        new = dataclasses.replace(self, **overrides)
        new._requested_name = self.label()
        return new


def _encode_key(key: RuleKey) -> str:
    if isinstance(key, re.Pattern):
        if key.flags not in (0, re.UNICODE):
            raise ConfigError(f"layer rule {key!r}: regex flags cannot be serialized; write them inline, e.g. (?i)")
        return "re:" + key.pattern  # a "re:" string is the same rule (module docstring)
    if isinstance(key, type):
        return f"type:{key.__module__}.{key.__qualname__}"
    return key


def _decode_key(key: str) -> RuleKey:
    if key.startswith("type:"):
        module_name, _, qualname = key[len("type:"):].rpartition(".")
        try:
            found: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(f"layer rule {key!r}: no such module type (import its package first)") from None
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise ConfigError(f"layer rule {key!r} does not name an nn.Module type")
        return found
    return key


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no type check for that config
        return {}


def check_bits(scheme: str, field_name: str, value: Any, lo: int, hi: int) -> None:
    """Shared bit-width check: integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"scheme {scheme!r}: {field_name}={value!r} must be an integer from {lo} to {hi} "
            f"(got {type(value).__name__})"
        )
    if not lo <= value <= hi:
        raise ConfigError(
            f"scheme {scheme!r}: {field_name}={value!r} is out of range; use an integer from {lo} to {hi}"
        )


# ---- registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., SchemeConfig]
    description: str
    mode: str


_REGISTRY: dict[str, _Entry] = {}


def register_scheme(name: str, factory: Callable[..., SchemeConfig], description: str | None = None,
                    mode: str | None = None) -> None:
    """Register ``factory(**overrides) -> SchemeConfig`` under ``name`` (families such as ``adder_ptq{2..8}`` register
    one name per member with a partial factory)."""
    probe = factory()
    _REGISTRY[name] = _Entry(factory, description or probe.description, mode or probe.mode)


def scheme(cls: type[SchemeConfig]) -> type[SchemeConfig]:
    """Class decorator: register a config class under its ``name``."""
    register_scheme(cls.name, cls, cls.description, cls.mode)
    return cls


def get_scheme(spec: "str | SchemeConfig", **overrides: Any) -> SchemeConfig:
    """Resolve a scheme name or config object and apply per-call overrides; validates the result."""
    from ..errors import UnknownSchemeError

    if isinstance(spec, SchemeConfig):
        cfg = spec.with_overrides(**overrides) if overrides else spec
    elif isinstance(spec, str):
        _ensure_builtin()
        entry = _REGISTRY.get(spec)
        if entry is None:
            known = ", ".join(sorted(_REGISTRY))
            raise UnknownSchemeError(f"unknown scheme {spec!r}; known schemes: {known}")
        cfg = entry.factory()
        if overrides:
            cfg = cfg.with_overrides(**overrides)
    else:
        raise ConfigError(f"scheme must be a name (str) or a SchemeConfig, got {type(spec).__name__}")
    cfg.validate()
    return cfg


def list_schemes() -> dict[str, str]:
    """Registered scheme names -> one-line descriptions (with their mode)."""
    _ensure_builtin()
    return {name: f"[{e.mode}] {e.description}" for name, e in sorted(_REGISTRY.items())}


def _ensure_builtin() -> None:
    from . import builtin  # noqa: F401  (registers the built-in schemes on first use)
