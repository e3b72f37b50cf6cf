import numpy as np
import pytest
import torch

import fastreg
from fastreg.ops import locked as L
from fastreg.ops.dropout import dropout_multipliers_reference
from helpers import saved_bytes, views

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES_DIMS = [((5, 3, 7), 1), ((5, 3, 7), 0), ((5, 3, 7), -1), ((9,), 0), ((2, 4, 3, 5), 2),
               ((3, 700), 0), ((1, 3), 1), ((4, 1, 2), 1)]


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference_bitwise(backend, dtype, gen):
    for shape, dim in SHAPES_DIMS:
        x = torch.randn(shape, generator=gen).to(dtype)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        p = float(torch.rand((), generator=gen)) * 0.9
        ref = L.locked_dropout_reference(x, seed, 2, p, dim % x.dim())
        for name, xv in views(x):
            with fastreg.use_backend(backend):
                out = fastreg.locked_dropout(xv, p, dim=dim, seed=seed, stream=2)
            assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
            assert torch.equal(out, ref), (shape, dim, name)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_mask_shared_along_dim_and_equal_to_dropout_mask(backend):
    """Every slice along dim carries the dropout mask of the shape with dim removed."""
    O, D, I = 6, 5, 11
    x = torch.ones(O, D, I, dtype=torch.float64)
    with fastreg.use_backend(backend):
        y = fastreg.locked_dropout(x, 0.35, dim=1, seed=123, stream=4)
        m = fastreg.dropout(torch.ones(O, I, dtype=torch.float64), 0.35, seed=123, stream=4)
    for d in range(D):
        assert torch.equal(y[:, d, :], m)
    assert 0 < int((m == 0).sum()) < m.numel()


@pytest.mark.parametrize("start", [0, 2**32 - 12, 2**40 + 3])
def test_kernels_high_indices(start, gen):
    import triton  # noqa: F401  (the interpreter is set by conftest)

    from fastreg.kernels.numba import locked as nb
    from fastreg.kernels.triton import locked as tk

    O, D, I = 3, 4, 301
    x = torch.randn(O, D, I, generator=gen)
    ref = L.locked_dropout_reference(x, 99, 5, 0.3, 1, start=start)
    out = np.empty(x.numel(), np.float32)
    t = L.keep_threshold(0.3)
    nb.locked_fwd(x.view(-1).numpy(), out, O, D, I, 99, 5, t, np.float32(1 / 0.7), start)
    assert torch.equal(torch.from_numpy(out).view(O, D, I), ref)
    tout = torch.empty_like(x)
    tk.locked_fwd_kernel[tk.grid(x.numel())](x, tout, torch.tensor(99), 5, t, L.dropout_scale_bits(0.3),
                                            start, D * I, I, x.numel(), COMPUTE_F64=False,
                                            BLOCK=tk.BLOCK)
    assert torch.equal(tout, ref)


def test_long_rows_cross_task_boundaries(gen):
    """I longer than one Numba task (2048), unaligned to counters."""
    x = torch.randn(3, 2, 4099, generator=gen)
    out = fastreg.locked_dropout(x, 0.5, dim=1, seed=7)
    assert torch.equal(out, L.locked_dropout_reference(x, 7, 0, 0.5, 1))


def test_identity_and_extremes(gen):
    x = torch.randn(3, 4, generator=gen)
    assert fastreg.locked_dropout(x, 0.5, dim=0, training=False) is x
    assert fastreg.locked_dropout(x, 0.0, dim=0) is x
    e = torch.empty(0, 4)
    assert fastreg.locked_dropout(e, 0.5, dim=1) is e
    assert torch.equal(fastreg.locked_dropout(x, 1.0, dim=0, seed=1), torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_gradcheck_and_backward_is_same_mask(backend, gen):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    with fastreg.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a: fastreg.locked_dropout(a, 0.4, dim=1, seed=8), (x,))
        # the registered op's autograd (what torch.compile uses), not the eager fast path
        assert torch.autograd.gradcheck(
            lambda a: torch.ops.fastreg.locked_dropout(a, torch.tensor(8), 0, 0.4, 1), (x,))
        y = fastreg.locked_dropout(x, 0.4, dim=1, seed=8)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, L.locked_dropout_reference(g, 8, 0, 0.4, 1))


