"""End-to-end CPU latency of the deploy ``adder_ptq4`` ResNet-18 against torch FP32, with a per-op-type profile.

Prints, for each thread count and batch: FP32 (NCHW and channels-last, the faster is the baseline) and the deploy
adder model, medians of round-robin repeats in one run, and the ratio. Then the deploy model's time split by op type
(torch.profiler self CPU time): adder convs (integer l1 kernels, activation re-quantization included when fused),
activation re-quantization (``quantize_groups``, when not fused), FP stem / classifier, and the glue (BatchNorm,
ReLU, residual add, pooling, layout copies, allocation).

    .venv/bin/python benchmarks/adder_e2e_profile.py [--batches 1 16] [--threads 1] [--repeats 7] [--bits 4]
"""
from __future__ import annotations

import argparse
import copy
import os
from collections import defaultdict
from typing import Dict

import torch
import torchvision

import quantkit
from quantkit.models import adder_resnet18
from quantkit.ops._dispatch import cpu_isa
from quantkit.sysinfo import cpu_model
from timing import interleaved_medians

# op name -> category of the profile
_CATEGORIES = (
    ("quantkit::adder_", "adder convs"),
    ("quantkit::quantize_groups", "quantize_groups"),
    ("quantkit::conv_max_pool2d_nhwc", "FP stem (conv + ReLU + max-pool kernel)"),
    ("aten::mkldnn_convolution", "FP stem conv"),
    ("aten::convolution", "FP stem conv"),
    ("aten::_convolution", "FP stem conv"),
    ("aten::conv2d", "FP stem conv"),
    ("aten::addmm", "FP classifier"),
    ("aten::linear", "FP classifier"),
    ("aten::max_pool2d", "pooling"),
    ("aten::max_pool2d_with_indices", "pooling"),
    ("quantkit::max_pool2d_nhwc", "pooling"),
    ("aten::adaptive_avg_pool2d", "pooling"),
    ("aten::mean", "pooling"),
    ("aten::batch_norm", "BatchNorm"),
    ("aten::native_batch_norm", "BatchNorm"),
    ("aten::_native_batch_norm_legit_no_training", "BatchNorm"),
    ("aten::relu", "ReLU / residual add"),
    ("aten::relu_", "ReLU / residual add"),
    ("aten::clamp_min", "ReLU / residual add"),
    ("aten::add", "ReLU / residual add"),
    ("aten::add_", "ReLU / residual add"),
    ("aten::isnan", "NaN check"),
    ("aten::any", "NaN check"),
    ("aten::is_nonzero", "NaN check"),
    ("aten::item", "NaN check"),
    ("aten::_local_scalar_dense", "NaN check"),
    ("aten::contiguous", "layout copies"),
    ("aten::clone", "layout copies"),
    ("aten::copy_", "layout copies"),
    ("aten::to", "layout copies"),
    ("aten::_to_copy", "layout copies"),
    ("aten::empty", "allocation"),
    ("aten::empty_like", "allocation"),
    ("aten::empty_strided", "allocation"),
)


def _category(name: str) -> str:
    for prefix, cat in _CATEGORIES:
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            return cat
    return "other glue"


def build_models(size: int, bits: int) -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18().eval()
    calib = torch.randn(2, 3, size, size)
    sim = quantkit.quantize(adder_resnet18().eval(), f"adder_ptq{bits}", calib_data=[calib], progress=False)
    deploy = quantkit.convert(sim).eval().to(memory_format=torch.channels_last)
    return {"fp32": fp32, "fp32_cl": copy.deepcopy(fp32).to(memory_format=torch.channels_last), "adder": deploy}


@torch.no_grad()
def profile_split(model: torch.nn.Module, x: torch.Tensor, runs: int = 3) -> Dict[str, float]:
    """Share of the deploy model's self CPU time per op category (torch.profiler, ``runs`` forwards)."""
    from torch.profiler import ProfilerActivity, profile

    model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            model(x)
    totals: Dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        totals[_category(ev.key)] += ev.self_cpu_time_total
    return dict(totals)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)

    models = build_models(args.size, args.bits)
    print(f"# adder_ptq{args.bits} ResNet-18 {args.size}x{args.size} deploy vs torch FP32; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical), torch {torch.__version__}, kernels ISA: {cpu_isa()}")
    print(f"# medians of {args.repeats} round-robin runs after warm-up; x FP32 = faster FP32 layout / deploy")
    print(f"{'threads':>7} {'batch':>5} {'FP32 ms':>9} {'FP32 CL ms':>10} {'adder ms':>9} {'x FP32':>7}")
    cl = torch.channels_last
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            x = torch.randn(b, 3, args.size, args.size)
            xcl = x.contiguous(memory_format=cl)
            with torch.no_grad():
                t = interleaved_medians({"fp32": lambda: models["fp32"](x), "fp32_cl": lambda: models["fp32_cl"](xcl),
                                         "adder": lambda: models["adder"](xcl)}, args.repeats)
            best = min(t["fp32"], t["fp32_cl"])
            print(f"{threads:>7} {b:>5} {t['fp32'] * 1e3:>9.1f} {t['fp32_cl'] * 1e3:>10.1f} {t['adder'] * 1e3:>9.1f} "
                  f"{best / t['adder']:>7.2f}", flush=True)
            if not args.no_profile:
                split = profile_split(models["adder"], xcl)
                total = sum(split.values()) or 1.0
                parts = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))
                print(f"#   profile (self CPU time): {parts}", flush=True)


if __name__ == "__main__":
    main()
