"""AdderNet post-training quantization accuracy on real data: scikit-learn's handwritten digits (1797 images, 8x8).

Trains a small adder CNN (FP 3x3 stem, three adder 3x3 convolutions with BN + ReLU, FP linear classifier; see
``quantkit.models.adder_cnn_digits``) once per seed, caches the weights under ``.cache/adder_ptq/`` (git-ignored),
then quantizes it after training with ``adder_ptq{b}``, the two single-shared-scale baselines ``adder_qssf{b}_w`` /
``adder_qssf{b}_a`` and plain rounding ``adder_round{b}`` at 8/6/5/4/3/2 bits. Prints test top-1 (mean +- std over the
seeds) and the output SQNR against the FP model (10 log10(sum y_fp^2 / sum (y_q - y_fp)^2) over the test logits,
mean over seeds).

    python benchmarks/adder_ptq.py                    # the table in docs/results_adder_ptq.md
    python benchmarks/adder_ptq.py --seeds 0 --bits 4 # quick look

Recipe (fixed before any quantization run): stratified 75/25 split (split seed 0), inputs standardized with the
train statistics; SGD momentum 0.9, lr 0.1 with cosine decay, weight decay 5e-4, batch 64, 60 epochs, random
+-1 pixel shifts; adder layers use the AdderNet gradients with eta = 0.2. Calibration: 4 batches of 64 training
images (drawn with the seed), no augmentation. The first four rows use each scheme's defaults (no BN re-estimation);
the others add one option each (BN re-estimation: 4 calibration batches).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import quantkit  # noqa: E402
from quantkit.models import adder_cnn_digits  # noqa: E402

# (row label, scheme name pattern, overrides). The first four rows are the schemes with their defaults; the others
# are the options that matter here: the grid-range weight clamp, and BN re-estimation for the method and baselines.
FAMILIES = [
    ("adder_ptq (paper, defaults)", "adder_ptq{b}", {}),
    ("QSSF-W (s = max|W|)", "adder_qssf{b}_w", {}),
    ("QSSF-A (s = A)", "adder_qssf{b}_a", {}),
    ("plain rounding", "adder_round{b}", {}),
    ('adder_ptq, weight_clamp="grid"', "adder_ptq{b}", {"weight_clamp": "grid"}),
    ("adder_ptq + BN re-est.", "adder_ptq{b}", {"bn_recalib_batches": 4}),
    ('adder_ptq, "grid" + BN re-est.', "adder_ptq{b}", {"weight_clamp": "grid", "bn_recalib_batches": 4}),
    ("QSSF-W + BN re-est.", "adder_qssf{b}_w", {"bn_recalib_batches": 4}),
    ("QSSF-A + BN re-est.", "adder_qssf{b}_a", {"bn_recalib_batches": 4}),
]
CACHE = os.path.join(os.path.dirname(__file__), "..", ".cache", "adder_ptq")


def load_digits_split(split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=split_seed, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    norm = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in each direction (zero fill)."""
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.empty_like(x)
    shifts = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, dy:dy + 8, dx:dx + 8]
    return out


def train(seed: int, data, epochs: int, log: bool = True) -> torch.nn.Module:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = adder_cnn_digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(random_shift(xtr[idx], gen)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            print(f"  seed {seed} epoch {epoch + 1}: loss {loss.item():.3f}, test top-1 "
                  f"{accuracy(model, xte, yte):.2f}%", flush=True)
    return model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits(model, x).argmax(1) == y).float().mean().item()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (test - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def trained_model(seed: int, data, epochs: int) -> torch.nn.Module:
    path = os.path.join(CACHE, f"digits_adder_cnn_seed{seed}_e{epochs}.pt")
    if os.path.exists(path):
        model = adder_cnn_digits()
        model.load_state_dict(torch.load(path))
        return model.eval()
    t0 = time.perf_counter()
    model = train(seed, data, epochs)
    print(f"  trained seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4, 3, 2])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_digits_split()
    xtr, ytr, xte, yte = data
    print(f"digits: {len(xtr)} train / {len(xte)} test images; torch {torch.__version__}; {platform.machine()} "
          f"{platform.processor() or ''}; threads {torch.get_num_threads()}", flush=True)

    acc: dict[tuple[str, int | None], list[float]] = {}
    sq: dict[tuple[str, int], list[float]] = {}
    deploy_ok: list[bool] = []
    for seed in args.seeds:
        model = trained_model(seed, data, args.epochs)
        ref = logits(model, xte)
        acc.setdefault(("FP32", None), []).append(100.0 * (ref.argmax(1) == yte).float().mean().item())
        gen = torch.Generator().manual_seed(1000 + seed)
        idx = torch.randperm(len(xtr), generator=gen)[: 64 * args.calib_batches]
        calib = [xtr[idx[i:i + 64]] for i in range(0, len(idx), 64)]
        for label, pattern, overrides in FAMILIES:
            for b in args.bits:
                q = quantkit.quantize(model, pattern.format(b=b), calib_data=calib, progress=False, **overrides)
                out = logits(q, xte)
                acc.setdefault((label, b), []).append(100.0 * (out.argmax(1) == yte).float().mean().item())
                sq.setdefault((label, b), []).append(sqnr_db(ref, out))
                if pattern == "adder_ptq{b}" and not overrides and b == 4:  # the integer deploy model predicts the same classes
                    dep = logits(quantkit.convert(q), xte)
                    deploy_ok.append(bool((dep.argmax(1) == out.argmax(1)).all()))
        print(f"  seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    n = len(args.seeds)
    print()
    print(f"Test top-1 (%), mean ± std over {n} seed(s); FP32 adder CNN: {fmt(acc[('FP32', None)])}")
    print()
    head = "| method | " + " | ".join(f"{b}-bit" for b in args.bits) + " |"
    print(head)
    print("|" + "---|" * (len(args.bits) + 1))
    for label, _, _ in FAMILIES:
        print(f"| {label} | " + " | ".join(fmt(acc[(label, b)]) for b in args.bits) + " |")
    print()
    print("Output SQNR vs the FP model (dB, mean over seeds; higher is better)")
    print()
    print(head)
    print("|" + "---|" * (len(args.bits) + 1))
    for label, _, _ in FAMILIES:
        print(f"| {label} | " + " | ".join(f"{statistics.mean(sq[(label, b)]):.1f}" for b in args.bits) + " |")
    if deploy_ok:
        print(f"\nadder_ptq4 integer deploy model (quantkit.convert) predicts the same class as the simulated model on "
              f"every test image: {all(deploy_ok)} ({sum(deploy_ok)}/{len(deploy_ok)} seeds)")
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
