"""Layer selection: which candidate layers a scheme quantizes, and which rule decided it.

Precedence (documented in :mod:`quantkit.schemes.base`): exact name > regex > type > scheme default.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from ..errors import ConfigError


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
        self.seen: list[str] = []  # every layer a pass asked about, in order
        self._matched: set[int] = set()  # id() of the keys that matched at least one of them

    def decide(self, name: str, module: nn.Module, is_first: bool, is_last: bool) -> Decision:
        self.seen.append(name)
        for key in list(self.rules) + list(self.only or ()):
            if id(key) not in self._matched and _matches(key, name, module) is not None:
                self._matched.add(id(key))
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

    def check_all_matched(self, model: nn.Module, recorded: Iterable[str]) -> None:
        """Raise ConfigError for a name or regex in ``rules`` / ``skip`` / ``only`` that matched no layer: a typo
        there would otherwise change nothing, silently. ``recorded`` are the layers the report lists (a rule naming
        one of them is not an error even when no pass asked about it, e.g. a layer kept FP by the graph).
        Type keys are exempt: a type rule is generic and may legitimately not occur in a model."""
        candidates = list(dict.fromkeys(self.seen))
        recorded = set(recorded)
        modules = [n for n, _ in model.named_modules() if n]
        tensors = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        for where, keys in (("rules/skip", list(self.rules)), ("only", list(self.only or ()))):
            for key in keys:
                if id(key) in self._matched or isinstance(key, type):
                    continue
                pattern = _as_pattern(key)
                if pattern is None and key in recorded:
                    continue
                inside = [n for n in candidates if n.startswith(f"{key}.")] if pattern is None else []
                if inside:
                    raise ConfigError(
                        f"{where} entry {key!r} names a block, not a layer (rules match layer names exactly); for "
                        f"every layer inside it use the regex {'re:' + re.escape(key) + '[.].*'!r} (it matches "
                        f"{', '.join(map(repr, inside[:5]))}{' ...' if len(inside) > 5 else ''})"
                    )
                if pattern is None and key in modules:
                    raise ConfigError(
                        f"{where} entry {key!r} names a layer that scheme {self.config.label()!r} does not consider "
                        f"(it rewrites {_types_of(self.config)}); candidate layers include "
                        f"{_close(key, candidates)}"
                    )
                owner = key.rpartition(".")[0] if pattern is None else ""
                if key in tensors:
                    raise ConfigError(f"{where} entry {key!r} names a parameter or buffer, not a layer; use the "
                                      f"layer's name {owner!r}")
                what = f"regex {pattern.pattern!r}" if pattern is not None else f"layer name {key!r}"
                text = pattern.pattern if pattern is not None else key
                raise ConfigError(
                    f"{where} entry {key!r}: {what} matches no layer of the model; close matches: "
                    f"{_close(text, candidates or modules)} (names are qualified module names, as in "
                    "model.named_modules(); regexes must match the whole name)"
                )


def _close(text: str, names: list[str]) -> str:
    picks = difflib.get_close_matches(text, names, n=5, cutoff=0.5)
    if picks:
        return ", ".join(repr(n) for n in picks)
    if not names:
        return "none (the model has no such layer)"
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return "none; the layers are " + ", ".join(repr(n) for n in names[:5]) + more


def _types_of(config: Any) -> str:
    try:
        return ", ".join(sorted(t.__name__ for t in config.targets())) or "no layer type"
    except Exception:
        return "its own layer types"
