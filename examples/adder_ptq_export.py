"""AdderNet post-training quantization and ONNX export, on scikit-learn's handwritten digits (CPU, well under a
minute; ``--fast``: a few seconds).

1. train a small AdderNet CNN in float (adder convolutions with the AdderNet gradients; FP stem and classifier);
2. ``quantkit.quantize(model, "adder_ptq4", calib_data)``: k-means channel groups, shared group scales, activation
   outlier clamp, lossless weight clamp (Nie et al., NeurIPS 2022) -- no training, 8 unlabeled batches;
3. the per-layer report, and accuracy of the float, simulated and deploy (integer kernel) models;
4. ``quantkit.export_onnx``: standard operators only, INT4 weight codes, checked against onnxruntime (three-way
   agreement), then the test split classified by onnxruntime itself; file size against the FP32 export.

Run: ``python examples/adder_ptq_export.py [--bits 4] [--out adder_ptq4.onnx] [--fast]``
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

import quantkit
from quantkit.datasets import accuracy, digits
from quantkit.export import onnx_accuracy
from quantkit.models.adder_resnet import adder_cnn_digits


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-2) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, help="adder_ptq bit width, 2-8 (4)")
    parser.add_argument("--epochs", type=int, default=8, help="float training epochs (8)")
    parser.add_argument("--out", default=None, help="ONNX file to write (default: adder_ptq{bits}.onnx)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first adder layer (16)")
    parser.add_argument("--fast", action="store_true", help="3 epochs (seconds; for tests)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = args.out or f"adder_ptq{args.bits}.onnx"
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    width, epochs = (16, 3) if args.fast else (args.width, args.epochs)

    print(f"1. training an AdderNet CNN (width {width}, {epochs} epoch(s)) on {len(y_train)} digits")
    model = train(adder_cnn_digits(width=width), x_train, y_train, epochs)
    acc_fp = accuracy(model, x_test, y_test)

    print(f"2. post-training quantization: adder_ptq{args.bits} with 8 calibration batches")
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    qmodel = quantkit.quantize(model, f"adder_ptq{args.bits}", calib)
    print(quantkit.report(qmodel))
    deployed = quantkit.convert(qmodel)
    acc_sim, acc_dep = accuracy(qmodel, x_test, y_test), accuracy(deployed, x_test, y_test)

    print("3. ONNX export (standard operators, checked in onnxruntime)")
    result = quantkit.export_onnx(qmodel, (x_test[:8],), out)
    acc_ort, preds = onnx_accuracy(out, x_test, y_test)
    with torch.no_grad():
        same = float((deployed(x_test).argmax(-1).numpy() == preds).mean()) * 100
    with tempfile.TemporaryDirectory() as tmp:
        fp = quantkit.export_onnx(model, (x_test[:8],), os.path.join(tmp, "fp32.onnx"), quiet=True, verify=False)

    print(f"\ntest accuracy on {len(y_test)} digits: float {acc_fp:.2f}%  |  adder_ptq{args.bits}: simulated "
          f"{acc_sim:.2f}%, deploy {acc_dep:.2f}%, onnxruntime {acc_ort:.2f}%")
    print(f"onnxruntime and the deploy model predict the same class on {same:.2f}% of the test images")
    print(f"ONNX file: {result.file_bytes / 1024:.1f} KiB vs {fp.file_bytes / 1024:.1f} KiB for the FP32 export "
          f"({fp.file_bytes / result.file_bytes:.1f}x smaller); quantized weights "
          f"{result.fp32_weight_bytes / max(result.quantized_weight_bytes, 1):.0f}x smaller; wrote {out}")


if __name__ == "__main__":
    main()
