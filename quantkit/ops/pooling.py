"""Max pooling of channels_last activations for deploy models (the ResNet stem's conv -> ReLU -> MaxPool2d(3, 2, 1)):
compiled kernel without argmax indices, optionally fused with the preceding ReLU, plus its pure-PyTorch reference.

Op schemas (``kernels/register.cpp``)::

    quantkit::max_pool2d_nhwc(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool relu=False) -> Tensor
    quantkit::max_pool2d_nhwc_into(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool relu,
                                   Tensor(a!) out) -> ()
    quantkit::conv_max_pool2d_nhwc(Tensor x, Tensor weight, Tensor? bias, int[2] conv_stride, int[2] conv_padding,
                                   int[2] kernel_size, int[2] stride, int[2] padding, bool relu,
                                   Tensor? threshold=None) -> (Tensor, Tensor)

The ``out=`` form is a separate op that returns nothing: a mutated argument that is also returned cannot be
functionalized for torch.compile / export, one that is only written can.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.errors import KernelError
from quantkit.ops._dispatch import check_devices, register_fake, use_kernel
from quantkit.ops.layout import conv2d_output_size, int_pair
from quantkit.ops.packing import pack_activation_nhwc

IntPair = Union[int, Sequence[int]]
_OP = "max_pool2d_nhwc"


def _pair(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    return int_pair(value, name, minimum, _OP)


def pool_output_hw(h: int, w: int, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                   padding: Tuple[int, int]) -> Tuple[int, int]:
    """``(Ho, Wo)`` of a max pool with dilation 1 and floor rounding (torch's ``ceil_mode=False``): the conv output
    size rule of :func:`quantkit.ops.layout.conv2d_output_size` with dilation 1."""
    sizes = zip((h, w), kernel_size, stride, padding)
    return tuple(conv2d_output_size(n, k, s, p, 1) for n, k, s, p in sizes)  # type: ignore[return-value]


def _check_geometry(shape: Sequence[int], kernel_size: Tuple[int, int], padding: Tuple[int, int]) -> None:
    """What torch's max_pool2d (and the kernel) refuse: padding over half the kernel, an empty plane, an empty output."""
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise KernelError(
            f"{_OP}: padding {padding} is more than half the kernel size {kernel_size} (torch's max_pool2d refuses "
            "it: a window could hold padding only); use padding <= kernel_size // 2"
        )
    h, w = shape[2], shape[3]
    if h == 0 or w == 0:
        raise KernelError(f"{_OP}: x must have a non-empty height and width, got shape {tuple(shape)}")
    if h + 2 * padding[0] < kernel_size[0] or w + 2 * padding[1] < kernel_size[1]:
        raise KernelError(
            f"{_OP}: the kernel {kernel_size} is larger than the padded input ({h} x {w} with padding {padding}); "
            "the output would be empty"
        )


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two dense tensors (contiguous in some memory format) share an element: their byte ranges meet."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, out: Optional[Tensor],
           real: bool = True) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, ...]]:
    """Validated (kernel_size, stride, padding, output shape); ``real=False`` (fake tensors: no memory) skips the
    overlap check of ``out`` and ``x``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise KernelError(f"{_OP}: x must be a float tensor, got {got}")
    if x.dim() != 4:
        raise KernelError(
            f"{_OP}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}; add the batch dimension with "
            "x.unsqueeze(0)"
        )
    if not (x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()):
        raise KernelError(
            f"{_OP}: x must be in channels_last memory (a contiguous NCHW x is accepted and copied), got strides "
            f"{x.stride()}; call x.contiguous(memory_format=torch.channels_last)"
        )
    k, s, p = _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    _check_geometry(x.shape, k, p)
    ho, wo = pool_output_hw(x.shape[2], x.shape[3], k, s, p)
    shape = (x.shape[0], x.shape[1], ho, wo)
    if out is not None:
        if not isinstance(out, Tensor):
            raise KernelError(f"{_OP}: out must be a tensor or None, got {type(out).__name__}")
        if out.dtype != x.dtype:
            raise KernelError(f"{_OP}: out must have x's dtype {x.dtype}, got {out.dtype}")
        if tuple(out.shape) != shape:
            raise KernelError(f"{_OP}: out must have the output's shape {shape}, got {tuple(out.shape)}")
        if not out.is_contiguous(memory_format=torch.channels_last):
            raise KernelError(
                f"{_OP}: out must be contiguous in channels_last memory (a batch slice big[i:j] of a channels_last "
                f"tensor is), got strides {out.stride()}; allocate it with "
                "torch.empty(shape, memory_format=torch.channels_last)"
            )
        check_devices(_OP, x=x, out=out)
        if real and out.device.type != "meta" and not torch.compiler.is_compiling() and _overlap(out, x):
            raise KernelError(f"{_OP}: out must not share memory with x; pass a separate output tensor")
    return k, s, p, shape


def max_pool2d_nhwc_reference(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                              relu: bool = False) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, floor output size), then ``.relu()`` when
    ``relu``, in channels_last memory. Differentiable. NaN propagates (a window holding NaN gives its last NaN) and of
    a window's equal maxima (-0.0 and +0.0) the first one wins, as torch's CPU max_pool2d does. ``relu`` after the
    pool equals the pool of ``relu(x)`` except for the sign of a zero (``relu(-0.0)`` is -0.0 in torch)."""
    k, s, p = _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    if x.shape[1] == 0:  # torch's max_pool2d refuses a channel-less input; its answer is empty anyway
        ho, wo = pool_output_hw(x.shape[2], x.shape[3], k, s, p)
        return x.new_empty((x.shape[0], 0, ho, wo)).contiguous(memory_format=torch.channels_last)
    y = F.max_pool2d(x, k, s, p)
    if relu:
        y = F.relu(y)
    return y.contiguous(memory_format=torch.channels_last)


