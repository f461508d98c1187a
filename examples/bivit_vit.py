"""BiViT on a small Vision Transformer: binary attention with softmax-aware binarization, binary weights with learned
scales, knowledge distillation from the float model, cross-layer binarization; then convert and ONNX export
(scikit-learn's digits, CPU, about a minute; ``--fast``: seconds).

1. train the float ViT (``quantkit.models.vit.vit_digits``: 2x2 patches of the 8x8 digits, timm-style attention);
2. ``qat = quantkit.QAT(student, "bivit")``: the attention's qkv/proj linears, Q, K, V and the attention map
   binarized (SAB: keep ``p >= 0.25 * max p``), MLP weights binarized with learned per-row scales;
3. a plain loop with ``quantkit.distillation_loss`` from the float teacher; ``qat.epoch_start`` switches the
   cross-layer schedule (attention first, MLPs from the second half on);
4. ``qat.convert()`` (packed bits, XNOR/popcount kernels) and ``quantkit.export_onnx`` (standard operators; the
   binary attention as Where/MatMul/Softmax/ReduceMax/GreaterOrEqual, weights 1 bit each in uint8 initializers),
   checked in onnxruntime, and the test split classified by onnxruntime.

Run: ``python examples/bivit_vit.py [--scheme bivit|bivit_full|bibert] [--out bivit.onnx] [--fast]``
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import quantkit
from quantkit.datasets import accuracy, digits
from quantkit.export import onnx_accuracy
from quantkit.models.vit import vit_digits



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="bivit", choices=("bivit", "bivit_full", "bibert"))
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=12, help="QAT epochs (12)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=None, help="ONNX file to write (default: <scheme>.onnx)")
    parser.add_argument("--fast", action="store_true", help="a 2-block ViT, 3 + 2 epochs (seconds; for tests)")
    args = parser.parse_args(argv)
    out = args.out or f"{args.scheme}.onnx"
    teacher_epochs, epochs, depth = (3, 2, 2) if args.fast else (args.teacher_epochs, args.epochs, 4)
    torch.manual_seed(0)
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    gen = torch.Generator().manual_seed(0)

    teacher = vit_digits(depth=depth)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    for _ in range(teacher_epochs):
        teacher.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(teacher(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher.eval()
    acc_fp = accuracy(teacher, x_test, y_test)
    print(f"float ViT ({depth} blocks) after {teacher_epochs} epochs: {acc_fp:.2f}% on the test split")

    qat = quantkit.QAT(copy.deepcopy(teacher), args.scheme)
    print(qat.report())
    opt = torch.optim.AdamW(qat.model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    for epoch in range(epochs):
        qat.epoch_start(epoch, epochs)
        qat.model.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            with torch.no_grad():
                soft = teacher(x_train[idx])
            logits = qat.model(x_train[idx])
            loss = quantkit.distillation_loss(logits, soft) + nn.functional.cross_entropy(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        print(f"  QAT epoch {epoch + 1}/{epochs}: test {accuracy(qat.model, x_test, y_test):.2f}%")

    deployed = qat.convert()
    acc_sim, acc_dep = accuracy(qat.model, x_test, y_test), accuracy(deployed, x_test, y_test)
    result = quantkit.export_onnx(qat.model, (x_test[:8],), out)
    acc_ort, preds = onnx_accuracy(out, x_test, y_test)
    with torch.no_grad():
        same = 100.0 * float((deployed(x_test).argmax(-1).numpy() == preds).mean())
    print(f"\ntest accuracy: float {acc_fp:.2f}%  |  {args.scheme}: simulated {acc_sim:.2f}%, deploy {acc_dep:.2f}%, "
          f"onnxruntime {acc_ort:.2f}%  (onnxruntime == deploy prediction on {same:.2f}% of the images)")
    print(f"binary linears: {result.quantized_weight_bytes} B of packed weights instead of "
          f"{result.fp32_weight_bytes} B in FP32; file {result.file_bytes / 1024:.1f} KiB; wrote {out}")


if __name__ == "__main__":
    main()
