"""quantkit's w8a8 / w4a4 ONNX side by side with onnxruntime's own ``quantize_static`` (QDQ, per-channel int8
weights, uint8 activations, min/max calibration on the same calibration batches) and, when a Python with Brevitas is
given, Brevitas' QCDQ export, on the same float models: the digits CNN (conv 1->32->32->64(s2)->64 + linear, trained
here; accuracy on the held-out split, timing at batch 64) and torchvision's ResNet-18 (random weights with settled
BatchNorm statistics, 224x224; output agreement with the FP32 graph on random inputs, timing at batch 1 and 16).

Every file runs in onnxruntime (CPU provider, default graph optimizations). Per file the script prints how many
convs onnxruntime's optimizer turned into QLinearConv (the integer kernels) and how many stayed float, the accuracy /
agreement, and medians of ``--repeats`` timed runs; x FP32 is FP32 time / file time, from the same run and thread
count.

    .venv/bin/python benchmarks/uniform_vs_ort_quantize.py [--threads 1 2] [--repeats 15] [--skip-resnet]
        [--brevitas-python /tmp/brevitas-venv/bin/python]

Brevitas rows need a separate environment with brevitas installed (it is not a dependency of quantkit); without one
they print "skipped: brevitas not installed". ``benchmarks/brevitas_qcdq.py`` runs in that environment.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import quantkit
from quantkit.datasets import digits
from quantkit.sysinfo import cpu_model
from timing import median_ms
from uniform_cpu import settle_bn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


def session(path: str, threads: int, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def conv_kinds(path: str) -> str:
    """'QLinearConv n / float Conv m' in onnxruntime's optimized graph of ``path``."""
    import onnx

    opt = path + ".optimized.onnx"
    session(path, 1, opt)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    return f"{ops['QLinearConv']}/{ops['Conv'] + ops['FusedConv']}"


