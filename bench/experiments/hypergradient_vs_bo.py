"""Hypergradients (ReversibleSGD.reverse) against Bayesian optimisation (optuna's TPE) and
random search, tuning the regularisation of an MLP on digits.

  python bench/experiments/hypergradient_vs_bo.py [--seeds 3] [--budget 30] [--T 100]

Each evaluation trains a 64-32-10 tanh MLP on 200 digits for T steps of fastreg.optim.ReversibleSGD
(batch 100, momentum 0.9) on the training loss

    cross-entropy + fastreg.penalty.loss([W1, W2], l1=(l1_1, l1_2), l2=(l2_1, l2_2))

and returns the validation loss. Two search spaces (log-uniform boxes):
  "5-D":   per-layer L1 and L2 strengths and one learning rate;
  "104-D": the same strengths and a per-step learning-rate schedule (T values; 104-D at the
           default T = 100), a space that Bayesian optimisation cannot follow.
Methods, each with the same budget in training-run equivalents:
  (a) hypergradient descent: Adam on the log-hyperparameters, the gradient of the
      validation loss from one ReversibleSGD.reverse per iteration; an iteration costs
      1 + (reverse time / forward time), measured in the run itself;
  (b) optuna's TPE sampler (Bayesian optimisation), one training run per trial;
  (c) random search in the same box.
Every method starts from the same seeded initial weights. Test accuracy is that of the
configuration with the best validation loss each method found.
Writes docs/figures/hypergradient_vs_bo.png and docs/figures/hypergradient_vs_bo.md.
Needs optuna (an optional dependency of the experiments: `make bench` installs it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reversible_common import FIG_DIR, digits, machine, mlp, train_loss, write_table  # noqa: E402

import fastreg  # noqa: E402
from fastreg.optim import ReversibleSGD  # noqa: E402

SIZES = (64, 32, 10)
# log10 boxes
BOX = {"l1": (-6.0, -2.0), "l2": (-6.0, -1.0), "lr": (-2.0, 0.0)}
FAILED = 5.0  # the validation loss recorded for a run that diverged


def names(space, T):
    lr = ["lr"] if space == "5-D" else [f"lr_{t}" for t in range(T)]
    return ["l1_1", "l1_2", "l2_1", "l2_2"] + lr


def box(name):
    return BOX[name.split("_")[0]]


def evaluate(theta, space, data, T, seed, with_grad=False, ntrain=200):
    """One training run at log10-hyperparameters theta (a dict). Returns (val loss, test acc,
    gradient of the val loss with respect to theta (log10 units) or None, forward s, reverse s)."""
    (X, y), (Xv, yv), (Xt, yt) = data
    X, y = X[:ntrain], y[:ntrain]  # a small training set, so that regularisation matters
    model = mlp(SIZES, torch.float32, seed=seed)
    weights = [model[0].weight, model[2].weight]
    ten = lambda keys: torch.tensor([10.0 ** theta[k] for k in keys], dtype=torch.float32)  # noqa: E731
    l1 = ten(["l1_1", "l1_2"]).requires_grad_(with_grad)
    l2 = ten(["l2_1", "l2_2"]).requires_grad_(with_grad)
    lr = (ten(["lr"])[0] if space == "5-D" else ten([f"lr_{t}" for t in range(T)])).requires_grad_(with_grad)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.9)

    def closure(t):
        return train_loss(model, X, y, t) + fastreg.penalty.loss(weights, l1=l1, l2=l2)

    t0 = time.perf_counter()
    try:
        for t in range(T):
            opt.zero_grad()
            closure(t).backward()
            opt.step()
        with torch.no_grad():
            val = float(torch.nn.functional.cross_entropy(model(Xv), yv))
            acc = float((model(Xt).argmax(1) == yt).float().mean())
    except (OverflowError, RuntimeError):
        return FAILED, 0.0, None, time.perf_counter() - t0, 0.0
    fwd = time.perf_counter() - t0
    if not math.isfinite(val):
        return FAILED, 0.0, None, fwd, 0.0
    if not with_grad:
        return val, acc, None, fwd, 0.0
    l1.grad = l2.grad = None  # the forward run's backward() calls accumulated into them
    t0 = time.perf_counter()
    opt.reverse(lambda: torch.nn.functional.cross_entropy(model(Xv), yv), closure)
    rev = time.perf_counter() - t0
    ln10 = math.log(10.0)  # d/d log10 h = h ln 10 d/dh
    g = {}
    for keys, h in ((["l1_1", "l1_2"], l1), (["l2_1", "l2_2"], l2)):
        for k, gi, hi in zip(keys, h.grad.tolist(), h.detach().tolist()):
            g[k] = gi * hi * ln10
    lrg = (lr.grad * lr.detach() * ln10).reshape(-1).tolist()
    for k, v in zip(names(space, T)[4:], lrg):
        g[k] = v
    return val, acc, g, fwd, rev


def start(space, T):
    return {k: sum(box(k)) / 2 for k in names(space, T)}


def hypergradient(space, data, T, seed, budget, meta_lr=0.3):
    theta = start(space, T)
    keys = names(space, T)
    x = torch.tensor([theta[k] for k in keys], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([box(k)[0] for k in keys], dtype=torch.float64)
    hi = torch.tensor([box(k)[1] for k in keys], dtype=torch.float64)
    meta = torch.optim.Adam([x], lr=meta_lr)
    trace, spent, wall = [], 0.0, 0.0
    while spent < budget:
        theta = dict(zip(keys, x.detach().tolist()))
        val, acc, g, fwd, rev = evaluate(theta, space, data, T, seed, with_grad=True)
        spent += 1.0 + (rev / fwd if g is not None else 0.0)
        wall += fwd + rev
        trace.append((spent, wall, val, acc, rev / fwd if g is not None else float("nan"), theta))
        if g is None:  # diverged: step back towards the box's middle
            with torch.no_grad():
                x.mul_(0.5).add_(0.5 * (lo + hi) / 2)
            continue
        meta.zero_grad()
        x.grad = torch.tensor([g[k] for k in keys], dtype=torch.float64)
        meta.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return trace


def random_search(space, data, T, seed, budget):
    rng = np.random.default_rng(seed)
    trace, wall = [], 0.0
    for i in range(int(budget)):
        theta = {k: float(rng.uniform(*box(k))) for k in names(space, T)}
        val, acc, _, fwd, _ = evaluate(theta, space, data, T, seed)
        wall += fwd
        trace.append((i + 1.0, wall, val, acc, float("nan"), theta))
    return trace


def bayesian(space, data, T, seed, budget):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    trace, wall = [], 0.0
    for i in range(int(budget)):
        t0 = time.perf_counter()
        trial = study.ask()
        theta = {k: trial.suggest_float(k, *box(k)) for k in names(space, T)}
        val, acc, _, fwd, _ = evaluate(theta, space, data, T, seed)
        study.tell(trial, val)
        wall += time.perf_counter() - t0  # the sampler's own time counts too
        trace.append((i + 1.0, wall, val, acc, float("nan"), theta))
    return trace


METHODS = {"hypergradient": hypergradient, "optuna TPE": bayesian, "random search": random_search}


def best_so_far(trace):
    """(budget, wall, best val so far, test acc at that best)."""
    out, best, acc = [], math.inf, 0.0
    for spent, wall, val, a, *_ in trace:
        if val < best:
            best, acc = val, a
        out.append((spent, wall, best, acc))
    return np.asarray(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=30.0, help="training-run equivalents per method")
    ap.add_argument("--T", type=int, default=100)
    args = ap.parse_args()
    try:
        import optuna  # noqa: F401
    except ImportError:
        sys.exit("hypergradient_vs_bo.py needs optuna (the Bayesian-optimisation peer): `make bench` "
                 "installs it, or `pip install optuna`")
    torch.set_num_threads(1)
    data = digits(torch.float32)
    t0 = time.perf_counter()
    res = {}
    for space in ("5-D", f"{4 + args.T}-D"):
        sp = "5-D" if space == "5-D" else "schedule"
        for method, fn in METHODS.items():
            for seed in range(args.seeds):
                tr = fn(sp, data, args.T, seed, args.budget)
                res[(space, method, seed)] = tr
                b = best_so_far(tr)
                print(f"[{time.perf_counter() - t0:6.1f} s] {space} {method} seed {seed}: "
                      f"{len(tr)} runs, best val {b[-1, 2]:.4f}, test acc {b[-1, 3]:.3f}", flush=True)
    wall_all = time.perf_counter() - t0

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = sorted({k[0] for k in res}, key=len)
    fig, ax = plt.subplots(2, len(spaces), figsize=(13, 8), squeeze=False)
    rows = []
    for j, space in enumerate(spaces):
        for method, color in zip(METHODS, ["C0", "C1", "C2"]):
            finals, accs, rev_ratio, cfg = [], [], [], []
            grid = np.linspace(1.0, args.budget, 60)
            curves = []
            for seed in range(args.seeds):
                tr = res[(space, method, seed)]
                b = best_so_far(tr)
                finals.append(b[-1, 2])
                accs.append(b[-1, 3])
                th = min(tr, key=lambda r: r[2])[5]  # the configuration of the best validation loss
                lrs = [v for k, v in th.items() if k.startswith("lr")]
                cfg.append((np.mean([th["l1_1"], th["l1_2"]]), np.mean([th["l2_1"], th["l2_2"]]), np.mean(lrs)))
                rev_ratio += [r[4] for r in tr if math.isfinite(r[4])]
                # step function of the budget spent
                curves.append([b[np.searchsorted(b[:, 0], gx, side="right") - 1, 2]
                               if gx >= b[0, 0] else np.nan for gx in grid])
                ax[1, j].plot(b[:, 1], b[:, 2], color=color, lw=0.8, drawstyle="steps-post",
                              label=method if seed == 0 else None)
            cu = np.asarray(curves)
            seen = ~np.isnan(cu).all(0)  # before its first evaluation a method has no best yet
            cu, grid = cu[:, seen], grid[seen]
            ax[0, j].plot(grid, np.nanmean(cu, 0), color=color, label=method)
            ax[0, j].fill_between(grid, np.nanmin(cu, 0), np.nanmax(cu, 0), color=color, alpha=0.2)
            rows.append([space, method, f"{np.mean(finals):.4f} ± {np.std(finals):.4f}",
                         f"{np.mean(accs):.3f} ± {np.std(accs):.3f}",
                         f"{np.mean(rev_ratio):.2f}" if rev_ratio else "-",
                         " / ".join(f"{v:.2f}" for v in np.mean(cfg, 0)),
                         f"{np.mean([len(res[(space, method, s)]) for s in range(args.seeds)]):.1f}"])
        ax[0, j].set_title(f"{space}: best validation loss (mean, min-max over {args.seeds} seeds)")
        ax[0, j].set_xlabel("budget spent (training-run equivalents)")
        ax[1, j].set_title(f"{space}: against wall-clock time (each seed)")
        ax[1, j].set_xlabel("seconds")
        for a in ax[:, j]:
            a.set_ylabel("best validation loss so far")
            a.set_yscale("log")
            a.legend()
    fig.tight_layout()
    os.makedirs(FIG_DIR, exist_ok=True)
    fig.savefig(os.path.join(FIG_DIR, "hypergradient_vs_bo.png"), dpi=100)
    text = write_table(
        os.path.join(FIG_DIR, "hypergradient_vs_bo.md"),
        f"Hypergradients vs optuna TPE vs random search, digits (200 training examples) 64-32-10 MLP, T={args.T}, "
        f"budget {args.budget:g} training runs, {args.seeds} seeds (mean ± sd)",
        ["space", "method", "best validation loss", "test acc. at that config", "reverse / forward time",
         "best config: log10 L1 / L2 / lr (means)", "evaluations"],
        rows,
        "A hypergradient iteration is one forward run and one reverse run, charged 1 + (reverse time / "
        "forward time) measured in that iteration. Boxes (log10): L1 [-6, -2], L2 [-6, -1], "
        f"learning rate [-2, 0]; the hypergradient starts at the box's centre. All runs took "
        f"{wall_all:.0f} s.\n\nMachine: {machine()}.",
    )
    print(text)


if __name__ == "__main__":
    main()
