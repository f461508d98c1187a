"""AdaBin quantization-aware training in a plain PyTorch loop, then convert and ONNX export (scikit-learn's digits,
CPU, about a minute; ``--fast``: seconds).

The model is torchvision's own ResNet (BasicBlock) code with small widths (``examples/tiny_models.py``):

1. a short float pre-training (binary networks start from a float checkpoint);
2. ``qat = quantkit.QAT(model, "adabin")``: binary weights and activations with adaptive binary sets, Maxout in place
   of the ReLUs after binarized convolutions; the stem, the classifier and the 1x1 downsample shortcuts stay float;
3. an ordinary training loop -- the only quantkit call in it is ``qat.epoch_start(epoch, epochs)``, which drives the
   EDE temperature schedule of the sign's surrogate gradient;
4. ``qat.convert()``: packed 1-bit weights on the XNOR/popcount kernels with AdaBin's affine terms;
5. ``quantkit.export_onnx``: packed uint8 weight initializers (1 bit a weight), standard operators, checked in
   onnxruntime, and the test split classified by onnxruntime.

Run: ``python examples/adabin_qat.py [--epochs 12] [--out adabin.onnx] [--fast]``
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import quantkit
from quantkit.datasets import accuracy, digits
from quantkit.export import onnx_accuracy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import tiny_resnet_digits  # noqa: E402



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=4, help="float epochs before QAT (4)")
    parser.add_argument("--epochs", type=int, default=12, help="QAT epochs (12)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--out", default="adabin.onnx", help="ONNX file to write (adabin.onnx)")
    parser.add_argument("--fast", action="store_true", help="1 + 2 epochs (seconds; for tests)")
    args = parser.parse_args(argv)
    pre_epochs, epochs = (1, 2) if args.fast else (args.pretrain_epochs, args.epochs)
    torch.manual_seed(0)
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    gen = torch.Generator().manual_seed(0)

    model = tiny_resnet_digits()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for _ in range(pre_epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc_fp = accuracy(model, x_test, y_test)
    print(f"float ResNet after {pre_epochs} epoch(s): {acc_fp:.2f}% on the test split")

    # ---- quantization-aware training: the user's loop, unchanged except for epoch_start ----------------------
    qat = quantkit.QAT(model, "adabin")
    print(qat.report())
    opt = torch.optim.Adam(qat.model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    for epoch in range(epochs):
        qat.epoch_start(epoch, epochs)
        qat.model.train()
        total = 0.0
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(qat.model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(f"  QAT epoch {epoch + 1}/{epochs}: loss {total / len(y_train):.4f}, "
              f"test {accuracy(qat.model, x_test, y_test):.2f}%")

    # ---- deploy and export ------------------------------------------------------------------------------------
    deployed = qat.convert()
    acc_sim, acc_dep = accuracy(qat.model, x_test, y_test), accuracy(deployed, x_test, y_test)
    result = quantkit.export_onnx(qat.model, (x_test[:8],), args.out)
    acc_ort, preds = onnx_accuracy(args.out, x_test, y_test)
    with torch.no_grad():
        same = 100.0 * float((deployed(x_test).argmax(-1).numpy() == preds).mean())
    print(f"\ntest accuracy: float {acc_fp:.2f}%  |  AdaBin: simulated {acc_sim:.2f}%, deploy {acc_dep:.2f}%, "
          f"onnxruntime {acc_ort:.2f}%  (onnxruntime == deploy prediction on {same:.2f}% of the images)")
    binary = [layer for layer in result.layers if layer.kind == "adabin"]
    print(f"{len(binary)} binary layers exported with packed 1-bit weights: "
          f"{sum(layer.weight_bytes for layer in binary)} B instead of "
          f"{sum(layer.fp32_weight_bytes for layer in binary)} B; wrote {args.out}")


if __name__ == "__main__":
    main()
