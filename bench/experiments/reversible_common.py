"""Shared pieces of the reversible-learning benchmarks and experiments (digits, an MLP,
the exact run, the unrolled-autograd baseline)."""

from __future__ import annotations

import os
import platform

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIG_DIR = os.path.join(ROOT, "docs", "figures")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def digits(dtype=torch.float64, seed=0):
    """scikit-learn's digits (1797 x 64), scaled to [0, 1], split 1000/397/400 (train/val/test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=dtype) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[:1000], y[:1000]), (X[1000:1397], y[1000:1397]), (X[1397:], y[1397:])


def mlp(sizes=(64, 50, 50, 10), dtype=torch.float64, seed=0, scale=None):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    m = torch.nn.Sequential(*layers).to(dtype)
    if scale is not None:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, scale)
    return m


def batch_index(t: int, n: int, bs: int) -> torch.Tensor:
    """The deterministic minibatch of step t (a fixed permutation walk)."""
    return (torch.arange(bs) + t * bs) % n


def train_loss(model, X, y, t, bs=100):
    idx = batch_index(t, X.shape[0], bs)
    return torch.nn.functional.cross_entropy(model(X[idx]), y[idx])


def unrolled_hypergrad(model, w0, X, y, Xv, yv, T, lr, mom, wd, bs=100):
    """float64 unrolled autograd through T steps (what `higher` and TorchOpt do).

    Returns (objective, graph-holding objective) so callers can measure memory before
    backward; lr/mom/wd are 1-D tensors (requires_grad for hypergradients)."""
    names = [n for n, _ in model.named_parameters()]
    ws = list(w0)
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(T):
        idx = batch_index(t, X.shape[0], bs)
        out = torch.func.functional_call(model, dict(zip(names, ws)), (X[idx],))
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        gs = torch.autograd.grad(loss, ws, create_graph=True)
        vs = [mom[t] * v - (1 - mom[t]) * (g + wd[t] * w) for v, g, w in zip(vs, gs, ws)]
        ws = [w + lr[t] * v for w, v in zip(ws, vs)]
    out = torch.func.functional_call(model, dict(zip(names, ws)), (Xv,))
    return torch.nn.functional.cross_entropy(out, yv)


def write_table(path: str, title: str, header: list[str], rows: list[list], notes: str = "") -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    text = "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
