"""Host cost per call: every public elementwise op at 2^12 float32, where the kernel is cheap
and the Python path (validation, seed, dispatch, autograd, argument conversion) decides.

Groups "host <op> fwd 2^12 f32 <device>" and "host <op> fwd+bwd 2^12 f32 <device>", providers:
  "fastreg"                      the public function, real kernels;
  "fastreg (kernel stubbed)"     the same call with the kernel launch replaced by a no-op
                                 (Numba entry points on CPU, the Triton launch on CUDA): what
                                 is left is the host path alone, on any machine;
  "torch eager"                  the same work composed of torch ops (as in the family suites).

Run as a script for an interleaved table (all providers in one process, rounds alternating,
medians) and, with --profile OP, a cProfile of one fastreg case:

    .venv/bin/python bench/bench_host.py [--rounds 15] [--only dropout] [--profile "dropout fwd+bwd"]

By default the script runs torch on one thread and times with the calling thread's CPU
clock (--clock thread): host cost is CPU work, and on a shared machine the wall clock also
counts the time other processes hold the core (it varied 3-10x between runs here). At 2^12
everything runs on the calling thread (Numba's serial drivers; torch with one thread), so
the thread clock sees all of it. --clock wall --threads 0 gives the plain wall-clock figures.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys

if __name__ == "__main__":  # the pytest conftest does the same for the suites
    sys.path.insert(0, os.path.dirname(__file__))
    if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastreg  # noqa: E402
from fastreg.adversarial import fgsm, pgd_step  # noqa: E402
from fastreg.ops.variational import vd_sample  # noqa: E402

N = 1 << 12
FEAT = 1024
P = 0.5
SIGMA = math.sqrt(P / (1 - P))
EPS, STEP, LO, HI = 0.1, 0.025, 0.0, 1.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROVIDERS = ["fastreg", "fastreg (kernel stubbed)", "torch eager"]

# The Numba entry points the ops call, by kernel module: the CPU stub replaces these.
NUMBA_KERNELS = {
    "dropout": ("dropout_fwd", "dropout_add_fwd", "dropout_fwd_bits", "dropout_bits_apply"),
    "noise": ("noise_fwd", "noise_bwd", "noise_fwd_at"),
    "locked": ("locked_fwd", "locked_fwd_at"),
    "bias_act": ("bias_act_fwd", "bias_act_bwd"),
    "variational": ("vd_sample_fwd", "vd_sample_grad_var"),
    "adversarial": ("fgsm", "pgd_step", "fgsm_at", "pgd_at"),
}


def _noop(*args, **kwargs):
    return None


_noop.serial = _noop.parallel = _noop  # the by_size drivers' two copies, which lean paths call


@contextlib.contextmanager
def stub_kernels(device: str):
    """Every kernel launch of the elementwise ops becomes a no-op (outputs stay uninitialised).
    CPU: the Numba entry points of fastreg.kernels.numba.*; CUDA: Triton's launch (JITFunction
    .run, plus fastreg's direct launcher when enabled)."""
    saved = []
    try:
        if device == "cpu":
            for mod_name, names in NUMBA_KERNELS.items():
                mod = importlib.import_module(f"fastreg.kernels.numba.{mod_name}")
                for name in names:
                    saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, _noop)
        else:
            from triton.runtime.jit import JITFunction

            saved.append((JITFunction, "run", JITFunction.run))
            JITFunction.run = lambda self, *a, **k: None
            launch = sys.modules.get("fastreg._launch")  # the direct launcher, where it exists
            if launch is not None and hasattr(launch, "_launch_compiled"):
                saved.append((launch, "_launch_compiled", launch._launch_compiled))
                launch._launch_compiled = _noop
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def lean_off():
    """The lean eager paths of the noise, locked and adversarial ops switched off: those calls
    take the autograd.Function fast path they took before (the "fastreg (lean off)" provider
    of --lean-off, a before/after within one process)."""
    mods = [importlib.import_module(f"fastreg.ops.{m}") for m in ("noise", "locked", "adversarial")]
    saved = [(m, m._lean_ok) for m in mods]
    try:
        for m in mods:
            m._lean_ok = lambda *a: False
        yield
    finally:
        for m, f in saved:
            m._lean_ok = f


