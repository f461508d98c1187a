"""AdaBin's Maxout placement: each ReLU module that follows a binarized conv becomes a per-channel
:class:`~quantkit.nn.adabin.Maxout` over that conv's channels (docs/algorithms.md#adabin-placement)."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..nn.adabin import Maxout
from .passes import PassContext, replace_module
from .trace import fx_graph

_ADD_TARGETS = (operator.add, operator.iadd, torch.add)
_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)  # channel-preserving norms


def _binary_conv_before(node: fx.Node, modules: dict[str, nn.Module], convs: tuple[type, ...],
                        depth: int = 0) -> nn.Module | None:
    """The binarized conv whose output reaches ``node`` through norm layers and/or residual adds (None if none)."""
    if depth > 8 or not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, convs):
            return mod
        if isinstance(mod, _NORM_TYPES) and node.args:
            return _binary_conv_before(node.args[0], modules, convs, depth + 1)
        return None
    is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if is_add:
        for arg in node.args:
            found = _binary_conv_before(arg, modules, convs, depth + 1)
            if found is not None:
                return found
    return None


class MaxoutPass:
    """Replace each ReLU module that follows a binarized conv (a module of ``binary_convs``, with
    ``out_channels``) by a :class:`Maxout` over that conv's channels.

    With a torch.fx graph, every call site of the ReLU module must follow a binarized conv (through a norm layer and/or
    a residual add) with one channel count; a ReLU module called at several such sites (torchvision's BasicBlock
    calls ``relu`` twice) becomes one Maxout shared by those sites, and the report says so. Without a graph, only
    ReLUs inside an ``nn.Sequential`` right after [binarized conv, norm layer] or [binarized conv] are replaced
    (a Sequential runs its children in order, so that is known to be safe); the report names the ReLUs left alone.
    ``leaf_types``: the simulated layer types fx keeps opaque when the model is traced again after the swap.
    """

    label = "maxout"

    def __init__(self, binary_convs: tuple[type, ...], leaf_types: tuple[type, ...] = ()) -> None:
        self.binary_convs = tuple(binary_convs)
        self.leaf_types = tuple(leaf_types) or self.binary_convs

    def run(self, model: nn.Module, ctx: PassContext) -> None:
        modules = dict(model.named_modules())
        graph = None
        if ctx.trace.method == "fx":
            gm = ctx.trace.graph_module
            # the first trace ran before the swap; trace the swapped model again (its layers kept as leaves). A
            # failure is not expected (the first trace succeeded) and falls back to the safe path
            graph = gm.graph if gm is not None else fx_graph(model, self.leaf_types)
        if graph is not None:
            plan, skipped = self._plan_from_graph(graph, modules)
        else:
            plan, skipped = self._plan_from_sequentials(model, modules)
        replaced = []
        for relu_name, (channels, conv_names) in plan.items():
            ref = modules[conv_names[0]].weight
            replace_module(model, relu_name, Maxout(channels, device=ref.device, dtype=ref.dtype))
            shared = f" (one Maxout shared by {len(conv_names)} call sites)" if len(conv_names) > 1 else ""
            replaced.append(f"{relu_name}{shared}")
            for conv_name in conv_names:
                try:
                    ctx.report[conv_name].info["maxout"] = relu_name
                except KeyError:
                    pass
        if replaced:
            ctx.report.notes.append(f"maxout: {len(replaced)} ReLU module(s) after binarized convs became Maxout: "
                                    + ", ".join(replaced))
        else:
            ctx.report.notes.append("maxout: no ReLU module follows a binarized conv; nothing replaced")
        if skipped:
            ctx.report.notes.append("maxout: kept ReLU: " + "; ".join(skipped))

    def _plan_from_graph(self, graph: fx.Graph, modules: dict[str, nn.Module]):
        sites: dict[str, list] = {}
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.ReLU):
                conv = _binary_conv_before(node.args[0], modules, self.binary_convs) if node.args else None
                sites.setdefault(str(node.target), []).append(conv)
        names_of = {id(m): n for n, m in modules.items()}
        plan, skipped = {}, []
        for relu_name, convs in sites.items():
            if all(c is None for c in convs):
                continue  # an ordinary FP ReLU (stem, head): nothing to say
            if any(c is None for c in convs):
                skipped.append(f"{relu_name} (also used after a layer that is not a binarized conv)")
                continue
            channels = {c.out_channels for c in convs}
            if len(channels) != 1:
                skipped.append(f"{relu_name} (used after convs with different channel counts {sorted(channels)})")
                continue
            plan[relu_name] = (channels.pop(), [names_of[id(c)] for c in convs])
        return plan, skipped

    def _plan_from_sequentials(self, model: nn.Module, modules: dict[str, nn.Module]):
        uses: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        plan, planned = {}, set()
        for seq_name, seq in modules.items():
            if not isinstance(seq, nn.Sequential):
                continue
            children = list(seq.named_children())
            for i, (child_name, child) in enumerate(children):
                if not isinstance(child, nn.ReLU) or uses[id(child)] != 1:
                    continue
                prev = [c for _, c in children[max(0, i - 2):i]]
                conv = None
                if prev and isinstance(prev[-1], self.binary_convs):
                    conv = prev[-1]
                elif (len(prev) == 2 and isinstance(prev[-1], _NORM_TYPES)
                      and isinstance(prev[0], self.binary_convs)):
                    conv = prev[0]
                if conv is not None:
                    full = f"{seq_name}.{child_name}" if seq_name else child_name
                    conv_name = next(n for n, m in modules.items() if m is conv)
                    plan[full] = (conv.out_channels, [conv_name])
                    planned.add(full)
        skipped = []
        others = [n for n, m in modules.items() if isinstance(m, nn.ReLU) and n and n not in planned]
        if others:
            skipped.append(
                f"{', '.join(others[:8])}{' ...' if len(others) > 8 else ''} (the model could not be traced with "
                "torch.fx, so a ReLU outside an nn.Sequential cannot be matched to the conv it follows; rewrite the "
                "model to be fx-traceable or place Maxout yourself)")
        return plan, skipped


__all__ = ["MaxoutPass"]
