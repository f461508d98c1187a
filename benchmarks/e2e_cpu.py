"""End-to-end CPU latency of deploy models against FP32 torch, ResNet-18 at 224x224.

Rows: the deploy ``adabin`` ResNet-18 (binary 3x3 convs on packed bits; stem, downsample shortcuts and classifier
FP as in the paper) and the deploy ``adder_ptq4`` / ``adder_ptq2`` adder ResNet-18s (integer l1 convs on 4-bit /
2-bit codes, the 2-bit tap rows thermometer-coded on AVX-512; FP stem and classifier), each against torchvision's FP32 ResNet-18 (same shapes) measured in the same run at the same thread count. Medians of
repeats after warm-up; ``--threads`` chooses the thread counts (default: 1 and all).

Then a per-op-type profile of the ``adabin`` deploy model at every thread count and batch (``torch.profiler``, self
CPU time of each dispatched op summed by category, medians over ``--profile-repeats`` profiled runs): binary convs,
bit packing, the FP stem (the stem kernel: conv, ReLU and max-pool in one op), shortcut products and classifier, BatchNorm / Maxout / residual / pooling glue, allocation and
layout copies, and what is left of the wall time (Python and dispatch overhead). ``--no-profile`` skips it.

    .venv/bin/python benchmarks/e2e_cpu.py [--batches 1 16] [--repeats 5] [--threads 1 2] [--no-profile]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from quantkit.sysinfo import cpu_model
import torchvision

import quantkit
from quantkit.models import adder_resnet18


@torch.no_grad()
def interleaved_medians(runs: dict, repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` timed calls, taken in ``rounds`` rounds: each round runs
    every callable once untimed (its weights and code back in cache, as in a serving loop that runs one model
    back to back) and then its share of the timed calls back to back. A machine that speeds up or slows down during
    the run shifts all rows alike."""
    times = {name: [] for name in runs}
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for name, fn in runs.items():
            fn()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# op name (as torch.profiler records it) -> category of the profile; the first matching prefix wins
PROFILE_CATEGORIES = (
    ("binary conv", ("quantkit::binary_conv2d", "quantkit::binary_linear")),
    ("packing", ("quantkit::pack_bits",)),
    ("FP stem / shortcuts / fc", ("quantkit::conv_max_pool2d_nhwc", "aten::mkldnn_convolution", "aten::_convolution",
                                  "aten::convolution", "aten::conv2d", "aten::thnn_conv2d", "aten::_slow_conv2d",
                                  "aten::addmm", "aten::linear", "aten::mm", "aten::_mkldnn")),
    ("BN / Maxout / residual / pool", ("quantkit::maxout", "aten::add", "aten::batch_norm", "aten::native_batch_norm",
                                       "aten::_native_batch_norm", "aten::_batch_norm", "aten::max_pool2d",
                                       "aten::adaptive_avg_pool2d", "aten::mean", "aten::relu", "aten::mul",
                                       "aten::flatten", "aten::max_pool2d_with_indices", "aten::clamp_min",
                                       "quantkit::max_pool2d_nhwc")),
    ("allocation / layout copy", ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::copy_",
                                  "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy",
                                  "aten::resize_", "aten::as_strided", "aten::permute", "aten::view",
                                  "aten::reshape", "aten::expand", "aten::detach", "aten::alias")),
)


def _category(op_name: str) -> str:
    for cat, prefixes in PROFILE_CATEGORIES:
        if any(op_name.startswith(p) for p in prefixes):
            return cat
    return "other ops"


