"""A float-model rewrite for AdderNet: a CNN's convolutions become :class:`~quantkit.nn.adder.AdderConv2d`."""
from __future__ import annotations

import copy
import difflib

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..nn.adder import AdderConv2d
from .passes import replace_module
from .trace import trace


def adderize(model: nn.Module, *, keep_first: bool = True, keep_last: bool = True, skip: tuple = (),
             copy_weights: bool = False, eta: float | None = 0.2, inplace: bool = False) -> nn.Module:
    """Replace a CNN's ``nn.Conv2d`` layers by :class:`AdderConv2d` (in execution order, found with :func:`~quantkit.graph.trace`).

    As in the AdderNet papers the stem (the first convolution) and a convolutional classifier (the last layer, if it is
    an ``nn.Conv2d``) stay multiplicative (``keep_first`` / ``keep_last``); ``nn.Linear`` layers are never changed.
    Grouped/depthwise convolutions and non-zero padding modes are kept too (AdderConv2d supports groups = 1 only).
    Adder filters are new N(0, 1) parameters (``copy_weights=False``; a CNN's filters are not meaningful adder
    filters): train the result. Returns the new model (a copy unless ``inplace``).
    """
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    unknown = [n for n in skip if n not in dict(model.named_modules())]
    if unknown:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        close = difflib.get_close_matches(unknown[0], names, n=5, cutoff=0.5) or names[:5]
        raise ConfigError(f"adderize: skip entry {unknown[0]!r} names no layer of {type(model).__name__}; "
                          f"close matches: {', '.join(map(repr, close)) or 'none'}")
    work = model if inplace else copy.deepcopy(model)
    order = trace(work, None, ()).order
    modules = dict(work.named_modules())
    layers = [n for n in order if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
    if not any(isinstance(modules[n], nn.Conv2d) for n in layers):
        raise UnsupportedModelError(f"adderize: {type(model).__name__} has no nn.Conv2d to turn into an adder layer")
    for i, name in enumerate(layers):
        conv = modules[name]
        if not isinstance(conv, nn.Conv2d) or name in skip:
            continue
        if (keep_first and i == 0) or (keep_last and i == len(layers) - 1):
            continue
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        new = AdderConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, 1, conv.bias is not None, eta, device=conv.weight.device,
                          dtype=conv.weight.dtype)
        if copy_weights:
            new.load_state_dict(conv.state_dict())
        replace_module(work, name, new)
    return work


__all__ = ["adderize"]