def max_pool2d_nhwc(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, relu: bool = False,
                    out: Optional[Tensor] = None) -> Tensor:
    """:func:`max_pool2d_nhwc_reference` without argmax indices (compiled kernel, identical bits, NaN, infinities
    and signed zeros included) for float32 CPU inputs that need no gradient; otherwise the reference.

    ``x`` is ``(N, C, H, W)`` in channels_last memory (a contiguous NCHW ``x`` is accepted, at the cost of a copy);
    the result is ``(N, C, Ho, Wo)`` channels_last. ``relu=True`` returns ``relu(max_pool2d(x))``, which makes a
    ReLU right before the pool free. ``out``, when given, receives the result and is returned: it must be a
    tensor of the output's shape and x's dtype, contiguous in channels_last memory (a batch slice ``big[i:j]`` of a
    channels_last tensor is), not sharing memory with ``x``."""
    k, s, p, _ = _check(x, kernel_size, stride, padding, out)
    relu = bool(relu)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if needs_grad and out is not None:
        raise KernelError(f"{_OP}: out= does not support autograd (x requires grad); call it without out=")
    if not needs_grad and x.dtype == torch.float32 and use_kernel(_OP, x.device):
        if out is None:
            return torch.ops.quantkit.max_pool2d_nhwc(x, k, s, p, relu)
        torch.ops.quantkit.max_pool2d_nhwc_into(x, k, s, p, relu, out)
        return out
    y = max_pool2d_nhwc_reference(x, k, s, p, relu)
    if out is None:
        return y
    return out.copy_(y)


@register_fake("max_pool2d_nhwc")
def _max_pool2d_nhwc_fake(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                          relu: bool = False) -> Tensor:
    _, _, _, shape = _check(x, kernel_size, stride, padding, None, real=False)
    torch._check(x.dtype == torch.float32, lambda: f"{_OP}: the compiled op takes float32 x, got {x.dtype}")
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@register_fake("max_pool2d_nhwc_into")
def _max_pool2d_nhwc_into_fake(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                               relu: bool, out: Tensor) -> None:
    _check(x, kernel_size, stride, padding, out, real=False)
    torch._check(x.dtype == torch.float32, lambda: f"{_OP}: the compiled op takes float32 x, got {x.dtype}")
    return None


# ---------------------------------------------------------------------------------------------- conv -> pool (stem)
_STEM_OP = "conv_max_pool2d_nhwc"


