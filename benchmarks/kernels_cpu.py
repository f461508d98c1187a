"""CPU speed of quantkit's kernels against PyTorch FP32, every ratio measured in the same run at the same thread
count (medians over repeats). One table:

* ``binary_gemm``: ``quantkit.ops.binary_linear`` on packed operands (float output) vs torch FP32 ``matmul`` of the
  same M, N, K;
* ``binary_conv3x3``: ``quantkit.ops.binary_conv2d`` (packed NHWC input, float channels_last output) on ResNet-18's
  3x3 layer shapes at batch 1 and 16 vs torch FP32 ``conv2d`` in the default (NCHW) and the channels_last memory
  format; the "incl. pack" column adds the float->bits packing of a float channels_last input;
* ``popcount_peak``: a register-resident XOR+POPCOUNT+ADD loop of the active ISA (no loads): the ceiling; the
  "% peak" column of the binary rows is their bit-MAC rate as a fraction of it at the same thread count;
* the integer l1 (adder) rows of ``benchmarks/kernels_cpu_adder.py:adder_rows(threads)`` when that module exists.

Run: ``.venv/bin/python benchmarks/kernels_cpu.py [--quick] [--threads 1,2]``
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from quantkit.sysinfo import cpu_model
import torch.nn.functional as F

from quantkit import ops
from quantkit.ops._dispatch import has_op

# ResNet-18's 3x3 convolutions: (C_in, C_out, input H=W, stride)
RESNET18_3X3 = [
    (64, 64, 56, 1),
    (64, 128, 56, 2),
    (128, 128, 28, 1),
    (128, 256, 28, 2),
    (256, 256, 14, 1),
    (256, 512, 14, 2),
    (512, 512, 7, 1),
]


def median_time(fn: Callable[[], object], repeats: int, min_time: float = 0.2, max_repeats: int = 50) -> float:
    """Median wall time of ``fn`` over at least ``repeats`` calls (more, up to ``max_repeats``, until ``min_time``
    seconds were spent), after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def popcount_peak(threads: int) -> float:
    """bit-MAC/s of the register-resident probe on ``threads`` concurrent threads (best of 5)."""
    if not has_op("binary_popcount_peak"):
        return 0.0
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return max(torch.ops.quantkit.binary_popcount_peak(3_000_000) for _ in range(5))
    finally:
        torch.set_num_threads(saved)


def _row(op, shape, threads, ours_s, baseline, base_s, rate=None, peak=None, pack_s=None) -> dict:
    return {
        "threads": threads,
        "op": op,
        "shape": shape,
        "ours_ms": ours_s * 1e3,
        "pack_ms": None if pack_s is None else pack_s * 1e3,
        "baseline": baseline,
        "baseline_ms": None if base_s is None else base_s * 1e3,
        "speedup": None if base_s is None else base_s / ours_s,
        "rate": rate,
        "peak_frac": None if (rate is None or not peak) else rate / peak,
    }


def binary_rows(threads: int, quick: bool) -> list[dict]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    repeats = 3 if quick else 7
    rows: list[dict] = []
    try:
        peak = popcount_peak(threads)
        rows.append({"threads": threads, "op": "popcount_peak", "shape": f"register loop, {ops.cpu_isa()}",
                     "rate": peak, "peak_frac": 1.0 if peak else None})
        g = torch.Generator().manual_seed(0)
        sizes = [512, 1024] if quick else [512, 1024, 2048, 4096]
        for s in sizes:
            a, b = torch.randn(s, s, generator=g), torch.randn(s, s, generator=g)
            ap, bp = ops.pack_bits(a), ops.pack_bits(b)
            ours = median_time(lambda: torch.ops.quantkit.binary_linear(ap, bp, s, None, None, None, None), repeats)
            bt = b.T.contiguous()
            base = median_time(lambda: torch.matmul(a, bt), repeats if s < 4096 else 3)
            rows.append(_row("binary_gemm", f"M=N=K={s}", threads, ours, "torch.matmul fp32", base,
                             rate=s**3 / ours, peak=peak))
        shapes = RESNET18_3X3[::3] if quick else RESNET18_3X3
        for batch in (1, 16):
            for c_in, c_out, hw, stride in shapes:
                x = torch.randn(batch, c_in, hw, hw, generator=g)
                w = torch.randn(c_out, c_in, 3, 3, generator=g)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                w_cl = w.contiguous(memory_format=torch.channels_last)
                xp, wp = ops.pack_activation_nhwc(x_cl), ops.pack_conv_weight(w)
                st, pd, dl = [stride, stride], [1, 1], [1, 1]
                ours = median_time(lambda: torch.ops.quantkit.binary_conv2d(xp, wp, c_in, st, pd, dl), repeats)
                with_pack = median_time(
                    lambda: torch.ops.quantkit.binary_conv2d(ops.pack_activation_nhwc(x_cl), wp, c_in, st, pd, dl),
                    repeats,
                )
                t_nchw = median_time(lambda: F.conv2d(x, w, None, stride, 1), repeats)
                t_cl = median_time(lambda: F.conv2d(x_cl, w_cl, None, stride, 1), repeats)
                ho = (hw + 2 - 3) // stride + 1
                macs = batch * ho * ho * c_out * c_in * 9
                shape = f"N={batch} {c_in}->{c_out} {hw}x{hw} s{stride}"
                rows.append(_row("binary_conv3x3", shape, threads, ours, "F.conv2d fp32 NCHW", t_nchw,
                                 rate=macs / ours, peak=peak, pack_s=with_pack))
                rows.append(_row("binary_conv3x3", shape, threads, ours, "F.conv2d fp32 channels_last", t_cl,
                                 rate=macs / ours, peak=peak, pack_s=with_pack))
    finally:
        torch.set_num_threads(saved)
    return rows


