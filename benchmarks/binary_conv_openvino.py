"""quantkit's binary 3x3 conv vs OpenVINO's CPU ``BinaryConvolution``, side by side, on every ResNet-18 3x3 shape.

Both sides take a float32 activation and return float32, input binarization included:

* OpenVINO: ``FakeQuantize(levels=2)`` (x >= 0 -> 1) -> ``BinaryConvolution`` (``xnor-popcount``, u1 weights,
  pad_value 1) on an NCHW input, one compiled model per shape (f32 precision, ``INFERENCE_NUM_THREADS``);
* quantkit: ``pack_activation_nhwc`` of a channels_last input -> ``binary_conv2d_prepacked`` on weights prepacked
  once (``binary_conv_prepack``, and ``binary_conv_prepack_amx`` on CPUs with AMX-INT8, as the deploy layers hold
  them), float channels_last output, AdaBin's
  affine epilogue (scale, act-sum, weight-sum, count and bias terms: more work than OpenVINO's plain dot).

Each side in its native layout. Medians over ``--rounds`` passes of ``--repeats`` calls per shape after warm-up,
interleaved (A, B, A, B, ...) so a load change hits both; ratio = OpenVINO ms / quantkit ms from the same run. Without openvino every row says
"skipped: openvino not installed".

    PYTHONPATH=. python benchmarks/binary_conv_openvino.py [--batches 1 16] [--threads 1] [--repeats 10] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from quantkit import ops
from quantkit.sysinfo import cpu_model

from kernels_cpu import RESNET18_3X3  # noqa: E402  (ResNet-18's 3x3 shapes, shared with the kernel benchmark)


def _openvino():
    try:
        import openvino as ov
        import openvino.opset13 as ov_ops
    except ImportError:
        return None, None
    return ov, ov_ops


def ov_binary_conv(ov, ov_ops, signs: np.ndarray, batch: int, c_in: int, h: int, stride: int, threads: int):
    """Compiled OpenVINO model: float NCHW x -> FakeQuantize to {0, 1} -> BinaryConvolution (u1 weights)."""
    from quantkit.export.ov.binary import u1_constant

    x = ov_ops.parameter([batch, c_in, h, h], ov.Type.f32, name="x")
    t = np.float32(np.nextafter(np.float32(0), np.float32(-1)))  # x > t'  <=>  x >= 0
    bits = ov_ops.fake_quantize(x, t, t, np.float32(0.0), np.float32(1.0), 2)
    y = ov_ops.binary_convolution(bits, u1_constant(signs > 0, lsb_first=True), [stride, stride], [1, 1], [1, 1],
                                  [1, 1], "xnor-popcount", 1.0)
    model = ov.Model([y], [x], "binary_conv")
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                  "INFERENCE_NUM_THREADS": int(threads)})


def interleaved_times(fa, fb, repeats: int, ta: list, tb: list) -> None:
    """Append ``repeats`` timings of ``fa`` and ``fb``, called alternately (a load change hits both)."""
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)


def _case(ov, ov_ops, batch: int, c_in: int, c_out: int, h: int, stride: int, threads: int) -> dict:
    """One shape: the compiled OpenVINO model and request, quantkit's prepacked weights, and both callables."""
    g = torch.Generator().manual_seed(c_in * 1000 + c_out + stride)
    x = torch.randn(batch, c_in, h, h, generator=g)
    signs = torch.where(torch.randn(c_out, c_in, 3, 3, generator=g) >= 0, 1.0, -1.0)
    w = ops.pack_conv_weight(signs)
    panels, wpop = ops.binary_conv_prepack(w, c_in)
    terms = [torch.rand(c_out, generator=g) + 0.5 for _ in range(5)]
    zero_thr = torch.zeros(c_in)
    xcl = x.contiguous(memory_format=torch.channels_last)
    # the AMX bit masks too where the CPU has AMX-INT8, as the deploy layers hold them (the kernel then picks AMX or
    # VPOPCNTD per shape)
    amx = ops.binary_conv_prepack_amx(w, c_in) if ops.cpu_amx_supported() else None
    args_q = (panels, wpop, c_in, c_out, [3, 3], [stride, stride], [1, 1], [1, 1], *terms, None, None, None, None,
              True, amx)

    def quantkit_conv():
        xb = torch.ops.quantkit.pack_bits(xcl.permute(0, 2, 3, 1), zero_thr)
        return torch.ops.quantkit.binary_conv2d_prepacked(xb, *args_q)

    req = ov_binary_conv(ov, ov_ops, signs.numpy(), batch, c_in, h, stride, threads).create_infer_request()
    xn = x.numpy()
    req.infer([xn])
    # same dot product: OpenVINO's border taps count +1 * s_w, so compare the interior only
    dot = ops.binary_conv2d(ops.pack_activation_nhwc(x), w, c_in, stride, 1, 1)
    y_ov = np.asarray(req.get_output_tensor(0).data)
    assert np.array_equal(y_ov[:, :, 1:-1, 1:-1], dot.numpy()[:, :, 1:-1, 1:-1]), (c_in, c_out, h, stride)
    return {"ov": lambda: req.infer([xn]), "q": quantkit_conv, "t_ov": [], "t_q": []}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=10, help="interleaved calls per shape and round")
    p.add_argument("--rounds", type=int, default=5, help="passes over all shapes (spreads load bursts)")
    args = p.parse_args(argv)
    ov, ov_ops = _openvino()
    print(f"# binary conv 3x3 vs OpenVINO BinaryConvolution; CPU: {cpu_model()} ({os.cpu_count()} logical); torch "
          f"{torch.__version__}; kernels ISA: {ops.cpu_isa()}; openvino "
          f"{ov.__version__ if ov else 'not installed'}; load average {os.getloadavg()[0]:.2f}")
    print(f"# medians of {args.rounds} rounds x {args.repeats} interleaved calls per shape; both include the "
          "float -> bit binarization of the input")
    print("| threads | batch | shape (C_in->C_out, HxW, stride) | OpenVINO ms | quantkit ms | x OpenVINO |")
    print("|---|---|---|---|---|---|")
    saved = torch.get_num_threads()
    ratios = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            keys = [(b, *shape) for b in args.batches for shape in RESNET18_3X3]
            if ov is None:
                for b, c_in, c_out, h, stride in keys:
                    print(f"| {threads} | {b} | {c_in}->{c_out}, {h}x{h}, s{stride} | skipped: openvino not "
                          "installed | | |")
                continue
            cases = {k: _case(ov, ov_ops, *k, threads) for k in keys}
            with torch.no_grad():
                for c in cases.values():  # warm-up
                    interleaved_times(c["ov"], c["q"], 3, [], [])
                for _ in range(args.rounds):
                    for c in cases.values():
                        interleaved_times(c["ov"], c["q"], args.repeats, c["t_ov"], c["t_q"])
            for (b, c_in, c_out, h, stride), c in cases.items():
                t_ov, t_q = 1e3 * statistics.median(c["t_ov"]), 1e3 * statistics.median(c["t_q"])
                ratios.append(t_ov / t_q)
                print(f"| {threads} | {b} | {c_in}->{c_out}, {h}x{h}, s{stride} | {t_ov:.3f} | {t_q:.3f} | "
                      f"{t_ov / t_q:.2f}x |", flush=True)
    finally:
        torch.set_num_threads(saved)
    if ratios:
        print(f"# x OpenVINO: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}; load average after "
              f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