def _ctx(provider: str, device: str):
    if "stubbed" in provider:
        return stub_kernels(device)
    if "lean off" in provider:
        return lean_off()
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the cases
def _grad(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def cases(device: str, N: int = N) -> dict:
    """name -> {provider: callable}: "<op> fwd" (inputs without grad) and "<op> fwd+bwd"
    (N elements: 2^12 by default, --n in script mode)."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=False, uniform=False):
        t = (torch.rand if uniform else torch.randn)(*shape, generator=gen).to(device)
        return t.requires_grad_(grad)

    x, xg, r, rg, g = rnd(N), rnd(N, grad=True), rnd(N), rnd(N, grad=True), rnd(N)
    x2, x2g, g2 = rnd(N // FEAT, FEAT), rnd(N // FEAT, FEAT, grad=True), rnd(N // FEAT, FEAT)
    b, bg = rnd(FEAT), rnd(FEAT, grad=True)
    s = torch.full((FEAT,), 0.3, device=device)
    sg = s.clone().requires_grad_(True)
    var, varg = rnd(N, uniform=True), rnd(N, uniform=True, grad=True)
    xu, x0u = rnd(N, uniform=True), rnd(N, uniform=True)

    def locked_torch(t):
        m = torch.empty((1,) + t.shape[1:], device=device).bernoulli_(1 - P) / (1 - P)
        return t * m

    c = {}

    def add(op, fr, te, fr_bwd=None, te_bwd=None):
        c[f"{op} fwd"] = {"fastreg": fr, "torch eager": te}
        if fr_bwd is not None:
            c[f"{op} fwd+bwd"] = {"fastreg": fr_bwd, "torch eager": te_bwd}

    add("dropout", lambda: fastreg.dropout(x, P), lambda: F.dropout(x, P),
        lambda: _grad(fastreg.dropout(xg, P), (xg,), g), lambda: _grad(F.dropout(xg, P), (xg,), g))
    add("dropout mask=bits", lambda: fastreg.dropout(x, P, mask="bits"), lambda: F.dropout(x, P),
        lambda: _grad(fastreg.dropout(xg, P, mask="bits"), (xg,), g),
        lambda: _grad(F.dropout(xg, P), (xg,), g))
    add("dropout_add", lambda: fastreg.dropout_add(x, r, P), lambda: r + F.dropout(x, P),
        lambda: _grad(fastreg.dropout_add(xg, rg, P), (xg, rg), g),
        lambda: _grad(rg + F.dropout(xg, P), (xg, rg), g))
    add("gaussian_dropout", lambda: fastreg.gaussian_dropout(x, P),
        lambda: x * (1 + SIGMA * torch.randn_like(x)),
        lambda: _grad(fastreg.gaussian_dropout(xg, P), (xg,), g),
        lambda: _grad(xg * (1 + SIGMA * torch.randn_like(xg)), (xg,), g))
    add("multiplicative_noise per-feature sigma", lambda: fastreg.multiplicative_noise(x2, s),
        lambda: x2 * (1 + s * torch.randn_like(x2)),
        lambda: _grad(fastreg.multiplicative_noise(x2g, sg), (x2g, sg), g2),
        lambda: _grad(x2g * (1 + sg * torch.randn_like(x2g)), (x2g, sg), g2))
    add("input_noise", lambda: fastreg.input_noise(x, 0.1),
        lambda: x + 0.1 * torch.randn_like(x),
        lambda: _grad(fastreg.input_noise(xg, 0.1), (xg,), g),
        lambda: _grad(xg + 0.1 * torch.randn_like(xg), (xg,), g))
    add("locked_dropout", lambda: fastreg.locked_dropout(x2, P, dim=0), lambda: locked_torch(x2),
        lambda: _grad(fastreg.locked_dropout(x2g, P, dim=0), (x2g,), g2),
        lambda: _grad(locked_torch(x2g), (x2g,), g2))
    add("bias_act_dropout relu", lambda: fastreg.bias_act_dropout(x2, b, p=P),
        lambda: F.dropout(F.relu(x2 + b), P),
        lambda: _grad(fastreg.bias_act_dropout(x2g, bg, p=P), (x2g, bg), g2),
        lambda: _grad(F.dropout(F.relu(x2g + bg), P), (x2g, bg), g2))
    add("vd_sample", lambda: vd_sample(x, var, eps=1e-8),
        lambda: x + torch.sqrt(var + 1e-8) * torch.randn_like(x),
        lambda: _grad(vd_sample(xg, varg, eps=1e-8), (xg, varg), g),
        lambda: _grad(xg + torch.sqrt(varg + 1e-8) * torch.randn_like(xg), (xg, varg), g))
    add("fgsm", lambda: fgsm(xu, g, EPS, clamp=(LO, HI)),
        lambda: (xu + EPS * torch.sign(g)).clamp(LO, HI))
    add("pgd_step", lambda: pgd_step(xu, x0u, g, STEP, EPS, clamp=(LO, HI)),
        lambda: torch.minimum(torch.maximum(xu + STEP * torch.sign(g), x0u - EPS),
                              x0u + EPS).clamp(LO, HI))
    for fns in c.values():
        fns["fastreg (kernel stubbed)"] = fns["fastreg"]  # run inside stub_kernels
    return c


# ---------------------------------------------------------------- pytest-benchmark
def _case_names():
    return list(cases("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _case_names())
@pytest.mark.parametrize("provider", PROVIDERS)
def test_host(benchmark, provider, case, device):
    from _util import run

    fn = cases(device)[case][provider]
    ctx = stub_kernels(device) if provider == "fastreg (kernel stubbed)" else contextlib.nullcontext()
    with ctx:
        run(benchmark, fn, device, provider=provider, group=f"host {case} 2^12 f32 {device}",
            rounds=300 if device == "cpu" else 200, warmup=20)


# ---------------------------------------------------------------- interleaved script
def _time_block(fn, calls: int, device: str, clock) -> float:
    from _util import sync

    sync(device)
    t0 = clock()
    for _ in range(calls):
        fn()
    sync(device)
    return (clock() - t0) / calls * 1e6


def interleaved(device: str = "cpu", rounds: int = 15, calls: int = 100, only: str | None = None,
                clock=None, n: int = N, providers=PROVIDERS):
    """{case: {provider: median us per call}}: every round times each provider of a case once,
    one after the other, so a load change hits all providers alike."""
    import statistics
    import time

    clock = clock or time.perf_counter
    table = {}
    for case, fns in cases(device, n).items():
        if only and only not in case:
            continue
        fns["fastreg (lean off)"] = fns["fastreg"]  # run inside lean_off
        times = {p: [] for p in providers}
        for p in providers:  # warm up (Numba compiles on first use)
            with _ctx(p, device):
                for _ in range(20):
                    fns[p]()
        for _ in range(rounds):
            for p in providers:
                with _ctx(p, device):
                    times[p].append(_time_block(fns[p], calls, device, clock))
        table[case] = {p: statistics.median(v) for p, v in times.items()}
    return table


def _main(argv):
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--only", default=None, help="substring of the case names to run")
    ap.add_argument("--profile", default=None, help="a case name: cProfile its fastreg call")
    ap.add_argument("--json", default=None, help="write the table to this file")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    ap.add_argument("--n", type=int, default=N, help="elements per input (default 2^12)")
    ap.add_argument("--lean-off", action="store_true",
                    help="add the provider 'fastreg (lean off)': the lean eager paths disabled")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.profile:
        import cProfile
        import pstats

        fn = cases(a.device)[a.profile]["fastreg"]
        for _ in range(50):
            fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000):
            fn()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
        return
    import time

    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    providers = PROVIDERS + (["fastreg (lean off)"] if a.lean_off else [])
    table = interleaved(a.device, a.rounds, a.calls, a.only, clock, a.n, providers)
    print(f"us per call, {a.clock} clock, torch threads {torch.get_num_threads()}")
    size = f"2^{a.n.bit_length() - 1}" if a.n & (a.n - 1) == 0 else str(a.n)
    print(f"{'case (' + size + ' f32, ' + a.device + ')':44s} {'fastreg':>9s} {'stubbed':>9s} "
          f"{'torch':>9s} {'fr/torch':>9s}" + (f" {'lean off':>9s}" if a.lean_off else ""))
    for case, row in table.items():
        fr, st, te = row["fastreg"], row["fastreg (kernel stubbed)"], row["torch eager"]
        print(f"{case:44s} {fr:9.1f} {st:9.1f} {te:9.1f} {fr / te:9.2f}"
              + (f" {row['fastreg (lean off)']:9.1f}" if a.lean_off else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    _main(sys.argv[1:])