def test_saved_bytes():
    x = torch.randn(64, 8, 32, requires_grad=True)
    assert saved_bytes(lambda: fastreg.locked_dropout(x, 0.3, dim=1, seed=1)) <= 8  # the seed only
    w = torch.randn(48, 32, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    saved = saved_bytes(lambda: fastreg.dropconnect_linear(x, w, b, 0.3, seed=1))
    # x and W (the inputs, as nn.Linear saves them) and the seed: no mask, no masked W
    assert saved == x.numel() * 4 + w.numel() * 4 + 8


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
def test_opcheck(backend):
    x = torch.randn(3, 4, 5, requires_grad=True)
    seed = torch.tensor(3)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {"test_utils": utils} if backend == "triton" else {}
    with fastreg.use_backend(backend):
        for dim in (0, 2):
            torch.library.opcheck(torch.ops.fastreg.locked_dropout.default, (x, seed, 1, 0.3, dim),
                                  **kw)
        w = torch.randn(6, 5, requires_grad=True)
        b = torch.randn(6, requires_grad=True)
        torch.library.opcheck(torch.ops.fastreg.dropconnect_linear.default, (x, w, b, seed, 0, 0.3),
                              **kw)
        torch.library.opcheck(torch.ops.fastreg.dropconnect_linear.default,
                              (x, w, None, seed, 0, 0.3), **kw)
    if backend == "numba":
        torch.library.opcheck(torch.ops.fastreg.locked_dropout_cpu.default,
                              (x.detach(), seed, 1, 0.3, 1))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    x = torch.randn(4, 3, 6, generator=gen, requires_grad=True)
    lin = fastreg.nn.DropConnectLinear(6, 5, p=0.3, seed=4)
    lock = fastreg.nn.LockedDropout(0.25, dim=1, seed=2)

    def f(a):
        return lin(lock(a)).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    out.backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = lin.weight.grad = None
    ref = f(x)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, lin.weight.grad)


# ---------------------------------------------------------------- DropConnect
def _dc_reference(x, w, b, seed, stream, p):
    m, _ = dropout_multipliers_reference(w.numel(), seed, stream, p, w.dtype, w.device)
    return torch.nn.functional.linear(x, w * m.reshape(w.shape).to(w.dtype), b)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropconnect_matches_reference(backend, dtype, gen):
    x = torch.randn(2, 3, 7, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 7, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=dtype, requires_grad=True)
    with fastreg.use_backend(backend):
        y = fastreg.dropconnect_linear(x, w, b, 0.4, seed=17, stream=3)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
    yr = _dc_reference(x, w, b, 17, 3, 0.4)
    ref = torch.autograd.grad(yr, (x, w, b), g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)
    # dropped weights get exactly zero gradient
    m, keep = dropout_multipliers_reference(w.numel(), 17, 3, 0.4, dtype, "cpu")
    assert torch.equal(grads[1].reshape(-1)[~keep], torch.zeros(int((~keep).sum()), dtype=dtype))


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_dropconnect_gradcheck(backend):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with fastreg.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, c, d: fastreg.dropconnect_linear(a, c, d, 0.5, seed=6), (x, w, b))
        assert torch.autograd.gradcheck(
            lambda a, c: fastreg.dropconnect_linear(a, c, None, 0.5, seed=6), (x, w))


def test_dropconnect_module(gen):
    m = fastreg.nn.DropConnectLinear(7, 3, p=0.5, seed=11)
    x = torch.randn(4, 7, generator=gen)
    y = m(x)
    torch.testing.assert_close(y, _dc_reference(x, m.weight, m.bias, 11, 0, 0.5))
    m.eval()
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias))
    assert "p=0.5" in repr(m) and isinstance(m, torch.nn.Linear)
    m2 = fastreg.nn.DropConnectLinear(7, 3, bias=False)
    assert m2(x).shape == (4, 3)
    lm = fastreg.nn.LockedDropout(0.3, dim=0, seed=1)
    assert torch.equal(lm(x), fastreg.locked_dropout(x, 0.3, dim=0, seed=1))
    lm.eval()
    assert lm(x) is x and "dim=0" in repr(lm)


