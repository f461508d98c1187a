"""Deploy-time fusion of residual blocks (run by ``quantkit.convert`` after the BatchNorm folds):

* an inference BatchNorm that directly follows a full-precision ``nn.Conv2d`` (a binary net's stem and 1x1
  shortcuts) is folded into that conv's weight and bias -- one memory pass less, the conv's own layout unchanged;
* every residual block ``act2(conv2(act1(conv1(x))) + shortcut(x))`` of binary-input deploy convs (acts: Maxout
  or nothing; ``Identity`` left by folded BatchNorms anywhere in between) becomes a
  :class:`~quantkit.nn.binary_fused.FusedBinaryBlock`: two kernel calls whose epilogues do the Maxouts, the
  residual add and the packing of conv2's input (docs/kernels.md#fused-epilogues);
* every such block of quantized adder deploy convs (acts: ReLU or nothing) becomes a
  :class:`~quantkit.nn.adder_fused.FusedAdderBlock`: two kernel calls whose epilogues do the ReLUs and the
  residual add;
* :func:`link_block_chain` (run by ``convert`` after the stem tiling) lets each fused binary block or stem whose
  output is a fused binary block's input pack that output for it in its last pass.

Blocks are matched on their torch.fx graph, one submodule at a time: a block whose graph has anything else (another
op, a value used twice, a layer called twice) is left as it is. Exporters undo the block fusion with
:func:`~quantkit.nn.fused_block.unfuse_blocks`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from ..nn.adabin import Maxout
from ..nn.adder_fused import FusedAdderBlock
from ..nn.adder_quant import AdderDeployConv2d
from ..nn.binary_deploy import BinaryDeployConv2d, BinaryDeployLinear
from ..nn.binary_fused import FusedBinaryBlock
from ..nn.fused_block import FusedResidualBlock
from .fold import _module_call_counts, fold_batchnorms_into_float
from .passes import QuantkitLeafTracer, calls_module, replace_module

_ADD = (operator.add, operator.iadd, torch.add)
_LEAVES = (BinaryDeployConv2d, BinaryDeployLinear, Maxout, AdderDeployConv2d, FusedResidualBlock)


@dataclass(frozen=True)
class BlockKind:
    """What a fusable block is made of: its conv type, its activation type, a check on the two convs and the fused
    module that replaces it."""

    conv: type
    act: type
    convs_fit: Callable[[nn.Module, nn.Module], bool]
    fused: type


def _binary_convs_fit(c1: BinaryDeployConv2d, c2: BinaryDeployConv2d) -> bool:
    return not c1.float_input and not c2.float_input and c1.out_channels == c2.in_channels


def _adder_convs_fit(c1: AdderDeployConv2d, c2: AdderDeployConv2d) -> bool:
    return c1.weight_int.shape[0] == c2.weight_int.shape[1]


BINARY_BLOCK = BlockKind(BinaryDeployConv2d, Maxout, _binary_convs_fit, FusedBinaryBlock)
ADDER_BLOCK = BlockKind(AdderDeployConv2d, nn.ReLU, _adder_convs_fit, FusedAdderBlock)


class _BlockTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _BlockTracer().trace(module)
    except Exception:  # noqa: BLE001 - an untraceable module is simply not fused
        return None


def fold_float_conv_batchnorms(model: nn.Module) -> list[tuple[str, str]]:
    """Fold each BatchNorm that is the only user of a float conv / linear into it, in place (the deploy model's FP
    stem and shortcuts; :func:`.fold.fold_batchnorms_into_float` with the deploy layers kept whole). Returns
    (layer, bn)."""
    return fold_batchnorms_into_float(model, leaves=_LEAVES)[0]


def _skip_identities(node, modules):
    while (isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity)
           and len(node.users) == 1 and len(node.args) == 1):
        node = node.args[0]
    return node


def match_block(block: nn.Module, kind: BlockKind = BINARY_BLOCK) -> tuple | None:
    """The fusion plan ``(conv1, act1, conv2, shortcut, act2)`` of ``block`` (attribute paths; acts may be None,
    shortcut a list of modules applied in order), or None when its graph is not exactly a residual block of
    ``kind``."""
    graph = _trace(block)
    if graph is None:
        return None
    modules = dict(block.named_modules())
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return None
    x = inputs[0]
    v = outputs[0].args[0]
    act2 = None
    if calls_module(v, modules, kind.act) and len(v.args) == 1:
        act2, v = v, v.args[0]
    is_add = (v.op == "call_function" and v.target in _ADD) or (v.op == "call_method" and v.target in ("add", "add_"))
    if not is_add or len(v.args) != 2 or v.kwargs or len(v.users) != 1:
        return None
    add = v
    for main, short in (add.args, add.args[::-1]):
        conv2 = _skip_identities(main, modules)
        if calls_module(conv2, modules, kind.conv):
            break
    else:
        return None
    shortcut, s = [], short
    while s is not x:
        if not (isinstance(s, fx.Node) and s.op == "call_module" and len(s.args) == 1 and not s.kwargs
                and len(s.users) == 1):
            return None
        shortcut.append(s)
        s = s.args[0]
    shortcut.reverse()
    if len(conv2.args) != 1 or conv2.kwargs or len(conv2.users) != 1:
        return None
    a = _skip_identities(conv2.args[0], modules)
    act1 = None
    if calls_module(a, modules, kind.act) and len(a.args) == 1 and len(a.users) == 1:
        act1, a = a, _skip_identities(a.args[0], modules)
    conv1 = a
    if not calls_module(conv1, modules, kind.conv) or conv1.args != (x,) or conv1.kwargs:
        return None
    if not kind.convs_fit(modules[conv1.target], modules[conv2.target]) or len(conv1.users) != 1:
        return None
    # every node of the graph is part of the pattern (nothing else is computed), each layer called once
    between = {n for n in nodes if n.op == "call_module" and isinstance(modules.get(n.target), nn.Identity)}
    used = {x, outputs[0], add, conv1, conv2, *shortcut} | ({act1} if act1 else set()) | ({act2} if act2 else set())
    if set(nodes) - used - between:
        return None
    calls = _module_call_counts(graph)
    if calls[conv1.target] != 1 or calls[conv2.target] != 1 or any(calls[s.target] != 1 for s in shortcut):
        return None
    return (str(conv1.target), None if act1 is None else str(act1.target), str(conv2.target),
            [str(s.target) for s in shortcut], None if act2 is None else str(act2.target))


def fuse_blocks(model: nn.Module, kind: BlockKind) -> list[str]:
    """Replace (in place) every submodule of ``model`` that :func:`match_block` accepts as a ``kind`` block by
    ``kind.fused``; returns their names. The root module itself is never replaced."""
    fused = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(f + ".") for f in fused):
            continue
        if not any(isinstance(m, kind.conv) for m in module.children()):
            continue
        plan = match_block(module, kind)
        if plan is None:
            continue
        replace_module(model, name, kind.fused(module, *plan))
        fused.append(name)
    return fused


def _users_past_identities(node: fx.Node, modules: dict) -> list[fx.Node]:
    """The users of ``node``'s value, looking through ``nn.Identity`` calls (they return the very tensor)."""
    users = []
    for u in node.users:
        if calls_module(u, modules, nn.Identity) and u.args == (node,) and not u.kwargs:
            users.extend(_users_past_identities(u, modules))
        else:
            users.append(u)
    return users


