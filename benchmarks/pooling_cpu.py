"""CPU speed of ``quantkit.ops.max_pool2d_nhwc`` against torch's ``max_pool2d`` on the ResNet stem's pool: (N, 64,
112, 112) float32 channels_last, kernel 3, stride 2, padding 1, after a ReLU. Every ratio comes from one run at one
thread count, medians over repeats, with the calls of both sides interleaved so that a load change hits both.

Rows per (threads, batch):

* ``pool``: torch ``F.max_pool2d(x, 3, 2, 1)`` vs ``max_pool2d_nhwc(x, 3, 2, 1)``;
* ``relu+pool``: torch ``F.max_pool2d(F.relu(x), 3, 2, 1)`` (the stem as the float model runs it, a new tensor for
  the ReLU) vs ``max_pool2d_nhwc(x, 3, 2, 1, relu=True)`` (the ReLU fused, x read once);
* ``relu_+pool``: the same against torch's in-place ``relu_`` then ``max_pool2d`` (no allocation for the ReLU);
* ``pool, out=``: the kernel writing into a preallocated channels_last output (how a caller tiling the batch uses it).

Then the whole stem, conv (3 -> 64, 7x7, stride 2, padding 3) -> ReLU -> max pool on (N, 3, 224, 224) channels_last:
torch's layers one after the other on the whole batch vs the deploy model's ``TiledConvPool``, once with torch's conv
a few images at a time (the ReLU fused into the pool, each tile pooled into its slice of the output) and once as the
stem kernel ``conv_max_pool2d_nhwc`` (its default for a float conv: conv rows pooled while in cache).

Run: ``.venv/bin/python benchmarks/pooling_cpu.py [--quick] [--threads 1,2] [--batches 1,16]``
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from quantkit import ops
from quantkit.sysinfo import cpu_model
from timing import interleaved_medians


def pool_rows(threads: int, batch: int, repeats: int) -> list[tuple[str, float, float]]:
    """(row, torch ms, quantkit ms) at ``threads`` threads for one batch size."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 64, 112, 112, generator=g).contiguous(memory_format=torch.channels_last)
        x_relu = F.relu(x)
        x_inplace = x_relu.clone()  # relu_ on it repeats the same work every call
        out = torch.empty(batch, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t_pool, q_pool, t_relu, q_relu, t_inplace, q_out = interleaved_medians({
                "torch pool": lambda: F.max_pool2d(x_relu, 3, 2, 1),
                "pool": lambda: ops.max_pool2d_nhwc(x_relu, 3, 2, 1),
                "torch relu+pool": lambda: F.max_pool2d(F.relu(x), 3, 2, 1),
                "relu+pool": lambda: ops.max_pool2d_nhwc(x, 3, 2, 1, relu=True),
                "torch relu_+pool": lambda: F.max_pool2d(x_inplace.relu_(), 3, 2, 1),
                "pool, out=": lambda: ops.max_pool2d_nhwc(x_relu, 3, 2, 1, out=out),
            }, repeats).values()
    finally:
        torch.set_num_threads(saved)
    return [("pool", t_pool, q_pool), ("relu+pool", t_relu, q_relu), ("relu_+pool", t_inplace, q_relu),
            ("pool, out=", t_pool, q_out)]


class _Stem(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.conv1(x)))


def stem_row(threads: int, batch: int, repeats: int) -> tuple[float, float, float, int]:
    """(torch layers ms, tiled stem ms, stem kernel ms, images per tile) for the ResNet stem at ``threads``
    threads."""
    import copy

    from quantkit.graph.conv_pool import tile_conv_pools
    from quantkit.nn.conv_pool import tile_images

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        layers = _Stem().eval().to(memory_format=torch.channels_last)
        kernel = copy.deepcopy(layers)
        tile_conv_pools(kernel)
        tiled = copy.deepcopy(kernel)
        tiled.conv1.use_stem_kernel = False  # torch's conv a tile at a time, then the pool kernel
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t_layers, t_tiled, t_kernel = interleaved_medians(
                {"layers": lambda: layers(x), "tiled": lambda: tiled(x), "kernel": lambda: kernel(x)},
                repeats).values()
        step = tile_images(64 * 112 * 112 * 4, threads)
    finally:
        torch.set_num_threads(saved)
    return t_layers, t_tiled, t_kernel, step


def main() -> None:
    parser = argparse.ArgumentParser(description="max_pool2d_nhwc vs torch max_pool2d (ResNet stem pool)")
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all)")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    args = parser.parse_args()
    all_threads = os.cpu_count() or 1
    threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, all_threads})
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# CPU: {cpu_model()}, {all_threads} logical CPUs; torch {torch.__version__}; "
          f"quantkit CPU ISA: {ops.cpu_isa()}; (N, 64, 112, 112) fp32 channels_last, k3 s2 p1; medians, calls "
          "interleaved; speedup = torch time / quantkit time")
    print("| threads | batch | op | torch ms | quantkit ms | speedup |")
    print("|---|---|---|---|---|---|")
    for t in threads:
        for b in batches:
            repeats = 5 if args.quick else (41 if b <= 2 else 15)
            for name, base, ours in pool_rows(t, b, repeats):
                print(f"| {t} | {b} | {name} | {base * 1e3:.3f} | {ours * 1e3:.3f} | {base / ours:.2f} |", flush=True)
    print("\n# ResNet stem conv 7x7/2 -> ReLU -> max pool 3/2, (N, 3, 224, 224) channels_last: torch's layers on the "
          "whole batch vs TiledConvPool with torch's conv a tile at a time (use_stem_kernel=False) and with the stem "
          "kernel (conv_max_pool2d_nhwc, the default); speedups = layers time / that time")
    print("| threads | batch | images per tile | layers ms | tiled ms | speedup | stem kernel ms | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for t in threads:
        for b in batches:
            repeats = 5 if args.quick else (41 if b <= 2 else 11)
            base, tiled, kernel, step = stem_row(t, b, repeats)
            print(f"| {t} | {b} | {min(step, b)} | {base * 1e3:.2f} | {tiled * 1e3:.2f} | {base / tiled:.2f} | "
                  f"{kernel * 1e3:.2f} | {base / kernel:.2f} |", flush=True)


if __name__ == "__main__":
    main()
