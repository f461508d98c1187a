"""AdderNet post-training quantization: the math of one adder layer, as small functions.

Paper: Y. Nie, K. Han, H. Diao, C. Liu, E. Wu, Y. Wang, "Redistribution of Weights and Activations for AdderNet
Quantization", NeurIPS 2022 (arXiv 2212.10200). Official code: MindSpore ``research/cv/AdderQuant`` (``adder_quant.py``
class ``QAdder2dKmeansGroupShare`` and ``eval.py``). The steps and the places where the notes were ambiguous are in
``docs/algorithms.md#addernet-ptq``; every choice is an option of :class:`quantkit.schemes.adder.AdderPTQConfig`.

The adder kernel ``|x - w|`` has an integer form only if x and w lie on one grid, so one scale ``s_g`` is shared by the
weights of output-channel group ``g`` and by the activations re-quantized for that group:

1. activation clamp ``A``: a high percentile of ``|x|`` per calibration batch, max over batches (:func:`abs_percentile`);
2. output channels grouped by k-means on each filter's ``max|W_o|`` (:func:`kmeans_groups`);
3. group scale ``s_g = min(max|W_g|, A)`` (:func:`group_scales`); weights clamped to ``+-s_g`` with the exact
   per-channel bias ``b_o = -sum relu(|W_o| - s_g)`` (:func:`lossless_weight_clamp`);
4. b-bit codes on the group grid (:func:`quantize_weight_codes`, :func:`quantize_act_codes`), step :func:`group_step`;
5. ``Y_o = -Delta_g * sum |q_x - m q_w| + b_o`` with ``m = 1`` (signed activations, paper Fig. 3) or ``m = 2``
   (unsigned activations, the official code) -- evaluated by :mod:`quantkit.ops.adder`.

Quantizers round with a straight-through estimator (forward: exact rounding; backward: identity), so the simulated
layer stays differentiable; the clamps of the grid pass gradients only inside the range (as ``torch.clamp``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .uniform import ROUND_MODES, round_half, round_ste

ACT_MODES = ("auto", "signed", "unsigned")


# ----------------------------------------------------------------------------------------------------- step 1
def abs_percentile(x: Tensor, percentile: float) -> Tensor:
    """Outlier clamp of one calibration batch: the ``percentile``-th percentile of ``|x|`` over the whole tensor.

        A_batch = sort(|x|.flatten())[floor((M - 1) * p / 100)]          (M = numel, 0-based index, no interpolation)

    The layer's clamp is ``A = max(max_batches A_batch, 1e-3)`` (running max, then a floor, as ``eval.py::count_scale``).
    The official code takes index ``floor((round(M r) - 1) r)`` with ``r = 0.9997`` -- r applied twice, i.e. about the
    99.94th percentile (``100 r^2 = 99.940009``); ``p = 99.94`` reproduces it to within one element in 10^4.
    Selection uses ``kthvalue`` (linear time), not a full sort. ``x`` must be finite (the caller checks).
    """
    flat = x.detach().reshape(-1).abs().float()
    if flat.numel() == 0:
        raise ConfigError("abs_percentile: empty tensor")
    k = int(np.floor((flat.numel() - 1) * float(percentile) / 100.0))
    k = min(max(k, 0), flat.numel() - 1)
    return torch.kthvalue(flat.cpu(), k + 1).values


# ----------------------------------------------------------------------------------------------------- step 2
def kmeans_groups(feature: Tensor, groups: int, seed: int = 0, n_init: int = 10) -> tuple[Tensor, int]:
    """Group output channels by 1-D k-means on a per-channel feature (the paper uses ``max|W_o|``).

    scikit-learn ``KMeans(n_clusters=G, init="k-means++", max_iter=300, tol=1e-4)`` as the official
    ``cluster_by_kmeans``, but with a fixed ``random_state=seed`` and ``n_init`` so results are reproducible.

    * ``groups`` larger than the number of channels is an error (callers cap it first; the layers do).
    * If the feature has fewer distinct values than ``groups``, ``G`` becomes that count (k-means could not fill more
      groups without duplicates); no group is ever empty.
    * Groups are numbered by increasing centroid, so group 0 holds the filters with the smallest ranges.

    Returns ``(group_index, G)``: a ``(C,)`` int64 tensor with values in ``[0, G)``, every value used, and ``G``.
    """
    values = feature.detach().double().cpu().reshape(-1)
    n = values.numel()
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"kmeans_groups: groups={groups!r} must be a positive integer")
    if groups > n:
        raise ConfigError(
            f"kmeans_groups: groups={groups} is larger than the number of channels ({n}); use groups <= {n}"
        )
    if not torch.isfinite(values).all():
        raise ConfigError("kmeans_groups: the feature has NaN/Inf values (are the layer's weights finite?)")
    distinct = torch.unique(values)
    g = min(groups, distinct.numel())
    if g == 1:
        return torch.zeros(n, dtype=torch.int64), 1
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    # one thread: the problem is tiny, and sklearn's OpenMP pool next to torch's can be 100x slower than serial
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # ConvergenceWarning on ties is handled below by compacting the labels
        km = KMeans(n_clusters=g, init="k-means++", n_init=n_init, max_iter=300, tol=1e-4, random_state=seed)
        labels = km.fit_predict(values.numpy().reshape(-1, 1))
    centers = km.cluster_centers_.reshape(-1)
    used = [c for c in np.argsort(centers, kind="stable") if np.any(labels == c)]  # drop any empty cluster
    remap = np.full(g, -1, dtype=np.int64)
    remap[np.array(used)] = np.arange(len(used))
    return torch.from_numpy(remap[labels]), len(used)


# ----------------------------------------------------------------------------------------------------- step 3
def group_scales(channel_absmax: Tensor, group_index: Tensor, n_groups: int, act_clamp: float | Tensor) -> Tensor:
    """Shared scale of each group: ``s_g = min(max_{o in g} max|W_o|, A)``.

    A group whose weights exceed the activation clamp ``A`` takes ``s_g = A`` (its weights are then clamped to ``+-A``
    losslessly, see :func:`lossless_weight_clamp`); the others keep their own range. A group whose weights are all 0
    has no range of its own and takes ``s_g = A`` (0 is on every grid).
    """
    absmax = channel_absmax.detach().float().reshape(-1)
    a = torch.as_tensor(act_clamp, dtype=torch.float32)
    scales = torch.zeros(n_groups, dtype=torch.float32)
    scales.scatter_reduce_(0, group_index.cpu(), absmax.cpu(), reduce="amax", include_self=True)
    scales = torch.minimum(scales, a)
    return torch.where(scales > 0, scales, a)


def lossless_weight_clamp(weight: Tensor, clip: Tensor, lower: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Clamp each output channel's weights to ``[l_o, c_o]`` (``l_o = -c_o`` unless ``lower`` is given) and return the
    bias that keeps the outputs exact.

        W'_o = clamp(W_o, l_o, c_o)
        b_o  = -sum_{c,i,j} [ max(W_o(c,i,j) - c_o, 0) + max(l_o - W_o(c,i,j), 0) ]       (from the unclamped weights)

    With ``l_o = -c_o`` this is the paper's ``b_o = -sum max(|W_o| - c_o, 0)``. Exact whenever every activation lies
    in ``[l_o, c_o]``: for ``w >= c >= x``, ``|x - w| = (w - c) + |x - c|`` (and symmetrically below ``l``), so
    ``-sum|x - W| = -sum|x - W'| + b`` (paper Fig. 3: a weight range clamped to +-1.6 with bias -126.2).
    ``clip`` / ``lower`` are ``(C_out,)``; no gradient.
    """
    w = weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    hi = clip.detach().to(w.dtype).view(shape)
    lo = -hi if lower is None else lower.detach().to(w.dtype).view(shape)
    clamped = torch.maximum(torch.minimum(w, hi), lo)
    bias = -((w - hi).clamp_min(0) + (lo - w).clamp_min(0)).flatten(1).sum(1)
    return clamped, bias


