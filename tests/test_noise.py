import math
import re

import numpy as np
import pytest
import torch

import fastreg
from fastreg.ops import noise as N
from fastreg.ops import rng
from helpers import (Wrapper, assert_each_launches_its_kernel, assert_layout_like, record_launches,
                     saved_bytes, views)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# per-dtype tolerances: eps is float32 on every backend and agrees to a few ulp
# (Numba's vectorised Box-Muller, Triton's and torch's libm), the rest is one rounding.
TOL = {torch.float32: (2e-6, 2e-6), torch.float64: (2e-6, 2e-6), torch.float16: (1e-3, 1e-3),
       torch.bfloat16: (8e-3, 8e-3)}
# (input shape, sigma shape or None for a python float)
CASES = [((257,), None), ((7, 5), ()), ((2, 3, 13), (3, 1)), ((4, 6, 3, 5), (6, 1, 1)),
         ((3, 11), (11,)), ((5, 2, 7), (5, 2, 7)), ((2, 9, 4), (1, 9, 1))]


def _sigma(shape, gen, dtype=torch.float32):
    if shape is None:
        return 0.37
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.8 + 0.05).to(dtype)


def _sig_t(sigma, device="cpu"):
    return sigma if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=torch.float64)


# ---------------------------------------------------------------- the noise itself
def test_uniform_eps_bit_identical_to_spec_words():
    """Numba's unrolled Philox + uniform conversion give the spec's words exactly."""
    from fastreg.kernels.numba import noise as nb

    for start in (0, 2**32 - 8, 2**40 + 4):
        out = np.empty(4099, dtype=np.float32)
        nb.eps_fill(out, 0x123456789ABCDEF, 2**33 + 5, nb.DIST_UNIFORM, start)
        u = rng.uniforms(4099, 0x123456789ABCDEF, 2**33 + 5, start=start, backend="torch")
        ref = torch.tensor(N.SQRT3_F32, dtype=torch.float32) * (2.0 * u - 1.0)
        assert torch.equal(torch.from_numpy(out), ref), start


@pytest.mark.parametrize("start", [0, 2**31 - 4, 2**32 + 4, 2**40])
def test_gaussian_eps_agrees_with_spec_normals(start):
    """The vectorised Box-Muller agrees with the spec's libm normals to a few ulp."""
    from fastreg.kernels.numba import noise as nb

    n = 1 << 15
    out = np.empty(n, dtype=np.float32)
    nb.eps_fill(out, 987654321, 3, nb.DIST_GAUSSIAN, start)
    ref = rng.normals(n, 987654321, 3, start=start, backend="torch")
    got = torch.from_numpy(out)
    torch.testing.assert_close(got, ref, rtol=4e-6, atol=4e-6)


def test_gaussian_eps_tails_and_extremes():
    """u near 0 and 1 (the log's extremes) and every quadrant of the angle."""
    from fastreg.kernels.numba import noise as nb

    n = 1 << 20
    out = np.empty(n, dtype=np.float32)
    nb.eps_fill(out, 5, 0, nb.DIST_GAUSSIAN, 0)
    ref = rng.normals(n, 5, 0, backend="torch")
    got = torch.from_numpy(out)
    err = (got - ref).abs() / ref.abs().clamp_min(1.0)
    assert float(err.max()) < 4e-6
    assert float(got.abs().max()) > 4.5  # the tail is reached and still right
    assert abs(float(got.mean())) < 5e-3 and abs(float(got.std()) - 1) < 5e-3