def _block_successors(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, consumer) paths where the consumer, a fused binary block, takes the producer's output as its
    input (``nn.Identity`` calls in between), the producer a fused binary block or a stem (``TiledConvPool``), from
    the model's torch.fx graph (quantkit modules as leaves); where the model does not trace, consecutive fused blocks
    of each ``nn.Sequential`` (whose semantics are known without a trace)."""
    from ..nn.conv_pool import TiledConvPool

    modules = dict(model.named_modules())
    try:
        graph = QuantkitLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model: the Sequential rule below
        graph = None
    pairs = []
    if graph is not None:
        for node in graph.nodes:
            if not calls_module(node, modules, (FusedBinaryBlock, TiledConvPool)):
                continue
            users = _users_past_identities(node, modules)
            takers = [u for u in users if calls_module(u, modules, FusedBinaryBlock) and len(u.args) == 1
                      and not u.kwargs]
            if len(takers) == 1:
                pairs.append((str(node.target), str(takers[0].target)))
        return pairs
    for name, seq in modules.items():
        if isinstance(seq, nn.Sequential):
            kids = list(seq.named_children())
            for (a, ma), (b, mb) in zip(kids, kids[1:]):
                if isinstance(ma, FusedBinaryBlock) and isinstance(mb, FusedBinaryBlock):
                    pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b))
    return pairs


def link_block_chain(model: nn.Module) -> list[str]:
    """Let each fused binary block or stem whose output is the input of a fused binary block pack that output for
    it in its last pass (:meth:`~quantkit.nn.binary_fused.HandsOutputBits.hand_output_to`; the bits are used only
    when the consumer's input is that very tensor). In place, after the stem tiling; returns report notes."""
    pairs = _block_successors(model)
    for producer, consumer in pairs:
        model.get_submodule(producer).hand_output_to(model.get_submodule(consumer))
    if not pairs:
        return []
    return [f"{len(pairs)} module(s) pack their output for the next fused binary block in their last pass: "
            + ", ".join(f"{a} -> {b}" for a, b in pairs)]


def fuse_deploy_blocks(model: nn.Module) -> list[str]:
    """The fusions of the module docstring on a deploy model, in place; returns report notes."""
    notes = []
    if any(isinstance(m, BinaryDeployConv2d) for m in model.modules()):
        folded = fold_float_conv_batchnorms(model)
        if folded:
            notes.append("full-precision conv BatchNorms folded: "
                         + ", ".join(f"{bn!r} into {c!r}" for c, bn in folded))
        blocks = fuse_blocks(model, BINARY_BLOCK)
        if blocks:
            notes.append(f"{len(blocks)} binary residual block(s) fused into two kernel calls each (Maxout, residual "
                         "add and the next conv's packing in the epilogues): " + ", ".join(blocks))
    if any(isinstance(m, AdderDeployConv2d) for m in model.modules()):
        blocks = fuse_blocks(model, ADDER_BLOCK)
        if blocks:
            notes.append(f"{len(blocks)} adder residual block(s) fused into two kernel calls each (ReLUs and the "
                         "residual add in the epilogues): " + ", ".join(blocks))
    return notes


__all__ = ["fuse_deploy_blocks", "fuse_blocks", "link_block_chain", "fold_float_conv_batchnorms", "match_block",
           "BlockKind", "BINARY_BLOCK", "ADDER_BLOCK"]
