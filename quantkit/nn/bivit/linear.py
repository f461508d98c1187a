"""BiViT's binary linear layer with parameterized weight scales (PWS, BiViT Sec. 3.3.2): the generic
:class:`~quantkit.nn.layers.QuantLinear` with the ``bivit_sign`` input quantizer (or a float input, the MLP "1/32"
setting) and the ``pws`` weight quantizer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ...quantizers.softmax import PWSOptions
from ..layers import LayerQuantizers, QuantLinear


@dataclass
class BiViTLinearOptions(LayerQuantizers, PWSOptions):
    """The quantizers of BiViT's linears and their options (``pws``, ``sign_of_zero``)."""

    input_quantizer: str | None = "bivit_sign"
    weight_quantizer: str = "pws"


class BinaryLinearPWS(QuantLinear):
    """Linear layer with binary weights and parameterized weight scales (BiViT Sec. 3.3.2).

    forward (``binarize=True``): ``y = (x_in @ sign(W - mean_row(W))^T) * s + b`` (= ``x_in @ W_b^T + b``) with
    ``x_in = sign(x)`` (clipped STE) when ``binary_input`` else ``x``; the gradients are those of
    :func:`quantkit.quantizers.softmax.pws_binarize_weight` and :func:`quantkit.quantizers.softmax.bivit_sign`.
    ``s`` (``scale``, shape (out, 1)) is learned when ``learned_scale`` (PWS), initialised on the first binarized
    forward to ``mean|W[o]|`` of the raw weight; otherwise ``s = mean|W[o]|`` recomputed and detached (BiViT's
    "ordinary" scales, ``BinaryLinear_STE``). ``binarize=False``: the plain float layer (cross-layer binarization,
    stage 1), which also deploys as the float ``nn.Linear`` it runs as. The bias stays float.
    """

    Options = BiViTLinearOptions

    @classmethod
    def from_float(cls, module: nn.Linear, config: Any = None, name: str = "", *, binary_input: bool = True,
                   role: str = "attention") -> "BinaryLinearPWS":
        extra = {} if binary_input else {"input_quantizer": None}
        new = super().from_float(module, config, name, **extra)
        new.role = role
        return new

    # ---- the layer's options, as attributes -------------------------------------------------------------------
    @property
    def binarize(self) -> bool:
        return self.enabled

    @binarize.setter
    def binarize(self, value: bool) -> None:
        self.enabled = bool(value)

    @property
    def binary_input(self) -> bool:
        return self.input_quantizer is not None

    @property
    def sign_of_zero(self) -> int:
        return self.weight_quantizer.sign_of_zero

    @sign_of_zero.setter
    def sign_of_zero(self, value: int) -> None:
        for q in self.quantizers:
            q.sign_of_zero = value

    def current_scale(self) -> Tensor:
        """The per-row scale s (out, 1) the binarized forward uses (initialising the learned one on first use)."""
        return self.weight_quantizer.current_scale(self.weight)

    def binary_weight(self) -> Tensor:
        """``s * sign(W - mean_row(W))`` with its surrogate gradients."""
        return self.weight_quantizer(self.weight)

    def weight_nbytes(self) -> int:
        n = self.weight.numel() / 8 + self.out_features * 4  # 1 bit per weight + a float scale per row
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return int(math.ceil(n))

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "input": "binary" if self.binary_input else "fp",
                **self.weight_quantizer.describe(), "binarized_now": bool(self.binarize)}

    def extra_repr(self) -> str:
        return (f"{nn.Linear.extra_repr(self)}, binary_input={self.binary_input}, "
                f"learned_scale={self.learned_scale}, role={self.role}, binarize={self.binarize}")


__all__ = ["BinaryLinearPWS", "BiViTLinearOptions"]
