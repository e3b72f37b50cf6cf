"""Penalty family benchmarks (docs/penalty.md): fastreg.penalty vs torch compositions.

Two parameter lists, built by hand (no torchvision):
  resnet18     the 62 parameter tensors of torchvision's resnet18 (11,689,512 weights)
  transformer  a small pre-LN transformer, d=128, 16 layers, separate q/k/v (260 tensors, ~3.7M)

Work (float32, grads exist, CPU; CUDA when present):
  L1+L2   grad += l1 sign(w) + 2 l2 w
  group   grad += group_lasso sqrt(|g|) w_g / ||w_g||, groups = rows (filters / output units)
  prox    w <- GS(soft(w, lr l1), lr gl sqrt(|g|)): sparse-group-lasso proximal step, rows

Providers: "autograd penalty" (the penalty added to a loss and back-propagated into .grad),
"python loop" (in-place ops per tensor), "torch._foreach" (foreach composition where torch
has the ops: L1+L2 and the elementwise half of prox), "fastreg" (which also returns the
penalty's value: the loop/foreach providers compute only the gradient, so the comparison
favours them; its launch tables are warm, as in training, where the list does not change),
"fastreg (cold tables)" (the tables built, and on a GPU uploaded, on every call), and
"copy (floor)": one flat copy moving the bytes the op must move (read w,
read grad, write grad = 12 bytes per weight; prox: read w, write w = 8).
"""

import math

import pytest
import torch

import fastreg.penalty as P
from _util import run
from fastreg.ops import penalty as _ops