def test_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="dim"):
        fastreg.locked_dropout(x, 0.5, dim=2)
    with pytest.raises(ValueError, match="dim"):
        fastreg.locked_dropout(x, 0.5, dim=-3)
    with pytest.raises(TypeError, match="dim"):
        fastreg.locked_dropout(x, 0.5, dim=1.0)
    with pytest.raises(ValueError, match="dim"):
        fastreg.locked_dropout(torch.tensor(1.0), 0.5, dim=0)
    with pytest.raises(ValueError, match="p"):
        fastreg.locked_dropout(x, 1.5, dim=0)
    with pytest.raises(TypeError, match="input"):
        fastreg.locked_dropout(torch.ones(3, dtype=torch.int32), 0.5, dim=0)
    with pytest.raises(TypeError, match="training"):
        fastreg.locked_dropout(x, 0.5, dim=0, training=None)
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match="weight"):
        fastreg.dropconnect_linear(x, torch.randn(5, 4, 1))
    with pytest.raises(ValueError, match="input"):
        fastreg.dropconnect_linear(torch.randn(3, 5), w)
    with pytest.raises(ValueError, match="bias"):
        fastreg.dropconnect_linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="weight"):
        fastreg.dropconnect_linear(x, w.double())
    with pytest.raises(TypeError, match="weight"):
        fastreg.dropconnect_linear(x, [[1.0]])
    with pytest.raises(ValueError, match="p"):
        fastreg.dropconnect_linear(x, w, p=-0.1)
    with pytest.raises(TypeError, match="dim"):
        fastreg.nn.LockedDropout(0.5, dim="t")



def test_direct_op_checks_dim():
    """The op called directly: dim outside [0, ndim) is refused (a negative dim made the
    kernel's (O, D, I) view cover more than x: a silently wrong mask)."""
    x, seed = torch.randn(4, 5), torch.tensor(3)
    for op in (torch.ops.fastreg.locked_dropout_cpu, torch.ops.fastreg.locked_dropout):
        with pytest.raises(ValueError, match=r"locked_dropout_cpu: dim must be in \[0, 2\) for x "
                                             r"of shape \(4, 5\), got -1"):
            op(x, seed, 0, 0.5, -1)
        with pytest.raises(ValueError, match="got 2"):
            op(x, seed, 0, 0.5, 2)


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_cpu_agreement():
    x = torch.randn(8, 5, 33, device="cuda", requires_grad=True)
    seed = torch.tensor(5, device="cuda")
    torch.library.opcheck(torch.ops.fastreg.locked_dropout.default, (x, seed, 1, 0.3, 1))
    f = torch.compile(lambda t: fastreg.locked_dropout(t, 0.3, dim=1, seed=5), fullgraph=True)
    assert torch.equal(f(x), fastreg.locked_dropout(x, 0.3, dim=1, seed=5))
    for dtype in DTYPES:  # the same (seed, stream, shape) gives the same bits on CPU and GPU
        xc = torch.randn(6, 7, 301).to(dtype)
        a = fastreg.locked_dropout(xc, 0.4, dim=0, seed=9, stream=2)
        b = fastreg.locked_dropout(xc.cuda(), 0.4, dim=0, seed=9, stream=2).cpu()
        assert torch.equal(a, b)
    w = torch.randn(6, 33, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastreg.dropconnect_linear.default, (x, w, None, seed, 0, 0.3))
    y = fastreg.dropconnect_linear(x, w, None, 0.3, seed=4)
    yc = fastreg.dropconnect_linear(x.detach().cpu(), w.detach().cpu(), None, 0.3, seed=4)
    torch.testing.assert_close(y.detach().cpu(), yc, rtol=1e-4, atol=1e-4)
