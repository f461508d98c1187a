"""Generic simulated layers: :class:`QuantConv2d` / :class:`QuantLinear` with an ``input_quantizer`` and a
``weight_quantizer`` (registered :class:`~quantkit.quantizers.base.Quantizer` objects, chosen by name).

    y = op(input_quantizer(x), weight_quantizer(W), weight_quantizer.bias(b))          (op: conv2d or linear)

One ``from_float`` builds every such layer from its float layer, and one ``to_deploy`` turns every binary-weight
layer (XNOR, AdaBin, BiViT's PWS linears, any registered binarizer) into the packed
:class:`~quantkit.nn.binary_deploy.BinaryDeployConv2d` / ``BinaryDeployLinear`` from the quantizers' ``signs``,
``affine`` and ``threshold``; a uniform weight quantizer deploys on the integer kernels (:mod:`quantkit.nn.uniform`).

The quantizer names come from the scheme config's ``input_quantizer`` / ``weight_quantizer`` fields (or, without a
config, from the layer class's ``Options``). The named subclasses (``XnorConv2d``, ``AdaBinConv2d``,
``BinaryLinearPWS``, ...) only give a preset its own name in reports and ``isinstance`` checks.

State names: the quantizers are submodules, but the state_dict keeps the flat names of a layer's own tensors
(``conv.alpha_a``, ``conv.ede_t``, ``fc.act_scale``), so checkpoints do not depend on the object layout, and those
tensors are also readable as attributes of the layer (``layer.ede_t``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..quantizers.base import Quantizer, get_quantizer
from .base import NotQuantizable, QuantModule
from .binary_deploy import BinaryDeployConv2d, BinaryDeployLinear, affine_epilogue

_SLOTS = ("input_quantizer", "weight_quantizer", "output_quantizer")


@dataclasses.dataclass
class LayerQuantizers:
    """Which registered quantizers a generic layer uses (``None``: that operand stays float). The generic layers'
    own default is uniform quantization (8 bits unless the config says otherwise)."""

    input_quantizer: str | None = "uniform_act"
    weight_quantizer: str = "uniform_weight"


#: deploy builders of the weight quantizers' ``deploy`` kinds other than "binary" (registered by their modules)
_DEPLOY_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {}


def register_deploy(kind: str, build: Callable[[Any], nn.Module]) -> None:
    """Register ``build(simulated_layer) -> deploy module`` for weight quantizers whose ``deploy == kind``."""
    _DEPLOY_BUILDERS[kind] = build


def _flatten_quantizer_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: ``prefix + "weight_quantizer.ede_t"`` -> ``prefix + "ede_t"`` (module docstring)."""
    for slot in _SLOTS:
        head = f"{prefix}{slot}."
        for key in [k for k in state_dict if k.startswith(head)]:
            state_dict[prefix + key[len(head):]] = state_dict.pop(key)


