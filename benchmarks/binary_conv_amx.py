"""Binary 3x3 conv on AMX-INT8 tiles against the AVX-512 VPOPCNTD path, and the AdaBin ResNet-18 deploy model with
and without it, on a CPU with AMX (Sapphire Rapids or later; elsewhere the script says so and stops).

Rows 1: every ResNet-18 3x3 binary conv shape at batch 1 and 16, ``binary_conv2d_prepacked`` with the AdaBin
epilogue (all five affine terms, float output) on the VPOPCNTD path (``QUANTKIT_CPU_ISA=avx512``) and on AMX
(``QUANTKIT_CPU_ISA=amx``, forced on every shape) and with the default selection (AMX where at least 70% of its
16-row segments are output positions and there are 64 or more), interleaved medians. Rows 2: the AdaBin ResNet-18 deploy model
(224x224, channels-last) with the default selection and with ``avx512``, against torchvision's FP32 ResNet-18 in
its faster layout, same run, same threads.

    .venv/bin/python benchmarks/binary_conv_amx.py [--threads 1 2] [--repeats 15]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_medians  # noqa: E402

import quantkit  # noqa: E402
from quantkit import ops  # noqa: E402
from quantkit.sysinfo import cpu_model  # noqa: E402

# (C_in, C_out, H_in, stride): the binary 3x3 convs of ResNet-18
SHAPES = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1),
          (256, 512, 14, 2), (512, 512, 7, 1)]


def with_isa(isa: str, fn):
    def run():
        os.environ["QUANTKIT_CPU_ISA"] = isa
        return fn()
    return run


def conv_rows(batches, repeats: int) -> None:
    print("| threads | batch | shape | VPOPCNTD ms | AMX ms | AMX speed-up | default (auto) ms |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        for c_in, c_out, h, s in SHAPES:
            g = torch.Generator().manual_seed(0)
            w = ops.pack_conv_weight(torch.randn(c_out, c_in, 3, 3, generator=g))
            panels, wpop = ops.binary_conv_prepack(w, c_in)
            masks = ops.binary_conv_prepack_amx(w, c_in)
            x = ops.pack_activation_nhwc(torch.randn(b, c_in, h, h, generator=g))
            terms = {t: torch.randn(c_out, generator=g)
                     for t in ("scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias")}

            def conv():
                return ops.binary_conv2d_prepacked(x, panels, wpop, c_in, c_out, 3, s, 1, 1, **terms,
                                                   amx_weights=masks)
            t = interleaved_medians({"avx512": with_isa("avx512", conv), "amx": with_isa("amx", conv),
                                     "auto": with_isa("auto", conv)}, repeats)
            print(f"| {torch.get_num_threads()} | {b} | {c_in}->{c_out} {h}x{h} s{s} | {t['avx512'] * 1e3:.3f} | "
                  f"{t['amx'] * 1e3:.3f} | {t['avx512'] / t['amx']:.2f} | {t['auto'] * 1e3:.3f} |", flush=True)


def network_rows(batches, repeats: int) -> None:
    import torchvision

    torch.manual_seed(0)
    cl = torch.channels_last
    fp32 = torchvision.models.resnet18().eval().to(memory_format=cl)
    fp32_nchw = torchvision.models.resnet18().eval()
    adabin = quantkit.QAT(torchvision.models.resnet18(), "adabin").convert().eval().to(memory_format=cl)
    print("| threads | batch | FP32 best ms | adabin avx512 ms | x FP32 | adabin auto (AMX) ms | x FP32 | AMX gain |")
    print("|---|---|---|---|---|---|---|---|")
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        xcl = x.contiguous(memory_format=cl)
        with torch.no_grad():
            os.environ["QUANTKIT_CPU_ISA"] = "avx512"
            y0 = adabin(xcl)
            os.environ["QUANTKIT_CPU_ISA"] = "auto"
            y1 = adabin(xcl)
            assert torch.equal(y0, y1), "the AMX and VPOPCNTD deploy outputs differ"
            t = interleaved_medians({"fp32": lambda: fp32_nchw(x), "fp32_cl": lambda: fp32(xcl),
                                     "avx512": with_isa("avx512", lambda: adabin(xcl)),
                                     "auto": with_isa("auto", lambda: adabin(xcl))}, repeats)
        best = min(t["fp32"], t["fp32_cl"])
        print(f"| {torch.get_num_threads()} | {b} | {best * 1e3:.1f} | {t['avx512'] * 1e3:.2f} | "
              f"{best / t['avx512']:.2f} | {t['auto'] * 1e3:.2f} | {best / t['auto']:.2f} | "
              f"{t['avx512'] / t['auto']:.2f} |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--net-repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(f"# CPU: {cpu_model()} ({os.cpu_count()} logical), torch {torch.__version__}, "
          f"kernels ISA: {ops.cpu_isa()}; medians of interleaved runs; speed-up = VPOPCNTD time / AMX time")
    if not ops.cpu_amx_supported():
        print("# skipped: this CPU/OS has no AMX-INT8 tiles (or the kernels are not built)")
        return
    saved = os.environ.get("QUANTKIT_CPU_ISA")
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            conv_rows(args.batches, args.repeats)
            print()
        for threads in args.threads:
            torch.set_num_threads(threads)
            network_rows(args.batches, args.net_repeats)
            print()
    finally:
        if saved is None:
            os.environ.pop("QUANTKIT_CPU_ISA", None)
        else:
            os.environ["QUANTKIT_CPU_ISA"] = saved


if __name__ == "__main__":
    main()
