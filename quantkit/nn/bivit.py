"""BiViT layers (He et al., "BiViT: Extremely Compressed Binary Vision Transformers", ICCV 2023, arXiv 2211.07091).

Simulated layers (float math, trainable):

- :class:`BinaryLinearPWS` -- binary weights with parameterized weight scales (PWS); binary (sign) input, or float
  input for the MLP "1/32" setting. ``binarize=False`` runs it as the float layer (stage 1 of the cross-layer
  binarization schedule, set by the scheme's epoch hook).
- :func:`binary_attention` -- the binary attention core: ``z = (Q_b K_b^T) d^-1/2 (+ FP bias/mask)``, then SAB
  (or BiBERT's Bool) and ``A_b V_b``.
- :class:`BinaryMultiheadAttention` (replaces ``torch.nn.MultiheadAttention``), :class:`BinaryQKVAttention`
  (timm-style modules with a ``qkv`` and a ``proj`` Linear), :class:`BinaryShiftedWindowAttention` (torchvision Swin;
  relative position bias and shift masks stay full precision).

Deploy layers (packed bits, :mod:`quantkit.ops` kernels): :class:`BinaryDeployLinear` and
:class:`BinaryAttentionDeploy` (``binary_bmm`` for ``Q_b K_b^T``, ``binary_bmm_01`` for ``A_b V_b``).

Every attention wrapper computes the same thing as the module it replaced when ``binarize=False`` (used by the tests
to check the rewiring); with ``binarize=True`` (the default) Q, K, V are ``sign`` of the projections (clipped STE),
the attention is binarized by SAB (or Bool for ``bibert``), ``A_b V_b`` is an integer count (no normalisation; the
next layer only sees its sign), and the projections are :class:`BinaryLinearPWS` with binary inputs.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from ..ops.binary import binary_bmm, binary_bmm_01
from ..ops.packing import pack_bits
from ..quantizers.softmax import (bibert_bool, bivit_sign, check_sign_of_zero, pws_binarize_weight, pws_sign,
                                  sab_binarize, sab_select)
from .base import NotQuantizable, QuantModule
from .binary_deploy import BinaryDeployLinear, affine_epilogue

ATTENTION_METHODS = ("sab", "bibert")


def _cfg(config: Any, field: str, default: Any) -> Any:
    return getattr(config, field, default) if config is not None else default


def _check_packable(sign_of_zero: int, layer: str) -> None:
    """A packed bit holds -1 or +1 only: a model simulated with sign(0) = 0 has no exact deploy form."""
    if sign_of_zero != 1:
        raise ConfigError(
            f"{layer}: sign_of_zero=0 (the official torch.sign) cannot be deployed -- a packed bit has no 0, so the "
            "deploy layer would map 0 to +1 and differ from the simulated model wherever a sign input is exactly 0 "
            "(common at the projection input A_b V_b, an integer count). Set sign_of_zero=1 on the scheme (or the "
            "layers' sign_of_zero attribute), fine-tune or re-evaluate, then convert")


# ================================================================================================ binary linear
class BinaryLinearPWS(QuantModule, nn.Linear):
    """Linear layer with binary weights and parameterized weight scales (BiViT Sec. 3.3.2).

    forward (``binarize=True``): ``y = (x_in @ sign(W - mean_row(W))^T) * s + b`` (= ``x_in @ W_b^T + b``) with ``x_in = sign(x)`` (clipped
    STE) when ``binary_input`` else ``x``; the gradients are those of :func:`quantkit.quantizers.softmax.
    pws_binarize_weight` and :func:`quantkit.quantizers.softmax.bivit_sign`. ``s`` (``scale``, shape (out, 1)) is learned
    when ``learned_scale`` (PWS), initialised on the first binarized forward to ``mean|W[o]|`` of the raw weight;
    otherwise ``s = mean|W[o]|`` recomputed and detached (BiViT's "ordinary" scales, ``BinaryLinear_STE``).
    ``binarize=False``: the plain float layer (cross-layer binarization, stage 1). The bias stays float.
    """

    bits_w = 1
    bits_a = 1
    optional_state = ("scale", "scale_initialized")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, binary_input: bool = True,
                 learned_scale: bool = True, role: str = "attention", sign_of_zero: int = 1, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.binary_input = binary_input
        self.sign_of_zero = check_sign_of_zero(sign_of_zero)
        self.learned_scale = learned_scale
        self.role = role
        self.binarize = True
        self.bits_a = 1 if binary_input else None
        self.scale = nn.Parameter(torch.zeros(out_features, 1, device=device, dtype=dtype),
                                  requires_grad=learned_scale)
        self.register_buffer("scale_initialized", torch.zeros((), dtype=torch.bool, device=device))

    @classmethod
    def from_float(cls, module: nn.Linear, config: Any = None, name: str = "", *, binary_input: bool = True,
                   role: str = "attention") -> "BinaryLinearPWS":
        if not isinstance(module, nn.Linear):
            raise NotQuantizable(f"{name or type(module).__name__}: expected an nn.Linear, got {type(module).__name__}")
        new = cls(module.in_features, module.out_features, module.bias is not None, binary_input=binary_input,
                  learned_scale=_cfg(config, "pws", True), role=role, sign_of_zero=_cfg(config, "sign_of_zero", 1),
                  device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new.weight.requires_grad_(module.weight.requires_grad)
        return new

    def current_scale(self) -> Tensor:
        """The per-row scale s (out, 1) the binarized forward uses (initialising the learned one on first use)."""
        if not self.learned_scale:
            return self.weight.detach().abs().mean(dim=1, keepdim=True)
        if not bool(self.scale_initialized):
            # BiViT: s starts at mean|W_o| of the raw (uncentred) weight at the first binarized forward
            with torch.no_grad():
                self.scale.copy_(self.weight.abs().mean(dim=1, keepdim=True))
                self.scale_initialized.fill_(True)
        return self.scale

    def binary_weight(self) -> Tensor:
        """``s * sign(W - mean_row(W))`` with its surrogate gradients."""
        return pws_binarize_weight(self.weight, self.current_scale(), self.sign_of_zero)

    def forward(self, x: Tensor) -> Tensor:
        if not self.binarize:
            return F.linear(x, self.weight, self.bias)
        x_in = bivit_sign(x, self.sign_of_zero) if self.binary_input else x
        # (x_in @ sign(W_c)^T) * s == x_in @ W_b^T with W_b = pws_binarize_weight(W, s), same gradients; the scale
        # comes after the product so a binary dot product is an exact integer (and a tie is exactly 0) as in the
        # packed kernel -- otherwise float rounding of sums of +-s flips signs downstream.
        y = F.linear(x_in, pws_sign(self.weight, self.sign_of_zero)) * self.current_scale().reshape(-1)
        return y if self.bias is None else y + self.bias

    def weight_nbytes(self) -> int:
        n = self.weight.numel() / 8 + self.out_features * 4  # 1 bit per weight + a float scale per row
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return int(math.ceil(n))

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "input": "binary" if self.binary_input else "fp",
                "scale": "PWS (learned)" if self.learned_scale else "mean|W| (fixed)",
                "binarized_now": bool(self.binarize)}

    def to_deploy(self) -> nn.Module:
        """Packed deploy layer: y = s * (x_b . sign(W_c)) + b (binary input, threshold 0) or s * (x . sign(W_c)) + b
        (float input), the same order of operations as the simulated forward. A layer that is not binarized at the
        current training stage (``binarize=False``: stage 1 of cross-layer binarization) deploys as the float
        ``nn.Linear`` it runs as: the deploy model computes what was trained."""
        if not self.binarize:
            lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                            dtype=self.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(self.weight)
                if self.bias is not None:
                    lin.bias.copy_(self.bias)
            return lin.requires_grad_(False)
        _check_packable(self.sign_of_zero,
                        f"BinaryLinearPWS({self.in_features}, {self.out_features}, role={self.role})")
        with torch.no_grad():
            epilogue = affine_epilogue(self.current_scale().detach().reshape(-1),
                                       bias=None if self.bias is None else self.bias.detach())
            return BinaryDeployLinear.from_signs(pws_sign(self.weight.detach()), epilogue,
                                                 in_threshold=0.0 if self.binary_input else None)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, binary_input={self.binary_input}, learned_scale={self.learned_scale}, "
                f"role={self.role}, binarize={self.binarize}")


# ================================================================================================ attention core
def binary_attention(q: Tensor, k: Tensor, v: Tensor, *, method: str = "sab", beta: float = 0.25,
                     sab_scale: bool = False, bias: Tensor | None = None, dropout_p: float = 0.0,
                     training: bool = False, logit_scale: float | None = None,
                     binarize: bool = True, sign_of_zero: int = 1) -> tuple[Tensor, Tensor]:
    """Binary attention of BiViT on ``q (..., M, d)``, ``k (..., N, d)``, ``v (..., N, d)`` (after projection biases).

    ``binarize=True``::

        Q_b, K_b, V_b = sign(q), sign(k), sign(v)                    (bivit_sign: STE 1[|.| < 1]; sign(0) = +1,
                                                                       or 0 with sign_of_zero=0)
        z   = (Q_b K_b^T) * logit_scale  [+ bias]                     (logit_scale = d^-1/2; bias/masks stay FP)
        A_b = SAB(softmax(z))   (method "sab", gradient straight through to the softmax output)
            | Bool(z)           (method "bibert", clipped STE to the scores)
        out = A_b V_b                                                 (integer counts, no normalisation)

    Attention dropout (the official code drops the scores before the softmax) acts on ``Q_b K_b^T`` before the FP
    bias/masks are added, so a -inf mask never meets a dropout zero. ``binarize=False`` is float attention
    ``softmax(q k^T * logit_scale + bias) v`` with dropout on the probabilities (what the replaced modules compute).
    Returns ``(out, attention)``.
    """
    scale = q.shape[-1] ** -0.5 if logit_scale is None else logit_scale
    if not binarize:
        z = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            z = z + bias
        p = F.dropout(torch.softmax(z, dim=-1), dropout_p, training)
        return p @ v, p
    qb, kb, vb = bivit_sign(q, sign_of_zero), bivit_sign(k, sign_of_zero), bivit_sign(v, sign_of_zero)
    z = (qb @ kb.transpose(-2, -1)) * scale
    z = F.dropout(z, dropout_p, training)
    if bias is not None:
        z = z + bias
    if method == "sab":
        a = sab_binarize(torch.softmax(z, dim=-1), beta, sab_scale)
    elif method == "bibert":
        a = bibert_bool(z)
    else:
        raise ConfigError(f"binary_attention: method={method!r}; use one of {ATTENTION_METHODS}")
    return a @ vb, a


def binary_attention_packed(q: Tensor, k: Tensor, v: Tensor, *, method: str = "sab", beta: float = 0.25,
                            sab_scale: bool = False, bias: Tensor | None = None,
                            logit_scale: float | None = None) -> Tensor:
    """Deploy form of :func:`binary_attention` on packed bits (inference only).

    ``Q_b K_b^T`` = :func:`quantkit.ops.binary_bmm` (XNOR-popcount along the head dim, exact int32); the scores get
    the same float scale/bias/softmax as the simulated path, SAB's selection is packed along the key axis and
    ``A_b V_b`` = :func:`quantkit.ops.binary_bmm_01` (``2 popcount(a AND v) - popcount(a)``, exact int32).
    """
    d, n = q.shape[-1], k.shape[-2]
    scale = d ** -0.5 if logit_scale is None else logit_scale
    qk = binary_bmm(pack_bits(q), pack_bits(k), d)
    z = qk.to(q.dtype) * scale
    if bias is not None:
        z = z + bias
    if method == "sab":
        mask, basis = sab_select(torch.softmax(z, dim=-1), beta, sab_scale)
    elif method == "bibert":
        mask, basis = z > 0, None
    else:
        raise ConfigError(f"binary_attention_packed: method={method!r}; use one of {ATTENTION_METHODS}")
    # V_b transposed (..., d, N): packed along the token axis, the reduction axis of A_b V_b
    out = binary_bmm_01(pack_bits(mask), pack_bits(v.transpose(-2, -1)), n).to(q.dtype)
    return out if basis is None else out * basis


# ------------------------------------------------------------------------------------------------ shared plumbing
def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, H, N, C/H)."""
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3C) laid out as [q | k | v] with heads inside each -> three (B, H, N, C/H)."""
    b, n, c3 = qkv.shape
    t = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed) or an additive float mask -> additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _self_attention_mask(attn_mask: Tensor | None, is_causal: bool, q: Tensor) -> Tensor | None:
    """The additive FP mask of a self-attention call: the given bool/additive ``attn_mask`` plus, when
    ``is_causal``, -inf above the diagonal (token i attends to tokens <= i, as ``scaled_dot_product_attention``)."""
    bias = _additive_mask(attn_mask, q.dtype)
    if is_causal:
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        causal = torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(causal, float("-inf"))
        bias = causal if bias is None else bias + causal
    return bias


class _AttentionCoreMixin:
    """Attention settings shared by the simulated wrappers."""

    method: str
    beta: float
    sab_scale: bool
    binarize: bool

    def _set_core(self, config: Any) -> None:
        self.method = _cfg(config, "attention", "sab")
        if self.method not in ATTENTION_METHODS:
            raise ConfigError(f"attention={self.method!r}; use one of {ATTENTION_METHODS}")
        self.beta = float(_cfg(config, "beta", 0.25))
        self.sab_scale = bool(_cfg(config, "sab_scale", False))
        self.sign_of_zero = check_sign_of_zero(_cfg(config, "sign_of_zero", 1))
        self.binarize = True

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float,
                logit_scale: float | None = None) -> tuple[Tensor, Tensor]:
        return binary_attention(q, k, v, method=self.method, beta=self.beta, sab_scale=self.sab_scale, bias=bias,
                                dropout_p=dropout_p, training=self.training, logit_scale=logit_scale,
                                binarize=self.binarize, sign_of_zero=self.sign_of_zero)

    def _core_info(self) -> dict[str, Any]:
        if self.method == "sab":
            return {"attention": f"SAB beta={self.beta:g}" + (" scaled" if self.sab_scale else "")}
        return {"attention": "BiBERT Bool"}

    def _deploy_core(self) -> dict[str, Any]:
        if not self.binarize:  # the deploy form is binary attention only: it would not compute what ran
            raise UnsupportedModelError(
                f"{type(self).__name__}: binarize=False (float attention) has no deploy form; set binarize=True "
                "(and train) before convert")
        _check_packable(self.sign_of_zero, f"{type(self).__name__} (Q/K/V signs)")
        return {"method": self.method, "beta": self.beta, "sab_scale": self.sab_scale}

    def _linears_nbytes(self) -> int:
        total = 0
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, BinaryLinearPWS):
                total += m.weight_nbytes()
        return total


# ================================================================================================ torch MHA
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
        q, k, v, bias = _mha_inputs(self, self.in_proj, query, key, value, key_padding_mask, attn_mask, is_causal)
        out, attn = self._attend(q, k, v, bias, self.dropout)
        y = self.out_proj(_merge_heads(out))
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
        return BinaryAttentionDeploy("mha", self.num_heads, self.in_proj.to_deploy(), self.out_proj.to_deploy(),
                                     batch_first=self.batch_first, **self._deploy_core())


def _mha_inputs(mod: Any, in_proj: Callable[[Tensor], Tensor], query: Tensor, key: Tensor, value: Tensor,
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
    q, k, v = _split_heads(q, h), _split_heads(k, h), _split_heads(v, h)
    b, l, s = query.shape[0], query.shape[1], key.shape[1]
    bias = None
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(l, s, dtype=torch.bool, device=query.device).triu(1)
    am = _additive_mask(attn_mask, q.dtype)
    if am is not None:
        bias = am.reshape(b, h, l, s) if am.dim() == 3 else am.reshape(1, 1, l, s)
    kp = _additive_mask(key_padding_mask, q.dtype)
    if kp is not None:
        kp = kp.reshape(b, 1, 1, s)
        bias = kp if bias is None else bias + kp
    return q, k, v, bias


# ================================================================================================ timm-style
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
        attn_drop = _dropout_p(getattr(module, "attn_drop", None))
        proj_drop = _dropout_p(getattr(module, "proj_drop", None))
        qkv = BinaryLinearPWS.from_float(module.qkv, config, name + ".qkv", binary_input=True)
        proj = BinaryLinearPWS.from_float(module.proj, config, name + ".proj", binary_input=True)
        return cls(num_heads, qkv, proj, scale, attn_drop, proj_drop, config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = _split_qkv(self.qkv(x), self.num_heads)
        bias = _self_attention_mask(attn_mask, is_causal, q)
        out, _ = self._attend(q, k, v, bias, self.attn_drop_p, self.logit_scale)
        return F.dropout(self.proj(_merge_heads(out)), self.proj_drop_p, self.training)

    def weight_nbytes(self) -> int:
        return self._linears_nbytes()

    def describe(self) -> dict[str, Any]:
        return {"form": "qkv/proj attention", "heads": self.num_heads, **self._core_info()}

    def to_deploy(self) -> "BinaryAttentionDeploy":
        return BinaryAttentionDeploy("qkv", self.num_heads, self.qkv.to_deploy(), self.proj.to_deploy(),
                                     logit_scale=self.logit_scale, **self._deploy_core())


def _dropout_p(m: Any) -> float:
    if m is None:
        return 0.0
    if isinstance(m, nn.Dropout):
        return float(m.p)
    if isinstance(m, (int, float)):
        return float(m)
    return 0.0


# ================================================================================================ torchvision Swin
def _shift_window_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], device: torch.device,
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
    q, k, v = _split_qkv(qkv(tokens), num_heads)
    bias = relative_position_bias.reshape(1, num_heads, n, n)
    if shifted:
        mask = _shift_window_mask(ph, pw, win, shift, x.device, q.dtype)  # (nW, N, N)
        bias = (bias.unsqueeze(0) + mask.reshape(1, nh * nw, 1, n, n)).expand(b, nh * nw, num_heads, n, n)
        bias = bias.reshape(b * nh * nw, num_heads, n, n)
    out = proj(_merge_heads(attend(q, k, v, bias)))
    out = F.dropout(out, dropout, training)
    out = out.reshape(b, nh, nw, win[0], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shifted:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def _relative_position_bias(table: Tensor, index: Tensor, window_size: list[int]) -> Tensor:
    """(H, N, N) bias gathered from the (2Wh-1)(2Ww-1) x H table."""
    n = window_size[0] * window_size[1]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()


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
        bias = _relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
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
            bias = _relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                           self.window_size).detach()
        return BinaryAttentionDeploy("swin", self.num_heads, self.qkv.to_deploy(), self.proj.to_deploy(),
                                     relative_position_bias=bias, window_size=self.window_size,
                                     shift_size=self.shift_size, **self._deploy_core())


# ================================================================================================ deploy
class BinaryAttentionDeploy(nn.Module):
    """Deployed binary attention of any of the three forms (``layout`` = "mha", "qkv" or "swin"): packed projections
    (:class:`BinaryDeployLinear`) and :func:`binary_attention_packed`; FP parts (Swin's relative position bias,
    masks) as float tensors. Inference only (no dropout)."""

    def __init__(self, layout: str, num_heads: int, in_proj: BinaryDeployLinear, out_proj: BinaryDeployLinear,
                 *, method: str, beta: float, sab_scale: bool, batch_first: bool = True,
                 logit_scale: float | None = None, relative_position_bias: Tensor | None = None,
                 window_size: list[int] | None = None, shift_size: list[int] | None = None) -> None:
        super().__init__()
        self.layout, self.num_heads = layout, num_heads
        self.embed_dim = out_proj.out_features
        self.in_proj, self.out_proj = in_proj, out_proj
        self.method, self.beta, self.sab_scale = method, beta, sab_scale
        self.batch_first, self.logit_scale = batch_first, logit_scale
        self.window_size, self.shift_size = window_size, shift_size
        self.register_buffer("relative_position_bias", relative_position_bias)
        #: a module computing the attention core in place of :func:`binary_attention_packed` (same arguments);
        #: the ONNX export sets it to write the core as one unit. None: the packed kernels
        self.attention_core: nn.Module | None = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        if self.attention_core is not None:
            return self.attention_core(q, k, v, bias)
        return binary_attention_packed(q, k, v, method=self.method, beta=self.beta, sab_scale=self.sab_scale,
                                       bias=bias, logit_scale=self.logit_scale)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.layout == "mha":
            return self._forward_mha(*args, **kwargs)
        if self.layout == "qkv":
            return self._forward_qkv(*args, **kwargs)
        return shifted_window_attention_forward(args[0], self.in_proj, self.out_proj,
                                                lambda q, k, v, b: self._attend(q, k, v, b),
                                                self.relative_position_bias, self.window_size, self.shift_size,
                                                self.num_heads, 0.0, False)

    def _forward_qkv(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = _split_qkv(self.in_proj(x), self.num_heads)
        return self.out_proj(_merge_heads(self._attend(q, k, v, _self_attention_mask(attn_mask, is_causal, q))))

    def _forward_mha(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                     need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                     is_causal: bool = False) -> tuple[Tensor, None]:
        q, k, v, bias = _mha_inputs(self, self.in_proj, query, key, value, key_padding_mask, attn_mask, is_causal)
        y = self.out_proj(_merge_heads(self._attend(q, k, v, bias)))
        if not self.batch_first and query.dim() == 3:
            y = y.transpose(0, 1)
        if query.dim() == 2:
            y = y.squeeze(0)
        return y, None  # the packed path does not materialise attention weights

    def extra_repr(self) -> str:
        return f"layout={self.layout}, heads={self.num_heads}, method={self.method}, beta={self.beta:g}"


__all__ = ["BinaryLinearPWS", "binary_attention", "binary_attention_packed",
           "BinaryMultiheadAttention", "BinaryQKVAttention", "BinaryShiftedWindowAttention", "BinaryAttentionDeploy",
           "shifted_window_attention_forward", "ATTENTION_METHODS"]
