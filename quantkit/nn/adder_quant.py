"""Simulated and deploy layers of AdderNet post-training quantization (``adder_ptq{b}`` and its baselines).

The simulated layers (:class:`QuantAdderConv2d`, :class:`QuantAdderLinear`) compute exactly the integer form of the
paper (docs/algorithms.md#adder-ptq-integer-form), with float tensors holding integer codes::

    for each group g (output channels o with group_index[o] == g):
        q_x = quantize_act_codes(x, s_g)                 activations re-quantized on the group's grid
        Y_o = -Delta_g * sum |q_x - m q_w[o]| + b_o      m = 1 (signed activations) or 2 (unsigned activations)

The l1 sums of integer codes are exact in float32 while they stay below 2^24 (float64 is used otherwise), so the
simulated output equals the integer kernels of :mod:`quantkit.ops.adder` (integer sums bit-exact, the float epilogue
``-Delta * S + b`` within float rounding). The deploy layers (:class:`AdderDeployConv2d`, :class:`AdderDeployLinear`)
hold int8 weight codes, the group of each channel, the group scales, the per-channel step and bias, plus the
weights packed once for the CPU kernels, and call ``quantkit.ops.adder.adder_conv2d_packed`` /
``adder_linear_packed`` (activation re-quantization fused into the kernel), or ``adder_conv2d`` / ``adder_linear``
after ``quantize_groups`` elsewhere.

How the group scales are chosen is the scheme's ``method`` (see :mod:`quantkit.schemes.adder`):

* ``"ptq"`` -- the paper: k-means groups on ``max|W_o|``, ``s_g = min(max|W_g|, A)``, lossless weight clamp + bias
  (to ``+-s_g`` as the paper, or with ``weight_clamp="grid"`` to the extreme weight codes, see
  :func:`quantkit.quantizers.adder.grid_range`);
* ``"qssf_w"`` -- one scale per layer from the weights, ``s = max|W|`` (activations clipped at it);
* ``"qssf_a"`` -- one scale per layer from the activations, ``s = A`` (weights clipped at it, no bias correction);
* ``"round"`` -- one grid per layer covering both ranges, ``s = max(max|W|, max|x|)``; no clamp of any kind.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CalibrationDataError, KernelError, UnsupportedModelError
from ..ops.elementwise import quantize_groups
from ..quantizers.adder import (METHODS, SCALE_RULES, AdderQuantOptions, abs_percentile, grid_range, group_step,
                                lossless_weight_clamp, max_l1_term, quantize_act_codes, quantize_weight_codes)
from .adder import AdderConv2d, AdderLinear, adder_conv2d_fp, adder_linear_fp
from .base import QuantModule

_ACT_CLAMP_FLOOR = 1e-3  # eval.py floors the calibrated clamp at 1e-3


def _check_weights(weight: Tensor, name: str) -> None:
    w = weight.detach()
    if not torch.isfinite(w).all():
        raise UnsupportedModelError(f"adder layer {name!r}: its weights contain NaN/Inf; load finite trained weights")
    if w.numel() and bool(w.max() == w.min()):
        raise UnsupportedModelError(
            f"adder layer {name!r}: all {w.numel()} weights equal {float(w.flatten()[0]):.6g}, so there is nothing to "
            "group or clamp (adder PTQ groups output channels by each filter's max|W|); this usually means the trained "
            f"weights were not loaded. Load them, or keep the layer full precision with skip=[{name!r}]"
        )


class _QuantAdderMixin(QuantModule):
    """Calibration, scale selection and the integer-form forward shared by the conv and linear layers."""

    optional_state = ("act_clamp", "act_absmax", "act_min", "calib_batches", "group_index", "group_scale",
                      "unsigned_act", "ready", "out_scale", "out_shift")

    @classmethod
    def from_float(cls, module: nn.Module, config: Any = None, name: str = "") -> "_QuantAdderMixin":
        """The quantized layer for the float adder ``module`` (same weight/bias names: checkpoints load)."""
        new = cls._empty_like(module)
        new.load_state_dict(module.state_dict())
        new.calibrating = False
        new._init_quant(config, name)
        return new

    def _init_quant(self, config: Any, name: str) -> None:
        _check_weights(self.weight, name)
        self.layer_name = name
        source = AdderQuantOptions() if config is None else config
        #: this layer's options (the scheme config's fields of AdderQuantOptions)
        self.options = AdderQuantOptions(**{f.name: getattr(source, f.name)
                                            for f in dataclasses.fields(AdderQuantOptions)})
        self.bits_w = self.bits_a = int(self.options.bits)
        dev = self.weight.device
        cout = self.weight.shape[0]
        self.register_buffer("act_clamp", torch.tensor(float("-inf"), device=dev))  # running max of percentiles -> A
        self.register_buffer("act_absmax", torch.tensor(0.0, device=dev))
        self.register_buffer("act_min", torch.tensor(float("inf"), device=dev))
        self.register_buffer("calib_batches", torch.tensor(0, device=dev))
        self.register_buffer("group_index", torch.zeros(cout, dtype=torch.int64, device=dev))
        self.register_buffer("group_scale", torch.ones(1, device=dev))
        self.register_buffer("unsigned_act", torch.tensor(False, device=dev))
        self.register_buffer("ready", torch.tensor(False, device=dev))
        # y -> out_scale * y + out_shift of a BatchNorm folded into this layer (None until fold_affine)
        self.register_buffer("out_scale", None)
        self.register_buffer("out_shift", None)

    # ---- calibration ------------------------------------------------------------------------------------------
    def _observe(self, x: Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationDataError(
                f"adder layer {self.layer_name!r}: its input has {bad} NaN/Inf value(s) during calibration; check the "
                "calibration data and the layers before it"
            )
        a = abs_percentile(x, self.options.percentile).to(self.act_clamp.device)
        self.act_clamp.copy_(torch.maximum(self.act_clamp, a))
        self.act_absmax.copy_(torch.maximum(self.act_absmax, x.abs().max().float()))
        self.act_min.copy_(torch.minimum(self.act_min, x.min().float()))
        self.calib_batches += 1

    def finish_calibration(self) -> None:
        super().finish_calibration()
        if int(self.calib_batches) == 0:
            return  # never ran on the calibration data: stays full precision, describe() says so
        dev = self.weight.device
        a = max(float(self.act_clamp), _ACT_CLAMP_FLOOR)
        self.act_clamp.fill_(a)
        ch_absmax = self.weight.detach().abs().flatten(1).amax(1).float().cpu()
        gi, scales = SCALE_RULES[self.options.method].scales(ch_absmax, a, float(self.act_absmax), self.options)
        self.group_index.copy_(gi.to(dev))
        self.group_scale = scales.to(dev)
        mode = self.options.act_mode
        self.unsigned_act.fill_(mode == "unsigned" or (mode == "auto" and float(self.act_min) >= 0.0))
        self.ready.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "group_scale"
        if key in state_dict and state_dict[key].shape != self.group_scale.shape:  # G is known only after calibration
            self.group_scale = torch.empty_like(state_dict[key], device=self.group_scale.device)
        for name in ("out_scale", "out_shift"):  # present once a BatchNorm was folded into the layer
            if prefix + name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- the quantized parameters -----------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return int(self.group_scale.numel())

    @property
    def signed_act(self) -> bool:
        return not bool(self.unsigned_act)

    @property
    def w_mult(self) -> int:
        """1: signed form |q_x - q_w| (Fig. 3); 2: unsigned form |q_x - 2 q_w| (official code)."""
        return 1 if self.signed_act else 2

    def _state_key(self) -> tuple:
        tensors = [self.weight, self.bias, self.group_index, self.group_scale, self.unsigned_act]
        return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)

    def quant_params(self) -> dict[str, Tensor]:
        """The frozen integer-form parameters: ``w_codes`` (integer-valued float), per-channel ``delta`` and ``bias``
        (weight-clamp compensation + the layer's own bias), ``group_index``, ``group_scale``. They carry no gradient
        (post-training quantization) and are cached until one of the tensors they come from changes."""
        key = self._state_key()
        cached = getattr(self, "_qp_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        params = self._compute_quant_params()
        self._qp_cache = (key, params)
        return params

    def _compute_quant_params(self) -> dict[str, Tensor]:
        s_ch = self.group_scale[self.group_index]
        if self.options.weight_clamp == "grid":
            lo, hi = grid_range(s_ch, self.bits_w)
            clamped, comp = lossless_weight_clamp(self.weight, hi, lo)
        else:
            clamped, comp = lossless_weight_clamp(self.weight, s_ch)
        if not SCALE_RULES[self.options.method].compensate_clamp:
            comp = torch.zeros_like(comp)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        w_codes = quantize_weight_codes(clamped, s_ch.view(shape).to(clamped.dtype), self.bits_w, self.options.round_mode,
                                        self.options.weight_code_order)
        bias = comp if self.bias is None else comp + self.bias.detach()
        return {"w_codes": w_codes.detach(), "delta": group_step(s_ch, self.bits_w, self.signed_act).float(),
                "bias": bias.float(), "group_index": self.group_index.clone(), "group_scale": self.group_scale.clone()}

    def act_codes(self, x: Tensor, g: int, ste: bool = True) -> Tensor:
        """Activation codes on group ``g``'s grid (float tensor with integer values)."""
        return quantize_act_codes(x, self.group_scale[g].to(x.dtype), self.bits_a, self.signed_act,
                                  self.options.round_mode, ste=ste)

    def _sum_dtype(self, x: Tensor) -> torch.dtype:
        reduction = self.weight[0].numel()
        exact32 = reduction * max_l1_term(self.bits_a, self.signed_act) < 2**24
        return torch.float32 if exact32 and x.dtype != torch.float64 else torch.float64

    def _quant_forward(self, x: Tensor) -> Tensor:
        p = self.quant_params()
        delta, bias = self.epilogue(p)
        dt = self._sum_dtype(x)
        w_mult_codes = (p["w_codes"] * self.w_mult).to(dt)
        outs, order = [], []
        for g in range(self.n_groups):
            idx = torch.nonzero(self.group_index == g).flatten()
            if idx.numel() == 0:
                continue
            s = -self._neg_l1(self.act_codes(x, g).to(dt), w_mult_codes[idx])  # exact integer sums
            shape = self._channel_view(s.dim())
            y = s.float() * (-delta[idx]).view(shape) + bias[idx].view(shape)
            outs.append(y)
            order.append(idx)
        y = torch.cat(outs, dim=self._channel_dim)
        inverse = torch.argsort(torch.cat(order))
        return y.index_select(self._channel_dim, inverse).to(x.dtype)

    def _channel_view(self, dim: int) -> tuple[int, ...]:
        """The view that broadcasts a per-output-channel vector against a ``dim``-D output."""
        return (1, -1) + (1,) * (dim - 2) if self._channel_dim == 1 else (-1,)

    def epilogue(self, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The per-channel (delta, bias) of ``Y = -delta * S + bias``, with a folded BatchNorm's ``g, h`` applied as
        ``delta * g`` and ``bias * g + h`` -- the same float32 operations as the deploy layer's ``fold_affine``, so
        the simulated and deploy outputs are bitwise equal."""
        if self.out_scale is None:
            return p["delta"], p["bias"]
        return p["delta"] * self.out_scale, p["bias"] * self.out_scale + self.out_shift

    def fold_affine(self, g: Tensor, h: Tensor) -> None:
        """Absorb ``y -> g * y + h`` (per output channel: an inference BatchNorm that follows) into this layer, as
        the deploy layer does at convert; folding a second affine composes with the first."""
        g = g.detach().float().flatten().to(self.weight.device)
        h = h.detach().float().flatten().to(self.weight.device)
        if self.out_scale is None:
            self.out_scale, self.out_shift = g.clone(), h.clone()
        else:
            self.out_scale, self.out_shift = self.out_scale * g, self.out_shift * g + h

    def _fp_with_affine(self, x: Tensor) -> Tensor:
        y = self._fp_forward(x)
        if self.out_scale is None:
            return y
        shape = self._channel_view(y.dim())
        return y * self.out_scale.view(shape).to(y.dtype) + self.out_shift.view(shape).to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self._observe(x)
            return self._fp_with_affine(x)  # calibration statistics come from the full-precision network
        if not bool(self.ready):
            return self._fp_with_affine(x)
        return self._quant_forward(x)

    # ---- report -----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        if not bool(self.ready):
            return {"groups": self.options.groups, "calibrated": False}
        ch_absmax = self.weight.detach().abs().flatten(1).amax(1)
        gmax = torch.zeros(self.n_groups, device=ch_absmax.device).scatter_reduce(
            0, self.group_index, ch_absmax.float(), reduce="amax", include_self=True)
        sizes = torch.bincount(self.group_index, minlength=self.n_groups).tolist()
        info: dict[str, Any] = {"method": self.options.method, "groups": self.n_groups}
        if self.options.method == "ptq" and self.n_groups != self.options.groups:
            info["groups_requested"] = self.options.groups
        info.update({
            "group_sizes": sizes,
            "scales": [round(float(s), 4) for s in self.group_scale],
            "clamp_A": float(self.act_clamp),
            "act": "unsigned" if bool(self.unsigned_act) else "signed",
            "clamped_groups": int((gmax > self.group_scale * (1 + 1e-6)).sum()),
        })
        if self.options.weight_clamp != "scale":
            info["weight_clamp"] = self.options.weight_clamp
        return info


class QuantAdderConv2d(_QuantAdderMixin, AdderConv2d):
    """Adder convolution quantized with AdderNet PTQ (see the module docstring); simulated in float arithmetic."""

    _channel_dim = 1

    @classmethod
    def _empty_like(cls, module: AdderConv2d) -> "QuantAdderConv2d":
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, 1, module.bias is not None, module.eta, device=module.weight.device,
                   dtype=module.weight.dtype)

    def _fp_forward(self, x: Tensor) -> Tensor:
        return AdderConv2d.forward(self, x)

    def _neg_l1(self, codes: Tensor, w: Tensor) -> Tensor:
        return adder_conv2d_fp(codes, w, None, self.stride, self.padding, self.dilation, eta=None)

    def to_deploy(self) -> nn.Module:
        return AdderDeployConv2d(self)


class QuantAdderLinear(_QuantAdderMixin, AdderLinear):
    """Adder linear layer quantized with AdderNet PTQ (see the module docstring); simulated in float arithmetic."""

    _channel_dim = -1

    @classmethod
    def _empty_like(cls, module: AdderLinear) -> "QuantAdderLinear":
        return cls(module.in_features, module.out_features, module.bias is not None, module.eta,
                   device=module.weight.device, dtype=module.weight.dtype)

    def _fp_forward(self, x: Tensor) -> Tensor:
        return AdderLinear.forward(self, x)

    def _neg_l1(self, codes: Tensor, w: Tensor) -> Tensor:
        return adder_linear_fp(codes, w, None, eta=None)

    def to_deploy(self) -> nn.Module:
        return AdderDeployLinear(self)


# ------------------------------------------------------------------------------------------------------- deploy
class _AdderDeploy(nn.Module):
    """Deploy form: int8 weight codes + per-channel group index, step and bias; activations are quantized once per
    group (int8 codes for the signed form, uint8 for the unsigned form) and the integer l1 runs on quantkit.ops."""

    def __init__(self, sim: _QuantAdderMixin) -> None:
        super().__init__()
        if not bool(sim.ready):
            raise UnsupportedModelError(
                f"adder layer {sim.layer_name!r} was not calibrated (no calibration batch reached it); run "
                "quantkit.calibrate / quantize with data that exercises it before convert"
            )
        p = sim.quant_params()
        self.layer_name = sim.layer_name
        self.bits_w = self.bits_a = sim.bits_w
        self.round_mode = sim.options.round_mode
        self.signed_act = sim.signed_act
        self.w_mult = sim.w_mult
        self.register_buffer("weight_int", p["w_codes"].detach().to(torch.int8))
        self.register_buffer("group_index", p["group_index"].to(torch.int64))
        self.register_buffer("group_scale", p["group_scale"].float())
        delta, bias = sim.epilogue(p)  # a BatchNorm folded in simulation: the same constants, bit for bit
        self.register_buffer("delta", delta.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.prepack()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepack())

    def prepack(self) -> None:
        """Pack the weight codes once for the CPU kernels (``quantkit.ops.adder.adder_prepack``) and keep the
        packing as (non-persistent) buffers; forward then runs the prepacked op with the activation re-quantization
        fused into its input side. Called at construction and after ``load_state_dict``; call it again after writing
        ``weight_int`` or ``group_index`` in place. Without the compiled kernels (or off the CPU) the buffers are
        None and forward quantizes with ``quantize_groups`` and calls the integer-input ops."""
        from ..ops.adder import adder_prepack, has_packed_kernels

        packed_weight = packed_meta = None
        if self.weight_int.device.type == "cpu" and has_packed_kernels():
            packed_weight, packed_meta = adder_prepack(self.weight_int, self.group_index, self.w_mult, self.bits_a,
                                                       self.signed_act)
        self.register_buffer("packed_weight", packed_weight, persistent=False)
        self.register_buffer("packed_meta", packed_meta, persistent=False)

    def _use_packed(self, x: Tensor) -> bool:
        return (self.packed_weight is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and self.packed_weight.device.type == "cpu")

    def fold_affine(self, g: Tensor, h: Tensor) -> None:
        """Absorb ``y -> g * y + h`` (per output channel, e.g. a following BatchNorm): the epilogue
        ``-delta * S + bias`` becomes ``-(g delta) * S + (g bias + h)``."""
        g, h = g.float().flatten(), h.float().flatten()
        self.delta = self.delta * g
        self.bias = self.bias * g + h

    def quant_input(self, x: Tensor) -> Tensor:
        """(G, *x.shape) integer codes: the input re-quantized on each group's grid (int8 signed / uint8 unsigned)."""
        return quantize_groups(x, self.group_scale, self.bits_a, self.signed_act, self.round_mode)

    def _check_input(self, x: Tensor, rank_ok: bool, expected: str, channels: int, got_channels: int) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise KernelError(f"adder layer {self.layer_name!r}: expects a float input, got {got}")
        if not rank_ok:
            raise KernelError(f"adder layer {self.layer_name!r}: expects {expected} input, got shape {tuple(x.shape)}")
        if got_channels != channels:
            raise KernelError(
                f"adder layer {self.layer_name!r}: was built for {channels} input channels but the input "
                f"{tuple(x.shape)} has {got_channels}"
            )

    def _propagate_nan(self, x: Tensor, y: Tensor, nan_taps) -> Tensor:
        """NaN outputs where the simulated model has them: there ``|NaN - w|`` poisons every sum that reads a NaN
        input; here the integer codes cannot carry it (``quantize_groups`` gives it code 0), so the outputs whose
        sums read a NaN are set to NaN afterwards. ``nan_taps(mask)`` maps the input's NaN mask to a boolean mask
        broadcastable to ``y``. Eager CPU pays one pass over ``x`` when it holds no NaN."""
        nan = torch.isnan(x)
        if not torch.compiler.is_compiling() and x.device.type == "cpu" and not bool(nan.any()):
            return y
        return y.masked_fill(nan_taps(nan), float("nan"))


class AdderDeployConv2d(_AdderDeploy):
    def __init__(self, sim: QuantAdderConv2d) -> None:
        super().__init__(sim)
        self.stride, self.padding, self.dilation = sim.stride, sim.padding, sim.dilation

    def _check_conv_input(self, x: Tensor) -> None:
        rank_ok = isinstance(x, Tensor) and x.dim() == 4
        self._check_input(x, rank_ok, "an (N, C, H, W)", self.weight_int.shape[1], x.shape[1] if rank_ok else -1)

    def _packed(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        from ..ops.adder import adder_conv2d_packed

        # NaN outputs are produced by the op itself
        return adder_conv2d_packed(x, self.group_scale, self.packed_weight, self.packed_meta, self.delta, self.bias,
                                   tuple(self.weight_int.shape[2:]), self.stride, self.padding, self.dilation,
                                   self.bits_a, self.signed_act, self.round_mode, residual=residual, relu=relu)

    def fused(self, x: Tensor, *, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        """``relu(self(x) + residual)`` (each part optional) with the add and the ReLU in the kernel's epilogue
        (:class:`~quantkit.nn.adder_fused.FusedAdderBlock`); elsewhere the same steps as separate ops."""
        self._check_conv_input(x)
        if self._use_packed(x):
            return self._packed(x, residual, relu)
        y = self(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    def forward(self, x: Tensor) -> Tensor:
        from ..ops.adder import adder_conv2d

        self._check_conv_input(x)
        if self._use_packed(x):
            return self._packed(x)
        y = adder_conv2d(self.quant_input(x), self.weight_int, self.group_index, self.delta, self.bias, self.stride,
                         self.padding, self.dilation, self.w_mult)
        kh, kw = self.weight_int.shape[2:]

        def taps(nan: Tensor) -> Tensor:  # an output is NaN when any tap of its window (any channel) is NaN
            hits = nan.any(1, keepdim=True).to(y.dtype)
            ones = hits.new_ones((1, 1, kh, kw))
            return F.conv2d(hits, ones, None, self.stride, self.padding, self.dilation) > 0

        return self._propagate_nan(x, y, taps).contiguous().to(x.dtype)


class AdderDeployLinear(_AdderDeploy):
    def forward(self, x: Tensor) -> Tensor:
        from ..ops.adder import adder_linear, adder_linear_packed

        rank_ok = isinstance(x, Tensor) and x.dim() >= 1
        self._check_input(x, rank_ok, "an (..., in_features)", self.weight_int.shape[1], x.shape[-1] if rank_ok else -1)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self._use_packed(x2):  # a row with a NaN is all NaN, done by the op itself
            y = adder_linear_packed(x2.contiguous(), self.group_scale, self.packed_weight, self.packed_meta,
                                    self.delta, self.bias, self.bits_a, self.signed_act, self.round_mode)
        else:
            y = adder_linear(self.quant_input(x2), self.weight_int, self.group_index, self.delta, self.bias,
                             self.w_mult)
            y = self._propagate_nan(x2, y, lambda nan: nan.any(-1, keepdim=True))  # a row with a NaN is all NaN
        return y.reshape(*lead, self.weight_int.shape[0]).to(x.dtype)  # explicit N: batch 0 cannot infer -1


__all__ = ["QuantAdderConv2d", "QuantAdderLinear", "AdderDeployConv2d", "AdderDeployLinear", "METHODS"]
