"""Uniform schemes at integer speed: FP32 vs w8a8 vs w4a4, in PyTorch (deploy models on quantkit's int8 kernels) and
in onnxruntime (the exported QDQ files, which its optimizer fuses into QLinearConv / QGemm: the script prints how
many convs of each file became QLinearConv), on torchvision's
ResNet-18 (224x224, batch 1 and 16) and the demo's digits CNN (8x8, batch 64), at 1 thread and all threads.

Also a GEMM section: quantkit::int8_linear (input quantization + u8 x s8 GEMM + dequantizing epilogue) against
torch._int_mm (s8 x s8 -> s32 only) and FP32 matmul on ResNet-18's im2col shapes, so the choice of integer path is a
measurement. Medians of repeats after warm-up; every ratio is against FP32 measured in the same run at the same
thread count. Weights are random (timing does not depend on them); calibration uses random inputs.

    .venv/bin/python benchmarks/uniform_cpu.py [--threads 1 16] [--repeats 7] [--skip-resnet]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import quantkit
from quantkit.ops import int8 as int8_ops
from quantkit.sysinfo import cpu_model
from timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def settle_bn(model: nn.Module, shape: tuple) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, *shape))
    return model.eval()


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def fused_convs(path: str, tmp: str) -> str:
    """'n/m': QLinearConv and float Conv nodes in onnxruntime's optimized graph of ``path``."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    return f"{ops.count('QLinearConv')}/{ops.count('Conv') + ops.count('FusedConv')}"


def bench_model(name: str, model: nn.Module, shape: tuple, batches: list[int], threads_list: list[int],
                repeats: int, tmp: str) -> None:
    calib = [torch.randn(8, *shape) for _ in range(2)]
    variants = {"FP32": model}
    files = {}
    example = (torch.randn(2, *shape),)
    files["FP32"] = os.path.join(tmp, f"{name}_fp32.onnx")
    quantkit.export_onnx(model, example, files["FP32"], quiet=True, verify=False)
    with warnings.catch_warnings():
        # a random-weight ResNet amplifies float-rounding threshold flips (allow_mismatch); every layer is still
        # checked against its deploy layer, which the export enforces
        warnings.simplefilter("ignore", RuntimeWarning)
        for scheme in ("w8a8", "w4a4"):
            sim = quantkit.quantize(model, scheme, calib, progress=False)
            variants[scheme] = quantkit.convert(sim).eval()
            files[scheme] = os.path.join(tmp, f"{name}_{scheme}.onnx")
            quantkit.export_onnx(sim, example, files[scheme], quiet=True, allow_mismatch=True)
        files["w4a4 INT4"] = os.path.join(tmp, f"{name}_w4a4_int4.onnx")
        quantkit.export_onnx(quantkit.quantize(model, "w4a4", calib, progress=False), example, files["w4a4 INT4"],
                             quiet=True, uniform_form="int4", allow_mismatch=True)
    print(f"\n## {name} {'x'.join(map(str, shape))}")
    print("onnxruntime's optimized graph, QLinearConv / float Conv: " + ", ".join(
        f"{key} {fused_convs(path, tmp)}" for key, path in files.items()))
    print(f"{'threads':>7} {'batch':>5} {'runtime':<12} {'model':<10} {'ms':>9} {'x FP32':>7}")
    for threads in threads_list:
        torch.set_num_threads(threads)
        for batch in batches:
            x = torch.randn(batch, *shape)
            base = None
            with torch.no_grad():
                fp_nchw = median_ms(lambda: model(x), repeats)
                xcl = x.contiguous(memory_format=torch.channels_last)
                model_cl = model.to(memory_format=torch.channels_last)
                fp_cl = median_ms(lambda: model_cl(xcl), repeats)
                model.to(memory_format=torch.contiguous_format)
                base = min(fp_nchw, fp_cl)
                print(f"{threads:>7} {batch:>5} {'pytorch':<12} {'FP32':<10} {base:>9.2f} {1.0:>7.2f}")
                for scheme in ("w8a8", "w4a4"):
                    t = median_ms(lambda: variants[scheme](x), repeats)
                    print(f"{threads:>7} {batch:>5} {'pytorch':<12} {scheme:<10} {t:>9.2f} {base / t:>7.2f}")
            feed = {"input": x.numpy()}
            obase = None
            for key, path in files.items():
                sess = ort_session(path, threads)
                t = median_ms(lambda: sess.run(None, feed), repeats)
                obase = t if key == "FP32" else obase
                print(f"{threads:>7} {batch:>5} {'onnxruntime':<12} {key:<10} {t:>9.2f} {obase / t:>7.2f}")
            sys.stdout.flush()


