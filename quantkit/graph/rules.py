"""Layer selection: which candidate layers a scheme quantizes, and which rule decided it.

Precedence (documented in :mod:`quantkit.schemes.base`): exact name > regex > type > scheme default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class Decision:
    quantize: bool
    rule: str  # human-readable: which rule matched
    overrides: dict  # per-layer config overrides (empty if none)
    reason: str | None = None  # why kept full precision


def _as_pattern(key: Any) -> re.Pattern | None:
    if isinstance(key, re.Pattern):
        return key
    if isinstance(key, str) and key.startswith("re:"):
        return re.compile(key[3:])
    return None


def _matches(key: Any, name: str, module: nn.Module) -> str | None:
    """Return the precedence class ('name', 'regex', 'type') if ``key`` matches the layer, else None."""
    pat = _as_pattern(key)
    if pat is not None:
        return "regex" if pat.fullmatch(name) else None
    if isinstance(key, str):
        return "name" if key == name else None
    if isinstance(key, type):
        return "type" if isinstance(module, key) else None
    return None


_RANK = {"name": 0, "regex": 1, "type": 2}


def _describe(key: Any) -> str:
    if isinstance(key, re.Pattern):
        return f"regex {key.pattern!r}"
    if isinstance(key, str) and key.startswith("re:"):
        return f"regex {key[3:]!r}"
    if isinstance(key, type):
        return f"type {key.__name__}"
    return f"name {key!r}"


class LayerSelector:
    def __init__(self, config) -> None:
        self.config = config
        rules: dict = dict(config.rules)
        for key in config.skip or ():
            rules[key] = None
        self.rules = rules
        self.only = tuple(config.only) if config.only is not None else None

    def decide(self, name: str, module: nn.Module, is_first: bool, is_last: bool) -> Decision:
        best = None
        for key, value in self.rules.items():
            cls = _matches(key, name, module)
            if cls is not None and (best is None or _RANK[cls] < _RANK[best[0]]):
                best = (cls, key, value)
        if best is not None:
            _, key, value = best
            if value is None:
                return Decision(False, f"user rule ({_describe(key)})", {}, f"kept full precision by user rule ({_describe(key)})")
            return Decision(True, f"user rule ({_describe(key)})", dict(value))
        if self.only is not None and not any(_matches(k, name, module) for k in self.only):
            return Decision(False, "only=", {}, "not listed in only=")
        if is_first and self.config.keep_first:
            return Decision(False, "scheme default", {}, "first layer kept full precision (scheme default; override with rules={name: {}})")
        if is_last and self.config.keep_last:
            return Decision(False, "scheme default", {}, "last layer kept full precision (scheme default; override with rules={name: {}})")
        return Decision(True, f"scheme default (type {type(module).__name__})", {})