def pack_stem_weight(weight: Tensor) -> Tensor:
    """A conv weight ``(C_out, C_in, KH, KW)`` as :func:`conv_max_pool2d_nhwc` reads it: ``(KH, KW * C_in, C_out)``
    float32, contiguous (for a fixed kernel row, a pixel's taps are consecutive floats of an NHWC input row)."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise KernelError(f"{_STEM_OP}: expected a 4-D (C_out, C_in, KH, KW) conv weight")
    c_out, c_in, kh, kw = weight.shape
    return weight.detach().float().permute(2, 3, 1, 0).reshape(kh, kw * c_in, c_out).contiguous()


def conv_max_pool2d_nhwc_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_stride: IntPair,
                                   conv_padding: IntPair, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                                   relu: bool = False) -> Tensor:
    """``max_pool2d(conv2d(x, weight, bias, conv_stride, conv_padding), kernel_size, stride, padding)``, then
    ``relu`` when asked (:func:`max_pool2d_nhwc_reference`), channels_last; ``weight`` as ``(C_out, C_in, KH, KW)``."""
    y = F.conv2d(x, weight, bias, int_pair(conv_stride, "conv_stride", 1, _STEM_OP),
                 int_pair(conv_padding, "conv_padding", 0, _STEM_OP))
    return max_pool2d_nhwc_reference(y, kernel_size, stride, padding, relu)


def conv_max_pool2d_nhwc(x: Tensor, weight_packed: Tensor, bias: Optional[Tensor], conv_stride: IntPair,
                         conv_padding: IntPair, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                         relu: bool = False, threshold: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """A network stem ``max_pool(relu(conv(x)))`` in one kernel (``docs/kernels.md#stem-kernel``): ``x`` float32
    ``(N, C_in, H, W)`` (channels_last, or NCHW at the cost of a copy), ``weight_packed`` from
    :func:`pack_stem_weight`, dilation 1 and groups 1; returns ``(N, C_out, Ho, Wo)`` channels_last. The conv sums
    each output from its bias in tap order ``(kh, kw, c_in)`` with FMAs, so values agree with torch's conv to float
    rounding (not bit for bit); the pool and ReLU are those of :func:`max_pool2d_nhwc`, exactly. With a per-channel
    ``threshold`` it returns ``(y, bits)``, bits = ``pack_activation_nhwc(y, threshold)`` made while each row is in
    cache (the input of a following binary conv). Without the compiled kernel, or under autograd: the reference on
    the unpacked weight."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype != torch.float32:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise KernelError(f"{_STEM_OP}: x must be a float32 (N, C, H, W) tensor, got {got}")
    if not isinstance(weight_packed, Tensor) or weight_packed.dim() != 3 or weight_packed.shape[1] % max(
            x.shape[1], 1) != 0:
        raise KernelError(f"{_STEM_OP}: weight_packed must be (KH, KW * C_in, C_out) from pack_stem_weight for "
                          f"x's {x.shape[1]} channels, got {tuple(getattr(weight_packed, 'shape', ()))}")
    cs, cp = int_pair(conv_stride, "conv_stride", 1, _STEM_OP), int_pair(conv_padding, "conv_padding", 0, _STEM_OP)
    k, s, p = _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight_packed.requires_grad)
    if not needs_grad and use_kernel(_STEM_OP, x.device):
        y, bits = torch.ops.quantkit.conv_max_pool2d_nhwc(x, weight_packed, bias, cs, cp, k, s, p, bool(relu),
                                                          threshold)
        return y if threshold is None else (y, bits)
    kh, u, c_out = weight_packed.shape
    weight = weight_packed.reshape(kh, u // x.shape[1], x.shape[1], c_out).permute(3, 2, 0, 1)
    y = conv_max_pool2d_nhwc_reference(x, weight, bias, cs, cp, k, s, p, relu)
    if threshold is None:
        return y
    return y, pack_activation_nhwc(y, threshold)


@register_fake(_STEM_OP)
def _conv_max_pool2d_nhwc_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_stride: Sequence[int],
                               conv_padding: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                               padding: Sequence[int], relu: bool,
                               threshold: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    check_devices(_STEM_OP, x=x, weight=weight, bias=bias, threshold=threshold)
    kh, u, c_out = weight.shape
    ho, wo = (conv2d_output_size(n, kk, ss, pp, 1) for n, kk, ss, pp in
              zip(x.shape[2:], (kh, u // x.shape[1]), conv_stride, conv_padding))
    ho, wo = pool_output_hw(ho, wo, tuple(kernel_size), tuple(stride), tuple(padding))
    y = torch.empty((x.shape[0], c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    words = (c_out + 31) // 32
    bits = x.new_empty((x.shape[0], ho, wo, words) if threshold is not None else (0,), dtype=torch.int32)
    return y, bits