def bench_gemm(threads_list: list[int], repeats: int) -> None:
    # (M, N, K) of ResNet-18's 3x3 convs at batch 1 as im2col GEMMs, and the classifier at batch 16
    shapes = [(3136, 64, 576), (784, 128, 1152), (196, 256, 2304), (49, 512, 4608), (16, 1000, 512)]
    print("\n## GEMM (M, N, K), float input -> float output: FP32 matmul; quantkit::int8_linear (quantize + u8 x s8 "
          "GEMM + epilogue, one op); the same on torch._int_mm (quantize to s8 codes, _int_mm, epilogue as torch "
          "ops); _int_mm alone (s8 x s8 -> s32, no quantize / epilogue). x = FP32 ms / ms")
    print(f"{'threads':>7} {'M':>5} {'N':>5} {'K':>5} {'FP32 ms':>8} {'int8_linear':>11} {'x':>5} "
          f"{'_int_mm path':>12} {'x':>5} {'_int_mm':>8} {'x':>5}")
    g = torch.Generator().manual_seed(0)
    for threads in threads_list:
        torch.set_num_threads(threads)
        for m, n, k in shapes:
            x = torch.randn(m, k, generator=g)
            wf = torch.randn(n, k, generator=g)
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            packed, wsum, ws = int8_ops.pack_weight(w), int8_ops.weight_sum(w), torch.rand(n) * 0.01
            s, z = torch.tensor(0.05), torch.tensor(3.0)
            xi = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            wt = w.t().contiguous()
            corr = (z - 128) * wsum.float()  # codes q - 128 as s8: acc = sum (q - 128) w

            def int_mm_path():
                q = (torch.clamp(torch.round(x / s) + z, 0, 255) - 128).to(torch.int8)
                return (torch._int_mm(q, wt).float() - corr) * (s * ws)

            with torch.no_grad():
                fp = median_ms(lambda: x @ wf.t(), repeats)
                ours = median_ms(lambda: torch.ops.quantkit.int8_linear(x, s, z, 255, packed, wsum, ws, None, n),
                                 repeats)
                try:
                    path = median_ms(int_mm_path, repeats)
                    mm = median_ms(lambda: torch._int_mm(xi, wt), repeats)
                    mm_s = f"{path:>12.3f} {fp / path:>5.2f} {mm:>8.3f} {fp / mm:>5.2f}"
                except RuntimeError as exc:
                    mm_s = f"n/a ({str(exc).splitlines()[0][:40]})"
            print(f"{threads:>7} {m:>5} {n:>5} {k:>5} {fp:>8.3f} {ours:>11.3f} {fp / ours:>5.2f} {mm_s}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip-resnet", action="store_true")
    args = p.parse_args(argv)
    import onnxruntime

    print(f"# CPU: {cpu_model()} ({os.cpu_count()} logical), load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"int8 kernel: {int8_ops.int8_kernel_path()}")
    print(f"# medians of {args.repeats} runs after warm-up; x FP32 = FP32 time / model time, same run and threads "
          "(PyTorch FP32: the faster of NCHW and channels_last)")
    bench_gemm(args.threads, args.repeats)
    from demo import DigitsCNN

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bench_model("digits CNN", settle_bn(DigitsCNN(), (1, 8, 8)), (1, 8, 8), [64], args.threads, args.repeats,
                    tmp)
        if not args.skip_resnet:
            import torchvision

            resnet = settle_bn(torchvision.models.resnet18(), (3, 64, 64))
            bench_model("ResNet-18", resnet, (3, 224, 224), [1, 16], args.threads, args.repeats, tmp)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