def grid_range(scale: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Values of the extreme signed weight codes: ``(-2^(b-1) Delta_g, (2^(b-1) - 1) Delta_g)``, ``Delta_g = 2 s_g/(2^b-1)``.

    The signed grid is symmetric in step but not in range: ``+s_g`` itself is not on it (it rounds to
    ``(2^(b-1) - 1) Delta_g = s_g (1 - 1/(2^b - 1))``) and ``-s_g`` rounds to ``-s_g (1 + 1/(2^b - 1))`` (or, with
    ``order="official"`` of :func:`quantize_weight_codes`, for the float scales where the official order of operations
    lands one ulp above the tie, to ``-s_g (1 - 1/(2^b - 1))``). Weights clamped to
    ``+-s_g`` therefore all move by ``s_g / (2^b - 1)`` when quantized, in the same direction for a whole filter's
    clamped taps; clamping to this range instead (``weight_clamp="grid"``) keeps the clamp lossless after
    quantization for activations on the same grid."""
    step = group_step(scale, bits, signed=True)
    return -(2 ** (bits - 1)) * step, (2 ** (bits - 1) - 1) * step


# ----------------------------------------------------------------------------------------------------- step 4
def group_step(scale: Tensor, bits: int, signed: bool) -> Tensor:
    """Step that multiplies the integer l1 sum: signed form ``Delta_g = 2 s_g / (2^b - 1)`` (weights and activations on
    the same grid); unsigned form ``Delta_x = s_g / (2^b - 1)`` (activations; the weight step is ``2 Delta_x``, which the
    integer form absorbs as ``|q_x - 2 q_w|``)."""
    levels = 2**bits - 1
    return scale * (2.0 / levels) if signed else scale * (1.0 / levels)


def _to_grid(v: Tensor, scale: Tensor, bits: int, signed: bool) -> Tensor:
    """Activations: ``v (2^b - 1) / (2 s)`` (signed) or ``v (2^b - 1) / s`` (unsigned), computed as ``(v / s) * c``.

    The compiled ``quantize_groups`` kernel and the ONNX export evaluate the same expression in the same order, so the
    codes agree bit for bit. The official code evaluates ``(x (2^b - 1)) / s``; the two orders can differ by one ulp
    before rounding, which changes a code only when ``x`` sits within an ulp of a rounding tie (an exact float
    coincidence for real activations; unlike the weights, no activation is clamped onto ``+-s`` before rounding).
    """
    levels = 2**bits - 1
    return (v / scale) * (levels / 2.0 if signed else float(levels))


def _weight_to_grid(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Weights: ``((W (2^b - 1)) / s) / 2``, the official order of operations (``construct``: ``w * (2^b-1) / s / 2``).

    The order matters for clamped groups, whose weights sit exactly on ``-s`` (and ``+s``): ``(-s (2^b - 1)) / s`` is
    ``-(2^b - 1)`` only when ``s (2^b - 1)`` rounds back exactly; otherwise it is one ulp off, e.g. float32 ``s = 0.3``
    at 4 bits gives ``-7.4999995``, which rounds to ``-7`` instead of the tie's ``-8`` (about 13% of float32 scales at
    4 bits). ``+s`` gives code ``2^(b-1) - 1`` either way (``+7.5`` rounds to 8 and is clipped to 7). Used with
    ``weight_code_order="official"``; deploy codes come from the same function, so simulation and deploy agree.
    """
    return w * float(2**bits - 1) / scale / 2.0


WEIGHT_CODE_ORDERS = ("paper", "official")


def quantize_weight_codes(weight: Tensor, scale: Tensor, bits: int, round_mode: str = "half_even",
                          order: str = "paper") -> Tensor:
    """Signed symmetric b-bit weight codes on the group grid (official ``construct``; paper Fig. 3):

        q_w = clip(round(W * (2^b - 1) / (2 s_g)), -2^(b-1), 2^(b-1) - 1),   W ~= Delta_w q_w,  Delta_w = 2 s_g / (2^b - 1)

    ``scale`` broadcasts against ``weight`` (per output channel: shape ``(C_out, 1, ...)``). Returns float codes
    (integer values) with the straight-through gradient. Note the grid is symmetric in step but not in range:
    ``+s_g`` maps to ``2^(b-1) - 1`` and ``-s_g`` to ``-2^(b-1)`` (Fig. 3: +-1.6 -> 7 / -8 at 4 bits) -- or, with
    ``order="official"``, to ``-2^(b-1) + 1`` for the scales where that order lands one ulp above the tie.

    ``order`` picks the expression before rounding: ``"paper"`` (default) ``(W / s) (2^b - 1) / 2``, where ``+-s`` lands
    exactly on the tie for every scale (Fig. 3's -1.6 -> -8 holds whatever ``s`` is); ``"official"`` the official
    code's ``((W (2^b - 1)) / s) / 2`` (:func:`_weight_to_grid`), whose code at ``-s`` depends on one ulp of ``s``.
    The default is the paper's because it is scale-independent and, with the paper's clamp to ``+-s``, measured more
    accurate (docs/algorithms.md#adder-ptq-rounding has the numbers).
    """
    if order not in WEIGHT_CODE_ORDERS:
        raise ValueError(f"order={order!r}; use one of {WEIGHT_CODE_ORDERS}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grid = _weight_to_grid(weight, scale, bits) if order == "official" else _to_grid(weight, scale, bits, True)
    return torch.clamp(round_ste(grid, round_mode), lo, hi)


def quantize_act_codes(x: Tensor, scale: Tensor, bits: int, signed: bool, round_mode: str = "half_even",
                       ste: bool = True) -> Tensor:
    """Activation codes on group ``g``'s grid (the activations are re-quantized once per group):

        signed   (paper Fig. 3): q_x = clip(round(x (2^b - 1) / (2 s_g)), -2^(b-1), 2^(b-1) - 1)   step Delta_g
        unsigned (official code): q_x = clip(round(x (2^b - 1) / s_g),        0,        2^b - 1)     step Delta_g / 2

    The clip is the activation clamp: in a group with ``s_g = A`` it is the outlier clamp (lossless for the weights,
    see :func:`lossless_weight_clamp`); in a group with ``s_g = max|W_g| < A`` it also clips activations between
    ``s_g`` and ``A`` (lossy, as in the official code). Float codes; straight-through gradient unless ``ste=False``
    (deploy layers: same values, no autograd function).
    """
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    scaled = _to_grid(x, scale, bits, signed)
    return torch.clamp(round_ste(scaled, round_mode) if ste else round_half(scaled, round_mode), lo, hi)


def max_l1_term(bits: int, signed: bool) -> int:
    """Largest ``|q_x - m q_w|`` of one tap: ``2^b - 1`` (signed, m = 1) or ``2^(b+1) - 1`` (unsigned, m = 2)."""
    return 2**bits - 1 if signed else 2 ** (bits + 1) - 1


# ----------------------------------------------------------------------------------------------- the options
@dataclass
class AdderQuantOptions:
    """What one adder layer is quantized with (the scheme :class:`quantkit.schemes.adder.AdderPTQConfig` inherits
    these fields; its module docstring says why each default): ``bits``, ``groups`` (k-means groups, ``method="ptq"``),
    ``percentile`` (activation clamp), ``act_mode``, ``round_mode``, ``kmeans_seed`` / ``kmeans_n_init``,
    ``weight_clamp`` ("scale" | "grid"), ``weight_code_order`` ("paper" | "official"), ``method`` (a registered scale
    rule, :data:`SCALE_RULES`)."""

    bits: int = 4
    groups: int = 4
    percentile: float = 99.94
    act_mode: str = "auto"
    round_mode: str = "half_even"
    kmeans_seed: int = 0
    kmeans_n_init: int = 10
    weight_clamp: str = "scale"
    weight_code_order: str = "paper"
    method: str = "ptq"


# ----------------------------------------------------------------------------------------------- scale rules
@dataclass(frozen=True)
class ScaleRule:
    """How one method chooses the group scales at the end of calibration: ``scales(channel_absmax, act_clamp,
    act_absmax, options) -> (group_index (C,), group_scales (G,))``; ``compensate_clamp``: whether the weights
    clipped at the scale get the exact per-channel bias of :func:`lossless_weight_clamp`."""

    scales: Callable[[Tensor, float, float, AdderQuantOptions], tuple[Tensor, Tensor]]
    compensate_clamp: bool = True


#: method name -> rule (the ``method`` option of the adder schemes)
SCALE_RULES: dict[str, ScaleRule] = {}


def register_scale_rule(name: str, compensate_clamp: bool = True):
    """Decorator: register ``scales(channel_absmax, act_clamp, act_absmax, options)`` as the scale rule ``name``."""

    def deco(fn: Callable[[Tensor, float, float, AdderQuantOptions], tuple[Tensor, Tensor]]):
        SCALE_RULES[name] = ScaleRule(fn, compensate_clamp)
        return fn

    return deco


def _one_scale(channel_absmax: Tensor, s: float, act_clamp: float) -> tuple[Tensor, Tensor]:
    """One group holding every channel, scale ``s`` (``act_clamp`` if ``s`` is 0: an all-zero layer)."""
    return (torch.zeros(channel_absmax.numel(), dtype=torch.int64),
            torch.tensor([s if s > 0 else act_clamp], dtype=torch.float32))


@register_scale_rule("ptq")
def ptq_scales(channel_absmax: Tensor, act_clamp: float, act_absmax: float,
               options: AdderQuantOptions) -> tuple[Tensor, Tensor]:
    """The paper: k-means groups on max|W_o| (:func:`kmeans_groups`), s_g = min(max|W_g|, A) (:func:`group_scales`)."""
    groups = min(options.groups, channel_absmax.numel())
    gi, g = kmeans_groups(channel_absmax, groups, options.kmeans_seed, options.kmeans_n_init)
    return gi, group_scales(channel_absmax, gi, g, act_clamp)


@register_scale_rule("qssf_w")
def qssf_w_scale(channel_absmax: Tensor, act_clamp: float, act_absmax: float,
                 options: AdderQuantOptions) -> tuple[Tensor, Tensor]:
    """One shared scale per layer from the weights, s = max|W| (activations clipped at it)."""
    return _one_scale(channel_absmax, float(channel_absmax.max()), act_clamp)


@register_scale_rule("qssf_a", compensate_clamp=False)
def qssf_a_scale(channel_absmax: Tensor, act_clamp: float, act_absmax: float,
                 options: AdderQuantOptions) -> tuple[Tensor, Tensor]:
    """One shared scale per layer from the activations, s = A (weights clipped at it, without a bias correction:
    the prior single-scale method)."""
    return _one_scale(channel_absmax, act_clamp, act_clamp)


@register_scale_rule("round")
def round_scale(channel_absmax: Tensor, act_clamp: float, act_absmax: float,
                options: AdderQuantOptions) -> tuple[Tensor, Tensor]:
    """One grid per layer covering both ranges, s = max(max|W|, max|x|); no clamp of any kind."""
    return _one_scale(channel_absmax, max(float(channel_absmax.max()), act_absmax), act_clamp)


METHODS = tuple(SCALE_RULES)

__all__ = ["ROUND_MODES", "ACT_MODES", "round_half", "round_ste", "abs_percentile", "kmeans_groups", "group_scales",
           "lossless_weight_clamp", "grid_range", "WEIGHT_CODE_ORDERS", "group_step", "quantize_weight_codes",
           "quantize_act_codes", "max_l1_term", "AdderQuantOptions", "ScaleRule", "SCALE_RULES", "register_scale_rule",
           "METHODS"]
