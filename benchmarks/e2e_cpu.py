"""End-to-end CPU latency of deploy models against FP32 torch, ResNet-18 at 224x224.

Rows: the deploy ``adabin`` ResNet-18 (binary 3x3 convs on packed bits; stem, downsample shortcuts and classifier
FP as in the paper) and the deploy ``adder_ptq4`` adder ResNet-18 (integer l1 convs; FP stem and classifier), each
against torchvision's FP32 ResNet-18 (same shapes) measured in the same run at the same thread count. Medians of
repeats after warm-up; ``--threads`` chooses the thread counts (default: 1 and all).

    .venv/bin/python benchmarks/e2e_cpu.py [--batches 1 16] [--repeats 5] [--threads 1 2]
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
def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (also builds any cached packed weights)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_models(calib_batch: torch.Tensor) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18().eval()
    adabin = quantkit.QAT(torchvision.models.resnet18(), "adabin").convert().eval()
    adder_sim = quantkit.quantize(adder_resnet18().eval(), "adder_ptq4", calib_data=[calib_batch], progress=False)
    adder = quantkit.convert(adder_sim).eval()
    return {"fp32": fp32, "adabin": adabin, "adder_ptq4": adder}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)

    models = build_models(torch.randn(2, 3, args.size, args.size))
    print(f"# end-to-end ResNet-18 {args.size}x{args.size}, CPU: {cpu_model()} ({os.cpu_count()} logical), "
          f"torch {torch.__version__}, kernels ISA: {quantkit.ops.cpu_isa()}")
    print(f"# medians of {args.repeats} runs after warm-up; x FP32 = the faster FP32 layout's time / deploy time "
          "(same run, same threads); deploy models run channels_last, as their binary convs produce it")
    print(f"{'threads':>7} {'batch':>5} {'FP32 ms':>9} {'FP32 CL ms':>10} {'adabin ms':>10} {'x FP32':>7} "
          f"{'adder4 ms':>10} {'x FP32':>7}")
    cl = torch.channels_last
    models = {name: (m.to(memory_format=cl) if name != "fp32" else m) for name, m in models.items()}
    fp32_cl = copy.deepcopy(models["fp32"]).to(memory_format=cl)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            x = torch.randn(b, 3, args.size, args.size)
            xcl = x.contiguous(memory_format=cl)
            t = {name: median_time(lambda m=m: m(xcl if name != "fp32" else x), args.repeats)
                 for name, m in models.items()}
            t["fp32_cl"] = median_time(lambda: fp32_cl(xcl), args.repeats)
            best = min(t["fp32"], t["fp32_cl"])
            print(f"{threads:>7} {b:>5} {t['fp32'] * 1e3:>9.1f} {t['fp32_cl'] * 1e3:>10.1f} {t['adabin'] * 1e3:>10.1f} "
                  f"{best / t['adabin']:>7.2f} {t['adder_ptq4'] * 1e3:>10.1f} {best / t['adder_ptq4']:>7.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
