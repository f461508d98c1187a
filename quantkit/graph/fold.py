"""Deploy-time graph pass: fold a BatchNorm that directly follows a deploy layer into the layer's epilogue.

Every deploy layer with a per-output-channel affine epilogue (binary layers: ``scale * dot + ... + bias``; adder
layers: ``-delta * SUM|q_x - q_w| + bias``) implements ``fold_affine(g, h)`` (``y -> g * y + h``). An inference
BatchNorm is exactly such a map, ``g = gamma / sqrt(var + eps)``, ``h = beta - mean * g``, so when the layer's output
feeds only that BatchNorm, the BatchNorm becomes part of the kernel's epilogue (one memory pass less) and is replaced
by ``nn.Identity``. The fold is exact up to float rounding of the constants.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .passes import replace_module


class _DeployTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "fold_affine") or super().is_leaf_module(m, qualname)


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, h) with bn(y) == g * y + h per channel, for a BatchNorm in inference (running statistics)."""
    g = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight.detach().double()
    h = -bn.running_mean.double() * g
    if bn.bias is not None:
        h = h + bn.bias.detach().double()
    return g.float(), h.float()


def batchnorm_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of each BatchNorm's own parameters, by qualified name (what a fold removes, for the report)."""
    return {name: sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
            for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _module_call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times each submodule is called in ``graph`` (a layer called twice shares its weights: never fold)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def fold_batchnorms(model: nn.Module, include_training: bool = False) -> list[tuple[str, str]]:
    """Fold every foldable (layer with ``fold_affine`` -> BatchNorm) pair of ``model`` in place; returns (layer, bn)
    names. A BatchNorm in training mode is folded (with its running statistics) only when ``include_training``;
    the ``nn.Identity`` that replaces it takes its mode. Models torch.fx cannot trace are left as they are (an
    empty list)."""
    try:
        graph = _DeployTracer().trace(model)
    except Exception:
        return []
    calls = _module_call_counts(graph)
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not hasattr(modules.get(node.target), "fold_affine"):
            continue
        users = list(node.users)
        if len(users) != 1 or calls[node.target] != 1:
            continue
        user = users[0]
        bn = modules.get(user.target) if user.op == "call_module" else None
        if (not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or (bn.training and not include_training)
                or not bn.track_running_stats
                or bn.running_mean is None or calls[user.target] != 1 or user.args[0] is not node):
            continue
        g, h = batchnorm_affine(bn)
        modules[node.target].fold_affine(g, h)
        replace_module(model, user.target, nn.Identity().train(bn.training))
        folded.append((str(node.target), str(user.target)))
    return folded


class _FloatTracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaves = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm) + tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def fold_batchnorms_into_float(model: nn.Module, leaves: tuple[type, ...] = ()
                               ) -> tuple[list[tuple[str, str]], str | None]:
    """Fold every inference BatchNorm that directly follows a float ``nn.Conv2d`` / ``nn.Linear`` (the only user of
    that layer's output, each called once) into the layer's weight and bias, in place: ``W' = g * W``,
    ``b' = g * b + h`` per output channel. Run before quantization, so the quantizers see the folded weights and the
    simulated model computes what the exported one does. Returns the (layer, bn) pairs and, when torch.fx cannot
    trace the model (nothing is folded then), why. ``leaves``: further module types to keep whole while tracing (the
    quantized layers of a prepared or deploy model)."""
    try:
        graph = _FloatTracer(leaves).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "leave the model as it is"
        return [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    calls = _module_call_counts(graph)
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if type(layer) not in (nn.Conv2d, nn.Linear) or calls[node.target] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = modules.get(user.target) if user.op == "call_module" else None
        want = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
        if (type(bn) is not want or not bn.track_running_stats or bn.running_mean is None
                or bn.num_features != layer.weight.shape[0] or calls[user.target] != 1 or user.args[0] is not node
                or len(user.args) != 1 or user.kwargs):
            continue
        g, h = batchnorm_affine(bn)
        with torch.no_grad():
            w = layer.weight
            g = g.to(w)
            h = h.to(w)
            w.mul_(g.view(-1, *([1] * (w.dim() - 1))))
            if layer.bias is None:
                layer.bias = nn.Parameter(h.clone())
            else:
                layer.bias.mul_(g).add_(h)
        replace_module(model, user.target, nn.Identity().train(bn.training))  # the model's mode stays as it was
        folded.append((str(node.target), str(user.target)))
    return folded, None


class FoldBatchNormPass:
    """Graph pass: fold inference BatchNorms into the float conv / linear they follow, before the swap pass
    quantizes those layers (see :func:`fold_batchnorms_into_float`). Recorded in the report's notes."""

    label = "fold_bn"

    def run(self, model: nn.Module, ctx) -> None:
        bn_bytes = batchnorm_parameter_bytes(model)
        folded, why = fold_batchnorms_into_float(model)
        for layer, bn in folded:
            ctx.report.notes.append(f"BatchNorm {bn!r} folded into {layer!r} before quantization")
            ctx.report.folded_bytes += bn_bytes.get(bn, 0)  # part of the input model, gone from the prepared one
        if why is not None:
            ctx.report.notes.append(f"BatchNorms not folded (torch.fx cannot trace the model: {why})")
