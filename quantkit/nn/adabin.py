"""AdaBin layers (Tu et al., ECCV 2022; docs/algorithms.md#adabin): simulated ``AdaBinConv2d`` / ``AdaBinLinear``,
the ``Maxout`` nonlinearity, and their deploy forms running the bitwise kernels of :mod:`quantkit.ops.binary`.

The layers are the generic :class:`~quantkit.nn.layers.QuantConv2d` / ``QuantLinear`` with the ``adabin_act`` and
``adabin_weight`` quantizers. State names follow the float layer (``weight``, ``bias``) so float checkpoints load,
plus the official code's names where it has them (``alpha_a``, ``beta_a`` of the activation binarizer;
``pos_scale``, ``neg_scale`` of Maxout). The EDE parameters live in the buffers ``ede_k`` / ``ede_t`` (saved with
the state_dict so a resumed run continues with the same surrogate; missing from a float checkpoint is fine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.elementwise import maxout
from ..quantizers.adabin import AdaBinActOptions, AdaBinWeightOptions
from .base import NotQuantizable
from .layers import LayerQuantizers, QuantConv2d, QuantLinear

# torch.fx records maxout as one call (its kernel/reference choice is Python control flow)
torch.fx.wrap("maxout")


def is_downsample_conv(name: str, module: nn.Module) -> bool:
    """A residual shortcut projection: a 1x1 conv that strides, or one inside a module named ``downsample`` /
    ``shortcut`` (torchvision and most CIFAR ResNets). AdaBin keeps these full precision by default."""
    if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != (1, 1):
        return False
    parts = name.split(".")
    return max(module.stride) > 1 or any(p in ("downsample", "shortcut") for p in parts)


@dataclass
class AdaBinOptions(LayerQuantizers, AdaBinActOptions, AdaBinWeightOptions):
    """The AdaBin quantizers and their options; ``weight_only``: binarize weights only (activations stay FP).
    Placement rules apply when a config is given (``from_float`` without one binarizes any conv it can)."""

    input_quantizer: str | None = "adabin_act"
    weight_quantizer: str = "adabin_weight"
    weight_only: bool = False
    #: placement: residual downsample shortcuts (1x1 convs) stay full precision
    keep_downsample: bool = True


class _AdaBinPreset:
    """The AdaBin preset of the generic layers: its quantizer names, the ``weight_only`` switch, and ``alpha_a`` /
    ``beta_a`` reading None on a weight-only layer."""

    Options = AdaBinOptions

    @classmethod
    def quantizer_names(cls, options: Any) -> tuple[str | None, str]:
        return (None if options.weight_only else options.input_quantizer), options.weight_quantizer

    @property
    def weight_only(self) -> bool:
        return self.input_quantizer is None  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        if name in ("alpha_a", "beta_a") and (self.__dict__.get("_modules") or {}).get("input_quantizer") is None:
            return None
        return super().__getattr__(name)  # type: ignore[misc]


class AdaBinConv2d(_AdaBinPreset, QuantConv2d):
    """AdaBin binary convolution (official ``AdaBin_Conv2d``): y = conv(a_b, W_b) (+ bias), zero padding applied
    to the binarized input (padded taps are 0, not a binary level).

    a_b: :func:`quantkit.quantizers.adabin.adabin_activation` (learnable ``alpha_a``, ``beta_a``);
    W_b: :func:`quantkit.quantizers.adabin.adabin_weight` (per output channel, EDE surrogate).
    Grouped / depthwise convolutions are not binarized (``from_float`` raises :class:`NotQuantizable`).
    """

    @classmethod
    def check_placement(cls, module: nn.Module, config: Any, name: str) -> None:
        if config is not None and config.keep_downsample and is_downsample_conv(name, module):
            raise NotQuantizable(
                "downsample shortcut (1x1 conv) kept full precision (AdaBin placement; set keep_downsample=False "
                f"or rules={{{name!r}: {{'keep_downsample': False}}}} to binarize it)")


class AdaBinLinear(_AdaBinPreset, QuantLinear):
    """AdaBin binary linear layer: y = a_b @ W_b^T (+ bias), W_b per output row (same binarizers as
    :class:`AdaBinConv2d`)."""


class Maxout(nn.Module):
    """AdaBin's nonlinearity (official ``Maxout``), per channel c (dim 1 of the input):

    forward:  f(x) = gamma+_c * max(x, 0) - gamma-_c * max(-x, 0)  =  x * (gamma+_c if x > 0 else gamma-_c)
    backward: df/dx = gamma+_c for x > 0, gamma-_c for x < 0;  df/dgamma+_c = max(x, 0);  df/dgamma-_c = -max(-x, 0)

    At inference the second form runs as one fused pass (:func:`quantkit.ops.maxout`, bit-identical values): at deploy
    time this elementwise op would otherwise cost more than the binary convolutions around it.

    ``gamma+`` (``pos_scale``) starts at 1.0 and ``gamma-`` (``neg_scale``) at 0.25; both are learnable and
    unconstrained (some become negative in the released checkpoint).
    """

    def __init__(self, channels: int, neg_init: float = 0.25, pos_init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.pos_scale = nn.Parameter(torch.full((channels,), pos_init, device=device, dtype=dtype))
        self.neg_scale = nn.Parameter(torch.full((channels,), neg_init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # scales follow the input's dtype so a bf16 activation under autocast stays bf16; at inference a fused
        # one-pass kernel (quantkit.ops.maxout, same values)
        return maxout(x, self.pos_scale, self.neg_scale)

    def extra_repr(self) -> str:
        return f"{self.channels}"


__all__ = ["AdaBinConv2d", "AdaBinLinear", "AdaBinOptions", "Maxout", "is_downsample_conv"]
