"""Deploy-time pass: run each ``conv -> [ReLU] -> MaxPool2d`` chain (a ResNet stem, its BatchNorm already folded)
as one :class:`~quantkit.nn.conv_pool.TiledConvPool`, a few images at a time with the ReLU inside the pool kernel
(why: quantkit/nn/conv_pool.py).

The chain is matched on the deploy model's torch.fx graph: a float ``nn.Conv2d`` or a uniform deploy conv whose
output goes only (through ``nn.Identity`` left by folded BatchNorms) to an ``nn.ReLU`` whose output goes only to an
``nn.MaxPool2d`` (or straight to the pool), each module called once, the pool plain (dilation 1, floor mode, no
indices). The conv's place gets the tiled module, the ReLU's and the pool's an ``nn.Identity``. Models torch.fx cannot
trace are left as they are. Exporters undo it with :func:`~quantkit.nn.conv_pool.untile_conv_pools`.
"""
from __future__ import annotations

from torch import fx, nn

from ..nn.conv_pool import TiledConvPool
from ..nn.uniform import UniformDeployConv2d
from .fold import _module_call_counts
from .passes import QuantkitLeafTracer, calls_module, replace_module

_CONVS = (nn.Conv2d, UniformDeployConv2d)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module_of(node: fx.Node | None, modules: dict, kind) -> nn.Module | None:
    """The ``kind`` submodule ``node`` calls on one positional input, else None."""
    if not calls_module(node, modules, kind) or len(node.args) != 1 or node.kwargs:
        return None
    return modules[node.target]


def _plain_pool(pool: nn.MaxPool2d) -> bool:
    return pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices


def match_conv_pools(model: nn.Module) -> list[tuple[str, str | None, str]]:
    """Paths ``(conv, relu or None, pool)`` of every chain of the module docstring in ``model``."""
    try:
        graph = QuantkitLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model is simply not tiled
        return []
    modules = dict(model.named_modules())
    calls = _module_call_counts(graph)
    chains = []
    for node in graph.nodes:
        conv = _module_of(node, modules, _CONVS)
        if conv is None or getattr(conv, "groups", 1) != 1:
            continue
        nxt = _only_user(node)
        while _module_of(nxt, modules, nn.Identity) is not None:
            nxt = _only_user(nxt)
        relu = nxt if _module_of(nxt, modules, nn.ReLU) is not None else None
        pool = _only_user(relu) if relu is not None else nxt
        pool_mod = _module_of(pool, modules, nn.MaxPool2d)
        if pool_mod is None or not _plain_pool(pool_mod):
            continue
        chain = [node.target] + ([relu.target] if relu is not None else []) + [pool.target]
        if any(calls.get(name, 0) != 1 for name in chain):
            continue  # a module called twice shares its state with another call
        chains.append((node.target, relu.target if relu is not None else None, pool.target))
    return chains


def tile_conv_pools(model: nn.Module) -> list[str]:
    """Replace every matched chain of ``model`` in place (module docstring); returns report notes."""
    notes = []
    for conv, relu, pool in match_conv_pools(model):
        get = model.get_submodule
        tiled = TiledConvPool(get(conv), get(relu) if relu else None, get(pool), (conv, relu, pool))
        replace_module(model, conv, tiled)
        for place in (relu, pool):
            if place is not None:
                replace_module(model, place, nn.Identity())
        how = ("one stem kernel (direct conv, rows pooled while in cache)" if tiled.stem_kernel_fits()
               else "one tiled stem (a few images at a time, the ReLU inside the pool kernel)")
        notes.append(f"{conv!r}{' -> ' + repr(relu) if relu else ''} -> {pool!r} run as {how}")
    return notes


__all__ = ["match_conv_pools", "tile_conv_pools"]