class _QuantLayer(QuantModule):
    """What QuantConv2d and QuantLinear share: the quantizers, their life cycle, and the one from_float/to_deploy."""

    #: the quantizer names used when ``from_float`` gets no config
    Options: ClassVar[type] = LayerQuantizers

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_module("input_quantizer", None)
        self.register_module("weight_quantizer", None)
        #: optional grid of the layer's output (uniform schemes: convs that feed a residual Add); None: float output
        self.register_module("output_quantizer", None)
        #: False runs the float layer (e.g. BiViT's cross-layer binarization, stage 1) and deploys as it
        self.enabled = True
        self.layer_name = ""
        self._register_state_dict_hook(_flatten_quantizer_state)

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def quantizer_names(cls, options: Any) -> tuple[str | None, str]:
        """(input, weight) quantizer names from the options (a scheme config or ``cls.Options()``)."""
        return options.input_quantizer, options.weight_quantizer

    @classmethod
    def check_placement(cls, module: nn.Module, config: Any, name: str) -> None:
        """Scheme placement rules that keep a layer FP (raise NotQuantizable); default none."""

    @classmethod
    def from_float(cls, module: nn.Module, config: Any = None, name: str = "", **names: str | None) -> "_QuantLayer":
        """The simulated layer for the float ``module``: same weight and bias (same names, so checkpoints load), the
        quantizers named by ``config`` (or ``names``: ``input_quantizer=`` / ``weight_quantizer=`` overrides)."""
        if not isinstance(module, cls._float_type):
            raise NotQuantizable(f"{name or type(module).__name__}: expected an {cls._float_type.__name__}, got "
                                 f"{type(module).__name__}")
        input_name, weight_name = cls.quantizer_names(cls.Options() if config is None else config)
        input_name = names.get("input_quantizer", input_name)
        weight_name = names.get("weight_quantizer", weight_name)
        weight_cls = get_quantizer(weight_name, "weight")
        input_cls = None if input_name is None else get_quantizer(input_name, "input")
        cls.check_placement(module, config, name)
        new = cls._empty_like(module, weight_cls)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new.weight.requires_grad_(module.weight.requires_grad)
        new.layer_name = name
        new.weight_quantizer = weight_cls.build(config, new.weight, new.weight.shape[0])
        new.input_quantizer = None if input_cls is None else input_cls.build(config, new.weight, new.weight.shape[1])
        return new

    # ---- the quantizers' state as the layer's ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            for slot in _SLOTS:
                q = modules.get(slot)
                if q is not None and (name in q._parameters or name in q._buffers or name in q.exposed):
                    return getattr(q, name)
            raise

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # flat names (module docstring) -> the quantizer that owns them
        for slot in _SLOTS:
            q = self._modules.get(slot)
            if q is None:
                continue
            owned = set(q._parameters) | set(q._buffers) | set(q._modules)
            for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0] in owned]:
                state_dict[f"{prefix}{slot}.{key[len(prefix):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def quantizers(self) -> list[Quantizer]:
        return [q for q in (self.input_quantizer, self.weight_quantizer, self.output_quantizer) if q is not None]

    @property
    def bits_w(self) -> int | None:  # type: ignore[override]
        return self.weight_quantizer.bits

    @property
    def output_bits(self) -> int | None:
        """Bits of the output grid (``enable_output_quant``), None for a float output."""
        oq = self._modules.get("output_quantizer")
        return None if oq is None else oq.bits

    @property
    def output_relu(self) -> bool:
        """Whether the output grid applies the ReLU that follows the layer."""
        oq = self._modules.get("output_quantizer")
        return oq is not None and oq.relu

    @property
    def bits_a(self) -> int | None:  # type: ignore[override]
        return None if self.input_quantizer is None else self.input_quantizer.bits

    # ---- life cycle ------------------------------------------------------------------------------------------
    def start_calibration(self) -> None:
        super().start_calibration()
        for q in self.quantizers:
            q.start_calibration()

    def finish_calibration(self) -> None:
        super().finish_calibration()
        for q in self.quantizers:
            q.finish_calibration(self.layer_name)

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        for q in self.quantizers:
            q.schedule(epoch, total_epochs)

    def describe(self) -> dict[str, Any]:
        info = {"acts": "fp"} if self.input_quantizer is None else self.input_quantizer.describe()
        out = {} if self.output_quantizer is None else self.output_quantizer.describe()
        return {**info, **self.weight_quantizer.describe(), **out}

    def weight_nbytes(self) -> int:
        own = super().weight_nbytes()
        return own + sum(p.numel() * p.element_size() for q in self.quantizers for p in q.parameters())

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self._op(x, self.weight, self.bias)
        wq = self.weight_quantizer
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if not wq.scale_after_product:
            y = self._op(x, wq(self.weight), wq.bias(self.bias, self.weight, self.input_quantizer))
        else:
            signs, scale = wq.factors(self.weight)
            y = self._op(x, signs, None) * scale.reshape(self._channel_shape)
            y = y if self.bias is None else y + self.bias.reshape(self._channel_shape)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def enable_output_quant(self, bits: int = 8, relu: bool = False) -> None:
        """Round this layer's output to a calibrated ``bits``-bit grid (the ``uniform_output`` quantizer), after
        the ReLU that follows it when ``relu``. Only layers that deploy on the integer kernels support it."""
        if self.weight_quantizer.deploy != "uniform":
            raise ConfigError(f"layer {self.layer_name!r}: an output grid needs a uniform weight quantizer, not "
                              f"{self.weight_quantizer.name!r}")
        self.output_quantizer = get_quantizer("uniform_output", "output")(bits=bits, relu=relu)

    # ---- deploy ----------------------------------------------------------------------------------------------
    def to_deploy(self) -> nn.Module:
        """The deploy layer: the float layer when not enabled, the integer layer of a uniform weight quantizer, and
        for every binary weight quantizer the packed layer with epilogue (docs/kernels.md#epilogue-algebra)
        ``affine_epilogue(alpha_w, beta_w, scale_a, center_a, bias)`` and input threshold from the quantizers."""
        if not self.enabled:
            return self._float_copy()
        if self.output_quantizer is not None and self.weight_quantizer.deploy != "uniform":
            raise ConfigError(f"layer {self.layer_name!r}: an output grid deploys only on the integer kernels")
        if self.weight_quantizer.deploy != "binary":
            return _DEPLOY_BUILDERS[self.weight_quantizer.deploy](self)
        label = f"{type(self).__name__} {self.layer_name!r}" if self.layer_name else repr(self)
        for q in self.quantizers:
            q.check_deployable(label)
        wq, iq = self.weight_quantizer, self.input_quantizer
        with torch.no_grad():
            w = self.weight.detach()
            alpha_w, beta_w = wq.affine(w)
            bias = None if self.bias is None else self.bias.detach()
            if iq is None:  # float input: c_a = 0
                return self._binary_deploy(wq.signs(w), affine_epilogue(alpha_w, beta_w, bias=bias), None)
            scale_a, center_a = iq.affine()
            return self._binary_deploy(wq.signs(w), affine_epilogue(alpha_w, beta_w, scale_a, center_a, bias),
                                       iq.threshold())


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


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """Conv2d with quantized input and weights (module docstring). Zero padding is applied after the input
    quantizer, so padded taps are 0, not a binary level (what the packed kernel computes exactly)."""

    _float_type = nn.Conv2d
    _channel_shape = (1, -1, 1, 1)

    @classmethod
    def _empty_like(cls, module: nn.Conv2d, weight_cls: type[Quantizer]) -> "QuantConv2d":
        padding = module.padding
        if weight_cls.deploy == "binary":  # the packed kernels: dense, zero, symmetric integer padding
            if module.padding_mode != "zeros":
                raise NotQuantizable(f"padding_mode={module.padding_mode!r}: the binary kernels' bitwise form needs "
                                     "zero padding (padded taps = 0)")
            if module.groups != 1:
                raise NotQuantizable(
                    f"grouped/depthwise conv (groups={module.groups}) is not binarized: each filter sees only "
                    f"{module.in_channels // module.groups} input channel(s), too few taps for a 1-bit set, and the "
                    "binary kernels compute dense convolutions")
            if isinstance(padding, str):
                padding = _explicit_padding(module)
                if padding is None:
                    raise NotQuantizable(f"padding={module.padding!r} with kernel {module.kernel_size} is asymmetric; "
                                         "binary kernels take symmetric integer padding")
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                   module.dilation, module.groups, module.bias is not None, module.padding_mode,
                   device=module.weight.device, dtype=module.weight.dtype)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self._conv_forward(x, w, b)

    def _binary_deploy(self, signs: Tensor, epilogue: dict, threshold: Tensor | float | None) -> nn.Module:
        return BinaryDeployConv2d.from_signs(signs, epilogue, stride=self.stride, padding=self.padding,
                                             dilation=self.dilation, in_threshold=threshold)

    def _float_copy(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.requires_grad_(False)


class QuantLinear(_QuantLayer, nn.Linear):
    """Linear layer with quantized input and weights (module docstring)."""

    _float_type = nn.Linear
    _channel_shape = (-1,)

    @classmethod
    def _empty_like(cls, module: nn.Linear, weight_cls: type[Quantizer]) -> "QuantLinear":
        return cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                   dtype=module.weight.dtype)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def _binary_deploy(self, signs: Tensor, epilogue: dict, threshold: Tensor | float | None) -> nn.Module:
        return BinaryDeployLinear.from_signs(signs, epilogue, in_threshold=threshold)

    def _float_copy(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)


__all__ = ["QuantConv2d", "QuantLinear", "LayerQuantizers", "register_deploy"]