@pytest.mark.parametrize("start", [0, 2**32 - 1024, 2**40])
@pytest.mark.parametrize("dist", [0, 1])
def test_kernels_high_indices(start, dist, gen):
    """64-bit indexing: both kernels at logical indices past 2^32 (additive, x = 0, sigma = 1)."""
    import triton  # noqa: F401  (the interpreter is set by conftest)

    from fastreg.kernels.numba import noise as nb
    from fastreg.kernels.triton import noise as tk

    n = 1031
    idx = torch.arange(n, dtype=torch.int64) + start
    if dist == 0:
        ref = rng.normals_reference(idx, 42, 9)
    else:
        u = rng.uniform_from_words_reference(rng.words_reference(idx, 42, 9))
        ref = torch.tensor(N.SQRT3_F32, dtype=torch.float32) * (2.0 * u - 1.0)
    x = torch.randn(n, generator=gen)
    sizes = np.array([n], np.int64)
    sstr = np.array([0], np.int64)
    out = np.empty(n, np.float32)
    nb.noise_fwd(x.numpy(), np.ones(1, np.float32), out, sizes, sstr, 42, 9, dist, True,
                 np.float32(1), start, 2)
    torch.testing.assert_close(torch.from_numpy(out), x + ref, rtol=4e-6, atol=4e-6)
    tout = torch.empty(n)
    tk.noise_fwd_kernel[tk.grid(n)](x, torch.ones(1), tout, torch.tensor([n]), torch.tensor([0]),
                                    torch.tensor(42), 9, start, n, NDIM=1, SCALAR=True, DIST=dist,
                                    ADDITIVE=True, COMPUTE_F64=False, BLOCK=tk.BLOCK)
    torch.testing.assert_close(tout, x + ref, rtol=4e-6, atol=4e-6)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(backend, dtype, gen):
    rtol, atol = TOL[dtype]
    for shape, sshape in CASES:
        x = torch.randn(shape, generator=gen).to(dtype)
        sigma = _sigma(sshape, gen)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        for dist in ("gaussian", "uniform"):
            d = N.DISTS.index(dist)
            ref_m = N.noise_reference(x, _sig_t(sigma), seed, 4, d, False)
            ref_a = N.noise_reference(x, _sig_t(sigma), seed, 4, d, True)
            for name, xv in views(x):
                with fastreg.use_backend(backend):
                    m = fastreg.multiplicative_noise(xv, sigma, dist=dist, seed=seed, stream=4)
                    a = fastreg.input_noise(xv, sigma, dist=dist, seed=seed, stream=4)
                assert m.dtype == dtype and m.shape == x.shape
                # laid out as torch.empty_like(xv) (docs/layout.md), values as contiguous
                assert_layout_like(m, xv)
                assert_layout_like(a, xv)
                torch.testing.assert_close(m, ref_m, rtol=rtol, atol=atol, msg=f"{shape} {name}")
                torch.testing.assert_close(a, ref_a, rtol=rtol, atol=atol, msg=f"{shape} {name}")


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_gaussian_dropout_semantics(backend, gen):
    x = torch.randn(3, 1001, generator=gen, dtype=torch.float64)
    p = 0.3
    with fastreg.use_backend(backend):
        y = fastreg.gaussian_dropout(x, p, seed=11, stream=2)
    idx = torch.arange(x.numel())
    eps = rng.normals_reference(idx, 11, 2).double().reshape(x.shape)
    torch.testing.assert_close(y, x * (1 + math.sqrt(p / (1 - p)) * eps), rtol=2e-6, atol=2e-6)


def test_gaussian_dropout_statistics():
    x = torch.ones(1 << 20)
    for p in (0.1, 0.5, 0.8):
        y = fastreg.gaussian_dropout(x, p, seed=3)
        assert abs(float(y.mean()) - 1) < 5e-3 * math.sqrt(p / (1 - p)) * 3
        assert abs(float(y.var()) / (p / (1 - p)) - 1) < 1e-2


def test_uniform_noise_statistics():
    x = torch.ones(1 << 20)
    y = fastreg.multiplicative_noise(x, 0.5, dist="uniform", seed=8)
    eps = (y - 1) / 0.5
    assert float(eps.abs().max()) < math.sqrt(3)
    assert float(eps.abs().max()) > math.sqrt(3) - 1e-3
    assert abs(float(eps.mean())) < 5e-3 and abs(float(eps.var()) - 1) < 1e-2


def test_nan_inf_survive(gen):
    x = torch.randn(64, generator=gen)
    x[3], x[10], x[20] = float("nan"), float("inf"), -float("inf")
    for backend in ("numba", "triton"):
        with fastreg.use_backend(backend):
            y = fastreg.multiplicative_noise(x, 0.2, seed=1)
            z = fastreg.input_noise(x, 0.2, seed=1)
        ref = N.noise_reference(x, _sig_t(0.2), 1, 0, 0, False)
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
        assert y[3].isnan() and z[3].isnan() and z[10] == float("inf") and z[20] == -float("inf")


def test_seed_stream_and_reproducibility():
    x = torch.randn(100)
    a = fastreg.gaussian_dropout(x, 0.5, seed=1)
    assert torch.equal(a, fastreg.gaussian_dropout(x, 0.5, seed=1))
    assert not torch.equal(a, fastreg.gaussian_dropout(x, 0.5, seed=2))
    assert not torch.equal(a, fastreg.gaussian_dropout(x, 0.5, seed=1, stream=1))
    torch.manual_seed(0)
    b = fastreg.gaussian_dropout(x, 0.5)
    c = fastreg.gaussian_dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(b, fastreg.gaussian_dropout(x, 0.5)) and not torch.equal(b, c)


def test_identity_cases():
    x = torch.randn(10)
    assert fastreg.gaussian_dropout(x, 0.5, training=False) is x
    assert fastreg.gaussian_dropout(x, 0.0) is x
    e = torch.empty(0, 3)
    assert fastreg.gaussian_dropout(e, 0.5) is e
    assert torch.equal(fastreg.multiplicative_noise(x, 0.0, seed=1), x)
    assert torch.equal(fastreg.input_noise(x, 0.0, seed=1), x)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_empty_with_learned_sigma(backend):
    x = torch.empty(0, 4, requires_grad=True)
    s = torch.full((4,), 0.3, requires_grad=True)
    with fastreg.use_backend(backend):
        y = fastreg.multiplicative_noise(x, s, seed=1)
        y.sum().backward()
    assert y.shape == (0, 4) and torch.equal(s.grad, torch.zeros(4)) and x.grad.shape == (0, 4)


