"""A small representative workload for compute-sanitizer (scripts/gpu_check.sh): every CUDA kernel path once, on
ragged shapes with padding, checked against the references. Exits non-zero on a mismatch.

    compute-sanitizer --tool memcheck python scripts/cuda_sanitize_case.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantkit import ops  # noqa: E402
from quantkit.ops.adder import adder_l1_conv2d_reference, adder_l1_reference  # noqa: E402
from quantkit.ops.binary import binary_bmm_01_reference, binary_conv2d_reference, binary_linear_reference  # noqa: E402
from quantkit.ops.packing import pack_bits_reference  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    failures = []
    cc = torch.cuda.get_device_capability()
    paths = ["simt"] + (["mma"] if cc >= (8, 0) else [])
    if cc == (9, 0) and "sm90a_library=loaded" in torch.ops.quantkit.cuda_backend_info():
        paths.append("wgmma")
    xf = torch.randn(2, 45, 9, 11, generator=g)
    wf = torch.randn(70, 45, 3, 3, generator=g)
    x = ops.pack_activation_nhwc(xf)
    w = ops.pack_conv_weight(wf)
    xl = ops.pack_bits(torch.randn(37, 300, generator=g))
    wl = ops.pack_bits(torch.randn(130, 300, generator=g))
    if not torch.equal(ops.pack_bits(xf.to(dev).permute(0, 2, 3, 1)).cpu(), x):
        failures.append("pack_bits")
    for path in paths:
        os.environ["QUANTKIT_CUDA_BGEMM"] = path
        y = ops.binary_conv2d(x.to(dev), w.to(dev), 45, 1, 1, 1)
        if not torch.equal(y.cpu(), binary_conv2d_reference(x, w, 45, 1, 1, 1)):
            failures.append(f"binary_conv2d[{path}]")
        th = torch.randn(70, generator=g)
        yb = ops.binary_conv2d(x.to(dev), w.to(dev), 45, 2, 1, 1, threshold=th.to(dev))
        ref_b = pack_bits_reference(binary_conv2d_reference(x, w, 45, 2, 1, 1).permute(0, 2, 3, 1), th)
        if not torch.equal(yb.cpu(), ref_b):
            failures.append(f"binary_conv2d bits[{path}]")
        yl = ops.binary_linear(xl.to(dev), wl.to(dev), 300)
        if not torch.equal(yl.cpu(), binary_linear_reference(xl, wl, 300)):
            failures.append(f"binary_linear[{path}]")
        b01 = ops.binary_bmm_01(xl[None].to(dev), wl[None].to(dev), 300)
        if not torch.equal(b01.cpu(), binary_bmm_01_reference(xl[None], wl[None], 300)):
            failures.append(f"binary_bmm_01[{path}]")
    os.environ.pop("QUANTKIT_CUDA_BGEMM", None)
    xq = torch.randint(-8, 8, (2, 2, 13, 7, 6), generator=g).to(torch.int8)
    wq = torch.randint(-8, 8, (21, 13, 3, 3), generator=g).to(torch.int8)
    gi = torch.randint(0, 2, (21,), generator=g)
    for path in ["thermo", "vabs", "abs32"]:
        os.environ["QUANTKIT_CUDA_ADDER"] = path
        s = ops.adder_l1_conv2d(xq.to(dev), wq.to(dev), gi.to(dev), 1, 1, 1, 2)
        if not torch.equal(s.cpu(), adder_l1_conv2d_reference(xq, wq, gi, 1, 1, 1, 2)):
            failures.append(f"adder_l1_conv2d[{path}]")
        sl = ops.adder_l1(xq[:, 0, :, 0, :].transpose(1, 2).to(dev), wq[:, :, 0, 0].to(dev), gi.to(dev))
        if not torch.equal(sl.cpu(), adder_l1_reference(xq[:, 0, :, 0, :].transpose(1, 2), wq[:, :, 0, 0], gi)):
            failures.append(f"adder_l1[{path}]")
    os.environ.pop("QUANTKIT_CUDA_ADDER", None)
    torch.cuda.synchronize()
    print("paths:", paths, "| failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
