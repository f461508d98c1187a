"""Deploy module for a network's stem, ``max_pool(relu(conv(x)))`` (ResNet's conv1 -> bn1 -> relu -> maxpool with
the BatchNorm folded), run a few images at a time (built by :func:`quantkit.graph.conv_pool.tile_conv_pools` at
``quantkit.convert``).

Why: the stem's conv output is the largest tensor of the network (64 x 112 x 112 float32, 3.2 MB per image, 51 MB at
batch 16) and is read once, by the pool. Computed for the whole batch it goes to memory and back (and, that large,
is a fresh allocation on every call); computed a few images at a time it stays in cache between the conv and the
pool, and the pool writes straight into its slice of the output. The ReLU runs inside the pool kernel
(``max(relu(a), relu(b)) == relu(max(a, b))``, up to the sign of a zero: torch's ``relu(-0.0)`` is -0.0). A float conv
runs channels_last whatever the input's layout (torch's CPU conv with a 3-channel NCHW input is several times
slower): on a channels_last input the values are those of the layers run one after the other (zeros' signs
aside); on an NCHW input the conv's float32 sums are in another order. The pool and the ReLU are exact.

A float ``nn.Conv2d`` stem (groups 1, dilation 1) runs instead as one kernel, :func:`quantkit.ops.conv_max_pool2d_nhwc`
(``docs/kernels.md#stem-kernel``): a direct conv whose rows go straight into the pool while they are in cache, on
the whole batch at once, the weight prepacked at convert (:meth:`TiledConvPool.prepack`, repacked if the conv's
weight changes). Its conv sums in its own order (from the bias, taps in (kh, kw, c_in) order, FMAs), so its values
agree with torch's conv to float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import pooling as pool_ops
from ..ops.layout import int_pair
from .binary_fused import HandsOutputBits

# Images per tile: enough to give every thread one image, with the tile's conv output within about this many bytes
# (cache-resident between the conv and the pool).
TILE_BYTES = 8 << 20


def tile_images(per_image_bytes: int, threads: int) -> int:
    """Images per tile for a conv output of ``per_image_bytes`` per image on ``threads`` threads."""
    return max(1, min(threads, TILE_BYTES // max(per_image_bytes, 1)))


class TiledConvPool(HandsOutputBits, nn.Module):
    """``pool(relu(conv(x)))`` a tile of images at a time (module docstring).

    ``conv``: the stem conv (any module mapping (N, C, H, W) to (N, C', H', W') image by image: ``nn.Conv2d``, a
    uniform deploy conv); ``relu``: the ``nn.ReLU`` between them or None; ``pool``: the ``nn.MaxPool2d``. The ReLU
    and pool modules are kept (not registered: they hold no state) to run the layers one by one where the fast path
    does not apply and for :func:`untile_conv_pools`; ``places`` are the paths of (conv, relu, pool) in the model
    the pass ran on (the conv's is where this module sits)."""

    def __init__(self, conv: nn.Module, relu: nn.Module | None, pool: nn.MaxPool2d,
                 places: tuple[str, str | None, str]) -> None:
        super().__init__()
        self.conv = conv
        # False: run even a float conv through torch, a tile at a time (the stem kernel's conv rounds differently)
        self.use_stem_kernel = True
        self._stem_weight: tuple | None = None  # (packed weight, version, address, device of the conv weight)
        if self.stem_kernel_fits() and conv.weight.device.type != "meta":
            self.prepack()  # at convert: the stem kernel's weight layout, made once
        self._layers = (relu, pool)
        self.places = places
        self.kernel_size = int_pair(pool.kernel_size, "kernel_size", 1, "MaxPool2d")
        self.stride = int_pair(pool.stride or pool.kernel_size, "stride", 1, "MaxPool2d")
        self.padding = int_pair(pool.padding, "padding", 0, "MaxPool2d")

    def layers(self) -> tuple[nn.Module, nn.Module | None, nn.MaxPool2d]:
        relu, pool = self._layers
        return self.conv, relu, pool

    def _one_by_one(self, x: Tensor) -> Tensor:
        conv, relu, pool = self.layers()
        y = conv(x)
        return pool(relu(y) if relu is not None else y)

    def _fast(self, x: Tensor) -> bool:
        return (isinstance(x, Tensor) and x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad) and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling())

    def _pool_into(self, y: Tensor, out: Tensor | None) -> Tensor:
        return pool_ops.max_pool2d_nhwc(y.contiguous(memory_format=torch.channels_last), self.kernel_size, self.stride,
                                        self.padding, relu=self._layers[0] is not None, out=out)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fast(x):
            return self._one_by_one(x)
        if self._stem_kernel_now():
            c = self.conv
            threshold = self._consumer_threshold()  # a fused binary block next: its input bits made here too
            out = pool_ops.conv_max_pool2d_nhwc(x, self._stem_weight_now(), c.bias, c.stride, c.padding,
                                                self.kernel_size, self.stride, self.padding,
                                                relu=self._layers[0] is not None, threshold=threshold)
            if threshold is None:
                return out
            y, bits = out
            self._hand_over(y, bits)
            return y
        n = x.shape[0]
        if isinstance(self.conv, nn.Conv2d):  # the int8 conv reads NCHW directly; torch's float conv wants NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.conv(x[:1])
        if n == 1:
            return self._pool_into(y, None)
        shape = (n, y.shape[1]) + pool_ops.pool_output_hw(y.shape[2], y.shape[3], self.kernel_size, self.stride,
                                                          self.padding)
        out = torch.empty(shape, dtype=y.dtype, memory_format=torch.channels_last)
        self._pool_into(y, out[:1])
        step = tile_images(y.numel() * y.element_size(), torch.get_num_threads())
        for i in range(1, n, step):
            self._pool_into(self.conv(x[i:i + step]), out[i:i + step])
        return out

    # --- the one-kernel stem (a float conv): quantkit.ops.conv_max_pool2d_nhwc on a prepacked weight
    def stem_kernel_fits(self) -> bool:
        """Whether the conv is a plain float ``nn.Conv2d`` the stem kernel computes (groups 1, dilation 1, zero
        padding given as numbers, float32 weight)."""
        c = self.conv
        return (type(c) is nn.Conv2d and c.groups == 1 and tuple(c.dilation) == (1, 1) and c.padding_mode == "zeros"
                and not isinstance(c.padding, str) and c.weight.dtype == torch.float32)

    def prepack(self) -> Tensor:
        """(Re)build the stem kernel's weight, :func:`quantkit.ops.pack_stem_weight` of the conv's, and return it.
        Kept with the version and address of the weight it was made from: a changed weight (a loaded state dict,
        an in-place edit, ``.to()``) is packed again on the next call instead of being read stale."""
        w = self.conv.weight
        packed = pool_ops.pack_stem_weight(w)
        self._stem_weight = (packed, w._version, w.data_ptr(), w.device)
        return packed

    def _stem_weight_now(self) -> Tensor:
        held = self.__dict__.get("_stem_weight")
        w = self.conv.weight
        if held is not None and held[1] == w._version and held[2] == w.data_ptr() and held[3] == w.device:
            return held[0]
        return self.prepack()

    def _stem_kernel_now(self) -> bool:
        if not (self.use_stem_kernel and self.stem_kernel_fits()):
            return False
        if torch.is_grad_enabled():  # autograd must see the conv's parameters: the layers one by one
            c = self.conv
            if c.weight.requires_grad or (c.bias is not None and c.bias.requires_grad):
                return False
        return True

    def extra_repr(self) -> str:
        c, r, p = self.places
        return f"tiled: {c}{' -> ' + r if r else ''} -> {p}"


def untile_conv_pools(model: nn.Module) -> nn.Module:
    """Put every :class:`TiledConvPool` of ``model`` (in place; the model the pass ran on, or a copy of it) back as
    its conv, ReLU and pool at their original paths; returns ``model``. Exporters use it: they emit the layers one by one."""
    for stem in [m for m in model.modules() if isinstance(m, TiledConvPool)]:
        for place, layer in zip(stem.places, stem.layers()):
            if place is None:
                continue
            parent_path, _, attr = place.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, layer)
    return model


__all__ = ["TiledConvPool", "untile_conv_pools", "tile_images", "TILE_BYTES"]