def test_env_forcing(monkeypatch, gen):
    x = torch.randn(33, generator=gen)
    monkeypatch.setenv("FASTREG_BACKEND", "torch")
    y = fastreg.gaussian_dropout(x, 0.4, seed=5)
    assert torch.equal(y, N.noise_reference(x, _sig_t(math.sqrt(0.4 / 0.6)), 5, 0, 0, False))
    monkeypatch.setenv("FASTREG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not implemented"):
        fastreg.gaussian_dropout(x, 0.4, seed=5)


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(backend, dtype, gen):
    rtol, atol = TOL[dtype]
    for shape, sshape in CASES[1:]:
        x = torch.randn(shape, generator=gen).to(dtype)
        sigma = _sigma(sshape, gen, dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        for d in (0, 1):
            for additive in (False, True):
                rgx, rgs = N.noise_bwd_reference(g, x, sigma, 77, 1, d, additive, not additive,
                                                 True)
                for name, gv in views(g):
                    with fastreg.use_backend(backend):
                        gx, gs = torch.ops.fastreg.noise_bwd(gv, x, sigma, torch.tensor(77), 1, d,
                                                             additive, not additive, True)
                    if not additive:
                        torch.testing.assert_close(gx, rgx, rtol=rtol, atol=atol)
                    # the reduction adds up to ~100 terms: a few roundings of the sum
                    torch.testing.assert_close(gs, rgs, rtol=max(rtol, 1e-5) * 4,
                                               atol=max(atol, 1e-5) * 4, msg=f"{shape} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_backward_bit_identical_to_reference(dtype, gen):
    """With the uniform eps (the same float32 words on every backend) the Numba backward is the
    reference's arithmetic exactly: grad_x and grad_sigma bit for bit, every dtype, per-element,
    reduced and scalar sigma (float64 sums to their last bits: another summation order).
    The reduced grad_sigma sums 2112 float32 products in float64 (a float32 sum, or the product
    rounded to the input dtype, differs in the last bits)."""
    for shape, sshape in [((5, 2, 7), (5, 2, 7)), ((64, 9, 33), (1, 9, 1)), ((7, 5), ()),
                          ((3, 11), (11,))]:
        x = (torch.randn(shape, generator=gen) * 3).to(dtype)
        s = _sigma(sshape, gen, dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        for additive in (False, True):
            want = N.noise_bwd_reference(g, x, s, 77, 1, 1, additive, not additive, True)
            with fastreg.use_backend("numba"):
                got = torch.ops.fastreg.noise_bwd(g, x, s, torch.tensor(77), 1, 1, additive,
                                                  not additive, True)
            assert torch.equal(got[0], want[0]), (dtype, shape, sshape, additive)
            if dtype == torch.float64 and s.numel() != x.numel():
                # float64 terms summed in another order: the last bits of a 2112-term sum
                torch.testing.assert_close(got[1], want[1], rtol=1e-13, atol=1e-11)
            else:
                assert torch.equal(got[1], want[1]), (dtype, shape, sshape, additive)
    if dtype == torch.float32:  # and the reference's own float64 accumulation, by hand
        x, g = torch.randn(64, 9, 33, generator=gen), torch.randn(64, 9, 33, generator=gen)
        s = torch.full((1, 9, 1), 0.3)
        e = N.eps_reference(x.numel(), 77, 1, 1, "cpu").reshape(x.shape)
        hand = (g * x * e).double().sum((0, 2), keepdim=True).float()
        assert torch.equal(N.noise_bwd_reference(g, x, s, 77, 1, 1, False, False, True)[1], hand)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_backward_unrequested_outputs_are_empty(backend, gen):
    """noise_bwd's contract: an output not asked for is an empty tensor (what the fake kernel
    promises torch.compile), on every backend."""
    x = torch.randn(4, 6, generator=gen)
    s = torch.full((6,), 0.2)
    with fastreg.use_backend(backend):
        for additive, need_gx, need_gs in ((False, True, False), (False, False, True),
                                           (True, False, True), (True, False, False)):
            gx, gs = torch.ops.fastreg.noise_bwd(x, x, s, torch.tensor(3), 0, 0, additive,
                                                 need_gx, need_gs)
            assert gx.shape == ((4, 6) if need_gx else (0,)), (additive, need_gx, need_gs)
            assert gs.shape == ((6,) if need_gs else (0,)), (additive, need_gx, need_gs)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
@pytest.mark.parametrize("case", [(3, 4), (2, 3, 2), (2, 3)])
def test_gradcheck_float64(backend, case):
    sshape = {(3, 4): (), (2, 3, 2): (3, 1), (2, 3): (2, 3)}[case]
    x = torch.randn(case, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(sshape, dtype=torch.float64) + 0.1).requires_grad_()
    # the interpreter is slow: Triton checks each (dist, form) once, on alternating cases
    combos = [("gaussian", False), ("uniform", True), ("uniform", False), ("gaussian", True)]
    if backend == "triton":
        i = [(3, 4), (2, 3, 2), (2, 3)].index(case)
        combos = combos[i:i + 2]
    seed = torch.tensor(12)
    with fastreg.use_backend(backend):
        for dist, add in combos:
            f = fastreg.input_noise if add else fastreg.multiplicative_noise
            assert torch.autograd.gradcheck(lambda a, b: f(a, b, dist=dist, seed=12), (x, s))
            # the registered op's autograd (what torch.compile uses), not the eager fast path
            d = N.DISTS.index(dist)
            assert torch.autograd.gradcheck(
                lambda a, b: torch.ops.fastreg.noise_fwd(a, b, seed, 3, d, add), (x, s))
        assert torch.autograd.gradcheck(lambda a: fastreg.gaussian_dropout(a, 0.3, seed=4), (x,))


def test_learned_sigma_gradient_matches_composition(gen):
    """d/d sigma of sum(w * y) equals the explicit composition's, reduced per channel."""
    x = torch.randn(8, 4, 5, 5, generator=gen)
    w = torch.randn(8, 4, 5, 5, generator=gen)
    s = torch.full((4, 1, 1), 0.25, requires_grad=True)
    (fastreg.multiplicative_noise(x, s, seed=21) * w).sum().backward()
    eps = rng.normals_reference(torch.arange(x.numel()), 21, 0).reshape(x.shape)
    s2 = s.detach().clone().requires_grad_()
    (x * (1 + s2 * eps) * w).sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-5)


def _saved_bytes(fn, numel):
    return saved_bytes(fn) / numel


def test_saved_bytes_per_element():
    n = 1 << 16
    x = torch.randn(n, requires_grad=True)
    assert _saved_bytes(lambda: fastreg.gaussian_dropout(x, 0.5, seed=1), n) < 0.01
    assert _saved_bytes(lambda: fastreg.multiplicative_noise(x, 0.2, seed=1), n) < 0.01
    s = torch.tensor(0.2, requires_grad=True)
    assert _saved_bytes(lambda: fastreg.input_noise(x, s, seed=1), n) < 0.01
    # a learned multiplicative sigma needs x (d y / d sigma = x eps): exactly the input
    saved = _saved_bytes(lambda: fastreg.multiplicative_noise(x, s, seed=1), n)
    assert saved == pytest.approx(4, abs=0.01)


# ---------------------------------------------------------------- registration
@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
def test_opcheck(backend):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(5, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(5)
    # The interpreter cannot run kernels on fake tensors, so the compiled (aot_dispatch)
    # checks of the Triton path need a GPU: test_gpu_opcheck_compile_and_cpu_agreement runs them.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {"test_utils": utils} if backend == "triton" else {}
    with fastreg.use_backend(backend):
        for d, add in ((0, False), (1, True)):
            torch.library.opcheck(torch.ops.fastreg.noise_fwd.default, (x, s, seed, 2, d, add),
                                  **kw)
            torch.library.opcheck(torch.ops.fastreg.noise_bwd.default,
                                  (x.detach(), x.detach(), s.detach(), seed, 2, d, add,
                                   not add, True), **kw)
        torch.library.opcheck(torch.ops.fastreg.noise_fwd.default,
                              (torch.randn(4, 3), torch.tensor(0.5), seed, 0, 0, False), **kw)
        # grad_x alone: grad_sigma comes back empty, in the fake kernel too
        torch.library.opcheck(torch.ops.fastreg.noise_bwd.default,
                              (x.detach(), x.detach(), s.detach(), seed, 2, 0, False, True, False),
                              **kw)
    if backend == "numba":
        torch.library.opcheck(torch.ops.fastreg.noise_fwd_cpu.default,
                              (x.detach(), s.detach(), seed, 2, 0, False))
        for need_gs in (True, False):
            torch.library.opcheck(torch.ops.fastreg.noise_bwd_cpu.default,
                                  (x.detach(), x.detach(), s.detach(), seed, 2, 0, False, True,
                                   need_gs))


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    x = torch.randn(6, 10, generator=gen, requires_grad=True)
    s = torch.full((10,), 0.3, requires_grad=True)

    def f(a, b):
        y = fastreg.gaussian_dropout(a, 0.2, seed=3)
        y = fastreg.multiplicative_noise(y, b, seed=4, stream=1)
        return fastreg.input_noise(y, 0.1, dist="uniform", seed=5).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, s)
    out.backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    ref = f(x, s)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gs, s.grad)


# ---------------------------------------------------------------- modules
def test_modules(gen):
    m = fastreg.nn.GaussianDropout(0.5, seed=2)
    x = torch.randn(4, 6, generator=gen)
    assert torch.equal(m(x), fastreg.gaussian_dropout(x, 0.5, seed=2))
    m.eval()
    assert m(x) is x
    assert "p=0.5" in repr(m)
    mn = fastreg.nn.MultiplicativeNoise((6,), init=0.2, seed=9)
    y = mn(x)
    y.pow(2).sum().backward()
    eps = fastreg.input_noise(torch.zeros(4, 6), 1.0, seed=9)  # the same noise (0 + 1 * eps)
    torch.testing.assert_close(mn.sigma.grad, (2 * y.detach() * x * eps).sum(0), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(y, fastreg.multiplicative_noise(x, torch.full((6,), 0.2), seed=9))
    mn.eval()
    assert mn(x) is x
    fixed = fastreg.nn.MultiplicativeNoise(init=0.1, learn=False, dist="uniform")
    assert len(list(fixed.parameters())) == 0 and "sigma" in dict(fixed.named_buffers())
    with pytest.raises(ValueError, match="p"):
        fastreg.nn.GaussianDropout(1.0)
    with pytest.raises(ValueError, match="dist"):
        fastreg.nn.MultiplicativeNoise(dist="laplace")


# ---------------------------------------------------------------- errors
def test_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="p"):
        fastreg.gaussian_dropout(x, 1.0)
    with pytest.raises(ValueError, match="p"):
        fastreg.gaussian_dropout(x, -0.1)
    with pytest.raises(TypeError, match="p"):
        fastreg.gaussian_dropout(x, "0.5")
    with pytest.raises(TypeError, match="input"):
        fastreg.gaussian_dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="input"):
        fastreg.multiplicative_noise([1.0, 2.0], 0.1)
    with pytest.raises(TypeError, match="training"):
        fastreg.gaussian_dropout(x, 0.5, training=1)
    with pytest.raises(ValueError, match="sigma"):
        fastreg.multiplicative_noise(x, torch.rand(4))  # does not broadcast over (4, 3)
    with pytest.raises(ValueError, match="sigma"):
        fastreg.multiplicative_noise(x, torch.rand(2, 4, 3))  # would grow the input
    with pytest.raises(ValueError, match="sigma"):
        fastreg.input_noise(x, -0.5)
    with pytest.raises(ValueError, match="sigma"):
        fastreg.input_noise(x, float("nan"))
    for op in (fastreg.input_noise, fastreg.multiplicative_noise):  # an infinite sigma too
        with pytest.raises(ValueError, match="sigma"):
            op(x, float("inf"))
    with pytest.raises(TypeError, match="sigma"):
        fastreg.input_noise(x, torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="sigma"):
        fastreg.input_noise(x, "a")
    with pytest.raises(ValueError, match="dist"):
        fastreg.multiplicative_noise(x, 0.1, dist="normal")
    with pytest.raises(ValueError, match="seed"):
        fastreg.input_noise(x, 0.1, seed=-1)
    with pytest.raises(TypeError, match="stream"):
        fastreg.input_noise(x, 0.1, stream=0.5)


