"""Adversarial training with fastreg.adversarial on scikit-learn's digits.

One MLP (64 -> 256 -> 256 -> 10, ReLU; pixels scaled to [0, 1]) trained three ways per seed:
  * "clean":  cross-entropy on clean inputs;
  * "FGSM":   0.5 CE(clean) + 0.5 CE(FGSM(x, eps)) (Goodfellow et al. 2015);
  * "PGD":    CE on a PGD attack: random start in the eps-ball, 5 steps of 2.5 eps / 5
              (Madry et al. 2018).
Each is evaluated on the clean test set, on FGSM (eps) and on PGD-20 (step eps/4, no
random start) attacks of the test set built against the model itself (white box).
Every attack step is fastreg.adversarial.fgsm / pgd_step with clamp=(0, 1).
Writes docs/figures/adversarial_digits.png (accuracy under PGD-20 vs eps) and
prints a markdown table.

    python bench/experiments/adversarial_digits.py [--eps 0.1] [--epochs 60] [--seeds 0 1 2]
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

from fastreg.adversarial import fgsm, pgd_step  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
CLAMP = (0.0, 1.0)


def data(split_seed=0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=split_seed,
                                          stratify=y)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr), torch.from_numpy(Xte),
            torch.from_numpy(yte))


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def input_grad(model, x, y):
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return g


def attack_fgsm(model, x, y, eps):
    return fgsm(x, input_grad(model, x, y), eps, clamp=CLAMP)


def attack_pgd(model, x, y, eps, steps, step, random_start=False, gen=None):
    x0 = x
    if random_start:
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
        x = (x0 + noise).clamp(*CLAMP)
    for _ in range(steps):
        x = pgd_step(x, x0, input_grad(model, x, y), step, eps, clamp=CLAMP)
    return x


@torch.no_grad()
def acc(model, x, y):
    return float((model(x).argmax(1) == y).float().mean())


def evaluate(model, X, y, eps):
    model.eval()
    out = {"clean": acc(model, X, y),
           "fgsm": acc(model, attack_fgsm(model, X, y, eps), y),
           "pgd": acc(model, attack_pgd(model, X, y, eps, 20, eps / 4), y)}
    model.train()
    return out


def train(mode, seed, eps, epochs, lr=2e-3, batch=128):
    Xtr, ytr, _, _ = data()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n = len(Xtr)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            x, y = Xtr[perm[i:i + batch]], ytr[perm[i:i + batch]]
            if mode == "clean":
                loss = F.cross_entropy(model(x), y)
            elif mode == "FGSM":
                xa = attack_fgsm(model, x, y, eps)
                loss = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(xa), y)
            else:
                xa = attack_pgd(model, x, y, eps, 5, 2.5 * eps / 5, random_start=True, gen=gen)
                loss = F.cross_entropy(model(xa), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures",
                                                  "adversarial_digits.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    import numba

    numba.set_num_threads(1)
    _, _, Xte, yte = data()
    modes = ("clean", "FGSM", "PGD")
    sweep = [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2]
    res = {m: [] for m in modes}
    curves = {m: [] for m in modes}
    t0 = time.time()
    for seed in args.seeds:
        for mode in modes:
            model = train(mode, seed, args.eps, args.epochs)
            res[mode].append(evaluate(model, Xte, yte, args.eps))
            model.eval()
            curves[mode].append([acc(model, attack_pgd(model, Xte, yte, e, 20, e / 4), yte)
                                 if e > 0 else acc(model, Xte, yte) for e in sweep])
            r = res[mode][-1]
            print(f"seed {seed} {mode:5s}: clean {r['clean']:.4f} fgsm {r['fgsm']:.4f} "
                  f"pgd {r['pgd']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    elapsed = time.time() - t0

    print()
    print(f"MLP 64-256-256-10, {args.epochs} epochs, Adam lr 2e-3 (cosine), batch 128; "
          f"digits 1347 train / 450 test, pixels in [0, 1]; eps = {args.eps} (L-inf); "
          f"seeds {args.seeds}; {elapsed:.0f} s total, 1 thread")
    print()
    print(f"| training | clean test acc | FGSM (eps {args.eps}) acc | "
          f"PGD-20 (eps {args.eps}) acc |")
    print("| --- | --- | --- | --- |")
    for mode in modes:
        cells = []
        for key in ("clean", "fgsm", "pgd"):
            v = np.array([r[key] for r in res[mode]]) * 100
            cells.append(f"{v.mean():.1f}% ± {v.std():.1f}")
        label = {"clean": "clean", "FGSM": f"FGSM adversarial (eps {args.eps})",
                 "PGD": f"PGD-5 adversarial (eps {args.eps})"}[mode]
        print(f"| {label} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode, color in zip(modes, ("tab:gray", "tab:orange", "tab:blue")):
        c = np.array(curves[mode]) * 100
        ax.errorbar(sweep, c.mean(0), yerr=c.std(0), color=color, marker="o", capsize=3,
                    label=f"{mode}-trained")
    ax.axvline(args.eps, color="k", ls=":", lw=1)
    ax.set_xlabel("attack eps (L-inf, PGD-20, step eps/4)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Adversarial training on digits with fastreg.adversarial")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