def ort_quantize_static(fp32: str, out: str, calib: list[torch.Tensor]) -> None:
    """onnxruntime's static quantization: QDQ format, per-channel int8 weights, uint8 activations, min/max."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.batches, None)

    pre = out + ".pre.onnx"
    quant_pre_process(fp32, pre, skip_symbolic_shape=True)  # the pre-processing onnxruntime's docs recommend
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def export_quantkit(model: nn.Module, scheme: str, calib: list[torch.Tensor], example: torch.Tensor, out: str
                    ) -> nn.Module:
    sim = quantkit.quantize(model, scheme, calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ResNet at random init: see allow_mismatch below
        # a random-weight ResNet amplifies float-rounding threshold flips; each layer is still checked on its own
        quantkit.export_onnx(sim, (example,), out, quiet=True, allow_mismatch=True)
    return sim


def time_files(files: dict[str, str], x: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    """Median ms of each file, measured round-robin (each repeat runs every file once) so load drifts hit all."""
    sessions = {k: session(p, threads) for k, p in files.items()}
    for s in sessions.values():
        s.run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(repeats):
        for k, s in sessions.items():
            times[k].append(median_ms(lambda: s.run(None, {"input": x}), 1, warmup=0))
    return {k: float(np.median(v)) for k, v in times.items()}


def brevitas_files(python: str | None, state: str, calib: str, tmp: str) -> tuple[dict[str, str], str]:
    """Brevitas QCDQ exports of the digits CNN (run in ``python``), or why there are none."""
    if not python or not Path(python).exists():
        return {}, "skipped: brevitas not installed (pass --brevitas-python)"
    cmd = [python, str(HERE / "brevitas_qcdq.py"), state, calib, tmp]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    if p.returncode != 0:
        return {}, "skipped: brevitas failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:200]
    files = {}
    for line in p.stdout.splitlines():
        if line.startswith("file\t"):
            _, key, path = line.split("\t", 2)
            files[key] = path
    return files, ""


def onnx_accuracy(path: str, x: torch.Tensor, y: torch.Tensor) -> float:
    out = session(path, 1).run(None, {"input": x.numpy()})[0]
    return 100.0 * float((out.argmax(-1) == y.numpy()).mean())


def bench_digits(args, tmp: str) -> None:
    from demo import DigitsCNN, train

    torch.manual_seed(0)
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    model = train(DigitsCNN(width=32), x_train, y_train, args.epochs)
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    files = {"FP32": os.path.join(tmp, "digits_fp32.onnx")}
    quantkit.export_onnx(model, (x_test[:2],), files["FP32"], quiet=True, verify=False)
    for scheme in ("w8a8", "w4a4"):
        files[f"quantkit {scheme}"] = os.path.join(tmp, f"digits_{scheme}.onnx")
        export_quantkit(model, scheme, calib, x_test[:2], files[f"quantkit {scheme}"])
    files["ORT quantize_static w8a8"] = os.path.join(tmp, "digits_ort.onnx")
    ort_quantize_static(files["FP32"], files["ORT quantize_static w8a8"], calib)
    state, calib_path = os.path.join(tmp, "digits_cnn.pt"), os.path.join(tmp, "digits_calib.pt")
    torch.save(model.state_dict(), state)
    torch.save(torch.cat(calib), calib_path)
    brev, why = brevitas_files(args.brevitas_python, state, calib_path, tmp)
    files.update(brev)
    print(f"\n## digits CNN 1x8x8 (width 32, trained {args.epochs} epochs), test split {len(y_test)} images, "
          f"timing at batch 64")
    print(f"{'model':<26} {'QLinearConv/float Conv':>22} {'top-1 %':>8} " + " ".join(
        f"{f'{t} thr ms':>10} {'x FP32':>6}" for t in args.threads))
    acc = {k: onnx_accuracy(p, x_test, y_test) for k, p in files.items()}
    x = x_test[:64].numpy()
    ms = {t: time_files(files, x, t, args.repeats) for t in args.threads}
    for k, p in files.items():
        cols = " ".join(f"{ms[t][k]:>10.3f} {ms[t]['FP32'] / ms[t][k]:>6.2f}" for t in args.threads)
        print(f"{k:<26} {conv_kinds(p):>22} {acc[k]:>8.2f} {cols}")
    if why:
        print(f"{'Brevitas QCDQ w8a8 / w4a4':<26} {why}")


def bench_resnet(args, tmp: str) -> None:
    import torchvision

    torch.manual_seed(0)
    model = settle_bn(torchvision.models.resnet18(), (3, 64, 64))
    calib = [torch.randn(8, 3, 224, 224) for _ in range(2)]
    example = torch.randn(1, 3, 224, 224)
    files = {"FP32": os.path.join(tmp, "r18_fp32.onnx")}
    quantkit.export_onnx(model, (example,), files["FP32"], quiet=True, verify=False)
    for scheme in ("w8a8", "w4a4"):
        files[f"quantkit {scheme}"] = os.path.join(tmp, f"r18_{scheme}.onnx")
        export_quantkit(model, scheme, calib, example, files[f"quantkit {scheme}"])
    files["ORT quantize_static w8a8"] = os.path.join(tmp, "r18_ort.onnx")
    ort_quantize_static(files["FP32"], files["ORT quantize_static w8a8"], calib)
    # agreement with the FP32 graph on fresh random inputs: relative L2 error and top-1 agreement
    xs = torch.randn(8, 3, 224, 224).numpy()
    ref = session(files["FP32"], 2).run(None, {"input": xs})[0]
    print("\n## ResNet-18 3x224x224 (random weights, settled BatchNorm); agreement with FP32 on 8 random inputs: "
          "relative L2 error ||y - y_fp32|| / ||y_fp32||, top-1 agreement")
    print(f"{'model':<26} {'QLinearConv/float Conv':>22} {'rel L2':>8} {'top-1 =':>7}")
    for k, p in files.items():
        out = session(p, 2).run(None, {"input": xs})[0]
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        same = 100.0 * float((out.argmax(-1) == ref.argmax(-1)).mean())
        print(f"{k:<26} {conv_kinds(p):>22} {rel:>8.4f} {same:>6.0f}%")
    print(f"{'threads':>7} {'batch':>5} " + " ".join(f"{k:>26} {'x':>5}" for k in files))
    for threads in args.threads:
        for batch in (1, 16):
            x = torch.randn(batch, 3, 224, 224).numpy()
            ms = time_files(files, x, threads, args.repeats)
            print(f"{threads:>7} {batch:>5} " + " ".join(f"{ms[k]:>26.2f} {ms['FP32'] / ms[k]:>5.2f}" for k in files))
            sys.stdout.flush()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the digits CNN (8)")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--brevitas-python", default="/tmp/brevitas-venv/bin/python",
                   help="a Python with brevitas installed (default /tmp/brevitas-venv/bin/python if it exists)")
    args = p.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(1)
    print(f"# CPU: {cpu_model()} ({os.cpu_count()} logical), load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"# onnxruntime, default optimizations; medians of {args.repeats} round-robin runs; x FP32 = FP32 ms / ms "
          "(same run, same threads)")
    with tempfile.TemporaryDirectory() as tmp:
        bench_digits(args, tmp)
        if not args.skip_resnet:
            bench_resnet(args, tmp)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
