"""Deployed binary attention: packed projections (:class:`~quantkit.nn.binary_deploy.BinaryDeployLinear`) around
:func:`.core.binary_attention_packed`, one small module per call convention (torch MHA, timm qkv/proj, torchvision
Swin windows). FP parts (Swin's relative position bias, masks) stay float tensors. Inference only (no dropout)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..binary_deploy import BinaryDeployLinear
from .core import binary_attention_packed
from .heads import merge_heads, mha_inputs, self_attention_mask, split_qkv
from .swin import shifted_window_attention_forward


class BinaryAttentionDeploy(nn.Module):
    """What every deployed binary attention has: the packed in/out projections and the packed attention core
    ``_attend(q, k, v, bias)`` (one method; an exporter routes it through an exported unit by setting the
    ``attention_core`` hook). Subclasses give
    the call convention of the module they replace (``layout`` names it)."""

    layout = ""

    def __init__(self, num_heads: int, in_proj: BinaryDeployLinear, out_proj: BinaryDeployLinear, *, method: str,
                 beta: float, sab_scale: bool, logit_scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.embed_dim = out_proj.out_features
        self.in_proj, self.out_proj = in_proj, out_proj
        self.method, self.beta, self.sab_scale, self.logit_scale = method, beta, sab_scale, logit_scale
        #: a module computing the attention core in place of :func:`binary_attention_packed` (same arguments);
        #: the ONNX export sets it to write the core as one unit. None: the packed kernels
        self.attention_core: nn.Module | None = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        if self.attention_core is not None:
            return self.attention_core(q, k, v, bias)
        return binary_attention_packed(q, k, v, method=self.method, beta=self.beta, sab_scale=self.sab_scale,
                                       bias=bias, logit_scale=self.logit_scale)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, heads={self.num_heads}, method={self.method}, beta={self.beta:g}"


class MultiheadAttentionDeploy(BinaryAttentionDeploy):
    """Deployed :class:`~quantkit.nn.bivit.BinaryMultiheadAttention` (``nn.MultiheadAttention``'s signature;
    returns ``(output, None)``: the packed path does not materialise attention weights)."""

    layout = "mha"

    def __init__(self, num_heads: int, in_proj: BinaryDeployLinear, out_proj: BinaryDeployLinear, *,
                 batch_first: bool, **core: Any) -> None:
        super().__init__(num_heads, in_proj, out_proj, **core)
        self.batch_first = batch_first

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        q, k, v, bias = mha_inputs(self, self.in_proj, query, key, value, key_padding_mask, attn_mask, is_causal)
        y = self.out_proj(merge_heads(self._attend(q, k, v, bias)))
        if not self.batch_first and query.dim() == 3:
            y = y.transpose(0, 1)
        if query.dim() == 2:
            y = y.squeeze(0)
        return y, None


class QKVAttentionDeploy(BinaryAttentionDeploy):
    """Deployed :class:`~quantkit.nn.bivit.BinaryQKVAttention`: ``forward(x, attn_mask=None, is_causal=False)``."""

    layout = "qkv"

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = split_qkv(self.in_proj(x), self.num_heads)
        return self.out_proj(merge_heads(self._attend(q, k, v, self_attention_mask(attn_mask, is_causal, q))))


class ShiftedWindowAttentionDeploy(BinaryAttentionDeploy):
    """Deployed :class:`~quantkit.nn.bivit.BinaryShiftedWindowAttention`: ``forward(x)`` with ``x (B, H, W, C)``."""

    layout = "swin"

    def __init__(self, num_heads: int, in_proj: BinaryDeployLinear, out_proj: BinaryDeployLinear, *,
                 relative_position_bias: Tensor, window_size: list[int], shift_size: list[int], **core: Any) -> None:
        super().__init__(num_heads, in_proj, out_proj, **core)
        self.window_size, self.shift_size = window_size, shift_size
        self.register_buffer("relative_position_bias", relative_position_bias)

    def forward(self, x: Tensor) -> Tensor:
        return shifted_window_attention_forward(x, self.in_proj, self.out_proj,
                                                lambda q, k, v, b: self._attend(q, k, v, b),
                                                self.relative_position_bias, self.window_size, self.shift_size,
                                                self.num_heads, 0.0, False)


__all__ = ["BinaryAttentionDeploy", "MultiheadAttentionDeploy", "QKVAttentionDeploy", "ShiftedWindowAttentionDeploy"]
