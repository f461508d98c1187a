"""Torchvision Swin's windowed attention (Liu et al., ICCV 2021) rewritten around a pluggable attention core, so
the simulated and the packed binary cores run inside the same window / shift / mask layout."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .heads import merge_heads, split_qkv


def shift_window_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], device: torch.device,
                       dtype: torch.dtype) -> Tensor:
    """Additive mask (num_windows, N, N) of shifted-window attention: tokens of one window that came from different
    regions of the cyclically shifted map may not attend to each other (-100, as torchvision and the Swin paper),
    others get 0."""
    def regions(size: int, win: int, sh: int) -> Tensor:
        r = torch.zeros(size, dtype=torch.long, device=device)
        r[size - win:size - sh] = 1
        r[size - sh:] = 2
        return r

    label = regions(pad_h, window[0], shift[0])[:, None] * 3 + regions(pad_w, window[1], shift[1])[None, :]
    nh, nw = pad_h // window[0], pad_w // window[1]
    label = label.reshape(nh, window[0], nw, window[1]).permute(0, 2, 1, 3).reshape(nh * nw, window[0] * window[1])
    differ = label[:, None, :] != label[:, :, None]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, -100.0)


def shifted_window_attention_forward(x: Tensor, qkv: Callable[[Tensor], Tensor], proj: Callable[[Tensor], Tensor],
                                     attend: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
                                     relative_position_bias: Tensor, window_size: list[int], shift_size: list[int],
                                     num_heads: int, dropout: float, training: bool) -> Tensor:
    """Windowed multi-head self-attention of Swin (Liu et al., ICCV 2021) around a pluggable attention core.

    ``x (B, H, W, C)``: pad to whole windows, cyclic shift, partition into windows of N tokens, ``qkv``, heads,
    ``attend(q, k, v, bias)`` with the FP bias = relative position bias (+ shift mask), merge heads, ``proj``,
    dropout, reverse the windows and the shift, crop. The same layout as ``torchvision``'s ShiftedWindowAttention.
    """
    b, h, w, c = x.shape
    win = list(window_size)
    pad_b, pad_r = (-h) % win[0], (-w) % win[1]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    shift = [0 if win[0] >= ph else shift_size[0], 0 if win[1] >= pw else shift_size[1]]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = ph // win[0], pw // win[1]
    n = win[0] * win[1]
    tokens = x.reshape(b, nh, win[0], nw, win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
    q, k, v = split_qkv(qkv(tokens), num_heads)
    bias = relative_position_bias.reshape(1, num_heads, n, n)
    if shifted:
        mask = shift_window_mask(ph, pw, win, shift, x.device, q.dtype)  # (nW, N, N)
        bias = (bias.unsqueeze(0) + mask.reshape(1, nh * nw, 1, n, n)).expand(b, nh * nw, num_heads, n, n)
        bias = bias.reshape(b * nh * nw, num_heads, n, n)
    out = proj(merge_heads(attend(q, k, v, bias)))
    out = F.dropout(out, dropout, training)
    out = out.reshape(b, nh, nw, win[0], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shifted:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def relative_position_bias(table: Tensor, index: Tensor, window_size: list[int]) -> Tensor:
    """(H, N, N) bias gathered from the (2Wh-1)(2Ww-1) x H table."""
    n = window_size[0] * window_size[1]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()
