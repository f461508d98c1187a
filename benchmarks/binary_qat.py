"""Binary QAT accuracy on real data: scikit-learn's handwritten digits (1797 images, 8x8, 10 classes).

Trains one small CNN per method with the same data split, epochs, optimizer and seeds, and prints test accuracy
(mean +- std over seeds) for full precision, the ``xnor`` baseline, ``adabin`` and two AdaBin ablations (without
Maxout; weight-only). Every binary model is also converted to its deploy form and evaluated again on the test set.

    python benchmarks/binary_qat.py               # table 1 of docs/results_binary_qat.md
    python benchmarks/binary_qat.py --block pre   # table 2
    python benchmarks/binary_qat.py --epochs 2 --seeds 0   # quick look

The network (chosen before any run, the same for every method): an FP 3x3 stem conv (1 -> 32) + BN + ReLU, four
32 -> 32 3x3 conv blocks with an identity shortcut around each conv, a 2x2 max-pool after the second block, global
average pooling and an FP linear classifier. Block order ``post`` (default): ReLU(BN(conv(x)) + x), the Bi-Real /
AdaBin block; ``pre``: ReLU(conv(BN(x)) + x), BN in front of the binary conv as XNOR-Net orders it. With ``post``
every binary conv reads a ReLU output (>= 0), so a fixed sign() threshold at 0 sends all ones -- this is the case
AdaBin's learnable threshold and Maxout address, and it cripples the ``xnor`` baseline; ``pre`` gives the baseline a
centered input. The schemes keep the stem and the classifier in full precision (their defaults), so the four block
convs are the binarized layers. Optimizer: Adam (lr 2e-3), cosine decay to 0, batch 64, cross-entropy, no
augmentation; one torch thread by default (fastest for this tiny network).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import quantkit  # noqa: E402

# (label, scheme or None for FP, scheme overrides)
METHODS = [
    ("FP32", None, {}),
    ("xnor", "xnor", {}),
    ("adabin", "adabin", {}),
    ("adabin, no Maxout", "adabin", {"maxout": False}),
    ("adabin, weight-only (FP acts)", "adabin", {"weight_only": True}),
]


class Block(nn.Module):
    """``post``: act(BN(conv(x)) + x) -- the Bi-Real / AdaBin block; the conv sees the previous ReLU's output (>= 0).
    ``pre``: act(conv(BN(x)) + x) -- BN before the binary conv, as XNOR-Net orders it; the conv sees a centered
    input."""

    def __init__(self, channels: int, order: str = "post"):
        super().__init__()
        self.order = order
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.order == "pre":
            return self.act(self.conv(self.bn(x)) + x)
        return self.act(self.bn(self.conv(x)) + x)


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10, order: str = "post"):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_act = nn.ReLU()
        self.block1 = Block(width, order)
        self.block2 = Block(width, order)
        self.pool = nn.MaxPool2d(2)
        self.block3 = Block(width, order)
        self.block4 = Block(width, order)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem_act(self.stem_bn(self.stem(x)))
        x = self.pool(self.block2(self.block1(x)))
        x = self.block4(self.block3(x))
        return self.fc(x.mean((2, 3)))


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0):
    """Stratified train/test split (fixed for every method and seed), standardized with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()
    to_t = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return to_t(x_tr), torch.from_numpy(y_tr), to_t(x_te), torch.from_numpy(y_te)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def run_one(scheme, overrides, seed, data, epochs, batch_size, lr, order="post"):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = DigitsCNN(order=order)
    qat = quantkit.QAT(model, scheme, **overrides) if scheme else None
    net = qat.model if qat else model
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        if qat:
            qat.epoch_start(epoch, epochs)
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    train_s = time.perf_counter() - start
    acc = accuracy(net, x_te, y_te)
    deploy_acc, deploy_note = None, None
    if qat:
        try:
            deploy_acc = accuracy(qat.convert(), x_te, y_te)
        except Exception as exc:  # report it, keep benchmarking the others
            deploy_note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return acc, deploy_acc, deploy_note, train_s


def fmt_mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--methods", nargs="+", default=None, help="subset of method labels (default: all)")
    ap.add_argument("--block", choices=["post", "pre"], default="post",
                    help="block order: post = act(BN(conv(x)) + x) (Bi-Real/AdaBin, default); pre = act(conv(BN(x)) + x)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: this tiny network runs fastest single-threaded)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_digits_split()
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    results = {}
    notes = []
    for label, scheme, overrides in methods:
        rows = [run_one(scheme, overrides, s, data, args.epochs, args.batch_size, args.lr, args.block)
                for s in args.seeds]
        results[label] = rows
        for (_, _, note, _), seed in zip(rows, args.seeds):
            if note:
                notes.append(f"{label} (seed {seed}): convert() failed: {note}")
        accs = [r[0] for r in rows]
        print(f"{label:32s} {fmt_mean_std(accs):>14s}   per seed: {', '.join(f'{a:.2f}' for a in accs)}",
              flush=True)

    fp = statistics.mean(r[0] for r in results["FP32"]) if "FP32" in results else None
    xn = statistics.mean(r[0] for r in results["xnor"]) if "xnor" in results else None
    lines = [
        f"Digits (scikit-learn, 8x8): train {len(data[0])}, test {len(data[2])} images; {args.epochs} epochs, "
        f"seeds {args.seeds}, Adam lr {args.lr} cosine, batch {args.batch_size}, block order '{args.block}'.",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "| method | test accuracy % (mean ± std) | per seed | vs FP32 (pts) | vs xnor (pts) | deploy model accuracy % "
        "| train time / run (median, s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        accs = [r[0] for r in rows]
        mean = statistics.mean(accs)
        dep = [r[1] for r in rows if r[1] is not None]
        dep_s = fmt_mean_std(dep) if dep and len(dep) == len(rows) else ("-" if label == "FP32" else "n/a")
        lines.append(
            f"| {label} | {fmt_mean_std(accs)} | {', '.join(f'{a:.2f}' for a in accs)} | "
            f"{'' if fp is None else f'{mean - fp:+.2f}'} | {'' if xn is None else f'{mean - xn:+.2f}'} | {dep_s} | "
            f"{statistics.median(r[3] for r in rows):.1f} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    table = "\n".join(lines)
    print()
    print(table)
    return table


if __name__ == "__main__":
    main()
