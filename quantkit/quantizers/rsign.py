"""ReActNet's RSign (Liu et al., "ReActNet: Towards Precise Binary Neural Network with Generalized Activation
Functions", ECCV 2020): a sign with a learnable per-channel threshold."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Quantizer, register_quantizer
from .binary import sign_ste


def rsign(x: Tensor, threshold: Tensor) -> Tensor:
    """RSign: forward b = sign(x - t_c) (+1 where x >= t_c), t_c learnable per input channel c;
    backward (clipped STE): db/dx = 1[|x - t_c| <= 1], db/dt_c = -1[|x - t_c| <= 1] (summed over the channel)."""
    return sign_ste(x - threshold)


@register_quantizer("rsign")
class RSign(Quantizer):
    """Binary input :func:`rsign`; ``learned_threshold`` starts at 0. Deploy: bit = (x >= t_c), a_b = s."""

    kind = "input"
    optional_state = ("learned_threshold",)

    def __init__(self, *, weight: Tensor, channels: int) -> None:
        super().__init__()
        shape = (channels, 1, 1) if weight.dim() == 4 else (channels,)  # channel dim 1 (NCHW) or last (linear)
        self.learned_threshold = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rsign(x, self.learned_threshold)

    def threshold(self) -> Tensor:
        return self.learned_threshold.detach().float().flatten()

    def affine(self) -> tuple[float, float]:
        return 1.0, 0.0
