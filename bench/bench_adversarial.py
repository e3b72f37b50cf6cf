"""Adversarial steps: fastreg.adversarial.fgsm / pgd_step vs the plain torch composition
eager and under torch.compile, and the copy floor.

Groups "fgsm <size> f32 <device>" and "pgd_step <size> f32 <device>". The copy floor
moves the bytes the op must: fgsm reads x and grad and writes out (3 tensors: a clone
of 1.5 n elements), pgd_step also reads x0 (4 tensors: a clone of 2 n elements).
No autograd: the steps are not differentiable.
"""

import pytest
import torch

from _util import run
from fastreg.adversarial import fgsm, pgd_step

EPS, STEP, LO, HI = 0.1, 0.025, 0.0, 1.0
SIZES = {"2^24": 1 << 24, "2^12": 1 << 12}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROVIDERS = ["fastreg", "torch eager", "torch.compile", "copy (floor)"]


def fgsm_torch(x, g):
    return (x + EPS * torch.sign(g)).clamp(LO, HI)


def pgd_torch(x, x0, g):
    v = x + STEP * torch.sign(g)
    return torch.minimum(torch.maximum(v, x0 - EPS), x0 + EPS).clamp(LO, HI)


def _rounds(n, device):
    return 50 if device == "cuda" else (10 if n >= 1 << 20 else 200)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fgsm(benchmark, provider, size, device):
    n = SIZES[size]
    x = torch.rand(n, device=device)
    g = torch.randn(n, device=device)
    if provider == "copy (floor)":
        fn = torch.empty(n * 3 // 2, device=device).clone
    elif provider == "fastreg":
        fn = lambda: fgsm(x, g, EPS, clamp=(LO, HI))  # noqa: E731
    else:
        f = fgsm_torch if provider == "torch eager" else _compiled(fgsm_torch)
        fn = lambda: f(x, g)  # noqa: E731
    run(benchmark, fn, device, provider=provider, group=f"fgsm {size} f32 {device}",
        rounds=_rounds(n, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pgd_step(benchmark, provider, size, device):
    n = SIZES[size]
    x0 = torch.rand(n, device=device)
    x = (x0 + 0.05 * torch.randn(n, device=device)).clamp(LO, HI)
    g = torch.randn(n, device=device)
    if provider == "copy (floor)":
        fn = torch.empty(n * 2, device=device).clone
    elif provider == "fastreg":
        fn = lambda: pgd_step(x, x0, g, STEP, EPS, clamp=(LO, HI))  # noqa: E731
    else:
        f = pgd_torch if provider == "torch eager" else _compiled(pgd_torch)
        fn = lambda: f(x, x0, g)  # noqa: E731
    run(benchmark, fn, device, provider=provider, group=f"pgd_step {size} f32 {device}",
        rounds=_rounds(n, device))
