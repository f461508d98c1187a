"""Simulated binary attention modules replacing torch's ``nn.MultiheadAttention``, timm-style qkv/proj attention and
torchvision's Swin ``ShiftedWindowAttention``: binary projections (:class:`BinaryLinearPWS`, binary inputs), the
binary attention core of :mod:`.core`, and FP masks / biases. With ``binarize=False`` each computes what the replaced
module computes (the tests check the rewiring that way)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ...quantizers.softmax import check_packable, check_sign_of_zero
from ..base import NotQuantizable, QuantModule
from .core import attention_binarizer, binary_attention
from .deploy import (BinaryAttentionDeploy, MultiheadAttentionDeploy, QKVAttentionDeploy,
                     ShiftedWindowAttentionDeploy)
from .heads import merge_heads, mha_inputs, self_attention_mask, split_qkv
from .linear import BinaryLinearPWS, BiViTLinearOptions
from .swin import relative_position_bias, shifted_window_attention_forward


@dataclass
class BinaryAttentionOptions(BiViTLinearOptions):
    """The attention core's options: ``attention`` ("sab" | "bibert", :data:`.core.ATTENTION_BINARIZERS`),
    ``beta`` (SAB threshold factor), ``sab_scale`` (scale the {0,1} attention by its per-row basis)."""

    attention: str = "sab"
    beta: float = 0.25
    sab_scale: bool = False


class _AttentionCoreMixin:
    """Attention settings shared by the simulated wrappers."""

    method: str
    beta: float
    sab_scale: bool
    binarize: bool

    def _set_core(self, config: Any) -> None:
        options = BinaryAttentionOptions() if config is None else config
        attention_binarizer(options.attention)  # a clear error for an unknown method
        self.method = options.attention
        self.beta = float(options.beta)
        self.sab_scale = bool(options.sab_scale)
        self.sign_of_zero = check_sign_of_zero(options.sign_of_zero)
        self.binarize = True

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float,
                logit_scale: float | None = None) -> tuple[Tensor, Tensor]:
        return binary_attention(q, k, v, method=self.method, beta=self.beta, sab_scale=self.sab_scale, bias=bias,
                                dropout_p=dropout_p, training=self.training, logit_scale=logit_scale,
                                binarize=self.binarize, sign_of_zero=self.sign_of_zero)

    def _core_info(self) -> dict[str, Any]:
        return {"attention": attention_binarizer(self.method).label(self.beta, self.sab_scale)}

    def _deploy_core(self) -> dict[str, Any]:
        if not self.binarize:  # the deploy form is binary attention only: it would not compute what ran
            raise UnsupportedModelError(
                f"{type(self).__name__}: binarize=False (float attention) has no deploy form; set binarize=True "
                "(and train) before convert")
        check_packable(self.sign_of_zero, f"{type(self).__name__} (Q/K/V signs)")
        return {"method": self.method, "beta": self.beta, "sab_scale": self.sab_scale}

    def _linears_nbytes(self) -> int:
        total = 0
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, BinaryLinearPWS):
                total += m.weight_nbytes()
        return total


class BinaryMultiheadAttention(_AttentionCoreMixin, QuantModule):
    """Binary replacement of ``torch.nn.MultiheadAttention`` (packed in-projection ``in_proj_weight``, ``out_proj``).

    Same call signature and return value as the float module (``(output, weights)``; weights are the binary
    attention averaged over heads when ``need_weights``). A float checkpoint of the replaced module loads into it
    (``in_proj_weight``/``in_proj_bias`` are mapped onto ``in_proj.weight``/``in_proj.bias``).
    """

    bits_w = 1
    bits_a = 1

    def __init__(self, embed_dim: int, num_heads: int, in_proj: BinaryLinearPWS, out_proj: BinaryLinearPWS,
                 dropout: float, batch_first: bool, config: Any = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = in_proj
        self.out_proj = out_proj
        self._set_core(config)

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, config: Any = None, name: str = "") -> "BinaryMultiheadAttention":
        if not module._qkv_same_embed_dim:
            raise NotQuantizable("MultiheadAttention with kdim/vdim != embed_dim is not supported; left FP")
        if module.bias_k is not None or module.add_zero_attn:
            raise NotQuantizable("MultiheadAttention with add_bias_kv/add_zero_attn is not supported; left FP")
        e = module.embed_dim
        in_lin = nn.Linear(e, 3 * e, bias=module.in_proj_bias is not None, device=module.in_proj_weight.device,
                           dtype=module.in_proj_weight.dtype)
        with torch.no_grad():
            in_lin.weight.copy_(module.in_proj_weight)
            if module.in_proj_bias is not None:
                in_lin.bias.copy_(module.in_proj_bias)
        in_proj = BinaryLinearPWS.from_float(in_lin, config, name + ".in_proj", binary_input=True)
        out_proj = BinaryLinearPWS.from_float(module.out_proj, config, name + ".out_proj", binary_input=True)
        return cls(e, module.num_heads, in_proj, out_proj, module.dropout, module.batch_first, config)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # float checkpoints of nn.MultiheadAttention name the in-projection in_proj_weight / in_proj_bias
        for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        q, k, v, bias = mha_inputs(self, self.in_proj, query, key, value, key_padding_mask, attn_mask, is_causal)
        out, attn = self._attend(q, k, v, bias, self.dropout)
        y = self.out_proj(merge_heads(out))
        if not self.batch_first and query.dim() == 3:
            y = y.transpose(0, 1)
        if query.dim() == 2:
            y = y.squeeze(0)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        return y, weights

    def weight_nbytes(self) -> int:
        return self._linears_nbytes()

    def describe(self) -> dict[str, Any]:
        return {"form": "nn.MultiheadAttention", "heads": self.num_heads, **self._core_info()}

    def to_deploy(self) -> "BinaryAttentionDeploy":
        return MultiheadAttentionDeploy(self.num_heads, self.in_proj.to_deploy(), self.out_proj.to_deploy(),
                                        batch_first=self.batch_first, **self._deploy_core())


class BinaryQKVAttention(_AttentionCoreMixin, QuantModule):
    """Binary replacement of a timm-style self-attention module: ``qkv`` Linear (C -> 3C, [q|k|v] x heads), scores
    ``q k^T * scale``, softmax, ``@ v`` (explicitly or via ``F.scaled_dot_product_attention``), ``proj`` Linear.
    ``forward(x, attn_mask=None, is_causal=False)`` with ``x (B, N, C)`` (timm's signature); an optional
    bool/additive ``attn_mask`` and the causal mask stay FP."""

    bits_w = 1
    bits_a = 1

    def __init__(self, num_heads: int, qkv: BinaryLinearPWS, proj: BinaryLinearPWS, logit_scale: float,
                 attn_drop: float, proj_drop: float, config: Any = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = qkv, proj
        self.logit_scale, self.attn_drop_p, self.proj_drop_p = logit_scale, attn_drop, proj_drop
        self._set_core(config)

    @classmethod
    def from_float(cls, module: nn.Module, config: Any = None, name: str = "") -> "BinaryQKVAttention":
        num_heads = int(getattr(module, "num_heads"))
        dim = module.qkv.in_features
        scale = float(getattr(module, "scale", (dim // num_heads) ** -0.5))
        attn_drop = dropout_p(getattr(module, "attn_drop", None))
        proj_drop = dropout_p(getattr(module, "proj_drop", None))
        qkv = BinaryLinearPWS.from_float(module.qkv, config, name + ".qkv", binary_input=True)
        proj = BinaryLinearPWS.from_float(module.proj, config, name + ".proj", binary_input=True)
        return cls(num_heads, qkv, proj, scale, attn_drop, proj_drop, config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        bias = self_attention_mask(attn_mask, is_causal, q)
        out, _ = self._attend(q, k, v, bias, self.attn_drop_p, self.logit_scale)
        return F.dropout(self.proj(merge_heads(out)), self.proj_drop_p, self.training)

    def weight_nbytes(self) -> int:
        return self._linears_nbytes()

    def describe(self) -> dict[str, Any]:
        return {"form": "qkv/proj attention", "heads": self.num_heads, **self._core_info()}

    def to_deploy(self) -> "BinaryAttentionDeploy":
        return QKVAttentionDeploy(self.num_heads, self.qkv.to_deploy(), self.proj.to_deploy(),
                                  logit_scale=self.logit_scale, **self._deploy_core())


def dropout_p(m: Any) -> float:
    if m is None:
        return 0.0
    if isinstance(m, nn.Dropout):
        return float(m.p)
    if isinstance(m, (int, float)):
        return float(m)
    return 0.0


class BinaryShiftedWindowAttention(_AttentionCoreMixin, QuantModule):
    """Binary replacement of torchvision's ``ShiftedWindowAttention`` (Swin v1): binary ``qkv``/``proj`` and binary
    attention core; the relative position bias table, its index and the shift masks stay full precision."""

    bits_w = 1
    bits_a = 1

    def __init__(self, module: nn.Module, config: Any = None, name: str = "") -> None:
        super().__init__()
        self.window_size = list(module.window_size)
        self.shift_size = list(module.shift_size)
        self.num_heads = module.num_heads
        self.attention_dropout = float(module.attention_dropout)
        self.dropout = float(module.dropout)
        self.qkv = BinaryLinearPWS.from_float(module.qkv, config, name + ".qkv", binary_input=True)
        self.proj = BinaryLinearPWS.from_float(module.proj, config, name + ".proj", binary_input=True)
        self.relative_position_bias_table = nn.Parameter(module.relative_position_bias_table.detach().clone())
        self.register_buffer("relative_position_index", module.relative_position_index.clone())
        self._set_core(config)

    @classmethod
    def from_float(cls, module: nn.Module, config: Any = None, name: str = "") -> "BinaryShiftedWindowAttention":
        return cls(module, config, name)

    def forward(self, x: Tensor) -> Tensor:
        bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                       self.window_size)

        def attend(q: Tensor, k: Tensor, v: Tensor, b: Tensor) -> Tensor:
            return self._attend(q, k, v, b, self.attention_dropout)[0]

        return shifted_window_attention_forward(x, self.qkv, self.proj, attend, bias, self.window_size,
                                                self.shift_size, self.num_heads, self.dropout, self.training)

    def weight_nbytes(self) -> int:
        t = self.relative_position_bias_table
        return self._linears_nbytes() + t.numel() * t.element_size()

    def describe(self) -> dict[str, Any]:
        return {"form": "torchvision ShiftedWindowAttention", "heads": self.num_heads,
                "window": tuple(self.window_size), "shift": tuple(self.shift_size), **self._core_info(),
                "fp": "relative position bias, shift mask"}

    def to_deploy(self) -> "BinaryAttentionDeploy":
        with torch.no_grad():
            bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                           self.window_size).detach()
        return ShiftedWindowAttentionDeploy(self.num_heads, self.qkv.to_deploy(), self.proj.to_deploy(),
                                            relative_position_bias=bias, window_size=self.window_size,
                                            shift_size=self.shift_size, **self._deploy_core())


__all__ = ["BinaryAttentionOptions", "BinaryMultiheadAttention", "BinaryQKVAttention", "BinaryShiftedWindowAttention"]
