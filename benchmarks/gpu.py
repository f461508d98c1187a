"""GPU benchmark of quantkit's CUDA kernels against cuBLAS / cuDNN / torch.cdist, measured in the same run.

    python benchmarks/gpu.py [--quick] [--out results.json]

Rows (medians over repeats, CUDA events, after warm-up; inputs random, never zeros):
  * binary GEMM (binary_linear; float output and packed-bit output) per kernel path (mma.sync, wgmma) vs cuBLAS
    FP16 (torch.matmul) and INT8 (torch._int_mm) on the same M, N, K; rate in bit-MAC/s vs MAC/s;
  * binary conv2d (float output / packed output) on ResNet-18's 3x3 layers at batch 64 vs cuDNN FP16
    channels-last with cudnn.benchmark;
  * adder l1 GEMM at 4 bits (thermometer codes on the b1 AND tensor cores) and 8 bits (vabsdiff4) vs
    torch.cdist(p=1) (fp32) and vs FP16 GEMM of the same M, N, K; rate in abs-diff/s;
  * end-to-end deploy models (adabin ResNet-18, bivit ViT) vs FP16 torch at batch 64, when the schemes exist.
For every quantkit row the time of its GEMM kernel alone (torch.profiler) is printed next to the op's time, so
the pre-passes (packing, popcounts, range checks) show up as the difference.
Prints the table last; ratios are against baselines measured in this run on this device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantkit import ops  # noqa: E402
from quantkit.ops import _load  # noqa: E402
from kernels_cpu import RESNET18_3X3  # noqa: E402  (ResNet-18's 3x3 shapes, shared with the CPU benchmark)

ROWS: list[dict] = []


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20, max_s: float = 4.0) -> float:
    """Median milliseconds of fn() with CUDA events; repeats are capped by a wall-clock budget."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.time() + max_s
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
        if time.time() > t_end and len(times) >= 3:
            break
    return statistics.median(times)


