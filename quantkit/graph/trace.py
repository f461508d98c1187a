"""Find the execution order of a model's layers.

``trace`` tries torch.fx symbolic tracing first. Models with data-dependent control flow (``if x.sum() > 0:``)
cannot be traced symbolically; then, with ``example_inputs``, one real forward pass records the order in which leaf
modules run (forward hooks), and without them the module tree's registration order is used. The result says
which path was taken and why, and the report shows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn


@dataclass
class TraceResult:
    method: str  # "fx" | "hooks" | "module_tree"
    order: list[str]  # qualified names of leaf modules, in execution order (each once)
    reason: str | None = None  # why fx was not used
    #: True when ``order`` holds exactly the modules that are *called* (fx graph or a real forward pass); then a
    #: module missing from it is not called as a module (e.g. used functionally by its parent) or not used at all
    complete: bool = True
    graph_module: fx.GraphModule | None = field(default=None, repr=False)
    #: leaf modules called more than once in one forward pass -> number of calls (fx graph or a real forward pass)
    repeated_calls: dict[str, int] = field(default_factory=dict)


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every module of ``leaf_types`` (plus torch.nn's own) as a call_module leaf."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def _is_leaf(module: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    return isinstance(module, leaf_types) or not any(True for _ in module.children())


def fx_graph(model: nn.Module, leaf_types: tuple[type, ...] = ()) -> fx.Graph | None:
    """The torch.fx graph of ``model`` with modules of ``leaf_types`` kept as call_module leaves, or None when fx
    cannot trace it."""
    try:
        return _LeafTracer(tuple(leaf_types)).trace(model)
    except Exception:  # fx raises TraceError, TypeError, ... for untraceable Python
        return None


def trace(model: nn.Module, example_inputs: tuple | None = None, leaf_types: tuple[type, ...] = ()) -> TraceResult:
    """Execution order of ``model``'s leaf modules (and of modules of ``leaf_types``, which are not entered)."""
    try:
        tracer = _LeafTracer(tuple(leaf_types))
        graph = tracer.trace(model)
        gm = fx.GraphModule(model, graph)
        order: list[str] = []
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                target = str(node.target)
                if target not in calls:
                    order.append(target)
                calls[target] = calls.get(target, 0) + 1
        return TraceResult("fx", order, None, graph_module=gm,
                           repeated_calls={n: c for n, c in calls.items() if c > 1})
    except Exception as exc:  # fx raises TraceError, TypeError, ... for untraceable Python
        reason = f"torch.fx could not trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if example_inputs is not None:
        calls: dict[str, int] = {}
        order = _order_by_hooks(model, example_inputs, tuple(leaf_types), calls)
        if order is not None:
            return TraceResult("hooks", order, reason + "; used the execution order of one forward pass",
                               repeated_calls={n: c for n, c in calls.items() if c > 1})
    order = [n for n, m in model.named_modules() if n and _is_leaf(m, tuple(leaf_types))]
    return TraceResult("module_tree", order, reason + "; used the module tree's registration order", complete=False)


def _order_by_hooks(model: nn.Module, example_inputs: tuple, leaf_types: tuple[type, ...],
                    calls: dict[str, int] | None = None) -> list[str] | None:
    order: list[str] = []
    seen: set[str] = set()
    handles = []
    calls = {} if calls is None else calls

    def make_hook(name: str):
        def hook(_mod, _inp):
            calls[name] = calls.get(name, 0) + 1
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    for name, mod in model.named_modules():
        if name and _is_leaf(mod, leaf_types):
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    except Exception:
        return None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order
