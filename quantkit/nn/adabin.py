"""AdaBin layers (Tu et al., ECCV 2022; ALGORITHMS.md section 2): simulated ``AdaBinConv2d`` / ``AdaBinLinear``,
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
from ..quantizers.binary import binary_sign
from .base import NotQuantizable, QuantModule

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

    def _init_adabin(self, config: Any) -> None:
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
        """EDE schedule (ALGORITHMS.md 2.2): t = 10^(log t_min + (log t_max - log t_min) e / E), k = max(1/t, 1)."""
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
        """Per-output-channel constants of the bitwise form (ALGORITHMS.md 2.4) and the packed-sign source."""
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
        new._init_adabin(config)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.binarize_input(x), self.binarized_weight(), self.bias)

    def to_deploy(self) -> nn.Module:
        return AdaBinDeployConv2d.from_simulated(self)


class AdaBinLinear(_AdaBinMixin, QuantModule, nn.Linear):
    """AdaBin binary linear layer: y = a_b @ W_b^T (+ bias), W_b per output row (same binarizers as
    :class:`AdaBinConv2d`)."""

    @classmethod
    def from_float(cls, module: nn.Linear, config: Any = None, name: str = "") -> "AdaBinLinear":
        new = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                  dtype=module.weight.dtype)
        new._init_adabin(config)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.binarize_input(x), self.binarized_weight(), self.bias)

    def to_deploy(self) -> nn.Module:
        return AdaBinDeployLinear.from_simulated(self)


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

    forward:  f(x) = gamma+_c * max(x, 0) - gamma-_c * max(-x, 0)
    backward: df/dx = gamma+_c for x > 0, gamma-_c for x < 0;  df/dgamma+_c = max(x, 0);  df/dgamma-_c = -max(-x, 0)

    ``gamma+`` (``pos_scale``) starts at 1.0 and ``gamma-`` (``neg_scale``) at 0.25; both are learnable and
    unconstrained (some become negative in the released checkpoint).
    """

    def __init__(self, channels: int, neg_init: float = 0.25, pos_init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.pos_scale = nn.Parameter(torch.full((channels,), pos_init, device=device, dtype=dtype))
        self.neg_scale = nn.Parameter(torch.full((channels,), neg_init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        # scales follow the input's dtype so a bf16 activation under autocast stays bf16
        pos, neg = self.pos_scale.to(x.dtype).view(shape), self.neg_scale.to(x.dtype).view(shape)
        return pos * F.relu(x) - neg * F.relu(-x)

    def extra_repr(self) -> str:
        return f"{self.channels}"


# ---------------------------------------------------------------------------------------------- deploy forms


class AdaBinDeployConv2d(nn.Module):
    """Frozen AdaBin conv on packed bits (ALGORITHMS.md 2.4). With a_b = scale_a s_a + c_a and
    W_b = alpha_w s_w + beta_w, over the valid (unpadded) taps of each output position::

        y = alpha_w scale_a sum(s_w s_a) + alpha_w c_a sum(s_w) + beta_w scale_a sum(s_a) + n beta_w c_a + bias

    with sum(s_w s_a) = n - 2 popcount(B_w XOR B_a), computed by :func:`quantkit.ops.binary_conv2d`. The input signs
    are those of the simulated layer, s_a = sign((a - beta_a) / alpha_a).

    Weight-only layers (full-precision activations) have no bitwise product: they keep the packed signs and the
    per-channel constants and compute conv(a, alpha_w s_w + beta_w) in float.
    """

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_simulated(cls, sim: AdaBinConv2d) -> "AdaBinDeployConv2d":
        from ..ops.packing import pack_conv_weight

        c = sim._frozen_constants()
        self = cls()
        self.in_channels, self.out_channels = sim.in_channels, sim.out_channels
        self.kernel_size, self.stride = tuple(sim.kernel_size), tuple(sim.stride)
        self.padding, self.dilation = tuple(sim.padding), tuple(sim.dilation)
        self.weight_only = sim.weight_only
        self.register_buffer("weight_bits", pack_conv_weight(c["signs"]))
        self.register_buffer("alpha_w", c["alpha_w"])
        self.register_buffer("beta_w", c["beta_w"])
        self.register_buffer("bias", None if sim.bias is None else sim.bias.detach().float().clone())
        if not self.weight_only:
            alpha_w, beta_w, s, ca = c["alpha_w"], c["beta_w"], c["scale_a"], c["center_a"]
            self.register_buffer("act_alpha", c["alpha_a"].clone())
            self.register_buffer("act_beta", c["beta_a"].clone())
            self.register_buffer("scale", alpha_w * s)
            self.register_buffer("act_sum_scale", beta_w * s)
            self.register_buffer("weight_sum_scale", alpha_w * ca)
            self.register_buffer("count_scale", beta_w * ca)
        return self

    def forward(self, x: Tensor) -> Tensor:
        from ..ops.binary import binary_conv2d
        from ..ops.packing import pack_activation_nhwc, unpack_bits

        x = x.float()
        if self.weight_only:
            signs = unpack_bits(self.weight_bits, self.in_channels).permute(0, 3, 1, 2)
            w = self.alpha_w.view(-1, 1, 1, 1) * signs + self.beta_w.view(-1, 1, 1, 1)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)
        a_hat = (x - self.act_beta) / self.act_alpha  # the simulated layer's threshold, bit for bit
        y = binary_conv2d(pack_activation_nhwc(a_hat), self.weight_bits, self.in_channels, self.stride,
                          self.padding, self.dilation, scale=self.scale, act_sum_scale=self.act_sum_scale,
                          weight_sum_scale=self.weight_sum_scale, count_scale=self.count_scale, bias=self.bias)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, weight_only={self.weight_only}")


class AdaBinDeployLinear(nn.Module):
    """Frozen AdaBin linear layer on packed bits: y = alpha_w scale_a sum(s_w s_a) + beta_w scale_a sum(s_a) + b',
    where the input-independent terms fold into b' = alpha_w c_a sum(s_w) + K beta_w c_a + bias
    (:func:`quantkit.ops.binary_linear`). Weight-only layers compute in float from the packed signs."""

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_simulated(cls, sim: AdaBinLinear) -> "AdaBinDeployLinear":
        from ..ops.packing import pack_linear_weight

        c = sim._frozen_constants()
        self = cls()
        self.in_features, self.out_features = sim.in_features, sim.out_features
        self.weight_only = sim.weight_only
        self.register_buffer("weight_bits", pack_linear_weight(c["signs"]))
        self.register_buffer("alpha_w", c["alpha_w"])
        self.register_buffer("beta_w", c["beta_w"])
        bias = torch.zeros(sim.out_features) if sim.bias is None else sim.bias.detach().float().clone()
        if self.weight_only:
            self.register_buffer("bias", None if sim.bias is None else bias)
            return self
        alpha_w, beta_w, s, ca = c["alpha_w"], c["beta_w"], c["scale_a"], c["center_a"]
        wsum = c["signs"].sum(dim=1)
        self.register_buffer("act_alpha", c["alpha_a"].clone())
        self.register_buffer("act_beta", c["beta_a"].clone())
        self.register_buffer("scale", alpha_w * s)
        self.register_buffer("act_sum_scale", beta_w * s)
        self.register_buffer("bias", (alpha_w * ca * wsum + sim.in_features * beta_w * ca + bias).float())
        return self

    def forward(self, x: Tensor) -> Tensor:
        from ..ops.binary import binary_linear
        from ..ops.packing import pack_bits, unpack_bits

        x = x.float()
        if self.weight_only:
            signs = unpack_bits(self.weight_bits, self.in_features)
            w = self.alpha_w.view(-1, 1) * signs + self.beta_w.view(-1, 1)
            return F.linear(x, w, self.bias)
        a_hat = (x - self.act_beta) / self.act_alpha
        return binary_linear(pack_bits(a_hat), self.weight_bits, self.in_features, scale=self.scale,
                             act_sum_scale=self.act_sum_scale, bias=self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_only={self.weight_only}"


__all__ = ["AdaBinConv2d", "AdaBinLinear", "Maxout", "AdaBinDeployConv2d", "AdaBinDeployLinear",
           "is_downsample_conv", "DEFAULT_EDE_K", "DEFAULT_EDE_T"]
