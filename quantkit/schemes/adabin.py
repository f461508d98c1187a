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

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..graph.maxout import MaxoutPass
from ..graph.passes import SwapPass
from ..nn.adabin import AdaBinConv2d, AdaBinLinear, AdaBinOptions
from .base import SchemeConfig, register_scheme


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
        passes: list = [SwapPass(self.targets())]
        if self.maxout:
            passes.append(MaxoutPass(binary_convs=(AdaBinConv2d,), leaf_types=tuple(self.targets().values())))
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


register_scheme("adabin", AdaBinConfig)