def test_direct_ops_check_sizes():
    """torch.ops.fastreg.* called directly: a sigma that does not broadcast over x (the kernels
    read it at x's broadcast offsets) and, for the multiplicative sigma gradient, an x that is
    not grad's shape are refused before the kernels run."""
    x, seed = torch.randn(4, 5), torch.tensor(3)
    for name in ("noise_fwd_cpu", "noise_fwd"):  # each op body checks
        op = getattr(torch.ops.fastreg, name)
        for bad in ((3,), (7,), (0,), (5, 4), (2, 4, 5)):
            msg = f"{name}: sigma has shape {bad} on cpu, needs a shape that broadcasts to"
            with pytest.raises(ValueError, match=re.escape(msg) + r" \(4, 5\)"):
                op(x, torch.rand(bad), seed, 0, 0, False)
    for name in ("noise_bwd_cpu", "noise_bwd"):
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: sigma has shape \(3,\)"):
            op(x, x, torch.rand(3), seed, 0, 0, False, True, True)
        with pytest.raises(ValueError, match=rf"{name}: x has shape \(3,\) on cpu, needs "
                                             r"grad's shape \(4, 5\)"):
            op(x, torch.randn(3), torch.rand(5), seed, 0, 0, False, True, True)
    # x is not read without the multiplicative sigma gradient: any may be passed, as documented
    gx, _ = torch.ops.fastreg.noise_bwd_cpu(x, torch.empty(0), torch.rand(5), seed, 0, 0, False,
                                            True, False)
    assert gx.shape == x.shape
    # every broadcastable sigma still runs
    for good in ((), (1,), (5,), (4, 1), (1, 5), (4, 5)):
        out = torch.ops.fastreg.noise_fwd_cpu(x, torch.rand(good), seed, 0, 0, False)
        assert out.shape == x.shape


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_cpu_agreement():
    x = torch.randn(64, 33, device="cuda", dtype=torch.float64, requires_grad=True)
    s = torch.rand(33, device="cuda", dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(5, device="cuda")
    for d in (0, 1):
        for add in (False, True):
            torch.library.opcheck(torch.ops.fastreg.noise_fwd.default, (x, s, seed, 1, d, add))
            torch.library.opcheck(torch.ops.fastreg.noise_bwd.default,
                                  (x.detach(), x.detach(), s.detach(), seed, 1, d, add, not add,
                                   True))
    f = torch.compile(lambda t: fastreg.gaussian_dropout(t, 0.3, seed=5), fullgraph=True)
    assert torch.equal(f(x), fastreg.gaussian_dropout(x, 0.3, seed=5))
    # the same (seed, stream, shape) gives the same noise on CPU and GPU (a few ulp)
    xc = torch.randn(1000, 17)
    for dtype in DTYPES:
        a = fastreg.multiplicative_noise(xc.to(dtype), 0.3, seed=9, stream=2)
        b = fastreg.multiplicative_noise(xc.to(dtype).cuda(), 0.3, seed=9, stream=2).cpu()
        torch.testing.assert_close(a, b, rtol=TOL[dtype][0] * 2, atol=TOL[dtype][1] * 2)
    assert torch.autograd.gradcheck(lambda a, b: fastreg.multiplicative_noise(a, b, seed=3),
                                    (x[:4, :5].detach().requires_grad_(),
                                     s[:5].detach().requires_grad_()))


# ---------------------------------------------------------------- float64 and gradient values
def _eps_of(backend, shape, dist, seed, stream):
    """The backend's own eps (float32, as the spec makes it): 0 + 1 * eps is exact."""
    with fastreg.use_backend(backend):
        return fastreg.input_noise(torch.zeros(shape), 1.0, dist=dist, seed=seed,
                                   stream=stream).double()


@pytest.mark.parametrize("backend", ["numba", "torch", "triton"])
def test_float64_values_and_gradients(backend, gen):
    """float64 inputs are computed in float64 around the float32 eps: forward, grad_x and
    grad_sigma against float64 arithmetic on the backend's own eps at ~1e-12 (float32
    arithmetic would be off by ~1e-7). The additive noise's grad_x is grad itself."""
    shape = (3, 5, 37)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    s = torch.rand(5, 1, generator=gen, dtype=torch.float64) + 0.1
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    for dist in DISTS_ALL:
        eps = _eps_of(backend, shape, dist, 7, 2)
        for additive in (False, True):
            f = fastreg.input_noise if additive else fastreg.multiplicative_noise
            xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
            with fastreg.use_backend(backend):
                y = f(xr, sr, dist=dist, seed=7, stream=2)
                y.backward(g)
            if additive:
                want, gx, gs = x + s * eps, g, (g * eps).sum((0, 2)).view(5, 1)
                assert torch.equal(xr.grad, g)
            else:
                want, gx, gs = x * (1 + s * eps), g * (1 + s * eps), (g * x * eps).sum((0, 2)).view(5, 1)
                torch.testing.assert_close(xr.grad, gx, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-14, msg=f"{dist} {additive}")
            torch.testing.assert_close(sr.grad, gs, rtol=1e-12, atol=1e-12, msg=f"{dist} {additive}")


DISTS_ALL = ("gaussian", "uniform")


# ---------------------------------------------------------------- paths that choose by layout,
# dtype and tensor kind: each must give the op's values


def _channels_last(gen, dtype=torch.float32):
    """A (2, 2, 4, 4) channels_last tensor: H*W % 4 == 0, so the Numba memory-order walk applies
    to a scalar sigma."""
    return torch.randn(2, 2, 4, 4, generator=gen).to(dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_channels_last_with_scalar_and_per_channel_sigma(backend, gen):
    """A channels_last input with a scalar sigma (the memory-order walk) and with a per-channel
    sigma (which must not take it: the walk reads one sigma), forward and the grad_x-only
    backward, bit for bit against the reference (uniform eps: the same float32 words); an
    unrequested grad_sigma is empty on every path."""
    x, g = _channels_last(gen), _channels_last(gen)
    for s in (torch.tensor(0.3), torch.tensor([0.2, 0.45]).view(2, 1, 1)):
        with fastreg.use_backend(backend):
            y = torch.ops.fastreg.noise_fwd(x, s, torch.tensor(9), 4, 1, False)
            gx, gs = torch.ops.fastreg.noise_bwd(g, x, s, torch.tensor(9), 4, 1, False, True,
                                                 False)
        assert torch.equal(y, N.noise_reference(x, s, 9, 4, 1, False)), s.shape
        want = N.noise_bwd_reference(g, x, s, 9, 4, 1, False, True, False)[0]
        assert torch.equal(gx, want), s.shape
        assert gs.shape == (0,), s.shape
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_sigma_of_another_dtype_is_rounded_to_the_compute_dtype(backend, gen):
    """A float64 sigma with a float32 input is rounded to float32 before use, as the kernels
    do, on the contiguous and channels_last paths, for a scalar and a per-channel sigma: the
    values equal those computed with sigma.float(), bit for bit (uniform eps)."""
    x, g = _channels_last(gen), _channels_last(gen)
    for xv, gv in ((x, g), (x.contiguous(), g.contiguous())):
        for s in (torch.tensor(0.1 + 1e-9, dtype=torch.float64),
                  torch.tensor([0.2 + 1e-9, 0.45 + 3e-9], dtype=torch.float64).view(2, 1, 1)):
            for additive in (False, True):
                with fastreg.use_backend(backend):
                    y = torch.ops.fastreg.noise_fwd(xv, s, torch.tensor(5), 1, 1, additive)
                    gx, gs = torch.ops.fastreg.noise_bwd(gv, xv, s, torch.tensor(5), 1, 1,
                                                         additive, not additive, False)
                s32 = s.float()
                assert torch.equal(y, N.noise_reference(xv, s32, 5, 1, 1, additive))
                if not additive:
                    want = N.noise_bwd_reference(gv, xv, s32, 5, 1, 1, False, True, False)[0]
                    assert torch.equal(gx, want), (s.shape, xv.stride())


@pytest.mark.parametrize("n", [12, (1 << 16) + 5])
def test_float64_input_with_a_number_sigma_stays_float64(n, gen):
    """gaussian_dropout and multiplicative_noise with a number sigma on float64 input (the lean
    path, serial below 2^16 elements and parallel above, and the strided path) keep float64
    and equal the registered op given a float64 sigma tensor, forward and backward."""
    base = torch.randn(2, n, generator=gen, dtype=torch.float64)
    g = torch.randn(2, n, generator=gen, dtype=torch.float64)
    sig = math.sqrt(0.3 / 0.7)
    for name, x, gv in (("contiguous", base, g), ("strided", base[:, ::2], g[:, ::2])):
        for fn in (lambda a: fastreg.gaussian_dropout(a, 0.3, seed=4, stream=2),
                   lambda a: fastreg.multiplicative_noise(a, sig, seed=4, stream=2)):
            xr = x.detach().requires_grad_()  # a new leaf with x's strides
            y = fn(xr)
            y.backward(gv)
            st = torch.tensor(sig, dtype=torch.float64)
            want = torch.ops.fastreg.noise_fwd(x, st, torch.tensor(4), 2, 0, False)
            want_gx = torch.ops.fastreg.noise_bwd(gv, x, st, torch.tensor(4), 2, 0,
                                                  False, True, False)[0]
            assert y.dtype == torch.float64 and xr.grad.dtype == torch.float64, name
            assert torch.equal(y, want), name
            assert torch.equal(xr.grad, want_gx), name


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_op_autograd_with_either_input_requiring_grad(backend, gen):
    """The registered op's backward (torch.compile's and dispatch modes' route) when only x,
    only sigma, or both require grad, multiplicative and additive: the gradients equal the
    reference's, bit for bit (uniform eps; float64 sums of one term per sigma element)."""
    x0 = torch.randn(3, 5, generator=gen)
    s0 = torch.rand(3, 5, generator=gen) + 0.1
    g = torch.randn(3, 5, generator=gen)
    for additive in (False, True):
        for need_x, need_s in ((True, False), (False, True), (True, True)):
            x = x0.clone().requires_grad_(need_x)
            s = s0.clone().requires_grad_(need_s)
            with fastreg.use_backend(backend):
                torch.ops.fastreg.noise_fwd(x, s, torch.tensor(8), 3, 1, additive).backward(g)
            rgx, rgs = N.noise_bwd_reference(g, x0, s0, 8, 3, 1, additive, True, True)
            case = (additive, need_x, need_s)
            if need_x:
                assert torch.equal(x.grad, g if additive else rgx), case
            else:
                assert x.grad is None, case
            if need_s:
                assert torch.equal(s.grad, rgs), case
            else:
                assert s.grad is None, case


@pytest.mark.parametrize("where", ["input", "sigma", "seed"])
def test_a_subclass_anywhere_takes_the_op_route(where, monkeypatch, gen):
    """A tensor subclass as input, sigma or seed sends the public functions through the
    registered op (whose dispatch unwraps it), never into the eager fast paths that hand
    tensors to the kernels directly; the values are the plain tensors'."""
    x = torch.randn(4, 3, generator=gen)
    s = torch.full((3,), 0.2)
    plain = [fastreg.multiplicative_noise(x, s, seed=3), fastreg.input_noise(x, s, seed=3),
             fastreg.gaussian_dropout(x, 0.3, seed=3)]

    def refuse(*a, **k):
        raise AssertionError("an eager fast path took a subclass")

    monkeypatch.setattr(N, "_lean_noise", refuse)
    monkeypatch.setattr(N._NoiseFn, "apply", refuse)
    xw = Wrapper(x) if where == "input" else x
    sw = Wrapper(s) if where == "sigma" else s
    seed = Wrapper(torch.tensor(3)) if where == "seed" else 3
    got = [fastreg.multiplicative_noise(xw, sw, seed=seed), fastreg.input_noise(xw, sw, seed=seed)]
    if where != "sigma":
        got.append(fastreg.gaussian_dropout(xw, 0.3, seed=seed))
    for a, b in zip(got, plain):
        assert torch.equal(a.inner if isinstance(a, Wrapper) else a, b)


_ERR = [  # (function, arguments, error, argument named first in the message)
    (fastreg.gaussian_dropout, dict(input=torch.arange(3)), TypeError, "input"),
    (fastreg.gaussian_dropout, dict(p=1.5), ValueError, "p"),
    (fastreg.gaussian_dropout, dict(p=1.0), ValueError, "p"),
    (fastreg.gaussian_dropout, dict(training=1), TypeError, "training"),
    (fastreg.gaussian_dropout, dict(stream=-1), ValueError, "stream"),
    (fastreg.gaussian_dropout, dict(seed=1.5), TypeError, "seed"),
]
for _f in (fastreg.multiplicative_noise, fastreg.input_noise):
    _ERR += [(_f, dict(input=torch.arange(3)), TypeError, "input"),
             (_f, dict(dist="normal"), ValueError, "dist"),
             (_f, dict(sigma=torch.rand(7)), ValueError, "sigma"),
             (_f, dict(stream=-1), ValueError, "stream"),
             (_f, dict(seed="a"), TypeError, "seed")]


@pytest.mark.parametrize("fn, kwargs, error, arg", _ERR,
                         ids=[f"{f.__name__}-{a}-{i}" for i, (f, _, _, a) in enumerate(_ERR)])
def test_errors_name_the_function_and_the_argument(fn, kwargs, error, arg):
    """Each refusal starts 'fastreg.<function>: <argument> ' (the public name, as typed)."""
    args = dict(input=torch.randn(4, 3))
    if fn is not fastreg.gaussian_dropout:
        args["sigma"] = 0.2
    args.update(kwargs)
    with pytest.raises(error, match=rf"^fastreg\.{fn.__name__}: {arg} "):
        fn(args.pop("input"), **args)


@pytest.mark.parametrize("backend", ["numba", "torch", "triton"])
def test_float64_grad_sigma_of_every_sigma_shape(backend, gen):
    """grad_sigma and grad_x for float64 with a scalar, a per-channel, a 2-element and a
    per-element sigma (values up to 3: an index misread as sigma's value shows), over 2100
    elements (three 1024-element programs for the scalar's partial sums): float64 arithmetic
    on the backend's own eps at ~1e-12 (float32 partials or buffers would be off by ~1e-7),
    and the forward. Multiplicative with the gaussian eps, additive with the uniform one."""
    shape = (2, 3, 350)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    for sshape in ((), (3, 1), (2, 1, 1), shape):
        s = torch.rand(sshape, generator=gen, dtype=torch.float64) * 3 + 0.1
        if sshape == ():
            s.fill_(2.5)  # read as a layout (size 2, stride 2) it would index past sigma
        for dist, additive in (("gaussian", False), ("uniform", True)):
            eps = _eps_of(backend, shape, dist, 7, 2)
            f = fastreg.input_noise if additive else fastreg.multiplicative_noise
            xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
            with fastreg.use_backend(backend):
                y = f(xr, sr, dist=dist, seed=7, stream=2)
                y.backward(g)
            d = g * eps if additive else g * x * eps
            want_y = x + s * eps if additive else x * (1 + s * eps)
            case = (sshape, dist, additive)
            torch.testing.assert_close(y, want_y, rtol=1e-13, atol=1e-14, msg=str(case))
            torch.testing.assert_close(sr.grad, d.sum_to_size(sshape), rtol=1e-12, atol=1e-12,
                                       msg=str(case))
            want_gx = g if additive else g * (1 + s * eps)
            torch.testing.assert_close(xr.grad, want_gx, rtol=1e-13, atol=1e-14, msg=str(case))


def test_each_op_launches_its_triton_kernel(monkeypatch, gen):
    """Under the Triton backend noise_fwd and noise_bwd launch their kernels once, for 40
    elements and for one (a skipped launch leaves the output uninitialised); under the torch
    backend neither is launched."""
    from fastreg.kernels.triton import noise as tk

    launched = record_launches(monkeypatch)
    seed = torch.tensor(2)
    for n in (40, 1):
        x, g, s = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.tensor(0.3)
        calls = {tk.noise_fwd_kernel: lambda: torch.ops.fastreg.noise_fwd(x, s, seed, 0, 0, False),
                 tk.noise_bwd_kernel: lambda: torch.ops.fastreg.noise_bwd(g, x, s, seed, 0, 0,
                                                                          False, True, True)}
        assert_each_launches_its_kernel(launched, calls, n)


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_noise_bwd_lays_grad_x_out_like_the_gradient(backend, gen):
    """noise_bwd's grad_x is laid out as torch.empty_like(grad) for a transposed and a
    channels_last gradient, with the contiguous gradient's values."""
    x = torch.randn(2, 3, 4, 4, generator=gen)
    s = torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    g0 = torch.randn(2, 3, 4, 4, generator=gen)
    with fastreg.use_backend(backend):
        want = torch.ops.fastreg.noise_bwd(g0, x, s, torch.tensor(3), 0, 1, False, True, False)[0]
        for g in (g0.transpose(1, 3).contiguous().transpose(1, 3),
                  g0.to(memory_format=torch.channels_last)):
            gx = torch.ops.fastreg.noise_bwd(g, x, s, torch.tensor(3), 0, 1, False, True, False)[0]
            assert_layout_like(gx, g)
            assert torch.equal(gx, want)
