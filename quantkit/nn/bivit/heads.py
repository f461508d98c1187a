"""Tensor plumbing shared by the simulated and deploy attention modules: heads, masks, the MHA call convention."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, H, N, C/H)."""
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3C) laid out as [q | k | v] with heads inside each -> three (B, H, N, C/H)."""
    b, n, c3 = qkv.shape
    t = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed) or an additive float mask -> additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def self_attention_mask(attn_mask: Tensor | None, is_causal: bool, q: Tensor) -> Tensor | None:
    """The additive FP mask of a self-attention call: the given bool/additive ``attn_mask`` plus, when
    ``is_causal``, -inf above the diagonal (token i attends to tokens <= i, as ``scaled_dot_product_attention``)."""
    bias = additive_mask(attn_mask, q.dtype)
    if is_causal:
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        causal = torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(causal, float("-inf"))
        bias = causal if bias is None else bias + causal
    return bias


def mha_inputs(mod: Any, in_proj: Callable[[Tensor], Tensor], query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                is_causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Project MHA inputs to per-head q, k, v (B, H, L, d) and build the additive FP mask (B, H, L, S) or None."""
    e, h = mod.embed_dim, mod.num_heads
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not mod.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if query is key and key is value:
        q, k, v = in_proj(query).split(e, dim=-1)
    else:  # cross attention: each input through its own third of the in-projection
        q = in_proj(query)[..., :e]
        k = in_proj(key)[..., e:2 * e]
        v = in_proj(value)[..., 2 * e:]
    q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
    b, l, s = query.shape[0], query.shape[1], key.shape[1]
    bias = None
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(l, s, dtype=torch.bool, device=query.device).triu(1)
    am = additive_mask(attn_mask, q.dtype)
    if am is not None:
        bias = am.reshape(b, h, l, s) if am.dim() == 3 else am.reshape(1, 1, l, s)
    kp = additive_mask(key_padding_mask, q.dtype)
    if kp is not None:
        kp = kp.reshape(b, 1, 1, s)
        bias = kp if bias is None else bias + kp
    return q, k, v, bias
