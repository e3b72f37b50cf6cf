"""Exactness and cost of reversible SGD on digits.

  python bench/experiments/reversible_exactness.py [--T 1000] [--hidden 300]

(a) A 64-H-H-10 MLP (H=300: 112,810 parameters) trained T steps with ReversibleSGD for
    gamma in {0.5, 0.9, 0.98}, then reversed with hypergradients: is w_0 recovered bit
    for bit, and how big is the information buffer against T d log2(1/gamma)?
(b) For contrast, naive reversal of float32 / float64 momentum SGD (w -= a v, v = (v + (1-g) grad)/g)
    on a 64-50-50-10 MLP: the relative error of the recovered w_0 as T grows.
Writes docs/figures/reversible_exactness.png and docs/figures/reversible_exactness.md.
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


def exact_run(T, gamma, hidden, X, y, Xv, yv):
    model = mlp((64, hidden, hidden, 10), torch.float32, seed=1)
    d = sum(p.numel() for p in model.parameters())
    lr = torch.full((T,), 0.05, requires_grad=True)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=gamma)
    w0 = [p.detach().clone() for p in model.parameters()]
    t0 = time.perf_counter()
    for t in range(T):
        opt.zero_grad()
        train_loss(model, X, y, t).backward()
        opt.step()
    t_fwd = time.perf_counter() - t0
    bits = opt.buffer_bits()
    val = float(torch.nn.functional.cross_entropy(model(Xv), yv).detach())
    t0 = time.perf_counter()
    opt.reverse(lambda: torch.nn.functional.cross_entropy(model(Xv), yv),
                lambda t: train_loss(model, X, y, t))
    t_rev = time.perf_counter() - t0
    exact = all(torch.equal(a, p.detach()) for a, p in zip(w0, model.parameters()))
    gq = opt.quantized_momentum()
    ideal = T * d * math.log2(1 / gq)
    return dict(d=d, gamma=gamma, gamma_q=gq, exact=exact, used=bits["used_bits"], info=bits["info_bits"],
                alloc=bits["allocated_bits"], ideal=ideal, val=val, t_fwd=t_fwd, t_rev=t_rev,
                lr_grad_norm=float(lr.grad.norm()))


def naive_reversal_error(T, gamma, dtype, X, y, alpha=0.05):
    model = mlp((64, 50, 50, 10), dtype, seed=2)
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    w0 = [x.clone() for x in w]
    v = [torch.zeros_like(x) for x in w]
    Xd = X.to(dtype)

    def grad(ws, t):
        ws = [x.detach().requires_grad_() for x in ws]
        idx = (torch.arange(100) + 100 * t) % X.shape[0]
        out = torch.func.functional_call(model, dict(zip(names, ws)), (Xd[idx],))
        return torch.autograd.grad(torch.nn.functional.cross_entropy(out, y[idx]), ws)

    for t in range(T):
        g = grad(w, t)
        v = [gamma * a - (1 - gamma) * b for a, b in zip(v, g)]
        w = [a + alpha * b for a, b in zip(w, v)]
    for t in range(T - 1, -1, -1):
        w = [a - alpha * b for a, b in zip(w, v)]
        g = grad(w, t)
        v = [(a + (1 - gamma) * b) / gamma for a, b in zip(v, g)]
    num = torch.cat([(a - b).reshape(-1).double() for a, b in zip(w, w0)]).norm()
    den = torch.cat([b.reshape(-1).double() for b in w0]).norm()
    err = float(num / den)
    return err if math.isfinite(err) else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=300)
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.9, 0.98])
    args = ap.parse_args()
    (X, y), (Xv, yv), _ = digits(torch.float32)

    rows = []
    for gamma in args.gammas:
        r = exact_run(args.T, gamma, args.hidden, X, y, Xv, yv)
        print(r, flush=True)
        rows.append(r)

    Ts = [1, 3, 10, 30, 100, 300, 1000]
    naive = {dt: [naive_reversal_error(T, 0.9, dt, X, y) for T in Ts] for dt in (torch.float32, torch.float64)}
    print(naive, flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    gs = [r["gamma_q"] for r in rows]
    per = [r["info"] / (r["d"] * args.T) for r in rows]
    grid = torch.linspace(0.4, 0.995, 200)
    ax[0].plot(grid, torch.log2(1 / grid), "k-", label="log2(1/gamma) (information lost)")
    ax[0].plot(gs, per, "o", ms=8, label="measured: information held per step")
    ax[0].set_xlabel("momentum gamma")
    ax[0].set_ylabel("buffer bits per parameter per step")
    ax[0].set_title(f"buffer cost, d={rows[0]['d']:,}, T={args.T}")
    ax[0].legend()
    for dt, errs in naive.items():
        e = [min(x, 1e30) for x in errs]
        ax[1].loglog(Ts, [max(x, 1e-18) for x in e], "o-", label=f"naive {str(dt).split('.')[-1]} reversal")
    ax[1].axhline(1e-18, color="g", ls="--", label="ReversibleSGD: 0 (bit-exact)")
    ax[1].set_xlabel("steps T (gamma = 0.9)")
    ax[1].set_ylabel("relative error of recovered w_0")
    ax[1].set_title("naive reversal of float momentum SGD")
    ax[1].legend()
    fig.tight_layout()
    os.makedirs(FIG_DIR, exist_ok=True)
    fig.savefig(os.path.join(FIG_DIR, "reversible_exactness.png"), dpi=110)

    table = [[f"{r['gamma']} ({r['gamma_q']:.6f})", f"{r['d']:,}", args.T, "yes" if r["exact"] else "NO",
              f"{r['used'] / 8 / 2**20:.2f}", f"{r['ideal'] / 8 / 2**20:.2f}",
              f"{r['info'] / r['ideal']:.4f}",
              f"{r['used'] / (1.1 * r['ideal'] + 64 * r['d']):.3f}",
              f"{r['alloc'] / 8 / 2**20:.2f}", f"{r['t_fwd']:.1f}", f"{r['t_rev']:.1f}"] for r in rows]
    text = write_table(
        os.path.join(FIG_DIR, "reversible_exactness.md"),
        "Bitwise recovery and buffer size (digits MLP, float32 model)",
        ["gamma (quantized)", "params d", "T", "w_0 bit-exact", "buffer used MiB", "T d log2(1/gamma) MiB",
         "information held / ideal", "used / (1.1 ideal + 64 d)", "allocated MiB", "fwd s", "reverse s"],
        table,
        "Naive reversal of float momentum SGD (gamma=0.9, 64-50-50-10 MLP), relative error of w_0:\n\n"
        "| T | " + " | ".join(str(T) for T in Ts) + " |\n|---|" + "---|" * len(Ts) + "\n"
        + "\n".join(f"| {str(dt).split('.')[-1]} | " + " | ".join(f"{e:.2e}" for e in errs) + " |"
                    for dt, errs in naive.items())
        + f"\n\nMachine: {machine()}.",
    )
    print(text)


if __name__ == "__main__":
    main()
