import numpy as np
import pytest
import torch

import fastreg
from fastreg.ops import bias_act as B
from fastreg.ops.dropout import dropout_multipliers_reference
from helpers import saved_bytes, views

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1,), (37,), (5, 33), (2, 3, 7), (70, 65), (3, 1)]
ACTS = [None, "relu", "gelu"]
# gelu: the reference and Numba evaluate erf in float64; Triton's float32 erf is off by
# up to ~4e-6 absolute for z < 0 (1 + erf(z) cancels), as torch's own float32 gelu is
GELU_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12),
            torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def _code(act):
    return B.ACTIVATIONS.index(act)


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(backend, dtype, gen):
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).to(dtype)
        b = torch.randn(shape[-1] * 2, generator=gen).to(dtype)[::2]  # a strided bias
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        p = float(torch.rand((), generator=gen)) * 0.9
        for act in ACTS:
            ref = B.bias_act_dropout_reference(x, b, seed, 6, _code(act), p)
            for name, xv in views(x):
                with fastreg.use_backend(backend):
                    out = fastreg.bias_act_dropout(xv, b, activation=act, p=p, seed=seed, stream=6)
                assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
                if act == "gelu":
                    rtol, atol = GELU_TOL[dtype]
                    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
                else:  # one rounding of the same float32/float64 arithmetic: bitwise
                    assert torch.equal(out, ref), (shape, act, name)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_mask_is_dropouts_and_semantics(backend, gen):
    x = torch.randn(9, 21, generator=gen, dtype=torch.float64)
    b = torch.randn(21, generator=gen, dtype=torch.float64)
    with fastreg.use_backend(backend):
        y = fastreg.bias_act_dropout(x, torch.zeros_like(b), activation=None, p=0.3, seed=5,
                                     stream=2)
        d = fastreg.dropout(x, 0.3, seed=5, stream=2)
        assert torch.equal(y, d)
        y = fastreg.bias_act_dropout(x, b, activation="gelu", p=0.3, seed=5, stream=2)
    keep = d != 0
    ref = torch.nn.functional.gelu(x + b) / 0.7
    torch.testing.assert_close(y[keep], ref[keep], rtol=1e-12, atol=1e-12)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))


@pytest.mark.parametrize("start", [0, 2**32 - 16, 2**40 + 8])
def test_kernels_high_indices(start, gen):
    import triton  # noqa: F401

    from fastreg.kernels.numba import bias_act as nb
    from fastreg.kernels.triton import bias_act as tk

    R, C = 7, 301
    x = torch.randn(R, C, generator=gen)
    b = torch.randn(C, generator=gen)
    t = B.keep_threshold(0.4)
    for act in (0, 1):
        ref = B.bias_act_dropout_reference(x, b, 31, 4, act, 0.4, start=start)
        out = np.empty(R * C, np.float32)
        nb.bias_act_fwd(x.view(-1).numpy(), b.numpy(), out, C, 31, 4, t, np.float32(1 / 0.6), act,
                        start)
        assert torch.equal(torch.from_numpy(out).view(R, C), ref)
        tout = torch.empty_like(x)
        tk.bias_act_fwd_kernel[tk.grid(R, C)](x, b, tout, torch.tensor(31), 4, t,
                                              B.dropout_scale_bits(0.4), start, R, C, ACT=act,
                                              COMPUTE_F64=False, BLOCK_R=tk.BLOCK_R,
                                              BLOCK_C=tk.BLOCK_C)
        assert torch.equal(tout, ref)


