"""AdaBin binarizers (Tu et al., "AdaBin: Improving Binary Neural Networks with Adaptive Binary Sets", ECCV 2022,
arXiv 2208.08084) and the two sign surrogates they use.

Formulas follow the official PyTorch code (huawei-noah/Efficient-Computing, ``BinaryNetworks/AdaBin``,
``utils/binarylib.py``: ``BinaryQuantize``, ``BinaryActivation``, ``AdaBin_Conv2d.forward``); see
``docs/algorithms.md#adabin`` for where each piece was read.

Sign convention: every forward here uses :func:`quantkit.quantizers.binary.binary_sign` (``sign(0) = +1``), so a
binary set always has exactly two levels. The official code uses ``torch.sign`` (``sign(0) = 0``): the two differ
only for an input that is exactly zero after centering, where the official code outputs the center value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, register_quantizer
from .binary import binary_sign

# ---------------------------------------------------------------------------------------------- EDE (IR-Net)


class _EDESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(u, k, t)
        return binary_sign(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, k, t = ctx.saved_tensors
        # same operation order as the official BinaryQuantize.backward
        return k * t * (1 - torch.pow(torch.tanh(u * t), 2)) * grad, None, None


def ede_sign(u: Tensor, k: Tensor | float, t: Tensor | float) -> Tensor:
    """Sign with the Error Decay Estimator surrogate (IR-Net, Qin et al., CVPR 2020), as used by AdaBin's weights.

    forward:  b = sign(u)                                   (+1 for u >= 0)
    backward: db/du = k * t * (1 - tanh(t * u)^2)

    ``k`` and ``t`` come from :func:`ede_schedule` (0-dim tensors keep ``torch.compile`` from recompiling when
    they change between epochs). No gradient flows to ``k`` or ``t``.
    """
    k = torch.as_tensor(k, dtype=u.dtype, device=u.device)
    t = torch.as_tensor(t, dtype=u.dtype, device=u.device)
    return _EDESign.apply(u, k, t)


def ede_schedule(epoch: int, total_epochs: int, t_min: float = 1e-3, t_max: float = 10.0) -> tuple[float, float]:
    """EDE temperature schedule of the official training script (``main.py``, ``Log_UP``); returns ``(k, t)``.

    t = 10^( log10(t_min) + (log10(t_max) - log10(t_min)) * epoch / total_epochs )
      = 10^(-3 + 4 * epoch / total_epochs)       with the defaults t_min = 1e-3, t_max = 10
    k = max(1 / t, 1)

    ``epoch`` is 0-based. Early in training the surrogate is close to the identity (k*t = 1, tanh nearly
    linear); at the end it approaches the sign (t close to t_max).
    """
    if total_epochs <= 0:
        raise ValueError(f"ede_schedule: total_epochs must be >= 1, got {total_epochs}")
    if not 0 < t_min <= t_max:
        raise ValueError(f"ede_schedule: need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    lo, hi = math.log10(t_min), math.log10(t_max)
    t = math.pow(10.0, lo + (hi - lo) / total_epochs * epoch)
    k = 1.0 / t if t < 1 else 1.0
    return k, t


# ---------------------------------------------------------------------------------------------- ApproxSign


def approx_sign_grad(x: Tensor) -> Tensor:
    """Derivative of the Bi-Real Net ApproxSign polynomial: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere
    (that is ``max(0, 2 - 2|x|)``)."""
    return torch.clamp(2 - 2 * x.abs(), min=0)


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * approx_sign_grad(x)


def approx_sign(x: Tensor) -> Tensor:
    """Sign with the ApproxSign surrogate (Bi-Real Net, Liu et al., ECCV 2018).

    forward:  b = sign(x)                                   (+1 for x >= 0)
    backward: db/dx = 2 + 2x on [-1, 0),  2 - 2x on [0, 1),  0 elsewhere

    (The official code writes it with the detach trick ``sign.detach() - poly.detach() + poly``, whose forward can
    differ from +-1 by rounding; here the forward is exactly +-1.)
    """
    return _ApproxSign.apply(x)


# ---------------------------------------------------------------------------------------------- weights


def adabin_weight_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel center and distance of AdaBin's weight set (docs/algorithms.md#adabin-weight-binarizer), shaped to
    broadcast against ``w`` (``(C_out, 1, 1, 1)`` for a conv weight, ``(C_out, 1)`` for a linear one):

    beta_w[o]  = mean(W[o])
    alpha_w[o] = sqrt( mean( (W[o] - beta_w[o])^2 ) )        (population std, ddof = 0)

    Both are differentiable functions of ``w`` (the official code does not detach them). The variance is floored
    at ``finfo(dtype).tiny`` so that a constant channel binarizes to its value (W_hat = 0, sign = +1) with finite
    gradients, where the official code gives NaN.
    """
    dims = tuple(range(1, w.dim()))
    beta = w.mean(dim=dims, keepdim=True)
    var = ((w - beta) ** 2).mean(dim=dims, keepdim=True)
    # a constant channel (var = 0) would give 0/0 = NaN in W_hat and an infinite sqrt gradient; the floor keeps
    # both finite and changes nothing for any channel with var >= finfo.tiny
    alpha = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
    return alpha, beta


