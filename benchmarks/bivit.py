"""BiViT on real data: a small ViT on scikit-learn's 8x8 digits (2x2 patches, 16 tokens + class token).

1. Train the float ViT (per seed).
2. Quantization-aware training from it, with distillation from it (ReActNet's distribution loss, as BiViT), under
   ``bibert`` (baseline), ``bivit`` without cross-layer binarization and ``bivit`` with it; the same total epochs,
   optimizer and schedule for all (Adam, no weight decay, cosine). Top-1 on the held-out split, mean +- std over
   seeds; the deploy model (packed kernels) is evaluated too.
3. BiViT Table 1 analogue: squared error between the float model's real attention maps (test images, every block
   and head) and their binarized versions -- BiBERT's Bool(scores), SAB with the optimal threshold (coordinate
   descent), SAB with 0.25*max (with its basis) and SAB without scale.

    .venv/bin/python benchmarks/bivit.py                 # full run (a few CPU minutes)
    .venv/bin/python benchmarks/bivit.py --quick         # smoke run
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import quantkit
from quantkit.datasets import accuracy, digits
from quantkit.models.vit import vit_digits
from quantkit.quantizers.softmax import attention_binarization_errors

MODEL = dict(embed_dim=64, depth=4, num_heads=4)


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    for g in opt.param_groups:
        g["lr"] = 0.5 * base * (1 + math.cos(math.pi * step / total))


def batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i:i + batch]


def train_fp(seed: int, epochs: int, xtr, ytr, batch: int = 64, lr: float = 2e-3) -> torch.nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = vit_digits(**MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps, total = 0, epochs * math.ceil(len(ytr) / batch)
    for _ in range(epochs):
        model.train()
        for idx in batches(len(ytr), batch, gen):
            cosine_lr(opt, lr, steps, total)
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            steps += 1
    return model.eval()


def train_qat(teacher: torch.nn.Module, scheme: str, seed: int, epochs: int, xtr, ytr, batch: int = 64,
              lr: float = 5e-4, **overrides) -> quantkit.QAT:
    """BiViT's recipe scaled down: init from the float model, Adam without weight decay, cosine, distillation only."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    qat = quantkit.QAT(teacher, scheme, **overrides)
    model = qat.model
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    steps, total = 0, epochs * math.ceil(len(ytr) / batch)
    for epoch in range(epochs):
        qat.epoch_start(epoch, epochs)
        model.train()
        for idx in batches(len(ytr), batch, gen):
            cosine_lr(opt, lr, steps, total)
            x = xtr[idx]
            with torch.no_grad():
                t_logits = teacher(x)
            opt.zero_grad()
            qat.distillation_loss(model(x), t_logits).backward()
            opt.step()
            steps += 1
    return qat


def attention_scores(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Pre-softmax attention scores (B, H, N, N) of every block of the float timm-style ViT."""
    out = []
    hooks = []
    for blk in model.blocks:
        att = blk.attn

        def hook(mod, inp, qkv, att=att):
            b, n, _ = qkv.shape
            t = qkv.reshape(b, n, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4)
            out.append((t[0] * att.scale) @ t[1].transpose(-2, -1))

        hooks.append(att.qkv.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fp-epochs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=30, help="QAT epochs (the same for every scheme)")
    ap.add_argument("--clb-split", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny; 1 avoids oversubscription)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 + 2 epochs (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.fp_epochs, args.epochs = 1, 3, 2

    xtr, ytr = digits("train", seed=0)
    xte, yte = digits("test", seed=0)
    print(f"# BiViT on digits: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; train {len(ytr)} / test {len(yte)} images; ViT {MODEL}, "
          f"2x2 patches (17 tokens); seeds {args.seeds}; FP {args.fp_epochs} epochs, QAT {args.epochs} epochs")
    runs = [("FP (teacher)", None, {}),
            ("bibert", "bibert", {}),
            ("bivit, no CLB", "bivit", {"clb": False}),
            (f"bivit, CLB (split {args.clb_split:g})", "bivit", {"clb": True, "clb_split": args.clb_split})]
    acc: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    acc_deploy: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    errs: dict[str, dict[str, list[float]]] = {"mean": {}, "row_sum": {}}
    t0 = time.time()
    for seed in range(args.seeds):
        teacher = train_fp(seed, args.fp_epochs, xtr, ytr)
        acc["FP (teacher)"].append(accuracy(teacher, xte, yte))
        for scores in attention_scores(teacher, xte):
            for red in ("mean", "row_sum"):
                for k, v in attention_binarization_errors(scores, reduction=red).items():
                    errs[red].setdefault(k, []).append(v)
        for name, scheme, overrides in runs[1:]:
            qat = train_qat(teacher, scheme, seed, args.epochs, xtr, ytr, **overrides)
            acc[name].append(accuracy(qat.model, xte, yte))
            acc_deploy[name].append(accuracy(qat.convert(), xte, yte))
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in acc.items()) +
              f"  ({time.time() - t0:.0f} s)", flush=True)

    print("\n## Top-1 on the digits test split (%), mean +- std over seeds\n")
    print("| model | simulated (QAT model) | deploy (packed kernels) |")
    print("|---|---|---|")
    for name, _, _ in runs:
        dep = mean_std(acc_deploy[name]) if acc_deploy[name] else "-"
        print(f"| {name} | {mean_std(acc[name])} | {dep} |")

    labels = {"bibert": "BiBERT: Bool(scores)", "sab_optimal": "SAB, optimal threshold (coordinate descent)",
              "sab_beta_max": "SAB, T = 0.25 * max (with basis v)", "sab_beta_max_noscale": "SAB, T = 0.25 * max, no scale (default)"}
    n_maps = len(errs["mean"]["bibert"])
    print(f"\n## Attention binarization error on real attention maps ({n_maps} maps = blocks x seeds, "
          f"{len(yte)} test images x heads x 17 rows each)\n")
    print("| method | MSE per element | squared error per row | ratio to SAB optimal |")
    print("|---|---|---|---|")
    base = statistics.mean(errs["mean"]["sab_optimal"])
    for k, label in labels.items():
        m, r = statistics.mean(errs["mean"][k]), statistics.mean(errs["row_sum"][k])
        print(f"| {label} | {m:.3g} | {r:.3g} | {m / base:.3g}x |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
