"""Graph pass of the uniform schemes: round the output of every conv that feeds a residual Add to an 8-bit grid.

An integer runtime runs a conv as ``QLinearConv`` only when its output is requantized (``Conv [-> Relu] -> Q``). A
conv whose output feeds the next quantized layer has that quantizer already; a conv whose output is summed with a
shortcut (ResNet's ``conv2`` and ``downsample``; a stem ``conv -> relu -> maxpool`` whose output is also a shortcut)
has none, so onnxruntime keeps it a float Conv of dequantized values. This pass gives such convs an output grid
(:meth:`QuantConv2d.enable_output_quant <quantkit.nn.layers.QuantConv2d.enable_output_quant>`, the ``uniform_output`` quantizer, min/max calibrated, 8 bits), in simulation as in the
deploy and exported models, so all three stay the same model.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

#: modules and functions a value passes through unchanged in sign / order on its way to the Add
_PASS_MODULES = (nn.Identity, nn.ReLU, nn.MaxPool2d, nn.Dropout)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.max_pool2d, torch.max_pool2d}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_RELUS = (nn.ReLU,)


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _RELUS)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _feeds_add(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value reaches an Add through pass-through ops only."""
    seen, todo = set(), list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if _is_add(user):
            return True
        if _passes_through(user, modules):
            todo.extend(user.users)
    return False


def _relu_follows(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s only consumer, through Identity modules (folded BatchNorms), is a ReLU."""
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity):
            continue
        return _is_relu(node, modules)
    return False


def quantize_residual_outputs(model: nn.Module, graph: fx.Graph, bits: int = 8) -> list[str]:
    """Enable output rounding on every uniform conv of ``model`` that feeds a residual Add (``graph``: its fx
    graph, convs as leaves, each called once); returns their names."""
    from ..nn.uniform import QuantConv2d

    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    done = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if (not isinstance(layer, QuantConv2d) or layer.weight_quantizer.deploy != "uniform"
                or calls[node.target] != 1 or not _feeds_add(node, modules)):
            continue
        layer.enable_output_quant(bits, relu=_relu_follows(node, modules))
        done.append(str(node.target))
    return done


class QuantizeResidualPass:
    """Run :func:`quantize_residual_outputs` after the swap pass; the report notes which convs it changed (or
    that the model could not be traced, which leaves every conv output float)."""

    label = "quantize_residual"

    def run(self, model: nn.Module, ctx) -> None:
        gm = ctx.trace.graph_module
        if gm is None:
            ctx.report.notes.append("residual conv outputs left float (torch.fx cannot trace the model): "
                                    "onnxruntime runs those convs in float")
            return
        done = quantize_residual_outputs(model, gm.graph)
        if done:
            ctx.report.notes.append(f"output of {len(done)} conv(s) feeding a residual Add rounded to 8 bits (so "
                                    f"integer runtimes requantize it in the conv): {', '.join(done)}")
