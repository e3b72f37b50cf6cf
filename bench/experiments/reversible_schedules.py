"""Learned per-layer learning-rate and momentum schedules and initial scales
(the paper's section 3.1 scaled to digits).

  python bench/experiments/reversible_schedules.py [--T 100] [--meta-iters 25]

A 64-50-50-10 tanh MLP is trained for T steps of ReversibleSGD (batch 100) from
w_0 = exp(s_l) * base_l per layer; every step t of every layer l has its own
alpha_{l,t} = exp(a_{l,t}) and gamma_{l,t} = sigmoid(b_{l,t}). The meta-objective is the
validation loss after training; its gradient with respect to a, b and s comes from one
`opt.reverse` per meta-iteration, and a meta-Adam follows it.
Writes docs/figures/reversible_schedules.png and docs/figures/reversible_schedules.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reversible_common import FIG_DIR, digits, machine, mlp, train_loss, write_table  # noqa: E402

from fastreg.optim import ReversibleSGD  # noqa: E402

SIZES = (64, 50, 50, 10)


def run_once(a, b, s, bases, T, data, with_grad=True):
    """Train with the schedules (a, b) from scales s; returns (val loss, test loss, test acc)."""
    (X, y), (Xv, yv), (Xt, yt) = data
    model = mlp(SIZES, torch.float32, seed=0)
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lay, base, sl in zip(layers, bases, s):
            lay.weight.copy_(torch.exp(sl) * base)
            lay.bias.zero_()
    lrs = [torch.exp(a[l]).detach().requires_grad_() for l in range(len(layers))]
    moms = [torch.sigmoid(b[l]).detach().requires_grad_() for l in range(len(layers))]
    opt = ReversibleSGD([{"params": lay.parameters(), "lr": lr, "momentum": mom}
                         for lay, lr, mom in zip(layers, lrs, moms)], lr=0.1, momentum=0.9)
    for t in range(T):
        opt.zero_grad()
        train_loss(model, X, y, t).backward()
        opt.step()
    with torch.no_grad():
        val = float(torch.nn.functional.cross_entropy(model(Xv), yv))
        out = model(Xt)
        test = float(torch.nn.functional.cross_entropy(out, yt))
        acc = float((out.argmax(1) == yt).float().mean())
    if not with_grad:
        return val, test, acc, None
    opt.reverse(lambda: torch.nn.functional.cross_entropy(model(Xv), yv),
                lambda t: train_loss(model, X, y, t))
    ga = torch.stack([lr.grad * lr.detach() for lr in lrs])  # d/d log alpha
    gb = torch.stack([mom.grad * mom.detach() * (1 - mom.detach()) for mom in moms])  # d/d logit gamma
    w0 = [torch.exp(sl) * base for sl, base in zip(s, bases)]
    gs = torch.stack([(lay.weight.grad * w).sum() for lay, w in zip(layers, w0)])  # d/d log scale
    return val, test, acc, (ga, gb, gs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--meta-iters", type=int, default=25)
    ap.add_argument("--meta-lr", type=float, default=0.1)
    args = ap.parse_args()
    data = digits(torch.float32)
    nl = len(SIZES) - 1
    g = torch.Generator().manual_seed(0)
    bases = [torch.randn(o, i, generator=g) for i, o in zip(SIZES[:-1], SIZES[1:])]
    a = torch.full((nl, args.T), math.log(0.1)).requires_grad_()
    b = torch.full((nl, args.T), math.log(0.9 / 0.1)).requires_grad_()
    s = torch.tensor([math.log(1 / math.sqrt(i)) for i in SIZES[:-1]]).requires_grad_()
    a0, b0, s0 = a.detach().clone(), b.detach().clone(), s.detach().clone()
    meta = torch.optim.Adam([a, b, s], lr=args.meta_lr)
    before = run_once(a, b, s, bases, args.T, data, with_grad=False)
    curve = []
    t0 = time.perf_counter()
    for it in range(args.meta_iters):
        val, test, acc, (ga, gb, gs) = run_once(a, b, s, bases, args.T, data)
        curve.append(val)
        print(f"meta-iter {it}: val {val:.4f} test {test:.4f} acc {acc:.3f}", flush=True)
        meta.zero_grad()
        a.grad, b.grad, s.grad = ga, gb, gs
        meta.step()
    wall = time.perf_counter() - t0
    after = run_once(a, b, s, bases, args.T, data, with_grad=False)
    curve.append(after[0])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for l in range(nl):
        ax[0].plot(torch.exp(a[l]).detach(), label=f"layer {l + 1}")
        ax[1].plot(torch.sigmoid(b[l]).detach(), label=f"layer {l + 1}")
    ax[0].axhline(math.exp(a0[0, 0]), color="k", ls="--", lw=0.8, label="initial")
    ax[1].axhline(float(torch.sigmoid(b0[0, 0])), color="k", ls="--", lw=0.8, label="initial")
    ax[0].set_title("learned learning-rate schedules")
    ax[1].set_title("learned momentum schedules")
    for x in ax[:2]:
        x.set_xlabel("training step t")
        x.legend()
    ax[2].plot(curve, "o-")
    ax[2].set_xlabel("meta-iteration")
    ax[2].set_ylabel("validation loss after T steps")
    ax[2].set_title("meta-Adam on exact hypergradients")
    fig.tight_layout()
    os.makedirs(FIG_DIR, exist_ok=True)
    fig.savefig(os.path.join(FIG_DIR, "reversible_schedules.png"), dpi=110)

    rows = [["before (alpha=0.1, gamma=0.9, 1/sqrt(fan_in) init)", f"{before[0]:.4f}", f"{before[1]:.4f}",
             f"{before[2]:.3f}", ", ".join(f"{math.exp(x):.3f}" for x in s0)],
            [f"after {args.meta_iters} meta-iterations", f"{after[0]:.4f}", f"{after[1]:.4f}", f"{after[2]:.3f}",
             ", ".join(f"{math.exp(float(x)):.3f}" for x in s.detach())]]
    text = write_table(
        os.path.join(FIG_DIR, "reversible_schedules.md"),
        f"Learned schedules and init scales, digits 64-50-50-10 MLP, T={args.T}",
        ["hyperparameters", "validation loss", "test loss", "test accuracy", "init scales (per layer)"],
        rows,
        "Per layer, mean learned alpha over steps: "
        + ", ".join(f"{float(torch.exp(a[l].detach()).mean()):.3f}" for l in range(nl))
        + "; mean learned gamma: " + ", ".join(f"{float(torch.sigmoid(b[l].detach()).mean()):.3f}" for l in range(nl))
        + f". {args.meta_iters} meta-iterations (T forward + T reverse steps each) took {wall:.0f} s."
        + f"\n\nMachine: {machine()}.",
    )
    print(text)


if __name__ == "__main__":
    main()
