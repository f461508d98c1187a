"""AdaBin layers (Tu et al., ECCV 2022; docs/algorithms.md#adabin): simulated ``AdaBinConv2d`` / ``AdaBinLinear``,
the ``Maxout`` nonlinearity, and their deploy forms running the bitwise kernels of :mod:`quantkit.ops.binary`.

Parameter names follow the float layer (``weight``, ``bias``) so float checkpoints load, plus the official code's
names where it has them (``alpha_a``, ``beta_a`` of the activation binarizer; ``pos_scale``, ``neg_scale`` of
Maxout). The EDE parameters live in the buffers ``ede_k`` / ``ede_t`` (saved with the state_dict so a resumed run
continues with the same surrogate; missing from a float checkpoint is fine).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers.adabin import (adabin_activation, adabin_activation_affine, adabin_weight_params,
                                 adabin_weight_signs, ede_schedule)
from ..ops.elementwise import maxout
from ..quantizers.binary import binary_sign
from .base import NotQuantizable, QuantModule
from .binary_deploy import BinaryDeployConv2d, BinaryDeployLinear, affine_epilogue

# torch.fx records maxout as one call (its kernel/reference choice is Python control flow)
torch.fx.wrap("maxout")

#: module defaults of the official AdaBin_Conv2d when no EDE schedule runs
DEFAULT_EDE_K = 10.0
DEFAULT_EDE_T = 0.1


def _option(config: Any, name: str, default: Any) -> Any:
    return getattr(config, name, default) if config is not None else default


def is_downsample_conv(name: str, module: nn.Module) -> bool:
    """A residual shortcut projection: a 1x1 conv that strides, or one inside a module named ``downsample`` /
    ``shortcut`` (torchvision and most CIFAR ResNets). AdaBin keeps these full precision by default."""
    if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != (1, 1):
        return False
    parts = name.split(".")
    return max(module.stride) > 1 or any(p in ("downsample", "shortcut") for p in parts)


class _AdaBinMixin:
    """What AdaBinConv2d and AdaBinLinear share: the activation parameters, the EDE buffers and their schedule."""

    optional_state = ("alpha_a", "beta_a", "ede_k", "ede_t")

    def _init_adabin(self, config: Any, source: nn.Module) -> None:
        """Set up the AdaBin state and copy the float layer's weight and bias (same names: checkpoints load)."""
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if source.bias is not None:
                self.bias.copy_(source.bias)
        p = self.weight
        self.act_form: str = _option(config, "act_form", "code")
        self.weight_only: bool = bool(_option(config, "weight_only", False))
        self.progressive: bool = bool(_option(config, "progressive", True))
        self.t_min: float = float(_option(config, "t_min", 1e-3))
        self.t_max: float = float(_option(config, "t_max", 10.0))
        self.bits_w, self.bits_a = 1, (None if self.weight_only else 1)
        if self.weight_only:
            self.register_parameter("alpha_a", None)
            self.register_parameter("beta_a", None)
        else:
            # official init: distance 1, center 0 (one scalar pair per layer)
            self.alpha_a = nn.Parameter(torch.tensor(1.0, device=p.device, dtype=p.dtype))
            self.beta_a = nn.Parameter(torch.tensor(0.0, device=p.device, dtype=p.dtype))
        self.register_buffer("ede_k", torch.tensor(DEFAULT_EDE_K, device=p.device, dtype=torch.float32))
        self.register_buffer("ede_t", torch.tensor(DEFAULT_EDE_T, device=p.device, dtype=torch.float32))

    def binarize_input(self, x: Tensor) -> Tensor:
        if self.weight_only:
            return x
        return adabin_activation(x, self.alpha_a, self.beta_a, self.act_form)

    def binarized_weight(self) -> Tensor:
        """W_b = alpha_w * sign(W_hat) + beta_w (differentiable; EDE surrogate with the current k, t)."""
        w = self.weight
        alpha, beta = adabin_weight_params(w)
        signs = adabin_weight_signs(w, alpha, beta, self.ede_k.to(w.dtype), self.ede_t.to(w.dtype))
        return alpha * signs + beta

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        """EDE schedule (docs/algorithms.md#ede-schedule): t = t_min (t_max / t_min)^(e / E), k = max(1/t, 1)."""
        if not self.progressive:
            return
        k, t = ede_schedule(epoch, total_epochs, self.t_min, self.t_max)
        self.ede_k.fill_(k)
        self.ede_t.fill_(t)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"acts": "fp (weight_only)" if self.weight_only else f"adabin/{self.act_form}",
                                "ede_t": float(self.ede_t)}
        if not self.weight_only:
            info["alpha_a"], info["beta_a"] = float(self.alpha_a.detach()), float(self.beta_a.detach())
        return info

    def _frozen_constants(self) -> dict[str, Tensor]:
        """Per-channel constants of the bitwise form (docs/algorithms.md#adabin-bitwise-form) and the packed-sign source."""
        w = self.weight.detach().float()
        alpha_w, beta_w = adabin_weight_params(w)
        signs = binary_sign((w - beta_w) / alpha_w)  # exactly the signs the simulated forward uses
        out = {"signs": signs, "alpha_w": alpha_w.flatten(), "beta_w": beta_w.flatten()}
        if not self.weight_only:
            scale_a, center_a = adabin_activation_affine(self.alpha_a.detach().float(), self.beta_a.detach().float(),
                                                         self.act_form)
            out.update(alpha_a=self.alpha_a.detach().float(), beta_a=self.beta_a.detach().float(),
                       scale_a=scale_a, center_a=center_a)
        return out

    def _deploy_form(self) -> tuple[Tensor, dict, Tensor | None]:
        """Signs, epilogue constants and input threshold of the deploy layer (docs/algorithms.md#adabin-bitwise-form).

        The kernel packs bit = (a >= beta_a). The simulated sign is that of (a - beta_a) / alpha_a: the same bit when
        alpha_a > 0, the opposite when alpha_a < 0 -- then the activation scale changes sign instead (the two forms
        differ only at an exact tie a == beta_a). Weight-only layers take a float input (threshold None)."""
        c = self._frozen_constants()
        bias = None if self.bias is None else self.bias.detach()
        if self.weight_only:
            return c["signs"], affine_epilogue(c["alpha_w"], c["beta_w"], bias=bias), None
        scale_a = c["scale_a"] if float(c["alpha_a"]) >= 0 else -c["scale_a"]
        return c["signs"], affine_epilogue(c["alpha_w"], c["beta_w"], scale_a, c["center_a"], bias), c["beta_a"]


