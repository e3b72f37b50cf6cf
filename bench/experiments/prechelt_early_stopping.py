"""Prechelt's trade-off between training time and generalisation, for fastreg.EarlyStopping.

  python bench/experiments/prechelt_early_stopping.py [--seeds 11] [--epochs 300] [--lr 0.01]

L. Prechelt, "Early Stopping -- But When?" (2012), trained many runs to a long fixed budget,
recorded the training and validation errors every epoch, and then asked, per stopping
criterion: how long did it train, relative to the epoch with the best validation error,
and how good is the network at its stop, relative to the one at that best epoch? His
finding: the slower criteria buy a little better generalisation, at a large cost in time.

Here: MLPs (fastreg.nn.Dropout between tanh layers, momentum SGD) on two data sets that
scikit-learn ships without a download, digits (10 classes) and breast cancer (2 classes),
small training sets so that they overfit; `--seeds` runs per data set, each with its own
split and initialisation. E_tr is the mean training loss over the epoch's minibatches,
E_va the validation loss (cross-entropy), the test error the test loss. The criteria run
after the fact over the recorded curves through fastreg.EarlyStopping.step (a criterion
that never fires stops at the budget).

Writes docs/figures/prechelt_early_stopping.png and docs/figures/prechelt_early_stopping.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reversible_common import FIG_DIR, machine, write_table  # noqa: E402

import fastreg  # noqa: E402

# (criterion, parameter name, values): Prechelt's classes at several strictnesses, and patience
GRID = [("gl", "alpha", [1, 2, 3, 5, 10]),
        ("pq", "alpha", [0.5, 1, 2, 3, 5]),
        ("up", "s", [1, 2, 3, 4]),
        ("patience", "patience", [5, 10, 20, 50])]


def dataset(name, seed):
    """(train, val, test) as float32 tensors: standardised features, a fresh split per seed.
    Small training sets (digits 300, cancer 150) so the networks overfit within the budget."""
    from sklearn import datasets

    d = datasets.load_digits() if name == "digits" else datasets.load_breast_cancer()
    X = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    X, y = X[perm], y[perm]
    ntr, nva = (300, 300) if name == "digits" else (150, 150)
    mu, sd = X[:ntr].mean(0), X[:ntr].std(0).clamp_min(1e-3)
    X = (X - mu) / sd
    return ((X[:ntr], y[:ntr]), (X[ntr:ntr + nva], y[ntr:ntr + nva]),
            (X[ntr + nva:], y[ntr + nva:]))


def train_curves(name, seed, epochs, lr, bs=30):
    """One run to the full budget: per-epoch E_tr, E_va, test loss and test accuracy."""
    (X, y), (Xv, yv), (Xt, yt) = dataset(name, seed)
    torch.manual_seed(seed)
    nin, nout = X.shape[1], int(y.max()) + 1
    model = torch.nn.Sequential(torch.nn.Linear(nin, 128), torch.nn.Tanh(), fastreg.nn.Dropout(0.1),
                                torch.nn.Linear(128, 128), torch.nn.Tanh(), fastreg.nn.Dropout(0.1),
                                torch.nn.Linear(128, nout))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ce = torch.nn.functional.cross_entropy
    g = torch.Generator().manual_seed(seed)
    out = np.zeros((epochs, 4))
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(X.shape[0], generator=g)
        tot = 0.0
        for i in range(0, X.shape[0], bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            loss = ce(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * idx.numel()
        model.eval()
        with torch.no_grad():
            lt = model(Xt)
            out[ep] = (tot / X.shape[0], float(ce(model(Xv), yv)), float(ce(lt, yt)),
                       float((lt.argmax(1) == yt).float().mean()))
    return out


def stop_epoch(curve, crit, pname, value):
    """The epoch (1-based) at which the criterion stops on this curve (the budget if never)."""
    kw = {pname: value}
    stop = fastreg.EarlyStopping(crit, strip=5, **kw)
    for t in range(curve.shape[0]):
        if stop.step(curve[t, 1], train_loss=curve[t, 0]):
            return t + 1, True
    return curve.shape[0], False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=11)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    curves = {}
    for name in ("digits", "cancer"):
        for seed in range(args.seeds):
            c = train_curves(name, seed, args.epochs, args.lr)
            curves[(name, seed)] = c
            best = int(np.argmin(c[:, 1])) + 1
            print(f"[{time.perf_counter() - t0:6.1f} s] {name} seed {seed}: best val epoch {best}, "
                  f"val {c[best - 1, 1]:.4f} -> {c[-1, 1]:.4f} at {args.epochs}", flush=True)
    train_s = time.perf_counter() - t0

    rows, points = [], {}
    for crit, pname, values in GRID:
        for v in values:
            slow, gloss, acc_d, fired = [], [], [], 0
            t1 = time.perf_counter()
            nsteps = 0
            for (name, seed), c in curves.items():
                t_opt = int(np.argmin(c[:, 1])) + 1
                t_stop, ok = stop_epoch(c, crit, pname, v)
                nsteps += t_stop
                fired += ok
                slow.append(t_stop / t_opt)
                gloss.append(c[t_stop - 1, 2] / c[t_opt - 1, 2])
                acc_d.append(c[t_stop - 1, 3] - c[t_opt - 1, 3])
            us = 1e6 * (time.perf_counter() - t1) / nsteps
            slow, gloss, acc_d = map(np.asarray, (slow, gloss, acc_d))
            label = f"{crit} {pname}={v}"
            points.setdefault(crit, []).append((slow.mean(), gloss.mean(), v))
            rows.append([label, f"{fired}/{len(curves)}", f"{slow.mean():.2f} ± {slow.std():.2f}",
                         f"{np.median(slow):.2f}", f"{gloss.mean():.4f} ± {gloss.std():.4f}",
                         f"{100 * acc_d.mean():+.2f}", f"{us:.1f}"])
            print(f"{label}: fired {fired}/{len(curves)}, slowness {slow.mean():.2f}, "
                  f"test-loss ratio {gloss.mean():.4f}", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for crit, pts in points.items():
        xs, ys, vs = zip(*pts)
        ax[0].plot(xs, ys, "o-", label=crit)
        for x, yv, v in zip(xs, ys, vs):
            ax[0].annotate(str(v), (x, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax[0].axhline(1.0, color="k", lw=0.6, ls="--")
    ax[0].axvline(1.0, color="k", lw=0.6, ls="--")
    ax[0].set_xlabel("training time: stop epoch / best-validation epoch (mean)")
    ax[0].set_ylabel("test loss at stop / at best-validation epoch (mean)")
    ax[0].set_title(f"Prechelt's trade-off, {len(curves)} runs (digits + breast cancer)")
    ax[0].legend()
    for name, col in (("digits", "C0"), ("cancer", "C1")):
        for seed in range(min(3, args.seeds)):
            c = curves[(name, seed)]
            ax[1].plot(c[:, 1], color=col, lw=0.8, label=f"{name} val" if seed == 0 else None)
            ax[1].plot(c[:, 0], color=col, lw=0.8, ls=":", label=f"{name} train" if seed == 0 else None)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("cross-entropy")
    ax[1].set_title("training (dotted) and validation curves, 3 seeds each")
    ax[1].legend()
    fig.tight_layout()
    os.makedirs(FIG_DIR, exist_ok=True)
    fig.savefig(os.path.join(FIG_DIR, "prechelt_early_stopping.png"), dpi=110)

    opt_ep = [int(np.argmin(c[:, 1])) + 1 for c in curves.values()]
    text = write_table(
        os.path.join(FIG_DIR, "prechelt_early_stopping.md"),
        f"Early-stopping criteria on {len(curves)} runs ({args.seeds} seeds x digits, breast cancer), "
        f"budget {args.epochs} epochs, SGD lr {args.lr} momentum 0.9",
        ["criterion", "fired", "time: t_stop / t_opt (mean ± sd)", "median", "test loss ratio (mean ± sd)",
         "test acc. vs t_opt (points)", "step cost (µs)"],
        rows,
        f"t_opt: the epoch of the lowest validation loss in the whole run (median {np.median(opt_ep):.0f}, "
        f"range {min(opt_ep)}-{max(opt_ep)}). A criterion that never fired stops at the budget. "
        f"Strip length 5 for pq and up. Training all runs took {train_s:.0f} s.\n\nMachine: {machine()}.",
    )
    print(text)


if __name__ == "__main__":
    main()