def adabin_weight_signs(w: Tensor, alpha: Tensor, beta: Tensor, k: Tensor | float = 10.0,
                        t: Tensor | float = 0.1) -> Tensor:
    """B_w = sign(W_hat) with W_hat = (W - beta_w) / alpha_w and the EDE surrogate on W_hat (``alpha``, ``beta``
    from :func:`adabin_weight_params`). The deploy path packs exactly these signs."""
    return ede_sign((w - beta) / alpha, k, t)


def adabin_weight(w: Tensor, k: Tensor | float = 10.0, t: Tensor | float = 0.1) -> Tensor:
    """AdaBin weight binarizer per output channel o (docs/algorithms.md#adabin-weight-binarizer; ``AdaBin_Conv2d.forward``).

    forward:  beta_w = mean(W[o]),  alpha_w = std(W[o]) (population),  W_hat = (W - beta_w) / alpha_w,
              W_b = alpha_w * sign(W_hat) + beta_w          -> binary set {beta_w - alpha_w, beta_w + alpha_w}
    backward: autograd through alpha_w and beta_w (both functions of W), with the EDE surrogate for the sign:
              d sign(W_hat)/d W_hat = k * t * (1 - tanh(t * W_hat)^2)

    ``k``, ``t``: the EDE parameters (official module defaults k = 10, t = 0.1 when no schedule runs; the schedule
    is :func:`ede_schedule`).
    """
    alpha, beta = adabin_weight_params(w)
    return alpha * adabin_weight_signs(w, alpha, beta, k, t) + beta


# ---------------------------------------------------------------------------------------------- activations