def adder_rows(threads: int, quick: bool) -> list[dict]:
    """Rows of benchmarks/kernels_cpu_adder.py (if present), one per (our op, baseline) pair."""
    path = Path(__file__).with_name("kernels_cpu_adder.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("kernels_cpu_adder", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels_cpu_adder"] = mod
    spec.loader.exec_module(mod)
    try:
        raw = mod.adder_rows(threads, quick=quick)
    except TypeError:  # older signature without quick
        raw = mod.adder_rows(threads)
    rows: list[dict] = []
    for r in raw:
        name, shape, ours = r.get("name", "adder"), r.get("shape", ""), r.get("ours_ms")
        rate = r.get("G_absdiff_per_s")
        rate = rate * 1e9 if rate is not None else None
        base_cols = [("fp32_matmul_ms", "torch.matmul fp32"),
                     ("fp32_conv2d_ms", f"F.conv2d fp32 {r.get('fp32_conv2d_layout', '')}".strip()),
                     ("cdist_ms", "torch.cdist p=1")]
        added = False
        for key, label in base_cols:
            if r.get(key) is not None and ours:
                rows.append({"threads": threads, "op": name, "shape": shape, "ours_ms": ours, "baseline": label,
                             "baseline_ms": r[key], "speedup": r[key] / ours, "rate": rate, "unit": "abs-diff/s"})
                added = True
        if not added:
            rows.append({"threads": threads, "op": name, "shape": shape, "ours_ms": ours, "rate": rate,
                         "peak_frac": r.get("fraction_of_sad_peak"), "unit": "abs-diff/s"})
    return rows


def _fmt_rate(r: dict) -> str:
    rate = r.get("rate")
    if rate is None:
        return ""
    unit = r.get("unit", "bit-MAC/s")
    return f"{rate / 1e12:.3f} T {unit}" if rate >= 1e11 else f"{rate / 1e9:.1f} G {unit}"


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description="quantkit CPU kernel benchmark (one table)")
    parser.add_argument("--quick", action="store_true", help="few shapes and repeats (a smoke run)")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all)")
    parser.add_argument("--no-adder", action="store_true", help="skip the adder rows")
    args = parser.parse_args()
    all_threads = os.cpu_count() or 1
    threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, all_threads})
    print(f"# CPU: {cpu_model()}, {all_threads} logical CPUs; torch {torch.__version__}; "
          f"quantkit CPU ISA: {ops.cpu_isa()}; medians; speedup = baseline time / quantkit time (same threads)")
    cols = ["threads", "op", "shape", "quantkit ms", "incl. pack ms", "baseline", "baseline ms", "speedup",
            "rate", "% popcount peak"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for t in threads:
        rows = binary_rows(t, args.quick)
        if not args.no_adder:
            rows += adder_rows(t, args.quick)
        for r in rows:
            cells = [
                str(r["threads"]), r["op"], r.get("shape", ""), _f(r.get("ours_ms"), ".3f"), _f(r.get("pack_ms"), ".3f"),
                r.get("baseline", "") or "", _f(r.get("baseline_ms"), ".3f"), _f(r.get("speedup"), ".1f"),
                _fmt_rate(r), "" if r.get("peak_frac") is None else f"{100 * r['peak_frac']:.0f}%",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
