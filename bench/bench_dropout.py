"""Dropout family benchmarks: fastreg vs torch eager, torch.compile and the copy floor.

Groups: "dropout fwd", "dropout bwd", "dropout fwd+bwd", "dropout_add fwd+bwd", each at
2^24 and 2^12 float32 elements, on CPU, and on CUDA when present (marked gpu).
"""

import pytest
import torch
import torch.nn.functional as F

import fastreg
from fastreg import _alloc
from _util import run, saved_bytes_per_elem

P = 0.5
SIZES = {"2^24": 1 << 24, "2^12": 1 << 12}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _rounds(n, device):
    if device == "cuda":
        return 50
    return 10 if n >= 1 << 20 else 200


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def _providers(kind):
    """name -> (make(x, r) -> callable building the graph / doing the work)."""
    if kind == "dropout":
        return {
            "fastreg": lambda x, r: fastreg.dropout(x, P),
            "fastreg mask=bits": lambda x, r: fastreg.dropout(x, P, mask="bits"),
            "torch eager": lambda x, r: F.dropout(x, P),
        }
    return {
        "fastreg": lambda x, r: fastreg.dropout_add(x, r, P),
        "torch eager": lambda x, r: r + F.dropout(x, P),
    }


def _floor_copy(t):
    """The bandwidth floor: the bytes the op moves, into an output allocated the way
    fastreg allocates its own (huge-page advice for large CPU outputs, fastreg._alloc)."""
    if t.device.type == "cpu":
        return _alloc.empty(t.shape, t.dtype).copy_(t)
    return t.clone()


def _setup(size, device, requires_grad):
    n = SIZES[size]
    x = torch.randn(n, device=device, requires_grad=requires_grad)
    r = torch.randn(n, device=device, requires_grad=requires_grad)
    g = torch.randn(n, device=device)
    return n, x, r, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fastreg", "fastreg mask=bits", "torch eager",
                                      "torch.compile", "copy (floor)"])
def test_dropout_fwd(benchmark, provider, size, device):
    n, x, r, _ = _setup(size, device, False)
    if provider == "copy (floor)":
        fn = lambda: _floor_copy(x)  # noqa: E731
    elif provider == "torch.compile":
        f = _compiled(lambda t: F.dropout(t, P))
        fn = lambda: f(x)  # noqa: E731
    else:
        make = _providers("dropout")[provider]
        fn = lambda: make(x, r)  # noqa: E731
    run(benchmark, fn, device, provider=provider, group=f"dropout fwd {size} f32 {device}",
        rounds=_rounds(n, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fastreg", "fastreg mask=bits", "torch eager", "copy (floor)"])
def test_dropout_bwd(benchmark, provider, size, device):
    n, x, r, g = _setup(size, device, True)
    if provider == "copy (floor)":
        fn = lambda: _floor_copy(g)  # noqa: E731
    else:
        out = _providers("dropout")[provider](x, r)
        fn = lambda: torch.autograd.grad(out, x, g, retain_graph=True)  # noqa: E731
    run(benchmark, fn, device, provider=provider, group=f"dropout bwd {size} f32 {device}",
        rounds=_rounds(n, device))


@pytest.mark.parametrize("kind", ["dropout", "dropout_add"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fastreg", "fastreg mask=bits", "torch eager",
                                      "torch.compile", "copy (floor)"])
def test_fwd_bwd(benchmark, provider, size, device, kind):
    if kind == "dropout_add" and provider == "fastreg mask=bits":
        pytest.skip("dropout_add has one mask mode")
    n, x, r, g = _setup(size, device, True)
    saved = None
    if provider == "copy (floor)":
        def fn():  # forward writes one tensor, backward one
            _floor_copy(x.detach())
            _floor_copy(g)
    else:
        if provider == "torch.compile":
            body = (lambda a, b: F.dropout(a, P)) if kind == "dropout" else (
                lambda a, b: b + F.dropout(a, P))
            make = _compiled(body)
        else:
            make = _providers(kind)[provider]
        saved = saved_bytes_per_elem(lambda: make(x, r), n)
        inputs = (x,) if kind == "dropout" else (x, r)

        def fn():
            torch.autograd.grad(make(x, r), inputs, g)
    extra = {} if saved is None else {"saved_bytes_per_elem": saved}
    run(benchmark, fn, device, provider=provider, group=f"{kind} fwd+bwd {size} f32 {device}",
        rounds=_rounds(n, device), **extra)
