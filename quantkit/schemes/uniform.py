"""Uniform baselines: ``w8a8`` and ``w4a4`` (per-channel symmetric weights, per-tensor affine activations)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..graph.fold import FoldBatchNormPass
from ..graph.passes import SwapPass
from ..graph.residual import QuantizeResidualPass
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
    #: round the output of each conv that feeds a residual Add to an 8-bit grid (what an integer runtime's
    #: QLinearConv writes; quantkit.graph.residual), so onnxruntime runs every conv of a ResNet as QLinearConv;
    #: False keeps those outputs float (those convs then run as float Convs in onnxruntime)
    quantize_residual: bool = True

    def targets(self) -> dict[type, type]:
        return {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}

    def passes(self) -> list:
        return (([FoldBatchNormPass()] if self.fold_bn else []) + [SwapPass(self.targets())]
                + ([QuantizeResidualPass()] if self.quantize_residual else []))

    def validate(self) -> None:
        super().validate()
        check_bits(self.name, "bits_w", self.bits_w, 2, 8)
        check_bits(self.name, "bits_a", self.bits_a, 2, 8)
        for flag in ("fold_bn", "quantize_residual"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"scheme {self.name!r}: {flag}={getattr(self, flag)!r} must be True or False")
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
