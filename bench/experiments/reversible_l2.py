"""Per-weight L2 strengths for logistic regression, optimised on validation loss
(the paper's section 3.2 on digits).

  python bench/experiments/reversible_l2.py [--T 100] [--meta-iters 30] [--train 200]

Multinomial logistic regression 64 -> 10 on a small training set (so that regularisation
matters), trained for T full-batch steps of ReversibleSGD on
    CE(W x + c, y) + 1/2 sum_ij exp(r_ij) W_ij^2,
with one log-strength r_ij per weight (640 meta-parameters). The validation loss after
training is differentiated with respect to r through `opt.reverse` (r is found in the
training loss's graph automatically), and a meta-Adam follows it.
Writes docs/figures/reversible_l2.png and docs/figures/reversible_l2.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reversible_common import FIG_DIR, digits, machine, write_table  # noqa: E402

from fastreg.optim import ReversibleSGD  # noqa: E402


def run_once(r, T, data, n_train, with_grad=True, lr=0.5, momentum=0.9):
    (X, y), (Xv, yv), (Xt, yt) = data
    X, y = X[:n_train], y[:n_train]
    model = torch.nn.Linear(64, 10).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=momentum)

    def train_loss(t):
        ce = torch.nn.functional.cross_entropy(model(X), y)
        return ce + 0.5 * (torch.exp(r) * model.weight**2).sum()

    for t in range(T):
        opt.zero_grad()
        train_loss(t).backward()
        opt.step()
    with torch.no_grad():
        val = float(torch.nn.functional.cross_entropy(model(Xv), yv))
        out = model(Xt)
        test = float(torch.nn.functional.cross_entropy(out, yt))
        acc = float((out.argmax(1) == yt).double().mean())
    grad = None
    if with_grad:
        r.grad = None  # the forward run's backward() calls accumulated into it
        opt.reverse(lambda: torch.nn.functional.cross_entropy(model(Xv), yv), train_loss)
        grad = r.grad.clone()
    return val, test, acc, grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--meta-iters", type=int, default=30)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--meta-lr", type=float, default=0.3)
    ap.add_argument("--init", type=float, default=1e-3, help="initial L2 strength of every weight")
    args = ap.parse_args()
    data = digits(torch.float64)
    r = torch.full((10, 64), math.log(args.init), dtype=torch.float64, requires_grad=True)
    meta = torch.optim.Adam([r], lr=args.meta_lr)
    before = run_once(r, args.T, data, args.train, with_grad=False)
    # the best single shared strength on a grid, for reference
    shared = []
    for lam in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1):
        rr = torch.full((10, 64), math.log(lam), dtype=torch.float64)
        shared.append((lam,) + run_once(rr, args.T, data, args.train, with_grad=False)[:3])
    best = min(shared, key=lambda x: x[1])
    curve = []
    t0 = time.perf_counter()
    for it in range(args.meta_iters):
        val, test, acc, g = run_once(r, args.T, data, args.train)
        curve.append(val)
        print(f"meta-iter {it}: val {val:.4f} test {test:.4f} acc {acc:.3f}", flush=True)
        meta.zero_grad()
        r.grad = g
        meta.step()
    wall = time.perf_counter() - t0
    after = run_once(r, args.T, data, args.train, with_grad=False)
    curve.append(after[0])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 4))
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(curve, "o-", label="per-weight strengths (meta-Adam)")
    ax.axhline(best[1], color="k", ls="--", label=f"best shared strength {best[0]:g}")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("validation loss")
    ax.legend()
    ax.set_title("validation loss after T steps")
    lam = torch.exp(r.detach())
    inner = fig.add_gridspec(2, 5, left=0.4, right=0.98, wspace=0.05, hspace=0.15)
    vmax = float(torch.log10(lam).max())
    vmin = float(torch.log10(lam).min())
    for c in range(10):
        a = fig.add_subplot(inner[c // 5, c % 5])
        im = a.imshow(torch.log10(lam[c]).view(8, 8), cmap="viridis", vmin=vmin, vmax=vmax)
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(f"class {c}", fontsize=8)
    fig.colorbar(im, ax=fig.axes[1:], shrink=0.8, label="log10 learned L2 strength")
    os.makedirs(FIG_DIR, exist_ok=True)
    fig.savefig(os.path.join(FIG_DIR, "reversible_l2.png"), dpi=110)

    rows = [[f"shared lambda={args.init:g} (start)", f"{before[0]:.4f}", f"{before[1]:.4f}", f"{before[2]:.3f}"],
            [f"best shared lambda on a grid ({best[0]:g})", f"{best[1]:.4f}", f"{best[2]:.4f}", f"{best[3]:.3f}"],
            [f"per-weight lambda after {args.meta_iters} meta-iterations", f"{after[0]:.4f}", f"{after[1]:.4f}",
             f"{after[2]:.3f}"]]
    text = write_table(
        os.path.join(FIG_DIR, "reversible_l2.md"),
        f"Per-weight L2 strengths, logistic regression on digits ({args.train} training examples, T={args.T})",
        ["regulariser", "validation loss", "test loss", "test accuracy"],
        rows,
        f"Learned strengths span {float(lam.min()):.2e} .. {float(lam.max()):.2e} (median {float(lam.median()):.2e}). "
        f"{args.meta_iters} meta-iterations took {wall:.0f} s.\n\nMachine: {machine()}.",
    )
    print(text)


if __name__ == "__main__":
    main()