def _composition(x, b, act, seed, stream, p):
    m, _ = dropout_multipliers_reference(x.numel(), seed, stream, p, x.dtype, x.device)
    z = x + b
    a = {None: z, "relu": torch.relu(z), "gelu": torch.nn.functional.gelu(z)}[act]
    return a * m.reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_composition(backend, dtype, gen):
    for shape in ((5, 33), (2, 3, 70)):
        x32 = torch.randn(shape, generator=gen)
        b32 = torch.randn(shape[-1], generator=gen)
        g32 = torch.randn(shape, generator=gen)
        for act in ACTS:
            x = x32.to(dtype).requires_grad_()
            b = b32.to(dtype).requires_grad_()
            with fastreg.use_backend(backend):
                y = fastreg.bias_act_dropout(x, b, activation=act, p=0.25, seed=3)
                gx, gb = torch.autograd.grad(y, (x, b), g32.to(dtype))
            # the oracle: autograd through the float64 composition
            xr = x.detach().double().requires_grad_()
            br = b.detach().double().requires_grad_()
            yr = _composition(xr, br, act, 3, 0, 0.25)
            rgx, rgb = torch.autograd.grad(yr, (xr, br), g32.to(dtype).double())
            lo = dtype in (torch.float16, torch.bfloat16)
            tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2,
                   torch.bfloat16: 4e-2}[dtype]
            torch.testing.assert_close(gx.double(), rgx, rtol=tol, atol=tol)
            # the bias gradient sums up to 140 terms: relative to their magnitude
            scale = float(rgx.abs().reshape(-1, shape[-1]).sum(0).max())
            assert float((gb.double() - rgb).abs().max()) <= tol * max(scale, 1) * (4 if lo else 1)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_gradcheck_float64(backend, gen):
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    with fastreg.use_backend(backend):
        for act in ACTS:
            assert torch.autograd.gradcheck(
                lambda u, v: fastreg.bias_act_dropout(u, v, activation=act, p=0.4, seed=7), (x, b))
            # the registered op's autograd (what torch.compile uses), not the eager fast path
            assert torch.autograd.gradcheck(
                lambda u, v: torch.ops.fastreg.bias_act_dropout_fwd(u, v, torch.tensor(7), 0,
                                                                    _code(act), 0.4), (x, b))


def test_saved_bytes():
    x = torch.randn(256, 64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    n = x.numel()
    none = saved_bytes(lambda: fastreg.bias_act_dropout(x, b, activation=None, seed=1))
    relu = saved_bytes(lambda: fastreg.bias_act_dropout(x, b, activation="relu", seed=1))
    gelu = saved_bytes(lambda: fastreg.bias_act_dropout(x, b, activation="gelu", seed=1))
    assert none <= 64 * 4 + 8  # bias and seed
    assert relu == 4 * n + 64 * 4 + 8  # the output
    assert gelu == 4 * n + 64 * 4 + 8  # the input


def test_eval_extremes_and_empty(gen):
    x = torch.randn(4, 6, generator=gen)
    b = torch.randn(6, generator=gen)
    state = torch.get_rng_state()
    y = fastreg.bias_act_dropout(x, b, activation="relu", training=False)
    assert torch.equal(torch.get_rng_state(), state)  # eval draws no seed
    assert torch.equal(y, torch.relu(x + b))
    assert torch.equal(fastreg.bias_act_dropout(x, b, activation=None, p=0.0), x + b)
    assert torch.equal(fastreg.bias_act_dropout(x, b, p=1.0, seed=1), torch.zeros_like(x))
    for backend in ("numba", "triton", "torch"):
        with fastreg.use_backend(backend):
            e = torch.empty(0, 6, requires_grad=True)
            bb = b.clone().requires_grad_()
            out = fastreg.bias_act_dropout(e, bb, activation="gelu", seed=1)
            out.sum().backward()
        assert out.shape == (0, 6) and torch.equal(bb.grad, torch.zeros(6))


def test_nan_propagates(gen):
    x = torch.randn(2, 8, generator=gen)
    x[0, 1] = float("nan")
    b = torch.zeros(8)
    for backend in ("numba", "triton"):
        with fastreg.use_backend(backend):
            y = fastreg.bias_act_dropout(x, b, activation="relu", p=0.0)
        assert y[0, 1].isnan()


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
def test_opcheck(backend, gen):
    x = torch.randn(4, 9, generator=gen, requires_grad=True)
    b = torch.randn(9, generator=gen, requires_grad=True)
    seed = torch.tensor(11)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {"test_utils": utils} if backend == "triton" else {}
    with fastreg.use_backend(backend):
        for act in (0, 1, 2):
            torch.library.opcheck(torch.ops.fastreg.bias_act_dropout_fwd.default,
                                  (x, b, seed, 1, act, 0.3), **kw)
            torch.library.opcheck(torch.ops.fastreg.bias_act_dropout_bwd.default,
                                  (x.detach(), x.detach(), b.detach(), seed, 1, act, 0.3), **kw)
    if backend == "numba":
        torch.library.opcheck(torch.ops.fastreg.bias_act_dropout_fwd_cpu.default,
                              (x.detach(), b.detach(), seed, 1, 2, 0.3))
        torch.library.opcheck(torch.ops.fastreg.bias_act_dropout_bwd_cpu.default,
                              (x.detach(), x.detach(), b.detach(), seed, 1, 2, 0.3))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 12, bias=False)
    b = torch.randn(12, generator=gen, requires_grad=True)
    x = torch.randn(5, 8, generator=gen)

    def f(u):
        return fastreg.bias_act_dropout(lin(u), b, activation="gelu", p=0.2, seed=9).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    out.backward()
    g = b.grad.clone()
    b.grad = None
    ref = f(x)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, b.grad)


