"""Binarizers of BiViT (He et al., "BiViT: Extremely Compressed Binary Vision Transformers", ICCV 2023,
arXiv 2211.07091) and of its BiBERT baseline (Qin et al., "BiBERT: Accurate Fully Binarized BERT", ICLR 2022).

- :func:`sab_binarize`: softmax-aware binarization (SAB) of attention probabilities, threshold beta * row max.
- :func:`sab_optimal_threshold`: the coordinate-descent search of the optimal threshold (an analysis tool: the paper
  uses it to justify beta * max; it is not used in training or inference).
- :func:`bibert_bool`: BiBERT's Bool binarization of the pre-softmax scores (baseline).
- :func:`pws_binarize_weight`: binary weights with parameterized (learnable, per-output-row) weight scales (PWS).
- :func:`bivit_sign`: the sign of BiViT's Q/K/V, of the binary inputs of its linears and of its centred weights.

Sign of zero: quantkit's convention (``binary_sign``: x >= 0 -> +1) by default; ``sign_of_zero=0`` gives the official
code's ``torch.sign`` (0 -> 0), simulation only (a packed bit has no 0); ``docs/algorithms.md#bivit-binary-signs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Quantizer, register_quantizer
from .binary import binary_sign

SIGN_OF_ZERO = (1, 0)


def check_sign_of_zero(sign_of_zero: int) -> int:
    """Validate the ``sign_of_zero`` option (1: quantkit's packable sign; 0: the official ``torch.sign``)."""
    if isinstance(sign_of_zero, bool) or sign_of_zero not in SIGN_OF_ZERO:
        raise ConfigError(f"sign_of_zero={sign_of_zero!r}; use 1 (sign(0) = +1, deployable) or 0 (sign(0) = 0, "
                          "the official BiViT code's torch.sign; simulation only)")
    return int(sign_of_zero)


class _BiViTSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sign_of_zero: int) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x) if sign_of_zero == 0 else binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1).to(grad.dtype), None


def bivit_sign(x: Tensor, sign_of_zero: int = 1) -> Tensor:
    """Sign with BiViT's clipped straight-through estimator (official ``BinaryQuantizer``).

    forward:  b = sign(x)  in {-1, +1}, sign(0) = +1      (``sign_of_zero=1``, default: what a packed bit can hold)
              b = sign(x)  in {-1, 0, +1}, sign(0) = 0    (``sign_of_zero=0``: ``torch.sign``, the official forward)
    backward: db/dx = 1[|x| < 1]                          (open window: the official code zeroes the gradient where
                                                           x >= 1 or x <= -1; :func:`~quantkit.quantizers.binary.sign_ste`
                                                           of BinaryNet/XNOR keeps |x| <= 1)
    """
    return _BiViTSign.apply(x, check_sign_of_zero(sign_of_zero))


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0.0 < float(beta) <= 1.0):
        raise ConfigError(f"SAB threshold factor beta={beta!r} is out of range; use a number in (0, 1] (paper: 0.25)")


def sab_threshold(p: Tensor, beta: float = 0.25) -> Tensor:
    """Per-row SAB threshold T = beta * max_j p_j over the last dim (shape ``p.shape[:-1] + (1,)``), detached.

    BiViT Sec. 3.2: the optimal threshold correlates linearly with the row maximum; a regression without bias gives
    beta, fixed to 0.25 (a bit shift in hardware).
    """
    _check_beta(beta)
    return (beta * p.detach().amax(dim=-1, keepdim=True))


def sab_select(p: Tensor, beta: float = 0.25, with_basis: bool = False) -> tuple[Tensor, Tensor | None]:
    """The forward selection of SAB, without gradient (shared by :func:`sab_binarize` and the packed deploy path).

    Returns ``mask = p >= beta * max_row(p)`` (bool, like ``p``) and, with ``with_basis``, the per-row basis
    ``v = sum_j p_j b_j / sum_j b_j`` (shape ``p.shape[:-1] + (1,)``; the least-squares level of the 1-bit fit), else None.
    """
    pd = p.detach()
    mask = pd >= sab_threshold(pd, beta)
    basis = None
    if with_basis:
        m = mask.to(pd.dtype)
        basis = (pd * m).sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True)
    return mask, basis


def sab_binarize(p: Tensor, beta: float = 0.25, scale: bool = False) -> Tensor:
    """Softmax-aware binarization of attention probabilities ``p`` (softmax over the last dim) -- BiViT Sec. 3.2.

    forward:  b_j = 1[p_j >= beta * max_k p_k]                      (every row keeps its maximum, so >= one 1)
              A   = b                      (default: {0, 1}, no scale; the paper's "without scales" setting)
              A   = v * b,  v = sum_j p_j b_j / sum_j b_j            (``scale=True``: the basis of the 1-bit fit)
    backward: dA/dp = I   (straight through to the softmax output, no clipping; BiViT Eq. 13, "softmax-aware"),
              implemented as ``A = A_fwd.detach() - p.detach() + p``; autograd then continues through the softmax.
    """
    mask, basis = sab_select(p, beta, scale)
    forward = mask.to(p.dtype)
    if basis is not None:
        forward = basis * forward
    return forward - p.detach() + p


