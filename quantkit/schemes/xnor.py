"""``xnor``: the sign-binarization baseline (XNOR-Net weights, binary activations, clipped STE)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn.xnor import XnorConv2d, XnorLinear, XnorOptions
from .base import SchemeConfig, register_scheme


@dataclass
class XnorConfig(XnorOptions, SchemeConfig):
    name = "xnor"
    description = "binary weights (sign, mean|W| per channel) and binary activations (sign, clipped STE); QAT"
    mode = "qat"
    keep_first: bool = True
    keep_last: bool = True

    def targets(self) -> dict[type, type]:
        return {nn.Conv2d: XnorConv2d, nn.Linear: XnorLinear}


register_scheme("xnor", XnorConfig)
