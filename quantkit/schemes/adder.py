"""AdderNet post-training quantization schemes.

* ``adder_ptq{b}`` (b = 2..8) -- "Redistribution of Weights and Activations for AdderNet Quantization" (Nie et al.,
  NeurIPS 2022): k-means groups of output channels with one scale per group shared by weights and activations,
  activation outlier clamp, lossless weight clamp with bias compensation (docs/algorithms.md#addernet-ptq).
* ``adder_qssf{b}_w`` -- prior single shared scale per layer, taken from the weights (``s = max|W|``; "bits waste" on
  the activations, which are clipped at ``max|W|``).
* ``adder_qssf{b}_a`` -- prior single shared scale per layer, taken from the activations (``s = A``, the same
  percentile clamp as adder_ptq; "over clamp" of the weights, without bias correction).
* ``adder_round{b}`` -- plain per-tensor rounding: one grid per layer covering both ranges
  (``s = max(max|W|, max|x|)`` over the calibration data), no clamp of any kind.

All four run the same integer form ``-Delta_g * sum |q_x - m q_w| + b`` (so they deploy on the same kernels) and share
the activation mode, rounding and BN re-estimation options; only the choice of scales differs. Which exact scale the
QSSF paper (arXiv 2101.10015) uses is not verified, hence both variants.

Defaults and why:

* ``method``: one of the scale rules registered in :data:`quantkit.quantizers.adder.SCALE_RULES`.
* ``groups=4`` (the official ``quant_group``; the paper's ablation found 4 best); capped per layer by the number of
  output channels and by the number of distinct ``max|W_o|`` values (the report shows ``groups_requested``).
* ``percentile=99.94``: the official code applies its ratio 0.9997 twice (about the 99.94th percentile of ``|x|``).
* ``act_mode="auto"``: unsigned activations (the official code's form, one more bit of resolution) when every
  calibration input of the layer is >= 0, signed (the paper's Fig. 3 form) otherwise.
* ``round_mode="half_even"``: MindSpore ``ops.Round`` and ``torch.round`` both round half to even.
* ``bn_recalib_batches=0``: BN re-estimation is in the official eval script but not verified to be in the paper's
  numbers; off by default. When on, the BN statistics are reset and re-estimated as the exact average over that many
  calibration batches, with the quantized model (the official script instead updates them with momentum 0.1 over 202
  batches without a reset, which converges to about the same values).
* ``kmeans_seed=0``, ``kmeans_n_init=10``: reproducible clustering (the official code leaves both unset).
* ``weight_clamp="scale"``: the paper clamps weights to ``+-s_g`` and compensates in float, but the b-bit signed grid
  (``q_w = clip(round(W (2^b-1) / (2 s_g)), -2^(b-1), 2^(b-1)-1)``) does not hold ``+-s_g``: quantizing moves every
  clamped weight by ``s_g / (2^b - 1)`` (Fig. 3: +1.6 -> 7 Delta = 1.49, -1.6 -> -8 Delta = -1.71), a per-channel
  offset that grows with the number of clamped taps and is large at <= 4 bits. ``weight_clamp="grid"`` (our option,
  not in the paper) clamps to the extreme codes ``[-2^(b-1) Delta_g, (2^(b-1)-1) Delta_g]`` instead, with the same kind
  of exact bias, so the clamp stays lossless after quantization (see :func:`quantkit.quantizers.adder.grid_range`).
  BN re-estimation also absorbs the offset.
* ``weight_code_order="paper"``: weight codes from ``(W / s_g) (2^b-1) / 2``, so ``-s_g`` is the rounding tie for every
  scale (Fig. 3). ``"official"`` evaluates the official code's ``((W (2^b-1)) / s_g) / 2``, whose code at ``-s_g``
  depends on one ulp of ``s_g`` (docs/algorithms.md#adder-ptq-rounding says why it is not the default).
* ``fold_bn=True``: after calibration (and the optional BN re-estimation), each BatchNorm that directly follows a
  quantized adder layer is folded into the layer's epilogue, ``-(g Delta) S + (g b + h)``, and each one after a
  full-precision conv (stem, shortcuts) into that conv's weights, in the simulated model as convert does for the
  deploy one; both then use the same float32 constants and agree bit for bit. Unfolded, the two
  differ by float rounding of ``g (-Delta S + b) + h`` (~1e-6), enough to move an activation across the next layer's
  grid now and then, which a network amplifies (seen: 0.04 on the digits example).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import ConfigError
from ..graph.fold import fold_batchnorms, fold_batchnorms_into_float
from ..nn.adder import AdderConv2d, AdderLinear
from ..nn.adder_quant import QuantAdderConv2d, QuantAdderLinear
from ..quantizers.adder import ACT_MODES, ROUND_MODES, SCALE_RULES, WEIGHT_CODE_ORDERS, AdderQuantOptions
from .base import SchemeConfig, check_bits, register_scheme

_PREFIX = {"ptq": "adder_ptq{b}", "qssf_w": "adder_qssf{b}_w", "qssf_a": "adder_qssf{b}_a", "round": "adder_round{b}"}
_DESCRIPTIONS = {
    "ptq": "AdderNet PTQ (Nie et al. 2022), {b}-bit: k-means channel groups with shared weight/activation scales, "
           "activation outlier clamp, lossless weight clamp + bias",
    "qssf_w": "AdderNet {b}-bit baseline: one shared scale per layer from the weights (s = max|W|)",
    "qssf_a": "AdderNet {b}-bit baseline: one shared scale per layer from the activations (s = percentile clamp A)",
    "round": "AdderNet {b}-bit baseline: plain per-tensor rounding on one grid covering max(|W|, |x|), no clamps",
}


@dataclass
class AdderPTQConfig(AdderQuantOptions, SchemeConfig):
    """AdderNet post-training quantization (see the module docstring for every option and its default)."""

    description = "AdderNet post-training quantization"
    mode = "ptq"

    bn_recalib_batches: int = 0
    #: after calibration, fold each BatchNorm that directly follows a quantized adder layer into that layer's
    #: epilogue (-delta g S + g b + h), as convert does: the simulated model then computes the deploy model's
    #: constants bit for bit, so no float rounding of the fold can move an activation across the next layer's grid
    fold_bn: bool = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return _PREFIX.get(self.method, "adder_ptq{b}").format(b=self.bits)

    def targets(self) -> dict[type, type]:
        return {AdderConv2d: QuantAdderConv2d, AdderLinear: QuantAdderLinear}

    def validate(self) -> None:
        check_bits(self.label(), "bits", self.bits, 2, 8)  # first: the name is built from bits
        super().validate()
        if self.method not in SCALE_RULES:
            raise ConfigError(f"scheme {self.name!r}: method={self.method!r}; use one of {tuple(SCALE_RULES)}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ConfigError(f"scheme {self.name!r}: groups={self.groups!r} must be a positive integer (default 4)")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"scheme {self.name!r}: percentile={self.percentile!r} must be in (50, 100] "
                              "(default 99.94, the official code's clamp)")
        if self.act_mode not in ACT_MODES:
            raise ConfigError(f"scheme {self.name!r}: act_mode={self.act_mode!r}; use one of {ACT_MODES}")
        if self.weight_clamp not in ("scale", "grid"):
            raise ConfigError(f"scheme {self.name!r}: weight_clamp={self.weight_clamp!r}; use 'scale' (the paper: "
                              "clamp to +-s_g) or 'grid' (clamp to the extreme weight codes)")
        if self.weight_code_order not in WEIGHT_CODE_ORDERS:
            raise ConfigError(f"scheme {self.name!r}: weight_code_order={self.weight_code_order!r}; use 'paper' "
                              "((W/s)(2^b-1)/2: -s is the tie for every scale) or 'official' (the official code's "
                              "((W (2^b-1))/s)/2, whose code at -s depends on one ulp of s)")
        if self.round_mode not in ROUND_MODES:
            raise ConfigError(f"scheme {self.name!r}: round_mode={self.round_mode!r}; use one of {ROUND_MODES}")
        if not isinstance(self.fold_bn, bool):
            raise ConfigError(f"scheme {self.name!r}: fold_bn={self.fold_bn!r} must be True or False")
        for field_name in ("bn_recalib_batches", "kmeans_seed"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"scheme {self.name!r}: {field_name}={v!r} must be an integer >= 0")
        if isinstance(self.kmeans_n_init, bool) or not isinstance(self.kmeans_n_init, int) or self.kmeans_n_init < 1:
            raise ConfigError(f"scheme {self.name!r}: kmeans_n_init={self.kmeans_n_init!r} must be an integer >= 1")

    def calibrate_finish(self, model: nn.Module, run_batches: Callable[[int | None], int]) -> list[tuple[str, str]]:
        """Optional BN re-estimation with the quantized layers active (official ``eval.py::adjust_BN``), then the
        BatchNorm fold (``fold_bn``). Returns the (layer, BatchNorm) pairs folded."""
        if self.bn_recalib_batches > 0:
            recalibrate_batchnorm(model, run_batches, self.bn_recalib_batches)
        if not self.fold_bn:
            return []
        # the full-precision convs too (stem, shortcuts): their weights absorb the BatchNorm in simulation as in
        # deploy, instead of deploy alone computing a differently rounded conv + BN
        float_folds, _ = fold_batchnorms_into_float(model, leaves=(QuantAdderConv2d, QuantAdderLinear))
        return float_folds + fold_batchnorms(model, include_training=True)


def recalibrate_batchnorm(model: nn.Module, run_batches: Callable[[int | None], int], batches: int) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the average over ``batches`` batches run
    through ``model`` (only the BN layers in train mode; everything else in eval mode). Returns the batches run."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches
        bn.train()
    try:
        return run_batches(batches)
    finally:
        for bn, mom in momenta:
            bn.momentum = mom
        for m, was in modes:
            m.train(was)


def _register() -> None:
    for method, pattern in _PREFIX.items():
        for b in range(2, 9):
            register_scheme(pattern.format(b=b), functools.partial(AdderPTQConfig, bits=b, method=method),
                            description=_DESCRIPTIONS[method].format(b=b), mode="ptq")


_register()

__all__ = ["AdderPTQConfig", "recalibrate_batchnorm"]
