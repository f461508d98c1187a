"""``adabin``: AdaBin binary networks (Tu et al., ECCV 2022; docs/algorithms.md#adabin), trained with quantkit.QAT.

Placement (the paper's, docs/algorithms.md#adabin-placement), every part configurable:

* binarized: every Conv2d / Linear selected by the rules, as :class:`~quantkit.nn.adabin.AdaBinConv2d` /
  :class:`~quantkit.nn.adabin.AdaBinLinear` (1-bit weights and activations);
* full precision by default: the first layer (stem, ``keep_first``), the last layer (classifier, ``keep_last``) and
  residual downsample shortcuts (1x1 convs, ``keep_downsample``); grouped/depthwise convs always (see
  ``AdaBinConv2d.from_float``);
* ``maxout=True``: a ReLU that follows a binarized conv (directly, through a norm layer, and/or through a residual
  add) becomes a per-channel :class:`~quantkit.nn.adabin.Maxout`.

Ablation switches: ``maxout=False`` keeps every ReLU; ``weight_only=True`` binarizes weights only (activations stay
full precision); ``act_form="paper"`` uses a_b = alpha*sign + beta instead of the official code's
alpha*(sign + beta). ``t_min``/``t_max``/``progressive`` set the EDE temperature schedule driven by
``QAT.epoch_start``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import ConfigError
from ..nn.adabin import AdaBinConv2d, AdaBinLinear, AdaBinOptions, Maxout
from .base import SchemeConfig, register_scheme

_ADD_TARGETS = (operator.add, operator.iadd, torch.add)
_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)  # channel-preserving norms


@dataclass
class AdaBinConfig(AdaBinOptions, SchemeConfig):
    name = "adabin"
    description = ("AdaBin: adaptive binary sets for weights (per-channel mean/std) and activations (learnable), "
                   "EDE schedule, Maxout; QAT")
    mode = "qat"
    keep_first: bool = True
    keep_last: bool = True
    maxout: bool = True

    def targets(self) -> dict[type, type]:
        return {nn.Conv2d: AdaBinConv2d, nn.Linear: AdaBinLinear}

    def passes(self) -> list:
        from ..graph.passes import SwapPass

        passes: list = [SwapPass(self.targets())]
        if self.maxout:
            passes.append(MaxoutPass())
        return passes

    def validate(self) -> None:
        super().validate()
        if self.act_form not in ("code", "paper"):
            raise ConfigError(f"scheme 'adabin': act_form={self.act_form!r}; use 'code' (official code, default) "
                              "or 'paper'")
        if not (isinstance(self.t_min, (int, float)) and isinstance(self.t_max, (int, float))
                and 0 < self.t_min <= self.t_max):
            raise ConfigError(f"scheme 'adabin': need 0 < t_min <= t_max, got t_min={self.t_min!r}, "
                              f"t_max={self.t_max!r}")


# ---------------------------------------------------------------------------------------------- Maxout pass


def _binary_conv_before(node: fx.Node, modules: dict[str, nn.Module], depth: int = 0) -> AdaBinConv2d | None:
    """The binarized conv whose output reaches ``node`` through norm layers and/or residual adds (None if none)."""
    if depth > 8 or not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, AdaBinConv2d):
            return mod
        if isinstance(mod, _NORM_TYPES) and node.args:
            return _binary_conv_before(node.args[0], modules, depth + 1)
        return None
    is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if is_add:
        for arg in node.args:
            found = _binary_conv_before(arg, modules, depth + 1)
            if found is not None:
                return found
    return None


class MaxoutPass:
    """Replace each ReLU module that follows a binarized conv by a :class:`Maxout` over that conv's channels.

    With a torch.fx graph, every call site of the ReLU module must follow a binarized conv (through a norm layer and/or
    a residual add) with one channel count; a ReLU module called at several such sites (torchvision's BasicBlock
    calls ``relu`` twice) becomes one Maxout shared by those sites, and the report says so. Without a graph, only
    ReLUs inside an ``nn.Sequential`` right after [binarized conv, norm layer] or [binarized conv] are replaced
    (a Sequential runs its children in order, so that is known to be safe); the report names the ReLUs left alone.
    """

    label = "maxout"

    def run(self, model: nn.Module, ctx) -> None:
        modules = dict(model.named_modules())
        graph = None
        if ctx.trace.method == "fx":
            gm = ctx.trace.graph_module
            graph = gm.graph if gm is not None else self._retrace(model)
        if graph is not None:
            plan, skipped = self._plan_from_graph(graph, modules)
        else:
            plan, skipped = self._plan_from_sequentials(model, modules)
        replaced = []
        for relu_name, (channels, conv_names) in plan.items():
            ref = modules[conv_names[0]].weight
            new = Maxout(channels, device=ref.device, dtype=ref.dtype)
            _set_submodule(model, relu_name, new)
            shared = f" (one Maxout shared by {len(conv_names)} call sites)" if len(conv_names) > 1 else ""
            replaced.append(f"{relu_name}{shared}")
            for conv_name in conv_names:
                try:
                    rec = ctx.report[conv_name]
                    rec.info["maxout"] = relu_name
                except KeyError:
                    pass
        if replaced:
            ctx.report.notes.append(f"maxout: {len(replaced)} ReLU module(s) after binarized convs became Maxout: "
                                    + ", ".join(replaced))
        else:
            ctx.report.notes.append("maxout: no ReLU module follows a binarized conv; nothing replaced")
        if skipped:
            ctx.report.notes.append("maxout: kept ReLU: " + "; ".join(skipped))

    @staticmethod
    def _retrace(model: nn.Module) -> fx.Graph | None:
        """The fx graph of the swapped model (AdaBin layers kept as leaves), when the trace kept only the order."""
        from ..graph.trace import _LeafTracer

        try:
            return _LeafTracer((AdaBinConv2d, AdaBinLinear)).trace(model)
        except Exception:  # the first trace succeeded, so this is not expected; fall back to the safe path
            return None

    @staticmethod
    def _plan_from_graph(graph: fx.Graph, modules: dict[str, nn.Module]):
        sites: dict[str, list] = {}
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.ReLU):
                conv = _binary_conv_before(node.args[0], modules) if node.args else None
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

    @staticmethod
    def _plan_from_sequentials(model: nn.Module, modules: dict[str, nn.Module]):
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
                if prev and isinstance(prev[-1], AdaBinConv2d):
                    conv = prev[-1]
                elif len(prev) == 2 and isinstance(prev[-1], _NORM_TYPES) and isinstance(prev[0], AdaBinConv2d):
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


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


register_scheme("adabin", AdaBinConfig)
