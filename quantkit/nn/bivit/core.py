"""BiViT's binary attention core (He et al., ICCV 2023, arXiv 2211.07091), simulated and on packed bits.

How the attention is binarized is a small registered strategy (:data:`ATTENTION_BINARIZERS`): ``"sab"`` (BiViT's
softmax-aware binarization of the probabilities) and ``"bibert"`` (BiBERT's Bool of the pre-softmax scores). Each
gives the training form (with its surrogate gradient) and the deploy selection (a bool mask and an optional per-row
basis); every user of the choice (simulated and packed attention, the report, the ONNX export) looks it up here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...ops.binary import binary_bmm, binary_bmm_01
from ...ops.packing import pack_bits
from ...quantizers.softmax import bibert_bool, bivit_sign, sab_binarize, sab_select


@dataclass(frozen=True)
class AttentionBinarizer:
    """One way to binarize attention. ``train(z, beta, sab_scale)``: A_b from the scores z (+ FP bias), with its
    gradient; ``select(z, beta, sab_scale)``: the deploy form, ``(mask, basis)`` with A_b = mask [* basis];
    ``label(beta, sab_scale)``: the report's description."""

    train: Callable[[Tensor, float, bool], Tensor]
    select: Callable[[Tensor, float, bool], tuple[Tensor, Tensor | None]]
    label: Callable[[float, bool], str]


ATTENTION_BINARIZERS: dict[str, AttentionBinarizer] = {
    # SAB on the softmax output, gradient straight through to it (quantizers.softmax.sab_binarize)
    "sab": AttentionBinarizer(
        train=lambda z, beta, scaled: sab_binarize(torch.softmax(z, dim=-1), beta, scaled),
        select=lambda z, beta, scaled: sab_select(torch.softmax(z, dim=-1), beta, scaled),
        label=lambda beta, scaled: f"SAB beta={beta:g}" + (" scaled" if scaled else "")),
    # Bool of the scores, clipped STE (quantizers.softmax.bibert_bool)
    "bibert": AttentionBinarizer(
        train=lambda z, beta, scaled: bibert_bool(z),
        select=lambda z, beta, scaled: (bibert_bool(z) > 0, None),
        label=lambda beta, scaled: "BiBERT Bool"),
}
ATTENTION_METHODS = tuple(ATTENTION_BINARIZERS)


def attention_binarizer(method: str, where: str = "attention") -> AttentionBinarizer:
    """The registered binarizer ``method`` (ConfigError naming ``where`` and the choices otherwise)."""
    found = ATTENTION_BINARIZERS.get(method) if isinstance(method, str) else None
    if found is None:
        raise ConfigError(f"{where}: method={method!r}; use one of {ATTENTION_METHODS}")
    return found


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
    a = attention_binarizer(method, "binary_attention").train(z, beta, sab_scale)
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
    mask, basis = attention_binarizer(method, "binary_attention_packed").select(z, beta, sab_scale)
    # V_b transposed (..., d, N): packed along the token axis, the reduction axis of A_b V_b
    out = binary_bmm_01(pack_bits(mask), pack_bits(v.transpose(-2, -1)), n).to(q.dtype)
    return out if basis is None else out * basis



__all__ = ["AttentionBinarizer", "ATTENTION_BINARIZERS", "ATTENTION_METHODS", "attention_binarizer",
           "binary_attention", "binary_attention_packed"]
