"""Uniform baselines: ``w8a8`` and ``w4a4`` (per-channel symmetric weights, per-tensor affine activations)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..graph.fold import FoldBatchNormPass
from ..graph.passes import SwapPass
from ..nn.uniform import QuantConv2d, QuantLinear, UniformOptions
from .base import SchemeConfig, check_bits, register_scheme


@dataclass
class UniformConfig(UniformOptions, SchemeConfig):
    name = "uniform"
    description = "uniform affine quantization: per-channel symmetric weights, per-tensor affine activations"
    mode = "ptq"

    #: fold each inference BatchNorm into the conv / linear before it, before quantizing (what integer runtimes run,
    #: so the simulated model is the exported one); False keeps BatchNorms as float layers
    fold_bn: bool = True

    def targets(self) -> dict[type, type]:
        return {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}

    def passes(self) -> list:
        return ([FoldBatchNormPass()] if self.fold_bn else []) + [SwapPass(self.targets())]

    def validate(self) -> None:
        super().validate()
        check_bits(self.name, "bits_w", self.bits_w, 2, 8)
        check_bits(self.name, "bits_a", self.bits_a, 2, 8)
        if not isinstance(self.fold_bn, bool):
            raise ConfigError(f"scheme {self.name!r}: fold_bn={self.fold_bn!r} must be True or False")
        if self.observer not in ("minmax", "percentile"):
            raise ConfigError(f"scheme {self.name!r}: observer={self.observer!r}; use 'minmax' or 'percentile'")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"scheme {self.name!r}: percentile={self.percentile!r} must be in (50, 100]")


@dataclass
class W8A8Config(UniformConfig):
    name = "w8a8"
    description = "8-bit weights (per channel, symmetric) and activations (per tensor, min/max observer)"


@dataclass
class W4A4Config(UniformConfig):
    name = "w4a4"
    description = "4-bit weights (per channel, symmetric) and activations (per tensor, 99.99th percentile observer)"
    bits_w: int = 4
    bits_a: int = 4
    observer: str = "percentile"


register_scheme("w8a8", W8A8Config)
register_scheme("w4a4", W4A4Config)
