"""Rewrite passes and the pass manager. Every pass records what it changed (or why it left a layer alone) in the
:class:`~quantkit.report.QuantReport` carried by the :class:`PassContext`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..nn.base import NotQuantizable, QuantModule, module_nbytes
from ..report import LayerRecord, QuantReport
from .rules import LayerSelector
from .trace import TraceResult


@dataclass
class PassContext:
    config: Any  # SchemeConfig
    trace: TraceResult
    report: QuantReport
    selector: LayerSelector = field(init=False)

    def __post_init__(self) -> None:
        self.selector = LayerSelector(self.config)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def candidates_in_order(model: nn.Module, trace: TraceResult, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """Layers of ``types`` in execution order (modules the trace did not see come last, in registration order)."""
    modules = dict(model.named_modules())
    out, seen = [], set()
    for name in trace.order:
        mod = modules.get(name)
        if mod is not None and isinstance(mod, types) and not isinstance(mod, QuantModule):
            out.append((name, mod))
            seen.add(name)
    for name, mod in modules.items():
        if name and name not in seen and isinstance(mod, types) and not isinstance(mod, QuantModule):
            # skip modules nested inside another candidate (e.g. a Linear inside a MultiheadAttention target)
            if not any(name.startswith(s + ".") for s in seen):
                out.append((name, mod))
                seen.add(name)
    return out


class SwapPass:
    """Swap each selected layer of a target type for its simulated quantized layer (``cls.from_float``)."""

    def __init__(self, targets: dict[type, type], label: str = "swap") -> None:
        self.targets = targets
        self.label = label

    def _target_for(self, module: nn.Module) -> type | None:
        # exact type first, then the nearest base class (so a subclass of Conv2d matches Conv2d's rule)
        if type(module) in self.targets:
            return self.targets[type(module)]
        for base in type(module).__mro__[1:]:
            if base in self.targets:
                return self.targets[base]
        return None

    def run(self, model: nn.Module, ctx: PassContext) -> None:
        types = tuple(self.targets)
        layers = candidates_in_order(model, ctx.trace, types)
        # nested candidates: a child of an already-chosen candidate is handled by that candidate's layer
        for i, (name, module) in enumerate(layers):
            decision = ctx.selector.decide(name, module, i == 0, i == len(layers) - 1)
            record = LayerRecord(name=name, original_type=type(module).__name__, new_type=type(module).__name__,
                                 rule=decision.rule, bytes_before=module_nbytes(module))
            record.bytes_after = record.bytes_before
            if not decision.quantize:
                record.kept_fp_reason = decision.reason
                ctx.report.add(record)
                continue
            cls = self._target_for(module)
            cfg = ctx.config
            if decision.overrides:
                cfg = cfg.with_overrides(**decision.overrides)
                cfg.validate()
            try:
                new = cls.from_float(module, cfg, name)
            except NotQuantizable as exc:
                record.kept_fp_reason = exc.reason
                ctx.report.add(record)
                continue
            replace_module(model, name, new)
            record.new_type = type(new).__name__
            record.bits_w, record.bits_a = new.bits_w, new.bits_a
            record.bytes_after = new.weight_nbytes()
            record.info = new.describe()
            ctx.report.add(record)


class PassManager:
    """Run a scheme's passes in order on ``model`` (in place), recording into one report."""

    def __init__(self, passes: list) -> None:
        self.passes = list(passes)

    def run(self, model: nn.Module, ctx: PassContext) -> QuantReport:
        for p in self.passes:
            p.run(model, ctx)
        return ctx.report


def refresh_report(model: nn.Module, report: QuantReport) -> QuantReport:
    """Update bits/bytes/info of every quantized record from the model's current layers (after calibration)."""
    modules = dict(model.named_modules())
    for rec in report.records:
        mod = modules.get(rec.name)
        if isinstance(mod, QuantModule):
            rec.bits_w, rec.bits_a = mod.bits_w, mod.bits_a
            rec.bytes_after = mod.weight_nbytes()
            rec.info = mod.describe()
    return report


__all__ = ["PassContext", "SwapPass", "PassManager", "replace_module", "candidates_in_order", "refresh_report"]
