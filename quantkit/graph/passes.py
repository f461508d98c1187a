"""Rewrite passes and the pass manager. Every pass records what it changed (or why it left a layer alone) in the
:class:`~quantkit.report.QuantReport` carried by the :class:`PassContext`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx, nn

from ..nn.base import NotQuantizable, QuantModule, module_nbytes
from ..report import QuantReport
from .records import fill_record, new_record
from .rules import Decision, LayerSelector
from .trace import TraceResult


@dataclass
class PassContext:
    config: Any  # SchemeConfig
    trace: TraceResult
    report: QuantReport
    selector: LayerSelector = field(init=False)

    def __post_init__(self) -> None:
        self.selector = LayerSelector(self.config)


class QuantkitLeafTracer(fx.Tracer):
    """fx tracer for deploy models: quantkit's own modules (deploy layers, fused blocks, stems) stay single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("quantkit.") or super().is_leaf_module(m, qualname)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def calls_module(node: Any, modules: dict, kind: type | tuple[type, ...]) -> bool:
    """Whether the torch.fx ``node`` calls a submodule (``modules``: the traced root's ``named_modules()``) of type
    ``kind``."""
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), kind)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def candidates_in_order(model: nn.Module, trace: TraceResult, types: tuple[type, ...]
                        ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module, str]]]:
    """Layers of ``types`` in execution order, and the layers of ``types`` that must stay as they are, with why:
    those the trace shows are never called as modules (a parent such as ``nn.MultiheadAttention`` reads their
    weights directly, so swapping them would change nothing while the report claimed otherwise)."""
    modules = dict(model.named_modules())
    out, seen = [], set()
    for name in trace.order:
        mod = modules.get(name)
        if mod is not None and isinstance(mod, types) and not isinstance(mod, QuantModule):
            out.append((name, mod))
            seen.add(name)
    skipped = []
    for name, mod in modules.items():
        if not name or name in seen or not isinstance(mod, types) or isinstance(mod, QuantModule):
            continue
        if any(name.startswith(s + ".") for s in seen):
            continue  # nested inside a chosen candidate: that layer handles it
        parent = modules.get(name.rpartition(".")[0]) if "." in name else model
        if isinstance(parent, nn.MultiheadAttention):
            skipped.append((name, mod, f"used functionally by its parent {type(parent).__name__} (weights read "
                                       "directly, not called as a module): kept FP by this scheme (the bivit "
                                       "schemes rewrite whole attention blocks)"))
        elif trace.complete:
            owner = f"; its parent {type(parent).__name__} uses its weights directly" if parent is not model else ""
            skipped.append((name, mod, "not called as a module in the traced forward pass" + owner))
        else:
            out.append((name, mod))
            seen.add(name)
    return out, skipped


def layer_config(config: Any, overrides: dict) -> Any:
    """The scheme config one layer is built with: ``config`` plus a per-layer rule's overrides (validated)."""
    if not overrides:
        return config
    cfg = config.with_overrides(**overrides)
    cfg.validate()
    return cfg


def swap_layer(model: nn.Module, ctx: PassContext, name: str, module: nn.Module, decision: Decision,
               build: Callable[[Any], QuantModule], *, kept_fp_reason: str | None = None,
               recursive: bool = False) -> QuantModule | None:
    """Swap one candidate layer, recording the outcome in ``ctx.report`` -- the step every rewrite pass shares.

    ``decision`` (from ``ctx.selector``) says whether the layer is quantized and with which overrides;
    ``kept_fp_reason`` is the pass's own reason to keep it full precision (checked after the user's rules).
    ``build(layer_config)`` returns the simulated layer or raises :class:`NotQuantizable`. The new layer takes
    the train/eval mode of the one it replaces. Returns the new layer, or None when the layer stays as it is."""
    record = new_record(name, module, decision.rule, recursive=recursive)
    record.kept_fp_reason = decision.reason if not decision.quantize else kept_fp_reason
    if record.kept_fp_reason is not None:
        ctx.report.add(record)
        return None
    try:
        new = build(layer_config(ctx.config, decision.overrides))
    except NotQuantizable as exc:
        record.kept_fp_reason = exc.reason
        ctx.report.add(record)
        return None
    new.train(module.training)
    replace_module(model, name, new)
    ctx.report.add(fill_record(record, new))
    return new


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
        layers, skipped = candidates_in_order(model, ctx.trace, tuple(self.targets))
        for i, (name, module) in enumerate(layers):
            decision = ctx.selector.decide(name, module, i == 0, i == len(layers) - 1)
            cls = self._target_for(module)
            swap_layer(model, ctx, name, module, decision,
                       lambda cfg, cls=cls, module=module, name=name: cls.from_float(module, cfg, name))
        for name, module, why in skipped:
            ctx.report.add(new_record(name, module, "graph", why))
        recorded = {r.name for r in ctx.report.records}
        for name, module in model.named_modules():
            # nn.MultiheadAttention's in-projection is a parameter of the module itself, not a Linear child
            if isinstance(module, nn.MultiheadAttention) and name not in recorded and module_nbytes(module):
                own = [n for n, _ in module.named_parameters(recurse=False)]
                ctx.report.add(new_record(
                    name, module, "graph",
                    f"{', '.join(own)} used inside nn.MultiheadAttention's own forward (no Linear layer to swap): "
                    f"kept FP by scheme {ctx.config.name!r}"))


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
            fill_record(rec, mod)
    return report


__all__ = ["PassContext", "SwapPass", "PassManager", "replace_module", "candidates_in_order", "refresh_report",
           "swap_layer", "layer_config"]
