"""Integer (u8 x s8 -> int32) linear and conv2d of the uniform deploy layers, with the input quantization and the
dequantizing epilogue fused in (compiled ``torch.ops.quantkit.int8_*`` kernels + exact pure-PyTorch references).

Semantics (the kernels and the references compute the same integers and the same float epilogue)::

    q_x = clamp(round_half_even(x / s_x) + z_x, 0, act_qmax)         # quantkit.quantizers.uniform.quantize_affine
    acc[p, o] = sum_k q_x[p, k] * q_w[o, k]                           # exact integers
    y[p, o] = float32(acc[p, o] - z_x * w_sum[o]) * float32(s_x * s_w[o]) + bias[o]

Conv zero padding is exact: a padded tap holds the code ``z_x`` of 0.0, so the correction ``z_x * w_sum[o]`` holds at
every output position. Weights are packed once by :func:`pack_weight` into ``(ceil(N/16), ceil(K/4), 64)`` int8
(16 output channels x 4 consecutive k per 64-byte row, the operand layout of AVX-512 VNNI ``VPDPBUSD``); conv
weights are flattened in (kh, kw, c) order first (:func:`flatten_conv_weight`).

Optional output grid ``out_grid = (s, 1/s, z, qmin, bits)`` (:class:`OutputGrid`): ``y`` is then also rounded with
:func:`~quantkit.quantizers.uniform.round_to_output_grid`; the kernels do it in their epilogue with the same float32
operations in the same order, so fused and unfused results are bit-identical.

NaN inputs: the kernels quantize a NaN to code 0 (a NaN fails both clamp comparisons), the references propagate it
(``torch.round(nan)`` stays NaN through the float64 products), so a NaN in ``x`` gives finite kernel outputs but NaN
reference outputs. Checking for it would cost a pass over the input; deploy inputs are finite.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.ops._dispatch import has_op, register_fake, use_kernel
from quantkit.quantizers.uniform import round_to_output_grid

BLOCK_N, QUAD_K = 16, 4


class OutputGrid(NamedTuple):
    """An output grid of :func:`~quantkit.quantizers.uniform.round_to_output_grid` as Python numbers: scale ``s``,
    ``1 / s`` in float32, zero point, lowest code (``zero_point`` for a ReLU grid, else 0) and bits."""

    scale: float
    inv_scale: float
    zero_point: int
    qmin: int
    bits: int

    def op_args(self) -> tuple[float, float, int, int, int]:
        """The trailing ``out_*`` arguments of the compiled ops."""
        return self.scale, self.inv_scale, self.zero_point, self.qmin, 2**self.bits - 1

    def apply(self, y: Tensor) -> Tensor:
        """``y`` rounded to the grid (in place when no gradient flows through it: the deploy layers' floats)."""
        in_place = not (torch.is_grad_enabled() and y.requires_grad)
        return round_to_output_grid(y, self.scale, self.inv_scale, self.zero_point, self.bits, self.qmin,
                                    in_place=in_place)


_NO_GRID = (None, 1.0, 0, 0, 0)


def flatten_conv_weight(w_int: Tensor) -> Tensor:
    """(O, C, kh, kw) conv weight codes -> (O, kh * kw * C): the (kh, kw, c) reduction order of the conv kernel."""
    return w_int.permute(0, 2, 3, 1).reshape(w_int.shape[0], -1)


def pack_weight(w_int: Tensor) -> Tensor:
    """int8 weight codes (N, K) -> the kernels' layout, int8 (ceil(N/16), ceil(K/4), 64), zero padded."""
    if w_int.dim() != 2:
        raise ValueError(f"pack_weight expects (N, K) weight codes, got shape {tuple(w_int.shape)}")
    n, k = w_int.shape
    nb, k4 = -(-n // BLOCK_N), -(-k // QUAD_K)
    w = F.pad(w_int.to(torch.int8), (0, k4 * QUAD_K - k, 0, nb * BLOCK_N - n))
    return w.view(nb, BLOCK_N, k4, QUAD_K).permute(0, 2, 1, 3).reshape(nb, k4, BLOCK_N * QUAD_K).contiguous()


def unpack_weight(w_packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_weight`: (N, K) int8 codes."""
    nb, k4, _ = w_packed.shape
    w = w_packed.view(nb, k4, BLOCK_N, QUAD_K).permute(0, 2, 1, 3).reshape(nb * BLOCK_N, k4 * QUAD_K)
    return w[:n, :k]


def weight_sum(w_int: Tensor) -> Tensor:
    """Per-output-channel sum of the weight codes (int32), the zero-point correction term."""
    return w_int.flatten(1).to(torch.int32).sum(dim=1, dtype=torch.int32)


def _quantize(x: Tensor, act_scale: Tensor, act_zero_point: Tensor, act_qmax: int) -> Tensor:
    scale = act_scale.to(torch.float32).reshape(())
    zp = act_zero_point.to(torch.float32).reshape(())
    return torch.clamp(torch.round(x / scale) + zp, 0, act_qmax)


def _epilogue(acc: Tensor, act_scale: Tensor, act_zero_point: Tensor, w_sum: Tensor, w_scale: Tensor,
              bias: Tensor | None, channel_dim: int) -> Tensor:
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    corr = act_zero_point.to(torch.float64).reshape(()) * w_sum.to(torch.float64)
    scale = act_scale.to(torch.float32).reshape(()) * w_scale.to(torch.float32)
    y = (acc - corr.view(shape)).to(torch.float32) * scale.view(shape)
    b = torch.zeros_like(scale) if bias is None else bias.to(torch.float32)
    return y + b.view(shape)


def int8_linear_reference(x: Tensor, act_scale: Tensor, act_zero_point: Tensor, act_qmax: int, w_int: Tensor,
                          w_scale: Tensor, bias: Tensor | None, out_grid: OutputGrid | None = None) -> Tensor:
    """Exact reference of ``quantkit::int8_linear`` (integer products summed in float64, exact below 2^53)."""
    q = _quantize(x.to(torch.float32), act_scale, act_zero_point, act_qmax).to(torch.float64)
    acc = q @ w_int.to(torch.float64).t()
    y = _epilogue(acc, act_scale, act_zero_point, weight_sum(w_int), w_scale.reshape(-1), bias, -1)
    return y if out_grid is None else out_grid.apply(y)


def int8_conv2d_reference(x: Tensor, act_scale: Tensor, act_zero_point: Tensor, act_qmax: int, w_int: Tensor,
                          w_scale: Tensor, bias: Tensor | None, stride, padding, dilation,
                          out_grid: OutputGrid | None = None) -> Tensor:
    """Exact reference of ``quantkit::int8_conv2d``; ``w_int`` is (O, C, kh, kw). Zero padding of the input codes
    minus ``z_x`` (i.e. of ``q_x - z_x``) is the kernel's "padded taps hold z_x"."""
    q = _quantize(x.to(torch.float32), act_scale, act_zero_point, act_qmax).to(torch.float64)
    zp = act_zero_point.to(torch.float64).reshape(())
    acc = F.conv2d(q - zp, w_int.to(torch.float64), None, stride, padding, dilation)
    # acc already holds sum (q - z) w = acc_int - z * w_sum: add the correction back so _epilogue subtracts it
    acc = acc + (zp * weight_sum(w_int).to(torch.float64)).view(1, -1, 1, 1)
    y = _epilogue(acc, act_scale, act_zero_point, weight_sum(w_int), w_scale.reshape(-1), bias, 1)
    y = y.contiguous(memory_format=torch.channels_last)
    return y if out_grid is None else out_grid.apply(y)


def _kernel_ok(name: str, x: Tensor) -> bool:
    return x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad) and use_kernel(name, x.device)


def int8_linear(x: Tensor, act_scale: Tensor, act_zero_point: Tensor, act_qmax: int, w_int: Tensor,
                w_packed: Tensor, w_sum: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_grid: OutputGrid | None = None) -> Tensor:
    """:func:`int8_linear_reference` on the compiled kernel for float32 CPU inputs (no gradient); ``w_packed`` and
    ``w_sum`` are :func:`pack_weight` / :func:`weight_sum` of ``w_int`` (N, K), computed once by the layer. With
    ``out_grid`` the output is rounded to it (in the kernel's epilogue). A NaN in ``x`` becomes code 0 on the kernel,
    NaN on the reference (module notes)."""
    if _kernel_ok("int8_linear", x):
        grid = _NO_GRID if out_grid is None else out_grid.op_args()
        return torch.ops.quantkit.int8_linear(x, act_scale, act_zero_point, act_qmax, w_packed, w_sum,
                                              w_scale.reshape(-1), bias, w_int.shape[0], *grid)
    return int8_linear_reference(x, act_scale, act_zero_point, act_qmax, w_int, w_scale, bias, out_grid)


def int8_conv2d(x: Tensor, act_scale: Tensor, act_zero_point: Tensor, act_qmax: int, w_int: Tensor,
                w_packed: Tensor, w_sum: Tensor, w_scale: Tensor, bias: Tensor | None, stride, padding,
                dilation, out_grid: OutputGrid | None = None) -> Tensor:
    """:func:`int8_conv2d_reference` on the compiled kernel for float32 CPU inputs (no gradient); ``w_packed`` is
    :func:`pack_weight` of :func:`flatten_conv_weight` of ``w_int`` (O, C, kh, kw). Output channels_last. With
    ``out_grid`` the output is rounded to it (in the kernel's epilogue). A NaN in ``x`` becomes code 0 on the kernel,
    NaN on the reference (module notes)."""
    if _kernel_ok("int8_conv2d", x) and x.dim() == 4:
        grid = _NO_GRID if out_grid is None else out_grid.op_args()
        return torch.ops.quantkit.int8_conv2d(x, act_scale, act_zero_point, act_qmax, w_packed, w_sum,
                                              w_scale.reshape(-1), bias, w_int.shape[0], list(w_int.shape[2:]),
                                              list(stride), list(padding), list(dilation), *grid)
    return int8_conv2d_reference(x, act_scale, act_zero_point, act_qmax, w_int, w_scale, bias, stride, padding,
                                 dilation, out_grid)


def int8_kernel_path() -> str:
    """The micro-kernel the int8 ops use now: ``"vnni"`` (AVX-512 VNNI), ``"avx2"``, ``"portable"`` (follows
    ``QUANTKIT_CPU_ISA``), or ``"reference"`` without compiled kernels."""
    if not has_op("int8_kernel_path"):
        return "reference"
    return torch.ops.quantkit.int8_kernel_path()


@register_fake("int8_linear")
def _int8_linear_fake(x, act_scale, act_zero_point, act_qmax, w_packed, w_sum, w_scale, bias, n_out, out_scale=None,
                      out_inv_scale=1.0, out_zero_point=0, out_qmin=0, out_qmax=0):
    torch._check(x.dim() >= 1, lambda: "quantkit::int8_linear: x must be (..., K)")
    return x.new_empty((*x.shape[:-1], n_out))


@register_fake("int8_conv2d")
def _int8_conv2d_fake(x, act_scale, act_zero_point, act_qmax, w_packed, w_sum, w_scale, bias, n_out, kernel_size,
                      stride, padding, dilation, out_scale=None, out_inv_scale=1.0, out_zero_point=0, out_qmin=0,
                      out_qmax=0):
    torch._check(x.dim() == 4, lambda: "quantkit::int8_conv2d: x must be (N, C, H, W)")
    n, _, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return x.new_empty((n, n_out, ho, wo)).contiguous(memory_format=torch.channels_last)