class _AdaBinActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, alpha: Tensor, beta: Tensor, paper_form: bool) -> Tensor:
        a_hat = (a - beta) / alpha
        b = binary_sign(a_hat)
        ctx.save_for_backward(a_hat, b, alpha, beta)
        ctx.paper_form = paper_form
        return alpha * b + beta if paper_form else alpha * (b + beta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a_hat, b, alpha, beta = ctx.saved_tensors
        s = approx_sign_grad(a_hat)
        grad_a = grad * s
        # parameter gradients are reduced in (at least) the parameters' precision, e.g. fp32 under bf16 autocast
        acc = torch.promote_types(grad.dtype, alpha.dtype)
        g, s_, ah, b_ = grad.to(acc), s.to(acc), a_hat.to(acc), b.to(acc)
        al, be = alpha.to(acc), beta.to(acc)
        if ctx.paper_form:
            d_alpha = b_ - ah * s_
            d_beta = 1 - s_
        else:
            d_alpha = b_ + be - ah * s_
            d_beta = al - s_
        grad_alpha = (g * d_alpha).sum_to_size(alpha.shape).to(alpha.dtype)
        grad_beta = (g * d_beta).sum_to_size(beta.shape).to(beta.dtype)
        return grad_a, grad_alpha, grad_beta, None


def adabin_activation(a: Tensor, alpha: Tensor, beta: Tensor, form: str = "code") -> Tensor:
    """AdaBin activation binarizer, learnable distance ``alpha``, center ``beta`` (docs/algorithms.md#adabin-activation-binarizer).

    Both forms share a_hat = (a - beta) / alpha, b = sign(a_hat) (threshold: a = beta when alpha > 0), and the
    ApproxSign surrogate s'(a_hat) = max(0, 2 - 2|a_hat|) for db/da_hat.

    ``form="code"`` (default; official ``BinaryActivation.forward``, loads official checkpoints):
        forward:  a_b = alpha * (b + beta)          -> levels {alpha*(beta - 1), alpha*(beta + 1)}
        backward: d a_b/d a     = s'(a_hat)
                  d a_b/d beta  = alpha - s'(a_hat)
                  d a_b/d alpha = b + beta - a_hat * s'(a_hat)

    ``form="paper"`` (the center/distance reading of the paper; its exact equation is unverified):
        forward:  a_b = alpha * b + beta            -> levels {beta - alpha, beta + alpha}
        backward: d a_b/d a     = s'(a_hat)
                  d a_b/d beta  = 1 - s'(a_hat)
                  d a_b/d alpha = b - a_hat * s'(a_hat)

    The backward is written in closed form (it equals autograd of the composition in exact arithmetic);
    gradients of ``alpha``/``beta`` are summed to their shapes (scalars in AdaBin).
    """
    if form not in ("code", "paper"):
        raise ValueError(f"adabin_activation: form must be 'code' or 'paper', got {form!r}")
    return _AdaBinActivation.apply(a, alpha, beta, form == "paper")


def adabin_activation_affine(alpha: Tensor, beta: Tensor, form: str = "code") -> tuple[Tensor, Tensor]:
    """The activation levels as ``a_b = scale * b + center`` (bitwise form, docs/algorithms.md#adabin-bitwise-form):
    code form: scale = alpha, center = alpha * beta;  paper form: scale = alpha, center = beta."""
    if form == "paper":
        return alpha, beta
    return alpha, alpha * beta


# ---------------------------------------------------------------------------------------------- quantizer objects

#: module defaults of the official AdaBin_Conv2d when no EDE schedule runs
DEFAULT_EDE_K = 10.0
DEFAULT_EDE_T = 0.1
ACT_FORMS = ("code", "paper")


@dataclass
class AdaBinWeightOptions:
    """``progressive``: run the EDE schedule (else k, t stay at the official module defaults 10, 0.1);
    ``t_min``/``t_max``: its temperature range (:func:`ede_schedule`)."""

    progressive: bool = True
    t_min: float = 1e-3
    t_max: float = 10.0


@dataclass
class AdaBinActOptions:
    """``act_form``: "code" (official code, a_b = alpha (b + beta)) or "paper" (a_b = alpha b + beta)."""

    act_form: str = "code"


@register_quantizer("adabin_weight")
class AdaBinWeight(Quantizer):
    """AdaBin's weight binarizer :func:`adabin_weight` with the EDE parameters in the buffers ``ede_k``/``ede_t``
    (saved with the state_dict so a resumed run continues with the same surrogate). Deploy: the signs of W_hat,
    scale alpha_w, center beta_w (per output channel)."""

    kind = "weight"
    Options = AdaBinWeightOptions
    optional_state = ("ede_k", "ede_t")
    exposed = ("progressive", "t_min", "t_max")

    def __init__(self, *, weight: Tensor, channels: int, progressive: bool, t_min: float, t_max: float) -> None:
        super().__init__()
        self.progressive, self.t_min, self.t_max = bool(progressive), float(t_min), float(t_max)
        self.register_buffer("ede_k", torch.tensor(DEFAULT_EDE_K, device=weight.device, dtype=torch.float32))
        self.register_buffer("ede_t", torch.tensor(DEFAULT_EDE_T, device=weight.device, dtype=torch.float32))

    def forward(self, w: Tensor) -> Tensor:
        return adabin_weight(w, self.ede_k.to(w.dtype), self.ede_t.to(w.dtype))

    def schedule(self, epoch: int, epochs: int) -> None:
        """EDE schedule (docs/algorithms.md#ede-schedule)."""
        if self.progressive:
            k, t = ede_schedule(epoch, epochs, self.t_min, self.t_max)
            self.ede_k.fill_(k)
            self.ede_t.fill_(t)

    def signs(self, w: Tensor) -> Tensor:
        w = w.detach().float()
        alpha, beta = adabin_weight_params(w)
        with torch.no_grad():  # exactly the signs the simulated forward uses
            return adabin_weight_signs(w, alpha, beta)

    def affine(self, w: Tensor) -> tuple[Tensor, Tensor]:
        alpha, beta = adabin_weight_params(w.detach().float())
        return alpha.flatten(), beta.flatten()

    def describe(self) -> dict[str, Any]:
        return {"ede_t": float(self.ede_t)}


@register_quantizer("adabin_act")
class AdaBinAct(Quantizer):
    """AdaBin's activation binarizer :func:`adabin_activation` with one learnable pair (``alpha_a``, ``beta_a``) per
    layer (official init 1, 0).

    Deploy: the kernel packs bit = (a >= beta_a). The simulated sign is that of (a - beta_a) / alpha_a: the same bit
    when alpha_a > 0, the opposite when alpha_a < 0 -- then the scale changes sign instead (the two differ only at
    an exact tie a == beta_a)."""

    kind = "input"
    Options = AdaBinActOptions
    optional_state = ("alpha_a", "beta_a")
    exposed = ("act_form",)

    def __init__(self, *, weight: Tensor, channels: int, act_form: str) -> None:
        super().__init__()
        self.act_form = act_form
        self.alpha_a = nn.Parameter(torch.tensor(1.0, device=weight.device, dtype=weight.dtype))
        self.beta_a = nn.Parameter(torch.tensor(0.0, device=weight.device, dtype=weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return adabin_activation(x, self.alpha_a, self.beta_a, self.act_form)

    def threshold(self) -> Tensor:
        return self.beta_a.detach().float()

    def affine(self) -> tuple[Tensor, Tensor]:
        alpha = self.alpha_a.detach().float()
        scale, center = adabin_activation_affine(alpha, self.beta_a.detach().float(), self.act_form)
        return (scale if float(alpha) >= 0 else -scale), center

    def describe(self) -> dict[str, Any]:
        return {"acts": f"adabin/{self.act_form}", "alpha_a": float(self.alpha_a.detach()),
                "beta_a": float(self.beta_a.detach())}


__all__ = [
    "AdaBinWeight",
    "AdaBinAct",
    "AdaBinWeightOptions",
    "AdaBinActOptions",
    "DEFAULT_EDE_K",
    "DEFAULT_EDE_T",
    "ede_sign",
    "ede_schedule",
    "approx_sign",
    "approx_sign_grad",
    "adabin_weight_params",
    "adabin_weight_signs",
    "adabin_weight",
    "adabin_activation",
    "adabin_activation_affine",
]
