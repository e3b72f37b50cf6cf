"""Sparsifying variational dropout on scikit-learn's digits.

The same MLP (64 -> 300 -> 100 -> 10, ReLU) trained twice per seed:
  * "plain":  torch.nn.Linear layers, cross-entropy, Adam;
  * "VD":     fastreg.nn.VariationalDropoutLinear layers, the ELBO
              mean CE + beta * KL / N with beta annealed linearly 0 -> 1, Adam.
Reported: test accuracy (VD evaluated deterministically with the weights of
log alpha >= 3 pruned) and the fraction of weights pruned. Writes
docs/figures/variational_dropout_digits.png and prints a markdown table.

    python bench/experiments/variational_dropout_digits.py [--epochs 200] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from fastreg.nn import VariationalDropoutLinear  # noqa: E402
from fastreg.nn.variational import total_kl, total_sparsity  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SIZES = (64, 300, 100, 10)


def data(split_seed=0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=split_seed,
                                          stratify=y)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr), torch.from_numpy(Xte),
            torch.from_numpy(yte))


def mlp(vd: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(VariationalDropoutLinear(a, b, stream=i) if vd else nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model, X, y) -> float:
    model.eval()
    acc = float((model(X).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(vd: bool, seed: int, epochs: int, warmup: int, lr: float, batch: int, log_every: int):
    Xtr, ytr, Xte, yte = data()
    torch.manual_seed(seed)
    model = mlp(vd)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n = len(Xtr)
    curve = []
    for epoch in range(epochs):
        beta = min(1.0, epoch / max(warmup, 1))
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            if vd:
                loss = loss + beta * total_kl(model) / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            curve.append((epoch + 1, accuracy(model, Xte, yte),
                          total_sparsity(model) if vd else 0.0))
    return model, curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=60, help="epochs of linear KL annealing")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures",
                                                  "variational_dropout_digits.png"))
    args = ap.parse_args()
    # Tiny matrices: one thread is fastest, and immune to other processes on the cores.
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    t0 = time.time()
    rows, curves = [], {}
    for seed in args.seeds:
        base, cb = train(False, seed, args.epochs, args.warmup, args.lr, args.batch, 5)
        vdm, cv = train(True, seed, args.epochs, args.warmup, args.lr, args.batch, 5)
        per_layer = [m.sparsity() for m in vdm if isinstance(m, VariationalDropoutLinear)]
        rows.append((seed, cb[-1][1], cv[-1][1], cv[-1][2], per_layer))
        curves[seed] = (cb, cv)
        print(f"seed {seed}: plain {cb[-1][1]:.4f}  VD {cv[-1][1]:.4f}  pruned {cv[-1][2]:.4f} "
              f"per layer {[round(s, 4) for s in per_layer]}  ({time.time() - t0:.0f} s)",
              flush=True)
    elapsed = time.time() - t0

    nweights = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
    print()
    print(f"MLP {'-'.join(map(str, SIZES))} ({nweights} weights), {args.epochs} epochs, "
          f"KL annealed over {args.warmup}, Adam lr {args.lr} (cosine), batch {args.batch}; "
          f"digits 1347 train / 450 test; {elapsed:.0f} s total on "
          f"{torch.get_num_threads()} threads")
    print()
    print("| seed | plain MLP test acc | VD MLP test acc (pruned) | weights pruned | "
          "pruned per layer |")
    print("| --- | --- | --- | --- | --- |")
    for seed, ab, av, sp, pl in rows:
        print(f"| {seed} | {100 * ab:.2f}% | {100 * av:.2f}% | {100 * sp:.2f}% | "
              f"{' / '.join(f'{100 * s:.1f}%' for s in pl)} |")
    mb = np.mean([r[1] for r in rows])
    mv = np.mean([r[2] for r in rows])
    ms = np.mean([r[3] for r in rows])
    print(f"| mean | {100 * mb:.2f}% | {100 * mv:.2f}% | {100 * ms:.2f}% | |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, (cb, cv) in curves.items():
        e = [c[0] for c in cv]
        a1.plot(e, [100 * c[1] for c in cb], color="tab:gray", alpha=0.7,
                label="plain MLP" if seed == args.seeds[0] else None)
        a1.plot(e, [100 * c[1] for c in cv], color="tab:blue", alpha=0.8,
                label="VD MLP (pruned, eval)" if seed == args.seeds[0] else None)
        a2.plot(e, [100 * c[2] for c in cv], color="tab:red", alpha=0.8,
                label=f"seed {seed}")
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy (%)")
    a1.set_ylim(80, 100)
    a1.legend()
    a1.grid(alpha=0.3)
    a2.axhline(90, color="k", ls=":", lw=1)
    a2.set_xlabel("epoch")
    a2.set_ylabel("weights pruned (log alpha >= 3, %)")
    a2.set_ylim(0, 100)
    a2.legend()
    a2.grid(alpha=0.3)
    fig.suptitle(f"Sparsifying variational dropout, digits, MLP {'-'.join(map(str, SIZES))}: "
                 f"{100 * mv:.1f}% acc at {100 * ms:.1f}% pruned vs {100 * mb:.1f}% plain")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
