"""Group lasso on input features and hidden neurons, subgradient vs proximal.

MLP 64 -> 128 -> 10 (ReLU) on scikit-learn's digits (pixels scaled to [0, 1], 80/20 split).
Groups (Scardapane et al. 2016): the columns of W1 (one per input pixel: feature selection)
and the columns of W2 (one per hidden neuron: its outgoing weights; a zero column removes the
neuron). Two ways to apply the penalty group_lasso * sum_g sqrt(|g|) ||w_g||, both plain SGD
(lr 0.1, batch 64, 150 epochs):

  * "subgradient": loss.backward(); fastreg.penalty.accumulate_(...); opt.step()
  * "proximal":    loss.backward(); opt.step(); fastreg.penalty.prox_(..., lr)

Subgradient steps never make exact zeros, so for them a group counts as removed when its norm
is below 1e-3 of the largest group norm of its tensor, and those groups are zeroed before the
test accuracy is measured (post-hoc pruning); proximal steps make exact zeros and nothing is
pruned afterwards. Writes docs/figures/penalty_group_lasso_digits.png and prints a markdown
table (the one in docs/penalty.md).

    python bench/experiments/penalty_group_lasso_digits.py [--epochs 150] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastreg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LAMBDAS = [0.0, 3e-4, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]
PRUNE_REL = 1e-3


def data(seed):
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr).long(), torch.from_numpy(Xte),
            torch.from_numpy(yte).long())


def groups_of(W1, W2):
    return [{"params": [W1], "groups": "cols"}, {"params": [W2], "groups": "cols"}]


def train(method, lam, seed, epochs, lr=0.1, batch=64):
    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = data(seed)
    l1 = torch.nn.Linear(64, 128)
    l2 = torch.nn.Linear(128, 10)
    params = list(l1.parameters()) + list(l2.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    n = Xtr.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(l2(F.relu(l1(Xtr[idx]))), ytr[idx])
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if method == "subgradient" and lam > 0:
                fastreg.penalty.accumulate_(groups_of(l1.weight, l2.weight), group_lasso=lam)
            opt.step()
            if method == "proximal" and lam > 0:
                fastreg.penalty.prox_(groups_of(l1.weight, l2.weight), lr, group_lasso=lam)
    with torch.no_grad():
        exact = fastreg.penalty.sparsity(groups_of(l1.weight, l2.weight))["zero_groups"]
        removed = {}
        for name, W in (("pixels", l1.weight), ("neurons", l2.weight)):
            norms = W.norm(dim=0)
            dead = norms <= PRUNE_REL * norms.max() if method == "subgradient" else norms == 0
            W[:, dead] = 0.0
            removed[name] = float(dead.float().mean())
        acc = float((l2(F.relu(l1(Xte))).argmax(1) == yte).float().mean())
    return acc, removed["pixels"], removed["neurons"], exact


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures", "penalty_group_lasso_digits.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    res = {}
    for method in ("subgradient", "proximal"):
        for lam in LAMBDAS:
            runs = [train(method, lam, s, args.epochs) for s in args.seeds]
            res[(method, lam)] = np.array(runs, dtype=np.float64).mean(0)
            if lam == 0.0:
                res[("proximal" if method == "subgradient" else "subgradient", lam)] = res[(method, lam)]
    print(f"<!-- {len(args.seeds)} seeds, {args.epochs} epochs, {time.time() - t0:.0f} s -->")
    print("| method | group_lasso | test accuracy | input pixels removed | hidden neurons removed "
          "| exact zero groups (of 192) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for method in ("subgradient", "proximal"):
        for lam in LAMBDAS:
            acc, pix, neu, exact = res[(method, lam)]
            print(f"| {method} | {lam:g} | {acc:.3f} | {pix:.1%} | {neu:.1%} | {exact:.1f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, col, what in ((axes[0], 2, "hidden neurons removed"), (axes[1], 1, "input pixels removed")):
        for method, mk in (("subgradient", "o--"), ("proximal", "s-")):
            pts = np.array([[res[(method, lam)][col], res[(method, lam)][0]] for lam in LAMBDAS])
            ax.plot(pts[:, 0] * 100, pts[:, 1] * 100, mk, label=method)
            for lam, (x, y) in zip(LAMBDAS, pts):
                ax.annotate(f"{lam:g}", (x * 100, y * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{what} (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle("digits MLP 64-128-10, group lasso on pixels (W1 cols) and neurons (W2 cols); "
                 "labels: group_lasso", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"<!-- wrote {os.path.relpath(args.out, ROOT)} -->")


if __name__ == "__main__":
    main()
