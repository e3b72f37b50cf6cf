"""Random labels on digits: Zhang, Bengio, Hardt, Recht & Vinyals, "Understanding deep
learning requires rethinking generalization" (ICLR 2017), at the scale of a 2-core CPU.

  python bench/experiments/random_labels.py [--seeds 3] [--max-epochs 150] [--max-epochs-reg 100]

Their three claims, tested here on scikit-learn's digits (500 train / 397 val / 400 test):
  1. an MLP and a small CNN fit training labels corrupted at 0, 20, 50, 80, 100% to 100%
     training accuracy;
  2. the time to fit is a small constant factor of the true-label time;
  3. test accuracy (on true labels) falls with the corruption.
And the same again with fastreg's explicit regularisers on: fastreg.nn.Dropout(0.3) in the
hidden layers, Gaussian input noise (fastreg.input_noise, sigma 0.1), an L2 penalty through
fastreg.penalty.accumulate_ (l2 = 5e-4), and fastreg.EarlyStopping (patience 20 on the
validation loss, with true validation labels). Training always runs until the training set
is fitted (or the budget): early stopping is recorded alongside, and "ES test acc." is the
test accuracy at the epoch it would have restored (its best epoch when it stopped, or the
best so far if it never did). The paper's claim: explicit regularisation helps
generalisation but is neither necessary nor by itself sufficient (the networks still fit
random labels with it on).

Corruption c: each training label is replaced, with probability c, by a class drawn
uniformly (so it may stay right by chance). Adam (lr 3e-3; fastreg has no general-purpose
optimiser, and Adam fits within a CPU budget), batch 50. The CNN: conv 3x3 (16) - max-pool
- 128 - 10; the MLP: 64 - 256 - 256 - 10, ReLU.
Writes docs/figures/random_labels.png and docs/figures/random_labels.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reversible_common import FIG_DIR, digits, machine, write_table  # noqa: E402

import fastreg  # noqa: E402

CORRUPTIONS = (0.0, 0.2, 0.5, 0.8, 1.0)


class MLP(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.l1, self.l2, self.l3 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10)
        self.drop = fastreg.nn.Dropout(p) if p else torch.nn.Identity()

    def forward(self, x):
        h = self.drop(torch.relu(self.l1(x)))
        return self.l3(self.drop(torch.relu(self.l2(h))))


class CNN(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.fc1, self.fc2 = torch.nn.Linear(16 * 4 * 4, 128), torch.nn.Linear(128, 10)
        self.drop = fastreg.nn.Dropout(p) if p else torch.nn.Identity()

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x.view(-1, 1, 8, 8))), 2)
        return self.fc2(self.drop(torch.relu(self.fc1(self.drop(h.flatten(1))))))


def corrupt(y, c, seed):
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(y.shape[0], generator=g) < c
    return torch.where(flip, torch.randint(0, 10, y.shape, generator=g), y)


def run(arch, c, seed, reg, max_epochs, data, bs=50, ntrain=500):
    """Trains until 100% training accuracy (on the corrupted labels) or the budget."""
    (X, y), (Xv, yv), (Xt, yt) = data
    X, y = X[:ntrain], y[:ntrain]  # a small training set: memorising it fits a CPU budget
    yc = corrupt(y, c, seed)
    torch.manual_seed(seed)
    model = (MLP if arch == "mlp" else CNN)(0.3 if reg else 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    stop = fastreg.EarlyStopping("patience", patience=20) if reg else None
    ce = torch.nn.functional.cross_entropy
    g = torch.Generator().manual_seed(seed)
    curve, es_epoch, fit = [], None, None
    for ep in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], bs):
            idx = perm[i:i + bs]
            xb = fastreg.input_noise(X[idx], 0.1) if reg else X[idx]
            opt.zero_grad()
            ce(model(xb), yc[idx]).backward()
            if reg:
                fastreg.penalty.accumulate_(model.parameters(), l2=5e-4)
            opt.step()
        model.eval()
        with torch.no_grad():
            tr_acc = float((model(X).argmax(1) == yc).float().mean())
            val = float(ce(model(Xv), yv))
            te_acc = float((model(Xt).argmax(1) == yt).float().mean())
        curve.append((tr_acc, val, te_acc))
        if stop is not None and es_epoch is None and stop.step(val):
            es_epoch = stop.stopped_epoch
        if tr_acc == 1.0:
            fit = ep
            break
    es_acc = None
    if stop is not None:
        best = stop.best_epoch  # what restore_best would have loaded
        es_acc = curve[best - 1][2]
    return {"fit": fit, "epochs": len(curve), "train_acc": curve[-1][0], "test_acc": curve[-1][2],
            "es_epoch": es_epoch, "es_test_acc": es_acc, "curve": np.asarray(curve)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=150)
    ap.add_argument("--max-epochs-reg", type=int, default=100,
                    help="budget with the regularisers on (they slow fitting; a CPU budget)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = digits(torch.float32)
    t0 = time.perf_counter()
    res = {}
    for reg in (False, True):
        for arch in ("mlp", "cnn"):
            for c in CORRUPTIONS:
                for seed in range(args.seeds):
                    r = run(arch, c, seed, reg, args.max_epochs_reg if reg else args.max_epochs, data)
                    res[(reg, arch, c, seed)] = r
                    print(f"[{time.perf_counter() - t0:6.1f} s] {arch} reg={'on' if reg else 'off'} "
                          f"corruption {c:.0%} seed {seed}: fit at epoch {r['fit']}, train acc "
                          f"{r['train_acc']:.3f}, test acc {r['test_acc']:.3f}"
                          + (f", ES test acc {r['es_test_acc']:.3f}" if reg else ""), flush=True)
    wall = time.perf_counter() - t0

    def ms(xs, fmt="{:.3f}"):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return (fmt + " ± " + fmt).format(np.mean(xs), np.std(xs))

    rows = []
    for reg in (False, True):
        for arch in ("mlp", "cnn"):
            base = [res[(reg, arch, 0.0, s)]["fit"] for s in range(args.seeds)]
            base = np.mean([b for b in base if b is not None]) if any(b is not None for b in base) else None
            for c in CORRUPTIONS:
                rs = [res[(reg, arch, c, s)] for s in range(args.seeds)]
                fits = [r["fit"] for r in rs]
                nfit = sum(f is not None for f in fits)
                mfit = np.mean([f for f in fits if f is not None]) if nfit else None
                rows.append([arch.upper(), "on" if reg else "off", f"{c:.0%}",
                             f"{nfit}/{len(rs)}", ms(fits, "{:.0f}"),
                             f"{mfit / base:.1f}" if mfit is not None and base else "-",
                             ms([r["train_acc"] for r in rs]), ms([r["test_acc"] for r in rs]),
                             ms([r["es_test_acc"] for r in rs]) if reg else "-"])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    for col, (reg, arch) in enumerate([(False, "mlp"), (False, "cnn"), (True, "mlp")]):
        for c, color in zip(CORRUPTIONS, ["C0", "C1", "C2", "C3", "C4"]):
            for s in range(args.seeds):
                cu = res[(reg, arch, c, s)]["curve"]
                lab = f"{c:.0%}" if s == 0 else None
                ax[0, col].plot(np.arange(1, len(cu) + 1), cu[:, 0], color=color, lw=0.8, label=lab)
                ax[1, col].plot(np.arange(1, len(cu) + 1), cu[:, 2], color=color, lw=0.8, label=lab)
        ax[0, col].set_title(f"{arch.upper()}, regularisers {'on' if reg else 'off'}: training accuracy")
        ax[1, col].set_title("test accuracy (true labels)")
        ax[1, col].set_xlabel("epoch")
        ax[0, col].legend(title="label corruption", fontsize=8)
    fig.tight_layout()
    os.makedirs(FIG_DIR, exist_ok=True)
    fig.savefig(os.path.join(FIG_DIR, "random_labels.png"), dpi=100)

    text = write_table(
        os.path.join(FIG_DIR, "random_labels.md"),
        f"Random labels on digits, {args.seeds} seeds (mean ± sd), budget {args.max_epochs} epochs "
        f"({args.max_epochs_reg} with the regularisers on)",
        ["model", "regularisers", "corruption", "fitted", "epochs to fit", "vs true labels",
         "train acc.", "test acc.", "ES test acc."],
        rows,
        "Epochs to fit: the first epoch with 100% training accuracy on the (corrupted) labels, over "
        "the seeds that fitted. Test accuracy on true labels, at the end of training (the fit). "
        "Regularisers on: fastreg.nn.Dropout(0.3), fastreg.input_noise(sigma 0.1), "
        "penalty.accumulate_(l2=5e-4), and EarlyStopping(patience=20) recorded alongside "
        f"(ES test acc.: at its best epoch). All runs took {wall:.0f} s.\n\nMachine: {machine()}.",
    )
    print(text)


if __name__ == "__main__":
    main()