class AdaBinConv2d(_AdaBinMixin, QuantModule, nn.Conv2d):
    """AdaBin binary convolution (official ``AdaBin_Conv2d``): y = conv(a_b, W_b) (+ bias), zero padding applied
    to the binarized input (padded taps are 0, not a binary level).

    a_b: :func:`quantkit.quantizers.adabin.adabin_activation` (learnable ``alpha_a``, ``beta_a``);
    W_b: :func:`quantkit.quantizers.adabin.adabin_weight` (per output channel, EDE surrogate).
    Grouped / depthwise convolutions are not binarized (``from_float`` raises :class:`NotQuantizable`).
    """

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: Any = None, name: str = "") -> "AdaBinConv2d":
        if module.padding_mode != "zeros":
            raise NotQuantizable(
                f"padding_mode={module.padding_mode!r}: AdaBin's bitwise form needs zero padding (padded taps = 0)")
        if module.groups != 1:
            raise NotQuantizable(
                f"grouped/depthwise conv (groups={module.groups}) is not binarized: each filter sees only "
                f"{module.in_channels // module.groups} input channel(s), too few taps for a 1-bit set, and the "
                "binary kernels compute dense convolutions")
        if _option(config, "keep_downsample", False) and is_downsample_conv(name, module):
            raise NotQuantizable(
                "downsample shortcut (1x1 conv) kept full precision (AdaBin placement; set keep_downsample=False "
                f"or rules={{{name!r}: {{'keep_downsample': False}}}} to binarize it)")
        padding = module.padding
        if isinstance(padding, str):
            padding = _explicit_padding(module)
            if padding is None:
                raise NotQuantizable(
                    f"padding={module.padding!r} with kernel {module.kernel_size} is asymmetric; binary kernels take "
                    "symmetric integer padding")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                  module.dilation, 1, module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        new._init_adabin(config, module)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.binarize_input(x), self.binarized_weight(), self.bias)

    def to_deploy(self) -> BinaryDeployConv2d:
        signs, epilogue, threshold = self._deploy_form()
        return BinaryDeployConv2d.from_signs(signs, epilogue, stride=self.stride, padding=self.padding,
                                             dilation=self.dilation, in_threshold=threshold)


class AdaBinLinear(_AdaBinMixin, QuantModule, nn.Linear):
    """AdaBin binary linear layer: y = a_b @ W_b^T (+ bias), W_b per output row (same binarizers as
    :class:`AdaBinConv2d`)."""

    @classmethod
    def from_float(cls, module: nn.Linear, config: Any = None, name: str = "") -> "AdaBinLinear":
        new = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                  dtype=module.weight.dtype)
        new._init_adabin(config, module)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.binarize_input(x), self.binarized_weight(), self.bias)

    def to_deploy(self) -> BinaryDeployLinear:
        signs, epilogue, threshold = self._deploy_form()
        return BinaryDeployLinear.from_signs(signs, epilogue, in_threshold=threshold)


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Integer padding equivalent to a string padding ('valid', or symmetric 'same'), else None."""
    if module.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)  # type: ignore[return-value]


class Maxout(nn.Module):
    """AdaBin's nonlinearity (official ``Maxout``), per channel c (dim 1 of the input):

    forward:  f(x) = gamma+_c * max(x, 0) - gamma-_c * max(-x, 0)  =  x * (gamma+_c if x > 0 else gamma-_c)
    backward: df/dx = gamma+_c for x > 0, gamma-_c for x < 0;  df/dgamma+_c = max(x, 0);  df/dgamma-_c = -max(-x, 0)

    At inference the second form runs as one fused pass (:func:`quantkit.ops.maxout`, bit-identical values): at deploy
    time this elementwise op would otherwise cost more than the binary convolutions around it.

    ``gamma+`` (``pos_scale``) starts at 1.0 and ``gamma-`` (``neg_scale``) at 0.25; both are learnable and
    unconstrained (some become negative in the released checkpoint).
    """

    def __init__(self, channels: int, neg_init: float = 0.25, pos_init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.pos_scale = nn.Parameter(torch.full((channels,), pos_init, device=device, dtype=dtype))
        self.neg_scale = nn.Parameter(torch.full((channels,), neg_init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # scales follow the input's dtype so a bf16 activation under autocast stays bf16; at inference a fused
        # one-pass kernel (quantkit.ops.maxout, same values)
        return maxout(x, self.pos_scale, self.neg_scale)

    def extra_repr(self) -> str:
        return f"{self.channels}"


__all__ = ["AdaBinConv2d", "AdaBinLinear", "Maxout",
           "is_downsample_conv", "DEFAULT_EDE_K", "DEFAULT_EDE_T"]
