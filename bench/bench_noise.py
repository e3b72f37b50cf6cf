"""Noise family benchmarks: fastreg vs the plain torch composition (eager and
torch.compile) and the copy floor, with bytes saved for backward per element.

Groups (float32, CPU; CUDA too when present, marked gpu):
  gaussian_dropout fwd / fwd+bwd           2^24 and 2^12   x * (1 + s * randn_like(x))
  multiplicative_noise fwd+bwd (per-       2^24 and 2^12   x * (1 + sigma * randn_like(x)),
    feature sigma, 1024 features)                           sigma (1024,) learned (requires
                                           (fixed: 2^24)     grad) or fixed
  input_noise fwd+bwd                      2^24            x + s * randn_like(x)
  locked_dropout fwd+bwd (dim 0 of T=64)   2^24            x * bernoulli mask (1, B, F) / (1-p)
  bias_act_dropout relu fwd+bwd            2^24            dropout(relu(x + b))
  dropconnect fwd+bwd (1024 x 1024 W,      2^20 weights    linear(x, W * bernoulli / (1-p), b)
    batch 256)
torch.compile is timed for Gaussian dropout and multiplicative noise (the targets)
and bias_act_dropout; each compile costs seconds, so the other groups leave it out.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastreg
from _util import run, saved_bytes_per_elem

P = 0.5
SIGMA = math.sqrt(P / (1 - P))
SIZES = {"2^24": 1 << 24, "2^12": 1 << 12}
FEAT = 1024
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _rounds(n, device):
    if device == "cuda":
        return 50
    return 7 if n >= 1 << 20 else 200


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def _gd_torch(x):
    return x * (1 + SIGMA * torch.randn_like(x))


def _mn_torch(x, s):
    return x * (1 + s * torch.randn_like(x))


# ---------------------------------------------------------------- Gaussian dropout
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fastreg", "torch eager", "torch.compile", "copy (floor)"])
def test_gaussian_dropout_fwd(benchmark, provider, size, device):
    n = SIZES[size]
    x = torch.randn(n, device=device)
    if provider == "copy (floor)":
        fn = x.clone
    elif provider == "fastreg":
        fn = lambda: fastreg.gaussian_dropout(x, P)  # noqa: E731
    else:
        f = _compiled(_gd_torch) if provider == "torch.compile" else _gd_torch
        fn = lambda: f(x)  # noqa: E731
    run(benchmark, fn, device, provider=provider,
        group=f"gaussian_dropout fwd {size} f32 {device}", rounds=_rounds(n, device), warmup=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fastreg", "torch eager", "torch.compile", "copy (floor)"])
def test_gaussian_dropout_fwd_bwd(benchmark, provider, size, device):
    n = SIZES[size]
    x = torch.randn(n, device=device, requires_grad=True)
    g = torch.randn(n, device=device)
    extra = {}
    if provider == "copy (floor)":
        def fn():  # forward writes one tensor, backward one
            x.detach().clone()
            g.clone()
    else:
        if provider == "fastreg":
            make = lambda: fastreg.gaussian_dropout(x, P)  # noqa: E731
        else:
            f = _compiled(_gd_torch) if provider == "torch.compile" else _gd_torch
            make = lambda: f(x)  # noqa: E731
        extra["saved_bytes_per_elem"] = saved_bytes_per_elem(make, n)

        def fn():
            torch.autograd.grad(make(), x, g)
    run(benchmark, fn, device, provider=provider,
        group=f"gaussian_dropout fwd+bwd {size} f32 {device}", rounds=_rounds(n, device),
        warmup=2, **extra)


# ------------------------------------------------------- multiplicative noise, per-feature sigma
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learned", [True, False], ids=["learned", "fixed"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fastreg", "torch eager", "torch.compile", "copy (floor)"])
def test_multiplicative_noise_fwd_bwd(benchmark, provider, size, learned, device):
    if not learned and size != "2^24":
        pytest.skip("the fixed-sigma variant is timed at 2^24 only")
    n = SIZES[size]
    x = torch.randn(n // FEAT, FEAT, device=device, requires_grad=True)
    s = torch.full((FEAT,), 0.3, device=device, requires_grad=learned)
    g = torch.randn(n // FEAT, FEAT, device=device)
    extra = {}
    if provider == "copy (floor)":
        def fn():  # reads x, writes y; backward reads g, x, writes grad_x
            x.detach().clone()
            g.clone()
    else:
        if provider == "fastreg":
            make = lambda: fastreg.multiplicative_noise(x, s)  # noqa: E731
        else:
            f = _compiled(_mn_torch) if provider == "torch.compile" else _mn_torch
            make = lambda: f(x, s)  # noqa: E731
        extra["saved_bytes_per_elem"] = saved_bytes_per_elem(make, n)

        inputs = (x, s) if learned else (x,)

        def fn():
            torch.autograd.grad(make(), inputs, g)
    kind = "learned" if learned else "fixed"
    run(benchmark, fn, device, provider=provider,
        group=f"multiplicative_noise {kind}-sigma fwd+bwd {size} f32 {device}",
        rounds=_rounds(n, device), warmup=2, **extra)


# ---------------------------------------------------------------- the other ops, 2^24 only
def _make_other(kind, provider, device):
    """(make() building the graph, inputs to differentiate, grad, numel)."""
    n = SIZES["2^24"]
    if kind == "input_noise":
        x = torch.randn(n, device=device, requires_grad=True)
        if provider == "fastreg":
            return (lambda: fastreg.input_noise(x, 0.1)), (x,), torch.randn(n, device=device), n
        return (lambda: x + 0.1 * torch.randn_like(x)), (x,), torch.randn(n, device=device), n
    if kind == "locked_dropout":
        T = 64
        x = torch.randn(T, n // T // FEAT, FEAT, device=device, requires_grad=True)
        g = torch.randn_like(x)
        if provider == "fastreg":
            return (lambda: fastreg.locked_dropout(x, P, dim=0)), (x,), g, n

        def comp():
            m = torch.empty((1,) + x.shape[1:], device=device).bernoulli_(1 - P) / (1 - P)
            return x * m
        return comp, (x,), g, n
    if kind == "bias_act_dropout relu":
        x = torch.randn(n // FEAT, FEAT, device=device, requires_grad=True)
        b = torch.randn(FEAT, device=device, requires_grad=True)
        g = torch.randn_like(x)
        if provider == "fastreg":
            return (lambda: fastreg.bias_act_dropout(x, b, activation="relu", p=P)), (x, b), g, n
        body = lambda u, v: F.dropout(F.relu(u + v), P)  # noqa: E731
        f = _compiled(body) if provider == "torch.compile" else body
        return (lambda: f(x, b)), (x, b), g, n
    # dropconnect: 2^20 weights
    x = torch.randn(256, 1024, device=device, requires_grad=True)
    w = torch.randn(1024, 1024, device=device, requires_grad=True)
    b = torch.randn(1024, device=device, requires_grad=True)
    g = torch.randn(256, 1024, device=device)
    if provider == "fastreg":
        return (lambda: fastreg.dropconnect_linear(x, w, b, P)), (x, w, b), g, w.numel()

    def comp():
        m = torch.empty_like(w).bernoulli_(1 - P)
        return F.linear(x, w * m / (1 - P), b)
    return comp, (x, w, b), g, w.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["input_noise", "locked_dropout", "bias_act_dropout relu",
                                  "dropconnect"])
@pytest.mark.parametrize("provider", ["fastreg", "torch eager", "torch.compile", "copy (floor)"])
def test_other_fwd_bwd(benchmark, provider, kind, device):
    if provider == "torch.compile" and kind != "bias_act_dropout relu":
        pytest.skip("torch.compile is timed for the target ops and bias_act_dropout only")
    if provider == "copy (floor)" and kind == "dropconnect":
        pytest.skip("a matmul has no copy floor")
    if provider == "copy (floor)":
        n = SIZES["2^24"]
        x = torch.randn(n, device=device)
        g = torch.randn(n, device=device)

        def fn():
            x.clone()
            g.clone()
        extra, size = {}, "2^24"
    else:
        make, inputs, g, n = _make_other(kind, provider, device)
        extra = {"saved_bytes_per_elem": saved_bytes_per_elem(make, n)}
        size = "2^20 weights" if kind == "dropconnect" else "2^24"

        def fn():
            torch.autograd.grad(make(), inputs, g)
    run(benchmark, fn, device, provider=provider, group=f"{kind} fwd+bwd {size} f32 {device}",
        rounds=_rounds(1 << 24, device), warmup=2, **extra)
