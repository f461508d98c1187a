"""CPU speed of the integer l1 (adder) kernels against baselines measured in the same run, at the same thread count.

Rows (``adder_rows(threads)``):
* ``adder_gemm`` 8-bit (code form |q_x - 2 q_w|, the PTQ default for post-ReLU inputs) and 4-bit, G = 4 groups,
  vs torch FP32 ``matmul`` of the same M, N, K and vs ``torch.cdist(p=1)`` of the same operands;
* ``adder_conv`` on ResNet-18's 3x3 layer shapes, 8, 4 and 2 bits, vs torch FP32 ``conv2d`` (NCHW and channels-last,
  the faster one is the baseline) and vs ``F.unfold`` + ``torch.cdist(p=1)``; ``form`` is the packing
  ``adder_prepack(form="auto")`` chose (2 bits on AVX-512: thermometer codes, XOR + popcount, whose abs-difference
  rate can exceed the SAD loop's: ``pct_sad_peak`` > 100), and ``x_vs_bytes_form`` the same layer on byte tap rows
  over it, timed in the same loop;
  both run the deploy path: float32 input, ``adder_linear_packed`` / ``adder_conv2d_packed`` on weights packed once
  (``adder_prepack``), the per-group activation re-quantization fused into the kernel's input side, so "ours"
  is everything a deploy layer pays per call. ``pct_sad_peak``: abs-differences/s as a share of the VPSADBW
  register loop times the thread count, the loop timed round-robin with the row (same machine state);
* ``sad_peak``: abs-differences/s of the kernel on a GEMM with L1-resident weights as a fraction of a
  register-resident VPSADBW+VPADDQ loop (docs/kernels.md#measured-cpu-limits), 1 thread; the same row reports the min-sum
  (VPMINUB+VPADDB) and FP32 FMA register loops, whose ratio to SAD bounds the adder-vs-FP32 speedups.

Times are medians over repeats, ours and the FP32 baselines timed round-robin in one loop (so machine contention hits
all alike); cdist is timed after them (3 calls: it is 30-150x slower). Every ratio is baseline time / our time
(> 1 means we are faster). The adder timings include everything a deploy layer pays per call (activation
quantization, indirection table, epilogue); the weights are prepacked, as in a deploy model.

Run: ``.venv/bin/python benchmarks/kernels_cpu_adder.py [--threads 1,2] [--quick]``
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from quantkit.sysinfo import cpu_model
import torch.nn.functional as F

from quantkit.ops import adder as A
from quantkit.ops._dispatch import cpu_isa, has_op
from timing import interleaved_medians


def _median_time(fn: Callable[[], object], repeats: int, min_time: float = 0.2) -> float:
    fn()  # warm-up (allocations, caches, lazy init)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sad_rate() -> float:
    """abs-differences/s of one short VPSADBW register loop on the calling thread (0 without AVX-512)."""
    return torch.ops.quantkit.adder_isa_peak(200_000, "sad") if has_op("adder_isa_peak") else 0.0


def _operands(bits: int, groups: int, x_shape, w_shape, gen: torch.Generator):
    """Code-form operands: x in [0, 2^b - 1] per group, w signed b-bit, w_mult = 2."""
    x = torch.randint(0, 2**bits, (groups, *x_shape), generator=gen).to(torch.uint8)
    w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), w_shape, generator=gen).to(torch.int8)
    n_out = w_shape[0]
    gi = torch.randint(0, groups, (n_out,), generator=gen)
    delta = torch.rand(n_out, generator=gen) + 0.01
    bias = torch.randn(n_out, generator=gen)
    return x, w, gi, delta, bias


def _gemm_row(m: int, n: int, k: int, bits: int, groups: int, repeats: int, with_cdist: bool) -> Dict:
    gen = torch.Generator().manual_seed(0)
    _, w, gi, delta, bias = _operands(bits, groups, (m, k), (n, k), gen)
    scale = torch.rand(groups, generator=gen) + 0.5
    packed = A.adder_prepack(w, gi, 2, bits, False)
    xf = torch.randn(m, k, generator=gen).abs()
    a, b = torch.randn(m, k), torch.randn(k, n)
    peaks: List[float] = []
    t = interleaved_medians({"ours": lambda: A.adder_linear_packed(xf, scale, *packed, delta, bias, bits, False),
                       "mm": lambda: torch.matmul(a, b), "peak": lambda: peaks.append(_sad_rate())}, repeats)
    ours, t_mm = t["ours"], t["mm"]
    row = {
        "name": f"adder_gemm_{bits}bit",
        "shape": f"M={m} N={n} K={k} G={groups}",
        "ours_ms": ours * 1e3,
        "fp32_matmul_ms": t_mm * 1e3,
        "x_vs_fp32_matmul": t_mm / ours,
        "G_absdiff_per_s": m * n * k / ours / 1e9,
        "pct_sad_peak": _pct_of_peak(m * n * k / ours, peaks),
    }
    if with_cdist:
        xf, wf = torch.randn(m, k), torch.randn(n, k)
        t_cd = _median_time(lambda: torch.cdist(xf, wf, p=1), max(3, repeats // 3), min_time=0.0)
        row.update(cdist_ms=t_cd * 1e3, x_vs_cdist=t_cd / ours)
    return row


def _conv_row(batch: int, c: int, hw: int, cout: int, stride: int, bits: int, groups: int, repeats: int,
              with_cdist: bool) -> Dict:
    gen = torch.Generator().manual_seed(0)
    _, w, gi, delta, bias = _operands(bits, groups, (1, 1), (cout, c, 3, 3), gen)
    gi = torch.sort(gi).values  # deploy layers' groups come sorted from k-means; any order is exact
    scale = torch.rand(groups, generator=gen) + 0.5
    packed = A.adder_prepack(w, gi, 2, bits, False)  # form "auto": thermometer at 2 bits on AVX-512
    form = "thermometer" if packed[0].numel() < A.adder_prepack(w, gi, 2, bits, False, "bytes")[0].numel() else "bytes"
    xf = torch.randn(batch, c, hw, hw)
    wf = torch.randn(cout, c, 3, 3)
    xcl, wcl = xf.contiguous(memory_format=torch.channels_last), wf.contiguous(memory_format=torch.channels_last)
    xin = xcl.abs()  # post-ReLU activations, channels-last as the previous adder layer returns them
    peaks: List[float] = []
    fns = {
        "ours": lambda: A.adder_conv2d_packed(xin, scale, *packed, delta, bias, 3, stride, 1, 1, bits, False),
        "nchw": lambda: F.conv2d(xf, wf, None, stride, 1),
        "cl": lambda: F.conv2d(xcl, wcl, None, stride, 1),
        "peak": lambda: peaks.append(_sad_rate()),
    }
    if form != "bytes":  # the same layer on byte tap rows, for the form's own speed-up
        packed_bytes = A.adder_prepack(w, gi, 2, bits, False, "bytes")
        fns["bytes"] = lambda: A.adder_conv2d_packed(xin, scale, *packed_bytes, delta, bias, 3, stride, 1, 1, bits,
                                                     False)
    t = interleaved_medians(fns, repeats)
    ours, t_nchw, t_cl = t["ours"], t["nchw"], t["cl"]
    t_conv = min(t_nchw, t_cl)
    ho = (hw + 2 - 3) // stride + 1
    row = {
        "name": f"adder_conv3x3_{bits}bit",
        "shape": f"N={batch} C={c} {hw}x{hw} Cout={cout} s={stride} G={groups}",
        "form": form,
        "ours_ms": ours * 1e3,
        **({"x_vs_bytes_form": t["bytes"] / ours} if "bytes" in t else {}),
        "fp32_conv2d_ms": t_conv * 1e3,
        "fp32_conv2d_layout": "channels_last" if t_cl < t_nchw else "nchw",
        "x_vs_fp32_conv2d": t_conv / ours,
        "G_absdiff_per_s": batch * ho * ho * cout * c * 9 / ours / 1e9,
        "pct_sad_peak": _pct_of_peak(batch * ho * ho * cout * c * 9 / ours, peaks),
    }
    if with_cdist:
        wflat = wf.reshape(cout, -1)

        def unfold_cdist():
            cols = F.unfold(xf, 3, padding=1, stride=stride).transpose(1, 2).reshape(-1, c * 9)
            return torch.cdist(cols, wflat, p=1)

        t_cd = _median_time(unfold_cdist, 3, min_time=0.0)
        row.update(cdist_ms=t_cd * 1e3, x_vs_cdist=t_cd / ours)
    return row


def _pct_of_peak(rate: float, peaks: List[float]) -> float:
    """``rate`` as a percentage of the median single-thread SAD loop rate times the thread count ("" if unknown)."""
    good = [p for p in peaks if p > 0]
    return 100.0 * rate / (statistics.median(good) * torch.get_num_threads()) if good else float("nan")


def _sad_peak_row(repeats: int) -> Optional[Dict]:
    """Deploy-op rate (prepacked, fused quantization) on a problem with L1-resident weights (K = 512, N = 64: 32 KiB
    packed) against register-only loops,
    all on one thread: VPSADBW+VPADDQ (the bound of our u8 micro-kernel), VPMINUB+VPADDB (the min-sum alternative
    for <= 4 bits) and VFMADD231PS (the FP32 bound of torch's matmul/conv). sad / fp32_fma is this CPU's ceiling
    for "adder vs FP32" ratios."""
    if not has_op("adder_isa_peak"):
        return None
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peaks = {loop: max(torch.ops.quantkit.adder_isa_peak(2_000_000, loop) for _ in range(5))
                 for loop in ("sad", "minsum", "thermo2", "fp32_fma")}
        if peaks["sad"] <= 0:
            return None
        m, n, k = 8192, 64, 512
        gen = torch.Generator().manual_seed(0)
        _, w, gi, delta, _ = _operands(8, 1, (m, k), (n, k), gen)
        gi.zero_()
        packed = A.adder_prepack(w, gi, 2, 8, False)
        xf, scale = torch.rand(m, k, generator=gen), torch.ones(1)
        ours = _median_time(lambda: A.adder_linear_packed(xf, scale, *packed, delta, None, 8, False), repeats)
    finally:
        torch.set_num_threads(saved)
    rate = m * n * k / ours
    return {
        "name": "sad_peak",
        "shape": f"M={m} N={n} K={k} (L1-resident weights), 1 thread",
        "ours_ms": ours * 1e3,
        "G_absdiff_per_s": rate / 1e9,
        "register_loop_G_per_s": {key: v / 1e9 for key, v in peaks.items()},
        "fraction_of_sad_peak": rate / peaks["sad"],
        "sad_over_fp32_fma_ceiling": peaks["sad"] / peaks["fp32_fma"],
    }


def adder_rows(threads: int, quick: bool = False) -> List[Dict]:
    """Benchmark rows at ``threads`` threads (ours and every baseline at the same count)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    repeats = 5 if quick else 15
    rows: List[Dict] = []
    try:
        gemm_shapes = [(1024, 1024, 1024)] if quick else [(1024, 1024, 1024), (2048, 2048, 2048), (256, 512, 4608)]
        for bits in (8, 4):
            for m, n, k in gemm_shapes:
                rows.append(_gemm_row(m, n, k, bits, 4, repeats, with_cdist=m * n * k <= 2**30))
        conv_shapes = [(1, 64, 56, 64, 1), (1, 128, 28, 128, 1), (1, 256, 14, 256, 1), (1, 512, 7, 512, 1),
                       (16, 64, 56, 64, 1), (16, 128, 28, 128, 1), (16, 256, 14, 256, 1), (16, 512, 7, 512, 1)]
        if quick:
            conv_shapes = conv_shapes[:2]
        for bits in (8, 4, 2):
            for batch, c, hw, cout, stride in conv_shapes:
                rows.append(_conv_row(batch, c, hw, cout, stride, bits, 4, repeats, with_cdist=batch == 1))
        if threads == 1:
            peak = _sad_peak_row(repeats)
            if peak is not None:
                rows.append(peak)
    finally:
        torch.set_num_threads(saved)
    for r in rows:
        r["threads"] = threads
    return rows


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="comma-separated thread counts")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = parser.parse_args()
    print(f"# CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, ISA {cpu_isa()}")
    cols = ["threads", "name", "shape", "form", "ours_ms", "fp32_matmul_ms", "fp32_conv2d_ms", "cdist_ms",
            "x_vs_fp32_matmul", "x_vs_fp32_conv2d", "x_vs_cdist", "x_vs_bytes_form", "G_absdiff_per_s",
            "pct_sad_peak", "fraction_of_sad_peak"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for threads in sorted({int(t) for t in args.threads.split(",")}):
        for r in adder_rows(threads, quick=args.quick):
            print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |", flush=True)
            if r["name"] == "sad_peak":
                pk = r["register_loop_G_per_s"]
                print(f"#   register-resident loops, 1 thread: VPSADBW+VPADDQ {pk['sad']:.1f} G abs-diff/s, "
                      f"VPMINUB+VPADDB (min-sum, <= 4 bits) {pk['minsum']:.1f} G abs-diff/s, "
                      f"VPXORQ+VPOPCNTQ (3-bit thermometer codes, 2 bits) {pk['thermo2']:.1f} G abs-diff/s, "
                      f"VFMADD231PS {pk['fp32_fma']:.1f} G FMA/s; SAD/FMA ceiling for adder-vs-FP32 ratios: "
                      f"{r['sad_over_fp32_fma_ceiling']:.2f}x")


if __name__ == "__main__":
    main()