def sab_optimal_threshold(p: Tensor, iters: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Optimal 1-bit {0, v} fit of each attention row by coordinate descent (BiViT Sec. 3.2, Alg. 1) -- analysis only.

    Minimises ||p - v b||^2 over v in R and b in {0,1}^n, per row, ``iters`` rounds (paper: 5):
        b <- all ones;  repeat: v <- (p . b) / (b . b);  T <- v / 2;  b <- 1[p >= T]
    Returns ``(T, v, b)`` with T, v of shape ``p.shape[:-1] + (1,)`` and b like ``p``. No gradient.
    """
    if iters < 1:
        raise ConfigError(f"sab_optimal_threshold: iters={iters} must be >= 1 (paper: 5)")
    with torch.no_grad():
        b = torch.ones_like(p)
        for _ in range(iters):
            v = (p * b).sum(dim=-1, keepdim=True) / b.sum(dim=-1, keepdim=True).clamp_min(1)
            t = v / 2
            b = (p >= t).to(p.dtype)
        # the basis that goes with the final selection
        v = (p * b).sum(dim=-1, keepdim=True) / b.sum(dim=-1, keepdim=True).clamp_min(1)
    return t, v, b


class _BoolClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return grad * (z.abs() < 1).to(grad.dtype)


def bibert_bool(z: Tensor) -> Tensor:
    """BiBERT's binarization of attention (Qin et al., ICLR 2022), applied to the pre-softmax scores ``z``.

    forward:  A = Bool(z) = 1[z > 0]                  ({0, 1}; a zero score gives 0, as in the official code)
    backward: dA/dz = 1[|z| < 1]                       (clipped straight-through estimator)
    """
    return _BoolClippedSTE.apply(z)


def pws_sign(weight: Tensor, sign_of_zero: int = 1) -> Tensor:
    """The sign part of PWS: ``sign(W - mean_row(W))`` (:func:`bivit_sign`) with the latent-weight clipped STE through
    the centring (``1[|W - mean_row(W)| < 1]``). :func:`pws_binarize_weight` multiplies it by the per-row scale."""
    return bivit_sign(weight - weight.mean(dim=-1, keepdim=True), sign_of_zero)


def pws_binarize_weight(weight: Tensor, scale: Tensor, sign_of_zero: int = 1) -> Tensor:
    """Binary weight with parameterized weight scales (PWS), BiViT Sec. 3.3.2 (code ``BinaryLinear_adapscaling``).

    forward:  W_b[o] = s[o] * sign(W[o] - mean_j W[o, j])      (s: learnable, shape (out, 1); sign(0): see bivit_sign)
    backward: dW_b/dW through the centring with the clipped STE 1[|W - mean_row(W)| < 1] (latent-weight STE);
              dW_b/ds = sign(W - mean_row(W))                   (ordinary product rule; no positivity constraint)
    Pass a detached ``mean|W[o]|`` as ``scale`` for the "ordinary" (non-learned) scales of ``BinaryLinear_STE``.
    Layers may apply ``s`` after the product (``(x @ pws_sign(W)^T) * s``, the same value and gradients) so that the
    integer dot product is exact in float, as in the packed kernel.
    """
    return scale * pws_sign(weight, sign_of_zero)


def attention_binarization_errors(scores: Tensor, beta: float = 0.25, reduction: str = "mean") -> dict[str, float]:
    """Quantization error of binarized attention against the real attention ``p = softmax(scores)`` (BiViT Table 1).

    ``scores``: pre-softmax attention logits, rows along the last dim. Compared with ``p``:

    - ``"bibert"``: Bool(scores) = 1[scores > 0] (:func:`bibert_bool`);
    - ``"sab_optimal"``: v* b* from :func:`sab_optimal_threshold` (5 coordinate-descent rounds);
    - ``"sab_beta_max"``: v b with b = 1[p >= beta max p] and its least-squares basis v (:func:`sab_select`);
    - ``"sab_beta_max_noscale"``: b alone, in {0, 1} (what :func:`sab_binarize` uses by default).

    ``reduction="mean"``: mean squared error per element; ``"row_sum"``: squared error summed over each row, averaged
    over rows.
    """
    if reduction not in ("mean", "row_sum"):
        raise ConfigError(f"attention_binarization_errors: reduction={reduction!r}; use 'mean' or 'row_sum'")
    with torch.no_grad():
        z = scores.detach().to(torch.float64)
        p = torch.softmax(z, dim=-1)
        _, v_opt, b_opt = sab_optimal_threshold(p)
        mask, basis = sab_select(p, beta, with_basis=True)
        approx = {
            "bibert": (z > 0).to(p.dtype),
            "sab_optimal": v_opt * b_opt,
            "sab_beta_max": basis * mask.to(p.dtype),
            "sab_beta_max_noscale": mask.to(p.dtype),
        }
        out = {}
        for name, a in approx.items():
            sq = (p - a) ** 2
            out[name] = float(sq.mean() if reduction == "mean" else sq.sum(dim=-1).mean())
    return out


# ---------------------------------------------------------------------------------------------- quantizer objects


@dataclass
class SignOfZeroOptions:
    """``sign_of_zero``: what the signs give for an exact 0 -- 1 (+1, what a packed bit holds) or 0 (the official
    code's ``torch.sign``; simulation only)."""

    sign_of_zero: int = 1


@dataclass
class PWSOptions(SignOfZeroOptions):
    """``pws``: learned per-row weight scales (True) or fixed, detached mean|W[o]| (False: BiBERT's scales)."""

    pws: bool = True


def check_packable(sign_of_zero: int, layer: str) -> None:
    """A packed bit holds -1 or +1 only: a model simulated with sign(0) = 0 has no exact deploy form."""
    if sign_of_zero != 1:
        raise ConfigError(
            f"{layer}: sign_of_zero=0 (the official torch.sign) cannot be deployed -- a packed bit has no 0, so the "
            "deploy layer would map 0 to +1 and differ from the simulated model wherever a sign input is exactly 0 "
            "(common at the projection input A_b V_b, an integer count). Set sign_of_zero=1 on the scheme (or the "
            "layers' sign_of_zero attribute), fine-tune or re-evaluate, then convert")


@register_quantizer("bivit_sign")
class BiViTSign(Quantizer):
    """Binary input: :func:`bivit_sign` (STE on |x| < 1). Deploy: bit = (x >= 0), a_b = s (sign_of_zero = 1 only)."""

    kind = "input"
    Options = SignOfZeroOptions

    def __init__(self, *, weight: Tensor, channels: int, sign_of_zero: int) -> None:
        super().__init__()
        self.sign_of_zero = check_sign_of_zero(sign_of_zero)

    def forward(self, x: Tensor) -> Tensor:
        return bivit_sign(x, self.sign_of_zero)

    def threshold(self) -> float:
        return 0.0

    def affine(self) -> tuple[Any, Any]:
        return 1.0, 0.0

    def check_deployable(self, layer: str) -> None:
        check_packable(self.sign_of_zero, layer)


@register_quantizer("pws")
class PWSWeight(Quantizer):
    """Binary weight with parameterized weight scales, :func:`pws_binarize_weight` (BiViT Sec. 3.3.2).

    ``scale`` (out, 1) is learned when ``pws`` and initialised on the first binarized forward to mean|W[o]| of the
    raw weight (``scale_initialized`` records it); otherwise s = mean|W[o]| is recomputed and detached. The scale is
    applied after the product (``scale_after_product``) so a binary dot product stays an exact integer -- float
    rounding of sums of +-s would flip signs downstream. Deploy: signs sign(W - mean_row(W)), scale s."""

    kind = "weight"
    Options = PWSOptions
    optional_state = ("scale", "scale_initialized")
    exposed = ("learned_scale",)
    scale_after_product = True

    def __init__(self, *, weight: Tensor, channels: int, pws: bool, sign_of_zero: int) -> None:
        super().__init__()
        self.learned_scale = bool(pws)
        self.sign_of_zero = check_sign_of_zero(sign_of_zero)
        self.scale = nn.Parameter(torch.zeros(channels, 1, device=weight.device, dtype=weight.dtype),
                                  requires_grad=self.learned_scale)
        self.register_buffer("scale_initialized", torch.zeros((), dtype=torch.bool, device=weight.device))

    def current_scale(self, w: Tensor) -> Tensor:
        """The per-row scale s (out, 1) of the binarized forward (initialising the learned one on first use)."""
        if not self.learned_scale:
            return w.detach().abs().mean(dim=1, keepdim=True)
        if not bool(self.scale_initialized):
            # BiViT: s starts at mean|W_o| of the raw (uncentred) weight at the first binarized forward
            with torch.no_grad():
                self.scale.copy_(w.abs().mean(dim=1, keepdim=True))
                self.scale_initialized.fill_(True)
        return self.scale

    def forward(self, w: Tensor) -> Tensor:
        return pws_binarize_weight(w, self.current_scale(w), self.sign_of_zero)

    def factors(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(signs with their surrogate gradient, per-row scale): forward(w) = scale * signs."""
        return pws_sign(w, self.sign_of_zero), self.current_scale(w)

    def signs(self, w: Tensor) -> Tensor:
        return pws_sign(w.detach())

    def affine(self, w: Tensor) -> tuple[Tensor, None]:
        return self.current_scale(w).detach().reshape(-1), None

    def check_deployable(self, layer: str) -> None:
        check_packable(self.sign_of_zero, layer)

    def describe(self) -> dict[str, Any]:
        return {"scale": "PWS (learned)" if self.learned_scale else "mean|W| (fixed)"}


__all__ = ["BiViTSign", "PWSWeight", "SignOfZeroOptions", "PWSOptions", "check_packable", "SIGN_OF_ZERO", "check_sign_of_zero", "bivit_sign", "sab_threshold", "sab_select", "sab_binarize",
           "sab_optimal_threshold", "bibert_bool", "pws_sign", "pws_binarize_weight",
           "attention_binarization_errors"]
