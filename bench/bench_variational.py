"""Variational dropout's fused local-reparameterisation sample vs the torch composition.

    fastreg:  fastreg.ops.variational.vd_sample(mu, var)       (z regenerated in backward)
    torch:    mu + torch.sqrt(var + eps) * torch.randn_like(mu)  (eager and torch.compile)

Groups "vd_sample fwd <size> f32 <device>" and "vd_sample fwd+bwd ..." (gradients w.r.t.
mu and var), with bytes saved for backward per element. Copy floor: the forward moves
3 tensors (read mu, var; write out), forward+backward 6 (backward reads grad and var and
writes grad_var; grad_mu is grad itself): clones of 1.5 n and 3 n elements.
"""

import pytest
import torch

from _util import run, saved_bytes_per_elem
from fastreg.ops.variational import vd_sample

EPS = 1e-8
SIZES = {"2^24": 1 << 24, "2^12": 1 << 12}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROVIDERS = ["fastreg", "torch eager", "torch.compile", "copy (floor)"]


def vd_torch(mu, var):
    return mu + torch.sqrt(var + EPS) * torch.randn_like(mu)


def vd_fastreg(mu, var):
    return vd_sample(mu, var, eps=EPS)


def _rounds(n, device):
    return 50 if device == "cuda" else (10 if n >= 1 << 20 else 200)


def _fn(provider):
    if provider == "fastreg":
        return vd_fastreg
    if provider == "torch eager":
        return vd_torch
    torch._dynamo.reset()
    return torch.compile(vd_torch, fullgraph=True)


def _inputs(n, device, requires_grad):
    mu = torch.randn(n, device=device, requires_grad=requires_grad)
    var = torch.rand(n, device=device, requires_grad=requires_grad)
    return mu, var


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_vd_sample_fwd(benchmark, provider, size, device):
    n = SIZES[size]
    mu, var = _inputs(n, device, False)
    if provider == "copy (floor)":
        fn = torch.empty(n * 3 // 2, device=device).clone
    else:
        f = _fn(provider)
        fn = lambda: f(mu, var)  # noqa: E731
    run(benchmark, fn, device, provider=provider, group=f"vd_sample fwd {size} f32 {device}",
        rounds=_rounds(n, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_vd_sample_fwd_bwd(benchmark, provider, size, device):
    n = SIZES[size]
    mu, var = _inputs(n, device, True)
    g = torch.randn(n, device=device)
    extra = {}
    if provider == "copy (floor)":
        fn = torch.empty(n * 3, device=device).clone
    else:
        f = _fn(provider)
        extra["saved_bytes_per_elem"] = saved_bytes_per_elem(lambda: f(mu, var), n)

        def fn():
            torch.autograd.grad(f(mu, var), (mu, var), g)
    run(benchmark, fn, device, provider=provider, group=f"vd_sample fwd+bwd {size} f32 {device}",
        rounds=_rounds(n, device), **extra)