@pytest.mark.gpu
def test_gpu_opcheck_and_cpu_agreement():
    x = torch.randn(64, 33, device="cuda", requires_grad=True)
    b = torch.randn(33, device="cuda", requires_grad=True)
    seed = torch.tensor(5, device="cuda")
    for act in (0, 1, 2):
        torch.library.opcheck(torch.ops.fastreg.bias_act_dropout_fwd.default,
                              (x, b, seed, 0, act, 0.3))
        y = fastreg.bias_act_dropout(x, b, activation=B.ACTIVATIONS[act], p=0.3, seed=5)
        yc = fastreg.bias_act_dropout(x.detach().cpu(), b.detach().cpu(),
                                      activation=B.ACTIVATIONS[act], p=0.3, seed=5)
        torch.testing.assert_close(y.detach().cpu(), yc, rtol=1e-5, atol=1e-5)  # f32 erf on GPU


def test_bad_arguments():
    x = torch.randn(3, 4)
    b = torch.randn(4)
    with pytest.raises(ValueError, match="bias"):
        fastreg.bias_act_dropout(x, torch.randn(3))
    with pytest.raises(ValueError, match="bias"):
        fastreg.bias_act_dropout(x, torch.randn(1, 4))
    with pytest.raises(ValueError, match="bias"):
        fastreg.bias_act_dropout(x, b.double())
    with pytest.raises(TypeError, match="bias"):
        fastreg.bias_act_dropout(x, [0.0] * 4)
    with pytest.raises(TypeError, match="input"):
        fastreg.bias_act_dropout(torch.ones(3, 4, dtype=torch.int64), b)
    with pytest.raises(ValueError, match="input"):
        fastreg.bias_act_dropout(torch.tensor(1.0), torch.randn(1))
    with pytest.raises(ValueError, match="activation"):
        fastreg.bias_act_dropout(x, b, activation="tanh")
    with pytest.raises(ValueError, match="p"):
        fastreg.bias_act_dropout(x, b, p=2.0)
    with pytest.raises(TypeError, match="training"):
        fastreg.bias_act_dropout(x, b, training="yes")
    with pytest.raises(ValueError, match="seed"):
        fastreg.bias_act_dropout(x, b, seed=2**63)


def test_direct_ops_check_sizes():
    """torch.ops.fastreg.* called directly: a bias that is not (x.shape[-1],) (the kernels take
    bias.numel() as the row length) and, in backward, a saved tensor shorter than grad (read at
    grad's indices) are refused before the kernels run."""
    x, seed = torch.randn(4, 5), torch.tensor(3)
    for name in ("bias_act_dropout_fwd_cpu", "bias_act_dropout_fwd"):  # each op body checks
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: bias has shape \(3,\) "
                                             r"on cpu, needs \(5,\)"):
            op(x, torch.randn(3), seed, 0, 1, 0.5)
        with pytest.raises(ValueError, match=r"bias has shape \(0,\)"):
            op(x, torch.randn(0), seed, 0, 1, 0.5)
    for name in ("bias_act_dropout_bwd_cpu", "bias_act_dropout_bwd"):
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: saved has shape \(3,\) "
                                             r"on cpu, needs grad's shape \(4, 5\)"):
            op(x, torch.randn(3), torch.randn(5), seed, 0, 2, 0.5)
        with pytest.raises(ValueError, match=r"bias has shape \(7,\)"):
            op(x, x, torch.randn(7), seed, 0, 1, 0.5)
    # act 0 reads no saved tensor: any may be passed, as the op's docstring says
    gx, gb = torch.ops.fastreg.bias_act_dropout_bwd_cpu(x, torch.empty(0), torch.randn(5), seed,
                                                        0, 0, 0.5)
    assert gx.shape == x.shape and gb.shape == (5,)
