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


def fold_batchnorms(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable (deploy layer -> BatchNorm) pair of ``model`` in place; returns (layer, bn) names.
    Models torch.fx cannot trace are left as they are (an empty list)."""
    try:
        graph = _DeployTracer().trace(model)
    except Exception:
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
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
        if (not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.training or not bn.track_running_stats
                or bn.running_mean is None or calls[user.target] != 1 or user.args[0] is not node):
            continue
        g, h = batchnorm_affine(bn)
        modules[node.target].fold_affine(g, h)
        replace_module(model, user.target, nn.Identity())
        folded.append((str(node.target), str(user.target)))
    return folded