L1, L2, GL, LR = 1e-5, 1e-4, 1e-3, 1e-4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def resnet18_shapes():
    s = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = cin if block == 0 else cout
            s += [(cout, c_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or c_in != cout):
                s += [(cout, c_in, 1, 1), (cout,), (cout,)]
        cin = cout
    s += [(1000, 512), (1000,)]
    return s


def transformer_shapes(d=128, layers=16, ff=512, vocab=4000, ctx=256):
    s = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        s += [(d,), (d,)]  # ln1
        s += [(d, d), (d,)] * 4  # q, k, v, o
        s += [(d,), (d,)]  # ln2
        s += [(ff, d), (ff,), (d, ff), (d,)]
    s += [(d,), (d,)]
    return s


LISTS = {"resnet18": resnet18_shapes, "transformer": transformer_shapes}


def test_shape_lists():
    r = resnet18_shapes()
    assert len(r) == 62 and sum(math.prod(x) for x in r) == 11_689_512
    assert len(transformer_shapes()) == 260


def _params(name, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    ps = [(torch.randn(s, generator=g) * 0.05).to(device).requires_grad_(True) for s in LISTS[name]()]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
    return ps


def _rows(p):
    return p.reshape(p.shape[0], -1) if p.dim() >= 1 else p.reshape(1, 1)


def _providers(kind, ps):
    grads = [p.grad for p in ps]
    ws = [p.detach() for p in ps]
    sq = [math.sqrt(_rows(w).shape[1]) for w in ws]

    if kind == "L1+L2":
        def autograd():
            loss = sum(L1 * p.abs().sum() + L2 * (p * p).sum() for p in ps)
            loss.backward()

        def loop():
            for w, g in zip(ws, grads):
                g.add_(w.sign(), alpha=L1).add_(w, alpha=2 * L2)

        def foreach():
            torch._foreach_add_(grads, torch._foreach_sign(ws), alpha=L1)
            torch._foreach_add_(grads, ws, alpha=2 * L2)

        def fr():
            return P.accumulate_(ps, l1=L1, l2=L2)

        def fr_cold():
            _ops.clear_cache()  # the launch tables built (and, on a GPU, uploaded) again
            return P.accumulate_(ps, l1=L1, l2=L2)

        return {"autograd penalty": autograd, "python loop": loop, "torch._foreach": foreach,
                "fastreg": fr, "fastreg (cold tables)": fr_cold}

    if kind == "group":
        def autograd():
            loss = sum(GL * s * torch.linalg.vector_norm(_rows(p), dim=1).sum() for p, s in zip(ps, sq))
            loss.backward()

        def loop():
            for w, g, s in zip(ws, grads, sq):
                w2 = _rows(w)
                n = torch.linalg.vector_norm(w2, dim=1, keepdim=True)
                scale = torch.where(n > 0, (GL * s) / n, 0.0)
                _rows(g).addcmul_(w2, scale)

        def fr():
            return P.accumulate_(ps, group_lasso=GL, groups="rows")

        def fr_cold():
            _ops.clear_cache()
            return P.accumulate_(ps, group_lasso=GL, groups="rows")

        return {"autograd penalty": autograd, "python loop": loop, "fastreg": fr,
                "fastreg (cold tables)": fr_cold}

    # prox: sparse group lasso on rows
    def loop():
        for w, s in zip(ws, sq):
            z = w.sign() * (w.abs() - LR * L1).clamp_(min=0)
            z2 = _rows(z)
            n = torch.linalg.vector_norm(z2, dim=1, keepdim=True)
            f = torch.where(n > 0, (1 - LR * GL * s / n).clamp_(min=0), 0.0)
            _rows(w).copy_(z2 * f)

    def foreach():
        z = torch._foreach_abs(ws)
        torch._foreach_sub_(z, LR * L1)
        torch._foreach_clamp_min_(z, 0.0)
        torch._foreach_mul_(z, torch._foreach_sign(ws))
        ns = [torch.linalg.vector_norm(_rows(t), dim=1, keepdim=True) for t in z]  # no foreach per-row norm
        for w, t, n, s in zip(ws, z, ns, sq):
            _rows(w).copy_(_rows(t) * torch.where(n > 0, (1 - LR * GL * s / n).clamp_(min=0), 0.0))

    def fr():
        P.prox_(ps, LR, l1=L1, group_lasso=GL, groups="rows")

    def fr_cold():
        _ops.clear_cache()
        P.prox_(ps, LR, l1=L1, group_lasso=GL, groups="rows")

    return {"python loop": loop, "torch._foreach": foreach, "fastreg": fr,
            "fastreg (cold tables)": fr_cold}


PROVIDERS = ["autograd penalty", "python loop", "torch._foreach", "fastreg",
             "fastreg (cold tables)", "copy (floor)"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plist", list(LISTS))
@pytest.mark.parametrize("kind", ["L1+L2", "group", "prox"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_penalty(benchmark, provider, kind, plist, device):
    ps = _params(plist, device)
    n = sum(p.numel() for p in ps)
    if provider == "copy (floor)":
        per = 2 if kind == "prox" else 3  # 4-byte words moved per weight
        src = torch.randn(n * per // 2, device=device)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        provs = _providers(kind, ps)
        if provider not in provs:
            pytest.skip(f"{provider} does not express {kind}")
        fn = provs[provider]
    big = n > 5_000_000
    run(benchmark, fn, device, provider=provider, group=f"penalty {kind} {plist} f32 {device}",
        rounds=15 if big else 30, warmup=2, numel=n, tensors=len(ps))


def interleaved(rounds=15, device="cpu"):
    """Round-robin timing of every provider (min and median over `rounds`): on a shared machine
    every provider then sees the same load. `python bench/bench_penalty.py [rounds]`."""
    import time

    rows = []
    for plist in LISTS:
        for kind in ("L1+L2", "group", "prox"):
            ps = _params(plist, device)
            n = sum(p.numel() for p in ps)
            provs = dict(_providers(kind, ps))
            src = torch.randn(n * (2 if kind == "prox" else 3) // 2, device=device)
            dst = torch.empty_like(src)
            provs["copy (floor)"] = lambda: dst.copy_(src)  # noqa: B023
            ts = {k: [] for k in provs}
            for f in provs.values():
                f()
            for _ in range(rounds):
                for k, f in provs.items():
                    t = time.perf_counter()
                    f()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ts[k].append(time.perf_counter() - t)
            rows.append((kind, plist, {k: (sorted(v)[len(v) // 2], min(v)) for k, v in ts.items()}))
    print("| work | list | " + " | ".join(PROVIDERS) + " |")
    print("| --- | --- |" + " ---: |" * len(PROVIDERS))
    for kind, plist, r in rows:
        cells = [f"{r[p][0] * 1e3:.1f} / {r[p][1] * 1e3:.1f}" if p in r else "—" for p in PROVIDERS]
        print(f"| {kind} | {plist} | " + " | ".join(cells) + " |")
    print()
    print("| work | list | best loop/foreach ÷ fastreg | autograd ÷ fastreg | fastreg ÷ floor |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, plist, r in rows:
        f = r["fastreg"]
        best = [r[p] for p in ("python loop", "torch._foreach") if p in r]
        b = f"{min(x[0] for x in best) / f[0]:.2f}x, {min(x[1] for x in best) / f[1]:.2f}x"
        a = r.get("autograd penalty")
        a = f"{a[0] / f[0]:.1f}x, {a[1] / f[1]:.1f}x" if a else "—"
        fl = r["copy (floor)"]
        print(f"| {kind} | {plist} | {b} | {a} | {f[0] / fl[0]:.2f}x, {f[1] / fl[1]:.2f}x |")


def _load_revision(rev):
    """fastreg.penalty as it was at git revision `rev`, on the current native build: its two
    Python files executed as private modules (their torch.library ops made plain functions, the
    op names being taken by the current ones). For before/after timings in one process."""
    import subprocess
    import sys
    import types

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()

    def source(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True, cwd=root).stdout

    class _Op:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *a, **k):
            return self.fn(*a, **k)

        def register_fake(self, f):
            return f

        def register_autograd(self, *a, **k):
            pass

    def plain_op(*a, **k):
        return _Op

    ops_old = types.ModuleType(f"penalty_ops_{rev}")
    ops_old.__dict__["_plain_op"] = plain_op
    exec(compile(source("fastreg/ops/penalty.py").replace("@torch.library.custom_op(", "@_plain_op("),
                 f"{rev}:fastreg/ops/penalty.py", "exec"), ops_old.__dict__)
    sys.modules[ops_old.__name__] = ops_old
    api = types.ModuleType(f"penalty_{rev}")
    text = source("fastreg/penalty.py")
    text = text.replace("from fastreg.ops import penalty as _ops", f"import {ops_old.__name__} as _ops")
    text = text.replace("from fastreg.ops.penalty import", f"from {ops_old.__name__} import")
    exec(compile(text, f"{rev}:fastreg/penalty.py", "exec"), api.__dict__)
    return api


def before_after(rev, rounds=31, device="cpu", clock="wall"):
    """accumulate_ (L1+L2, and rows group lasso) of revision `rev` against the current code and
    torch._foreach, round-robin in one process (medians and minima, ms).
    `python bench/bench_penalty.py --before REV [rounds] [thread]`. clock "thread": the calling
    thread's CPU time, which a loaded machine disturbs far less than wall time; run it with
    OMP_NUM_THREADS=1 and torch's threads at 1 so that all the work is on that thread."""
    import time

    timer = time.thread_time if clock == "thread" else time.perf_counter
    if clock == "thread":
        torch.set_num_threads(1)

    old = _load_revision(rev)
    print(f"| work | list | torch._foreach | fastreg at {rev} | fastreg now (warm) | now, cold tables "
          "| before ÷ now | foreach ÷ now |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    works = {"L1+L2": dict(l1=L1, l2=L2), "group rows": dict(group_lasso=GL, groups="rows")}
    for plist in LISTS:
        for work, kw in works.items():
            ps = _params(plist, device)
            grads = [p.grad for p in ps]
            ws = [p.detach() for p in ps]

            def foreach():
                torch._foreach_add_(grads, torch._foreach_sign(ws), alpha=L1)
                torch._foreach_add_(grads, ws, alpha=2 * L2)

            def cold(kw=kw):
                _ops.clear_cache()
                P.accumulate_(ps, **kw)

            provs = {"foreach": foreach if work == "L1+L2" else None,
                     "before": lambda kw=kw: old.accumulate_(ps, **kw),
                     "now": lambda kw=kw: P.accumulate_(ps, **kw), "cold": cold}
            provs = {k: f for k, f in provs.items() if f is not None}
            ts = {k: [] for k in provs}
            for f in provs.values():
                f()
                f()
            for _ in range(rounds):
                for k, f in provs.items():
                    t = timer()
                    f()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    ts[k].append(timer() - t)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
            mn = {k: min(v) * 1e3 for k, v in ts.items()}
            cell = lambda k: f"{med[k]:.3f} / {mn[k]:.3f}" if k in med else "—"  # noqa: E731
            fe = f"{med['foreach'] / med['now']:.2f}x" if "foreach" in med else "—"
            print(f"| {work} | {plist} | {cell('foreach')} | {cell('before')} | {cell('now')} | "
                  f"{cell('cold')} | {med['before'] / med['now']:.2f}x | {fe} |")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--before":
        before_after(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 31,
                     clock=sys.argv[4] if len(sys.argv) > 4 else "wall")
    else:
        interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
