"""BiViT schemes (He et al., ICCV 2023, arXiv 2211.07091) and the BiBERT baseline for vision transformers.

- ``bivit``: attention fully binary (qkv/proj with binary inputs and PWS weights, sign Q/K/V, SAB attention);
  MLP weights binary with PWS, MLP activations full precision (the paper's "MLP 1/32" default); cross-layer
  binarization (CLB): with :class:`quantkit.QAT`, MLPs stay FP for the first ``clb_split`` of the epochs.
- ``bivit_full``: the same with binary MLP activations (the fully binary "1/1" setting).
- ``bibert``: BiBERT's binarization (Qin et al., ICLR 2022) as the baseline: Bool of the pre-softmax scores,
  weight scales mean|W| (not learned), no CLB; MLP activations FP as in BiViT's comparison (Table 3).

Patch embedding, classification head, patch merging, LayerNorms, residuals, softmax and GELU stay FP.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..graph.attention import BiViTPass
from ..nn.bivit import (ATTENTION_METHODS, BinaryAttentionOptions, BinaryLinearPWS, BinaryMultiheadAttention,
                        BinaryShiftedWindowAttention)
from .base import SchemeConfig, register_scheme


@dataclass
class BiViTConfig(BinaryAttentionOptions, SchemeConfig):
    """Options (all overridable per call, e.g. ``quantkit.QAT(model, "bivit", beta=0.35, clb=False)``):

    - ``attention``: "sab" (softmax-aware binarization) or "bibert" (Bool of the scores);
    - ``beta``: SAB threshold factor, T = beta * row max (paper: 0.25); ``sab_scale``: multiply the {0,1} attention
      by the per-row basis v (default False: no scale, the paper's default);
    - ``pws``: learned per-row weight scales (True) or fixed mean|W| (False);
    - ``binarize_mlp``: binarize MLP weights; ``mlp_binary_act``: binarize MLP inputs too;
    - ``clb``: cross-layer binarization schedule; ``clb_split``: fraction of the epochs in stage 1 (attention only);
    - ``sign_of_zero``: what the binary signs (Q/K/V, linear inputs, centred weights) give for an exact 0: ``1``
      (default; +1, what a packed bit holds) or ``0`` (the official code's ``torch.sign``, to reproduce its training
      numerics; simulation only -- ``convert`` refuses it, since a packed bit cannot represent 0).
    """

    name = "bivit"
    description = ("BiViT: binary attention with softmax-aware binarization, binary MLP weights with learned scales "
                   "(MLP activations FP), cross-layer binarization schedule; QAT")
    mode = "qat"

    binarize_mlp: bool = True
    mlp_binary_act: bool = False
    clb: bool = True
    clb_split: float = 0.5

    def targets(self) -> dict[type, type]:
        out: dict[type, type] = {nn.MultiheadAttention: BinaryMultiheadAttention, nn.Linear: BinaryLinearPWS}
        try:
            from torchvision.models.swin_transformer import ShiftedWindowAttention

            out[ShiftedWindowAttention] = BinaryShiftedWindowAttention
        except Exception:  # pragma: no cover - torchvision missing
            pass
        return out

    def passes(self) -> list:
        return [BiViTPass()]

    def validate(self) -> None:
        super().validate()
        if self.attention not in ATTENTION_METHODS:
            raise ConfigError(f"scheme {self.name!r}: attention={self.attention!r}; use one of {ATTENTION_METHODS}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 < self.beta <= 1.0:
            raise ConfigError(f"scheme {self.name!r}: beta={self.beta!r} must be a number in (0, 1] (paper: 0.25)")
        if isinstance(self.clb_split, bool) or not isinstance(self.clb_split, (int, float)) or not 0.0 <= self.clb_split <= 1.0:
            raise ConfigError(f"scheme {self.name!r}: clb_split={self.clb_split!r} must be a fraction of the epochs "
                              "in [0, 1] (paper: 0.5, i.e. 150 + 150 epochs)")
        if isinstance(self.sign_of_zero, bool) or self.sign_of_zero not in (0, 1):
            raise ConfigError(f"scheme {self.name!r}: sign_of_zero={self.sign_of_zero!r}; use 1 (sign(0) = +1, "
                              "deployable) or 0 (sign(0) = 0 as the official code's torch.sign; simulation only)")
        for flag in ("sab_scale", "pws", "binarize_mlp", "mlp_binary_act", "clb"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"scheme {self.name!r}: {flag}={getattr(self, flag)!r} must be True or False")

    def stage2_epoch(self, total_epochs: int) -> int:
        """First epoch of CLB stage 2 (MLPs binarized): ``round(clb_split * total_epochs)``; 0 without CLB."""
        return int(round(self.clb_split * total_epochs)) if self.clb else 0

    def epoch_start(self, model: nn.Module, epoch: int, total_epochs: int) -> None:
        """Cross-layer binarization: MLP linears run in FP before :meth:`stage2_epoch`, binary from it on."""
        binary_mlps = epoch >= self.stage2_epoch(total_epochs)
        for m in model.modules():
            if isinstance(m, BinaryLinearPWS) and m.role == "mlp":
                m.binarize = binary_mlps


@dataclass
class BiViTFullConfig(BiViTConfig):
    name = "bivit_full"
    description = "BiViT fully binary: like bivit, with binary MLP activations too (W1/A1 everywhere but the ends); QAT"
    mlp_binary_act: bool = True


@dataclass
class BiBERTConfig(BiViTConfig):
    name = "bibert"
    description = ("BiBERT baseline for ViTs: Bool of the pre-softmax attention scores, binary weights with mean|W| "
                   "scales, MLP activations FP, no cross-layer schedule; QAT")
    attention: str = "bibert"
    pws: bool = False
    clb: bool = False


register_scheme("bivit", BiViTConfig)
register_scheme("bivit_full", BiViTFullConfig)
register_scheme("bibert", BiBERTConfig)