def kernel_ms(fn: Callable[[], object], match: str = "bgemm", reps: int = 5) -> float | None:
    """Device time per call of the kernels whose name contains `match` (torch.profiler), or None."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        total_us = 0.0
        for ev in prof.key_averages():
            if match in ev.key:
                dt = getattr(ev, "device_time_total", None)
                if dt is None:
                    dt = getattr(ev, "cuda_time_total", 0.0)
                total_us += dt
        return total_us / reps / 1000.0 if total_us > 0 else None
    except Exception as exc:  # the profiler is a diagnostic only
        print(f"  (profiler unavailable: {exc})")
        return None


def add_row(section: str, name: str, ms: float, work: float, unit: str, base: str = "", ratio: float | None = None,
            kms: float | None = None, note: str = "") -> None:
    rate = work / (ms * 1e-3) if ms > 0 else float("nan")
    row = dict(section=section, name=name, ms=ms, rate=rate, unit=unit, base=base, ratio=ratio, kernel_ms=kms,
               note=note)
    ROWS.append(row)
    k = f" kernel {kms:.4f} ms" if kms else ""
    r = f" | {ratio:.2f}x {base}" if ratio is not None else ""
    print(f"  {name:58s} {ms:9.4f} ms  {rate / 1e12:9.2f} T{unit}/s{r}{k} {note}", flush=True)


def set_path(var: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = value


def header() -> None:
    p = torch.cuda.get_device_properties(0)
    print("=" * 110)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,"
                            "temperature.gpu,driver_version", "--format=csv"], capture_output=True, text=True,
                           timeout=20)
        print("nvidia-smi:", " | ".join(q.stdout.strip().splitlines()))
    except Exception as exc:
        print(f"nvidia-smi unavailable: {exc}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print("quantkit:", torch.ops.quantkit.cuda_backend_info())
    print("=" * 110, flush=True)


def gemm_paths() -> list[str]:
    cc = torch.cuda.get_device_capability()
    paths = []
    if cc >= (8, 0):
        paths.append("mma")
    if cc == (9, 0) and "sm90a_self_check=passed" in torch.ops.quantkit.cuda_backend_info():
        paths.append("wgmma")
    return paths or ["simt"]


# ---------------------------------------------------------------------------------------------- binary GEMM
def bench_gemm(quick: bool) -> None:
    print("\n[binary GEMM] binary_linear(x (M,K/32 words), w (N,K/32)) vs cuBLAS FP16 / torch._int_mm INT8")
    sizes = [(4096, 4096, 4096), (8192, 8192, 8192)] if quick else [(4096, 4096, 4096), (8192, 8192, 8192),
                                                                     (16384, 16384, 16384)]
    for m, n, k in sizes:
        macs = float(m) * n * k
        a16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
        b16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
        t16 = median_ms(lambda: torch.matmul(a16, b16), reps=10)
        add_row("gemm", f"cuBLAS FP16 {m}x{n}x{k}", t16, macs, "MAC")
        del a16, b16
        a8 = torch.randint(-127, 127, (m, k), device="cuda", dtype=torch.int8)
        b8 = torch.randint(-127, 127, (k, n), device="cuda", dtype=torch.int8)
        t8 = median_ms(lambda: torch._int_mm(a8, b8), reps=10)
        add_row("gemm", f"torch._int_mm INT8 {m}x{n}x{k}", t8, macs, "MAC")
        del a8, b8
        x = ops.pack_bits(torch.randn(m, k, device="cuda"))
        w = ops.pack_bits(torch.randn(n, k, device="cuda"))
        th = torch.randn(n, device="cuda")
        int8_rate = macs / (t8 * 1e-3)
        for path in gemm_paths():
            set_path("QUANTKIT_CUDA_BGEMM", path)
            for out_kind in ("float", "bits"):
                fn = (lambda: torch.ops.quantkit.binary_linear(x, w, k)) if out_kind == "float" else (
                    lambda: torch.ops.quantkit.binary_linear(x, w, k, None, None, None, th))
                t = median_ms(fn, reps=15)
                kms = kernel_ms(fn)
                rate = macs / (t * 1e-3)
                add_row("gemm", f"binary {path} {out_kind}-out {m}x{n}x{k}", t, macs, "bitMAC", "INT8 MAC rate",
                        rate / int8_rate, kms, f"({t16 / t:.1f}x FP16 time)")
        set_path("QUANTKIT_CUDA_BGEMM", None)
        del x, w
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- binary conv
def bench_conv(quick: bool, batch: int = 64) -> None:
    print(f"\n[binary conv2d] ResNet-18 3x3 layers, batch {batch}, vs cuDNN FP16 channels_last (cudnn.benchmark)")
    torch.backends.cudnn.benchmark = True
    for c_in, c_out, h, s in RESNET18_3X3:
        a = torch.randn(batch, c_in, h, h, device="cuda").contiguous(memory_format=torch.channels_last)
        wf = torch.randn(c_out, c_in, 3, 3, device="cuda")
        a16, w16 = a.half(), wf.half().contiguous(memory_format=torch.channels_last)
        tc = median_ms(lambda: torch.nn.functional.conv2d(a16, w16, None, s, 1), reps=30)
        ho = (h + 2 - 3) // s + 1
        macs = float(batch) * ho * ho * c_out * c_in * 9
        add_row("conv", f"cuDNN FP16 C{c_in}->{c_out} {h}x{h} s{s}", tc, macs, "MAC")
        x = ops.pack_activation_nhwc(a)
        wt = ops.pack_conv_weight(wf)
        scale = torch.rand(c_out, device="cuda") + 0.5
        bias = torch.randn(c_out, device="cuda")
        th = torch.randn(c_out, device="cuda")
        for path in gemm_paths():
            set_path("QUANTKIT_CUDA_BGEMM", path)
            for out_kind in ("float", "bits"):
                thr = th if out_kind == "bits" else None
                fn = lambda: torch.ops.quantkit.binary_conv2d(x, wt, c_in, [s, s], [1, 1], [1, 1], scale, None, None,  # noqa: E731
                                                             None, bias, thr)
                t = median_ms(fn, reps=30)
                kms = kernel_ms(fn)
                add_row("conv", f"binary {path} {out_kind}-out C{c_in}->{c_out} {h}x{h} s{s}", t, macs, "bitMAC",
                        "cuDNN FP16 speed", tc / t, kms)
        set_path("QUANTKIT_CUDA_BGEMM", None)
        if quick and c_in >= 128:
            break


# ---------------------------------------------------------------------------------------------- adder
def bench_adder(quick: bool) -> None:
    print("\n[adder] integer l1 GEMM S = sum |x - w| vs torch.cdist(p=1) fp32 and FP16 GEMM of the same M,N,K")
    mc, nc, kc = 1024, 512, 4096
    xc = torch.randn(mc, kc, device="cuda")
    wc = torch.randn(nc, kc, device="cuda")
    tcd = median_ms(lambda: torch.cdist(xc, wc, p=1), reps=5)
    add_row("adder", f"torch.cdist(p=1) fp32 {mc}x{nc}x{kc}", tcd, float(mc) * nc * kc, "absdiff")
    cdist_rate = float(mc) * nc * kc / (tcd * 1e-3)
    del xc, wc
    shapes = [(8192, 4096, 4096)] if quick else [(4096, 4096, 4096), (8192, 4096, 4096)]
    for m, n, k in shapes:
        ops_n = float(m) * n * k
        a16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
        b16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
        t16 = median_ms(lambda: torch.matmul(a16, b16), reps=10)
        add_row("adder", f"cuBLAS FP16 GEMM {m}x{n}x{k}", t16, ops_n, "MAC")
        del a16, b16
        for bits, label in ((4, "4-bit (thermometer codes, b1 AND MMA)"), (8, "8-bit (vabsdiff4)")):
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            xq = torch.randint(lo, hi + 1, (1, m, k), device="cuda", dtype=torch.int8 if bits < 8 else torch.int16)
            wq = torch.randint(lo, hi + 1, (n, k), device="cuda", dtype=torch.int8)
            gi = torch.zeros(n, dtype=torch.int64, device="cuda")
            fn = lambda: torch.ops.quantkit.adder_l1(xq, wq, gi, 1)  # noqa: E731
            t = median_ms(fn, reps=10)
            kms = kernel_ms(fn)
            add_row("adder", f"adder {label} {m}x{n}x{k}", t, ops_n, "absdiff", "torch.cdist rate",
                    (ops_n / (t * 1e-3)) / cdist_rate, kms, f"({t16 / t:.2f}x FP16 GEMM speed)")
            del xq, wq
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- end to end
def bench_e2e(batch: int = 64) -> None:
    print(f"\n[end-to-end] deploy models vs FP16 torch, batch {batch}, 224x224")
    import quantkit

    available = quantkit.schemes() if hasattr(quantkit, "schemes") else {}
    cases = []
    try:
        import torchvision

        cases.append(("adabin", "ResNet-18", lambda: torchvision.models.resnet18(num_classes=1000)))
    except Exception as exc:
        print(f"  skipped: torchvision unavailable ({exc})")
    try:
        from quantkit.models import VisionTransformer

        cases.append(("bivit", "ViT-Ti/16", lambda: VisionTransformer(img_size=224, embed_dim=192, depth=12,
                                                                        num_heads=3)))
    except Exception as exc:
        print(f"  skipped: quantkit.models.VisionTransformer unavailable ({exc})")
    for scheme, model_name, make in cases:
        if scheme not in available:
            print(f"  {scheme} {model_name}: skipped: scheme not available (registered: {sorted(available)})")
            ROWS.append(dict(section="e2e", name=f"{scheme} {model_name}", note="skipped: scheme not available"))
            continue
        try:
            torch.manual_seed(0)
            fp = make().eval()
            x = torch.randn(batch, 3, 224, 224)
            fp16 = make().eval().cuda().half().to(memory_format=torch.channels_last)
            fp16.load_state_dict(fp.state_dict())
            x16 = x.cuda().half().contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                t16 = median_ms(lambda: fp16(x16), reps=20)
            add_row("e2e", f"FP16 torch {model_name} b{batch}", t16, batch, "img")
            sim = quantkit.prepare(fp, scheme, (x[:2],))
            with torch.no_grad():
                sim(x[:8])  # one forward pass: initialises data-dependent parameters where a scheme has them
            dep = quantkit.convert(sim).cuda().eval()
            xd = x.cuda()
            with torch.no_grad():
                td = median_ms(lambda: dep(xd), reps=20)
                y_sim = sim.cuda().eval()(xd[:8])
                y_dep = dep(xd[:8])
            err = ((y_dep.float() - y_sim.float()).norm() / y_sim.float().norm().clamp_min(1e-12)).item()
            add_row("e2e", f"quantkit {scheme} deploy {model_name} b{batch}", td, batch, "img", "FP16 torch speed",
                    t16 / td, None, f"(rel. diff deploy vs simulated on GPU: {err:.2e})")
        except Exception as exc:
            print(f"  {scheme} {model_name}: skipped: {type(exc).__name__}: {exc}")
            ROWS.append(dict(section="e2e", name=f"{scheme} {model_name}", note=f"skipped: {type(exc).__name__}: {exc}"))


def print_table() -> None:
    print("\n" + "=" * 110)
    print(f"{'benchmark':64s} {'median ms':>10s} {'rate':>14s}  ratio")
    for r in ROWS:
        if "ms" not in r:
            print(f"{r['name']:64s} {r['note']}")
            continue
        ratio = f"{r['ratio']:.2f}x {r['base']}" if r.get("ratio") is not None else ""
        kern = f" [kernel {r['kernel_ms']:.4f} ms]" if r.get("kernel_ms") else ""
        print(f"{r['name']:64s} {r['ms']:10.4f} {r['rate'] / 1e12:9.2f} T{r['unit']:<7s} {ratio}{kern}")
    print("=" * 110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes (for a short GPU lease)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--only", default="gemm,conv,adder,e2e", help="comma-separated sections")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return
    _load.load()
    if not hasattr(torch.ops.quantkit, "cuda_backend_info"):
        print("quantkit._C was built without CUDA kernels: nothing to benchmark (" + str(_load.status()) + ")")
        sys.exit(1)
    header()
    sections = set(args.only.split(","))
    t0 = time.time()
    for name, fn in (("gemm", bench_gemm), ("conv", bench_conv), ("adder", bench_adder)):
        if name in sections:
            try:
                fn(args.quick)
            except Exception as exc:
                print(f"  section {name} failed: {type(exc).__name__}: {exc}")
                ROWS.append(dict(section=name, name=f"[{name}]", note=f"FAILED: {type(exc).__name__}: {exc}"))
            torch.cuda.empty_cache()
    if "e2e" in sections:
        bench_e2e()
    print(f"\nbenchmark wall time {time.time() - t0:.0f} s")
    print_table()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(ROWS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