@torch.no_grad()
def op_profile(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, dict[str, float], dict]:
    """(median wall seconds, median seconds per category, seconds per op name of the median run) of ``model(x)``
    under torch.profiler; the "framework overhead" category is the wall time no dispatched op accounts for."""
    from torch.profiler import ProfilerActivity, profile

    model(x)
    runs = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model(x)
            wall = time.perf_counter() - t0
        per_op: dict[str, float] = {}
        for ev in prof.key_averages():
            per_op[ev.key] = per_op.get(ev.key, 0.0) + ev.self_cpu_time_total * 1e-6
        cats: dict[str, float] = {}
        for name, sec in per_op.items():
            cats[_category(name)] = cats.get(_category(name), 0.0) + sec
        cats["framework overhead"] = max(0.0, wall - sum(cats.values()))
        runs.append((wall, cats, per_op))
    runs.sort(key=lambda r: r[0])
    wall, _, per_op = runs[len(runs) // 2]
    names = [c for c, _ in PROFILE_CATEGORIES] + ["other ops", "framework overhead"]
    med = {c: statistics.median(r[1].get(c, 0.0) for r in runs) for c in names}
    return wall, med, per_op


def print_profile(label: str, wall: float, cats: dict[str, float], per_op: dict) -> None:
    print(f"# profile {label}: {wall * 1e3:.2f} ms wall under the profiler")
    total = sum(cats.values()) or 1.0
    for cat, sec in cats.items():
        if sec > 0:
            print(f"#   {cat:<32} {sec * 1e3:>8.2f} ms {100 * sec / total:>5.1f}%")
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:6]
    print("#   top ops: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in top))


def build_models(calib_batch: torch.Tensor) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18().eval()
    adabin = quantkit.QAT(torchvision.models.resnet18(), "adabin").convert().eval()
    models = {"fp32": fp32, "adabin": adabin}
    for scheme in ("adder_ptq4", "adder_ptq2"):  # 2 bits: thermometer-coded tap rows (XOR + popcount) on AVX-512
        torch.manual_seed(0)
        sim = quantkit.quantize(adder_resnet18().eval(), scheme, calib_data=[calib_batch], progress=False)
        models[scheme] = quantkit.convert(sim).eval()
    return models


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--profile-repeats", type=int, default=5)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)

    models = build_models(torch.randn(2, 3, args.size, args.size))
    print(f"# end-to-end ResNet-18 {args.size}x{args.size}, CPU: {cpu_model()} ({os.cpu_count()} logical), "
          f"torch {torch.__version__}, kernels ISA: {quantkit.ops.cpu_isa()}")
    print(f"# medians of {args.repeats} runs in 3 rounds (each round: every model warmed up, then run back to back); x FP32 = the faster FP32 layout's time / deploy time "
          "(same run, same threads); deploy models run channels_last, as their binary convs produce it")
    print(f"{'threads':>7} {'batch':>5} {'FP32 ms':>9} {'FP32 CL ms':>10} {'adabin ms':>10} {'x FP32':>7} "
          f"{'adder4 ms':>10} {'x FP32':>7} {'adder2 ms':>10} {'x FP32':>7}")
    cl = torch.channels_last
    models = {name: (m.to(memory_format=cl) if name != "fp32" else m) for name, m in models.items()}
    fp32_cl = copy.deepcopy(models["fp32"]).to(memory_format=cl)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            x = torch.randn(b, 3, args.size, args.size)
            xcl = x.contiguous(memory_format=cl)
            runs = {name: (lambda m=m, name=name: m(xcl if name != "fp32" else x)) for name, m in models.items()}
            runs["fp32_cl"] = lambda: fp32_cl(xcl)
            t = interleaved_medians(runs, args.repeats)
            best = min(t["fp32"], t["fp32_cl"])
            print(f"{threads:>7} {b:>5} {t['fp32'] * 1e3:>9.1f} {t['fp32_cl'] * 1e3:>10.1f} {t['adabin'] * 1e3:>10.1f} "
                  f"{best / t['adabin']:>7.2f} {t['adder_ptq4'] * 1e3:>10.1f} {best / t['adder_ptq4']:>7.2f} "
                  f"{t['adder_ptq2'] * 1e3:>10.1f} {best / t['adder_ptq2']:>7.2f}",
                  flush=True)
    if args.no_profile:
        return
    print()
    print("# adabin deploy: where the time goes (torch.profiler self CPU time per op category; medians of "
          f"{args.profile_repeats} profiled runs; the profiler itself adds a little per op)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            xcl = torch.randn(b, 3, args.size, args.size).contiguous(memory_format=cl)
            print_profile(f"threads={threads} batch={b}", *op_profile(models["adabin"], xcl, args.profile_repeats))


if __name__ == "__main__":
    main()
