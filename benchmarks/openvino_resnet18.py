"""OpenVINO latency of an exported `adabin` ResNet-18 (torchvision architecture, random init) vs OpenVINO FP32
ResNet-18 vs quantkit's PyTorch deploy model: 1 thread and all threads, batch 1 and 16, 224x224 inputs.

    PYTHONPATH=. python benchmarks/openvino_resnet18.py [--repeats 20] [--batches 1 16]

Prints medians (ms per batch) and ratios measured in the same run, the CPU, the load average before and after, and
the IR sizes (.bin of both, u1 weight bytes of the binary layers vs their FP32 bytes).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torchvision

import quantkit
from quantkit.export.openvino import compile_openvino, export_openvino, inspect_openvino, runtime_layer_types
from quantkit.sysinfo import cpu_model
from timing import median_ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    all_threads = os.cpu_count() or 1
    load_before = os.getloadavg()

    torch.manual_seed(0)
    fp32 = torchvision.models.resnet18(weights=None).eval()
    q = quantkit.prepare(fp32, "adabin")
    deploy = quantkit.convert(q).eval()
    x1 = torch.randn(1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        qres = export_openvino(q, (x1,), os.path.join(tmp, "adabin.xml"), quiet=True)
        export_s = time.perf_counter() - t0
        fres = export_openvino(fp32, (x1,), os.path.join(tmp, "fp32.xml"), quiet=True)
        summary = inspect_openvino(qres.xml_path, compile_model=False)
        body_u1 = sum(nb for name, _, nb, _ in summary.binary_layers if name.endswith("/binary_conv"))
        body_fp = sum(fp for name, _, _, fp in summary.binary_layers if name.endswith("/binary_conv"))
        print(f"# CPU: {cpu_model()}, {all_threads} threads; openvino {__import__('openvino').__version__}, "
              f"torch {torch.__version__}")
        print(f"# load average before: {load_before[0]:.2f} (1 min); the machine is shared, figures are noisy")
        print(f"# adabin export + three-way check: {export_s:.1f} s; deploy vs OpenVINO max abs diff "
              f"{qres.agreement.deploy_vs_openvino:.3g} (max |y| {qres.agreement.output_absmax:.3g})"
              + (f"; per-layer max {qres.agreement.layerwise_max:.3g}" if qres.agreement.layerwise_max else ""))
        print(f"# .bin: FP32 {fres.bin_bytes / 2**20:.2f} MiB, adabin {qres.bin_bytes / 2**20:.2f} MiB "
              f"({fres.bin_bytes / qres.bin_bytes:.1f}x smaller); binary body weights {body_u1 / 2**20:.2f} MiB u1 vs "
              f"{body_fp / 2**20:.1f} MiB FP32 ({body_fp / body_u1:.0f}x)")
        print(f"# executed layers (adabin): {dict(runtime_layer_types(compile_openvino(qres.xml_path, 1)))}")
        print()
        print("| threads | batch | OpenVINO FP32 ms | OpenVINO adabin ms | PyTorch deploy ms | adabin vs OV FP32 | "
              "adabin vs PyTorch deploy |")
        print("|---|---|---|---|---|---|---|")
        before = torch.get_num_threads()
        try:
            for threads in sorted({1, all_threads}):
                torch.set_num_threads(threads)
                for batch in args.batches:
                    x = torch.randn(batch, 3, args.size, args.size)
                    xn = x.numpy()
                    ov_fp = compile_openvino(fres.xml_path, batch, threads=threads)
                    ov_q = compile_openvino(qres.xml_path, batch, threads=threads)
                    req_fp, req_q = ov_fp.create_infer_request(), ov_q.create_infer_request()
                    t_fp = median_ms(lambda: req_fp.infer([xn]), args.repeats, warmup=3)
                    t_q = median_ms(lambda: req_q.infer([xn]), args.repeats, warmup=3)
                    xcl = x.contiguous(memory_format=torch.channels_last)
                    with torch.no_grad():
                        t_pt = median_ms(lambda: deploy(xcl), max(3, args.repeats // 2), warmup=3)
                    out_q = np.asarray(req_q.get_output_tensor(0).data)
                    assert np.all(np.isfinite(out_q))
                    print(f"| {threads} | {batch} | {t_fp:.1f} | {t_q:.1f} | {t_pt:.1f} | {t_fp / t_q:.2f}x | "
                          f"{t_pt / t_q:.2f}x |", flush=True)
        finally:
            torch.set_num_threads(before)
    print(f"\n# load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
