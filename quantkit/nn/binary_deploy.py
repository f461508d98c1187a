"""Deploy layers for every binary-weight convolution and linear layer (XNOR-Net, AdaBin, BiViT's PWS linears).

They hold only packed weight signs (int32 words, layout in :mod:`quantkit.ops.layout`) and per-channel float32
epilogue constants. Any layer whose binarized operands are affine in the signs,

    a_b = alpha_a * s_a + c_a,     w_b[o] = alpha_w[o] * s_w[o] + beta_w[o],

computes (docs/kernels.md#epilogue-algebra; every sum over the valid, unpadded taps, so zero padding is exact)

    y = alpha_w alpha_a SUM(s_w s_a) + beta_w alpha_a SUM(s_a) + alpha_w c_a SUM(s_w) + n beta_w c_a + bias

which is the epilogue of :func:`quantkit.ops.binary_conv2d` / :func:`quantkit.ops.binary_linear`
(``scale``, ``act_sum_scale``, ``weight_sum_scale``, ``count_scale``, ``bias``; see :func:`affine_epilogue`).
XNOR-Net is alpha_a = 1, c_a = 0, beta_w = 0; AdaBin uses all four terms; BiViT's PWS linear has scale = s.

Binary input: bit = (x >= ``in_threshold``), packed by the kernel, then the XNOR/popcount product.
Float input (``in_threshold is None``: AdaBin weight-only, BiViT MLP "1/32"): the same epilogue with
SUM(s_w a) and SUM(a) taken over the float input, ``y = scale * (a * s_w) + act_sum_scale * SUM(a) + bias``.

Inputs: float32 only, ``(N, C_in, H, W)`` for the conv and ``(..., in_features)`` for the linear, with exactly the
channel count the layer was built for. Any other dtype (float16, bfloat16, float64, bool, integers), rank or
channel count raises :class:`~quantkit.errors.KernelError` naming the layer -- the same inputs the simulated
(float32) model rejects, so a deploy model never returns an answer its simulated model would not.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import KernelError

EPILOGUE_TERMS = ("scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias")


def _vec(v: Tensor | None, n: int) -> Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32).detach()
    return (t.expand(n) if t.numel() == 1 else t.reshape(n)).clone().contiguous()


def affine_epilogue(alpha_w: Tensor, beta_w: Tensor | None = None, alpha_a: Tensor | float = 1.0,
                    c_a: Tensor | float = 0.0, bias: Tensor | None = None) -> dict[str, Tensor | None]:
    """Per-output-channel epilogue constants for a_b = alpha_a s_a + c_a and w_b = alpha_w s_w + beta_w:
    scale = alpha_w alpha_a, act_sum_scale = beta_w alpha_a, weight_sum_scale = alpha_w c_a,
    count_scale = beta_w c_a, bias (terms that are identically zero are None)."""
    alpha_w = torch.as_tensor(alpha_w, dtype=torch.float32).detach().flatten()
    n = alpha_w.numel()
    alpha_a = torch.as_tensor(alpha_a, dtype=torch.float32).detach()
    c_a = torch.as_tensor(c_a, dtype=torch.float32).detach()
    beta = None if beta_w is None else torch.as_tensor(beta_w, dtype=torch.float32).detach().flatten()
    has_c = bool(c_a.abs().sum() != 0)
    return {
        "scale": _vec(alpha_w * alpha_a, n),
        "act_sum_scale": None if beta is None else _vec(beta * alpha_a, n),
        "weight_sum_scale": _vec(alpha_w * c_a, n) if has_c else None,
        "count_scale": _vec(beta * c_a, n) if has_c and beta is not None else None,
        "bias": _vec(bias, n),
    }


class _BinaryDeploy(nn.Module):
    def _register(self, weight_packed: Tensor, in_threshold: Tensor | float | None, epilogue: dict) -> None:
        self.float_input = in_threshold is None
        self.register_buffer("weight_packed", weight_packed.contiguous())
        self.register_buffer("in_threshold", None if in_threshold is None
                             else torch.as_tensor(in_threshold, dtype=torch.float32).detach().clone())
        if self.float_input and (epilogue.get("weight_sum_scale") is not None or epilogue.get("count_scale") is not None):
            raise ValueError("float-input binary layers have c_a = 0: no weight-sum or count terms")
        n = weight_packed.shape[0]
        for name in EPILOGUE_TERMS:
            self.register_buffer(name, _vec(epilogue.get(name), n))

    def fold_affine(self, g: Tensor, h: Tensor) -> None:
        """Absorb ``y -> g * y + h`` (per output channel, e.g. a following BatchNorm) into the epilogue."""
        g, h = g.float().flatten(), h.float().flatten()
        self.scale = g.clone() if self.scale is None else self.scale * g
        for name in ("act_sum_scale", "weight_sum_scale", "count_scale"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) * g)
        self.bias = h.clone() if self.bias is None else self.bias * g + h

    def _check_input(self, x: Tensor, rank_ok: bool, expected: str, channels: int, got_channels: int) -> None:
        """float32, the right rank and channel count (module docstring)."""
        if isinstance(x, Tensor) and x.dtype == torch.float32 and rank_ok and got_channels == channels:
            return  # the common case, on every call: no error text to build
        layer = f"{type(self).__name__}({self.extra_repr()})"
        if not isinstance(x, Tensor):
            raise KernelError(f"{layer}: expected a tensor input, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise KernelError(
                f"{layer}: expects a float32 input (as its simulated model does), got {x.dtype}; convert it with "
                "x.float()"
            )
        if not rank_ok:
            raise KernelError(f"{layer}: expects {expected} input, got shape {tuple(x.shape)}")
        if got_channels != channels:
            raise KernelError(
                f"{layer}: was built for {channels} input channels but the input {tuple(x.shape)} has {got_channels}"
            )

    def _epilogue_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in EPILOGUE_TERMS}

    def _pack_threshold(self, channels: int) -> Tensor:
        # always a per-channel tensor: no data-dependent branch (a device sync on GPU, a graph break when compiled);
        # packing against a zero threshold costs the same as packing the plain sign
        t = self.in_threshold
        return t.expand(channels).contiguous() if t.numel() == 1 else t

    def _float_epilogue(self, dot: Tensor, asum: Tensor | None, shape: tuple) -> Tensor:
        y = dot if self.scale is None else dot * self.scale.view(shape)
        if self.act_sum_scale is not None:
            y = y + asum * self.act_sum_scale.view(shape)
        return y if self.bias is None else y + self.bias.view(shape)


_HAVE_PREPACKED: list[bool] = []


def _have_prepacked_kernel() -> bool:
    """Whether the compiled prepacked conv op exists (asked once: the extension does not change in a process)."""
    if not _HAVE_PREPACKED:
        _HAVE_PREPACKED.append(ops._dispatch.has_op("binary_conv2d_prepacked"))
    return _HAVE_PREPACKED[0]


class BinaryDeployConv2d(_BinaryDeploy):
    """Packed binary conv2d (module docstring): NCHW float input -> bits packed NHWC -> the binary conv kernel.

    The weights are prepacked once, when the layer is built (and again when a state dict loads new
    ``weight_packed``), by :func:`quantkit.ops.binary_conv_prepack` into the buffers ``weight_panels`` /
    ``weight_popcounts`` (and ``weight_amx`` on CPUs with AMX; derived, not saved in the state dict); on CPU every call runs
    :func:`quantkit.ops.binary_conv2d_prepacked` on them, so no call repacks weights. :meth:`fused` exposes that
    op's epilogue (residual add, Maxout, thresholded packed-bit output) to fused deploy blocks
    (:mod:`quantkit.graph.block_fusion`)."""

    def __init__(self, weight_packed: Tensor, in_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], in_threshold: Tensor | float | None,
                 epilogue: dict) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(weight_packed.shape[0])
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._register(weight_packed, in_threshold, epilogue)
        self.register_buffer("weight_panels", None, persistent=False)
        self.register_buffer("weight_popcounts", None, persistent=False)
        self.register_buffer("weight_amx", None, persistent=False)
        self.register_buffer("in_threshold_channels", None, persistent=False)
        self.prepack()

    def prepack(self) -> None:
        """(Re)build ``weight_panels`` / ``weight_popcounts`` from ``weight_packed``, on CPUs with AMX-INT8 also
        ``weight_amx`` (:func:`quantkit.ops.binary_conv_prepack_amx`, the same size as the packed weights), and the
        per-channel input threshold ``in_threshold_channels`` (explicit: the only place the prepacked form is made)."""
        if self.weight_packed.device.type == "meta":
            return
        with torch.no_grad():
            self.weight_panels, self.weight_popcounts = ops.binary_conv_prepack(self.weight_packed, self.in_channels)
            self.weight_amx = (ops.binary_conv_prepack_amx(self.weight_packed, self.in_channels)
                               if self.weight_packed.device.type == "cpu" and ops.cpu_amx_supported() else None)
            if self.in_threshold is not None:
                self.in_threshold_channels = self._pack_threshold(self.in_channels).clone()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.prepack()  # the loaded weight_packed replaces the one the panels were made from

    def in_threshold_vector(self) -> Tensor:
        """The input threshold as a per-channel ``(in_channels,)`` vector (binary-input layers only)."""
        b = self._buffers  # direct: this runs twice per block call, nn.Module.__getattr__ is the slow path
        t = b["in_threshold_channels"]
        return t if t is not None and t.device == b["in_threshold"].device else self._pack_threshold(self.in_channels)

    def _prepacked_ready(self, x: Tensor) -> bool:
        panels = self._buffers["weight_panels"]
        return x.is_cpu and panels is not None and panels.is_cpu and _have_prepacked_kernel()

    def fused(self, x_bits: Tensor, *, residual: Tensor | None = None, maxout: tuple[Tensor, Tensor] | None = None,
              threshold: Tensor | None = None, float_out: bool = True,
              bias_add: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The layer on already packed NHWC input bits ``x_bits``, with the fused epilogue of
        :func:`quantkit.ops.binary_conv2d_prepacked` (``maxout`` = (pos, neg) slopes); returns ``(y, bits)``.
        ``bias_add`` (C_out,) is added to the layer's bias for this call (a shortcut's bias, see
        :func:`~quantkit.nn.fused_block.pointwise_conv_bias_apart`)."""
        mpos, mneg = maxout if maxout is not None else (None, None)
        if self._prepacked_ready(x_bits):
            # the op itself: the layer's buffers were checked when it was built, the kernel checks the rest; the
            # buffers straight from their dict (per call: nn.Module.__getattr__ costs a Python call per name)
            b = self._buffers
            bias = b["bias"]
            if bias_add is not None:
                bias = bias_add if bias is None else bias + bias_add
            return torch.ops.quantkit.binary_conv2d_prepacked(
                x_bits, b["weight_panels"], b["weight_popcounts"], self.in_channels, self.out_channels,
                self.kernel_size, self.stride, self.padding, self.dilation,
                b["scale"], b["act_sum_scale"], b["weight_sum_scale"], b["count_scale"], bias, residual,
                mpos, mneg, threshold, float_out, b["weight_amx"])
        # other devices: the plain kernel and the same epilogue steps as separate ops
        y = ops.binary_conv2d(x_bits, self.weight_packed, self.in_channels, self.stride, self.padding,
                              self.dilation, **self._epilogue_kwargs())
        if bias_add is not None:
            y = y + bias_add.view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual
        if maxout is not None:
            y = ops.maxout(y, mpos, mneg)
        bits = ops.pack_activation_nhwc(y, threshold) if threshold is not None else y.new_empty((0,), dtype=torch.int32)
        return (y if float_out else y.new_empty((0,))), bits

    @classmethod
    def from_signs(cls, signs: Tensor, epilogue: dict, *, stride, padding, dilation,
                   in_threshold: Tensor | float | None = 0.0) -> "BinaryDeployConv2d":
        """From the +-1 weight signs ``(C_out, C_in, kh, kw)`` and the constants of :func:`affine_epilogue`."""
        return cls(ops.pack_conv_weight(signs), signs.shape[1], signs.shape[2:], stride, padding, dilation,
                   in_threshold, epilogue)

    def weight_signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The +-1 weight signs ``(C_out, C_in, kh, kw)`` unpacked."""
        return ops.unpack_bits(self.weight_packed, self.in_channels, dtype).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        rank_ok = isinstance(x, Tensor) and x.dim() == 4
        self._check_input(x, rank_ok, "an (N, C, H, W)", self.in_channels, x.shape[1] if rank_ok else -1)
        if self.float_input:
            geo = (self.stride, self.padding, self.dilation)
            dot = F.conv2d(x, self.weight_signs(x.dtype), None, *geo)
            asum = None
            if self.act_sum_scale is not None:  # SUM(a) over the valid taps of each output position
                ones = x.new_ones((1, self.in_channels) + self.kernel_size)
                asum = F.conv2d(x, ones, None, *geo)
            return self._float_epilogue(dot, asum, (1, -1, 1, 1))
        xp = ops.pack_activation_nhwc(x, self.in_threshold_vector())
        if self._prepacked_ready(xp):
            return self.fused(xp)[0]
        return ops.binary_conv2d(xp, self.weight_packed, self.in_channels, self.stride, self.padding, self.dilation,
                                 **self._epilogue_kwargs())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, packed 1-bit weights, "
                f"{'float' if self.float_input else 'binary'} input")


class BinaryDeployLinear(_BinaryDeploy):
    """Packed binary linear: float input (..., K) -> bits (x >= in_threshold) -> ``binary_linear``. With no padding
    SUM(s_w) and n are constants, so the weight-sum and count terms fold into the bias."""

    def __init__(self, weight_packed: Tensor, in_features: int, in_threshold: Tensor | float | None,
                 epilogue: dict) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(weight_packed.shape[0])
        self._register(weight_packed, in_threshold, epilogue)

    @classmethod
    def from_signs(cls, signs: Tensor, epilogue: dict, *,
                   in_threshold: Tensor | float | None = 0.0) -> "BinaryDeployLinear":
        """From the +-1 weight signs ``(N, K)`` and the constants of :func:`affine_epilogue`."""
        epi = dict(epilogue)
        wsum_scale, count_scale = epi.pop("weight_sum_scale", None), epi.pop("count_scale", None)
        if wsum_scale is not None or count_scale is not None:
            folded = torch.zeros(signs.shape[0]) if epi.get("bias") is None else epi["bias"].clone().float()
            if wsum_scale is not None:
                folded += wsum_scale * signs.float().sum(dim=1)
            if count_scale is not None:
                folded += count_scale * signs.shape[1]
            epi["bias"] = folded
        return cls(ops.pack_linear_weight(signs), signs.shape[1], in_threshold, epi)

    def weight_signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return ops.unpack_bits(self.weight_packed, self.in_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        rank_ok = isinstance(x, Tensor) and x.dim() >= 1
        self._check_input(x, rank_ok, "an (..., in_features)", self.in_features, x.shape[-1] if rank_ok else -1)
        if self.float_input:
            dot = F.linear(x, self.weight_signs(x.dtype))
            asum = x.sum(dim=-1, keepdim=True) if self.act_sum_scale is not None else None
            return self._float_epilogue(dot, asum, (-1,))
        xp = ops.pack_bits(x, self._pack_threshold(x.shape[-1]))
        return ops.binary_linear(xp, self.weight_packed, self.in_features, scale=self.scale,
                                 act_sum_scale=self.act_sum_scale, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed 1-bit weights, "
                f"{'float' if self.float_input else 'binary'} input")
