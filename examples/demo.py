"""End-to-end demo on real data (scikit-learn's handwritten digits), CPU only, about a minute.

1. train a small CNN (float) and an AdderNet CNN (adder convolutions, FP stem and classifier);
2. post-training quantization: ``w8a8`` / ``w4a4`` on the CNN, ``adder_ptq8`` / ``adder_ptq4`` on the AdderNet
   (4-bit also with BN re-estimation, as the official evaluation does);
3. print each per-layer report and the accuracy before / after;
4. convert to deploy models (packed / integer kernels) and check deploy == simulated;
5. export the 4-bit AdderNet to ONNX and run it in onnxruntime (three-way agreement).

Run: ``make demo`` (or ``.venv/bin/python examples/demo.py``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn

import quantkit
from quantkit.datasets import accuracy, digits
from quantkit.models import adder_cnn_digits
from quantkit.ops._load import have_kernels


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def train(model: nn.Module, x, y, epochs: int, seed: int = 0) -> nn.Module:
    """SGD (momentum 0.9, lr 0.1 cosine, weight decay 5e-4), batch 64: the AdderNet recipe, fine for the CNN too."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def section(title: str) -> None:
    print("\n" + "=" * 100 + f"\n{title}\n" + "=" * 100)


def check_deploy(sim: nn.Module, x_test) -> float:
    deployed = quantkit.convert(sim)
    with torch.no_grad():
        a, b = sim.eval()(x_test[:64]), deployed(x_test[:64])
    err = (a - b).abs().max().item()
    print(f"deploy model == simulated model: max |diff| = {err:.2e} over 64 test images")
    return err


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--fast", action="store_true", help="fewer epochs (for tests)")
    args = parser.parse_args(argv)
    epochs = 2 if args.fast else args.epochs
    torch.set_num_threads(1)  # these models are tiny: one thread is fastest (and the two vCPUs share a core)
    torch.manual_seed(0)
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]  # 8 unlabeled batches
    print(f"digits: {len(y_train)} train / {len(y_test)} test images, 8x8; kernels: "
          f"{'compiled, ISA ' + quantkit.ops.cpu_isa() if have_kernels() else 'reference fallback'}")

    section("1. float CNN, post-training quantization (w8a8, w4a4)")
    t0 = time.time()
    cnn = train(DigitsCNN(), x_train, y_train, epochs)
    fp_acc = accuracy(cnn, x_test, y_test)
    print(f"trained float CNN in {time.time() - t0:.1f}s: top-1 {fp_acc:.2f}%")
    for scheme in ("w8a8", "w4a4"):
        q = quantkit.quantize(cnn, scheme, calib_data=calib)
        print()
        print(quantkit.report(q))
        print(f"{scheme}: top-1 {fp_acc:.2f}% -> {accuracy(q, x_test, y_test):.2f}%")
        check_deploy(q, x_test)

    section("2. AdderNet CNN (adder convolutions, FP stem and classifier), adder_ptq8 / adder_ptq4")
    t0 = time.time()
    adder = train(adder_cnn_digits(), x_train, y_train, epochs)
    adder_acc = accuracy(adder, x_test, y_test)
    print(f"trained AdderNet CNN in {time.time() - t0:.1f}s: top-1 {adder_acc:.2f}%")
    runs = [("adder_ptq8", {}), ("adder_ptq4", {}), ("adder_ptq4", {"bn_recalib_batches": len(calib)})]
    for scheme, options in runs:
        q = quantkit.quantize(adder, scheme, calib_data=calib, **options)
        label = scheme + "".join(f" {k}={v}" for k, v in options.items())
        print()
        print(quantkit.report(q))
        print(f"{label}: top-1 {adder_acc:.2f}% -> {accuracy(q, x_test, y_test):.2f}%")
        check_deploy(q, x_test)

    section("3. ONNX export of the last model (standard operators, checked in onnxruntime)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adder_ptq4.onnx")
        result = quantkit.export_onnx(q, (x_test[:8],), path)
        print(f"wrote {os.path.basename(path)}: {result.file_bytes / 1024:.1f} KiB, {len(result.layers)} quantized "
              f"layers with {result.quantized_weight_bytes} bytes of integer weights")


if __name__ == "__main__":
    main()
