"""Layout fidelity (fastreg/_layout.py, docs/layout.md): every elementwise op returns its
output, and its backward its gradients, laid out as torch.empty_like(input) (channels_last
stays channels_last, a dense permutation keeps its strides, a non-dense view comes back as
empty_like chooses), with values bit-identical to the op on input.contiguous(): the random
numbers follow the logical index, never the memory order."""

import pytest
import torch
from torch.library import opcheck

import fastreg
from fastreg.adversarial import fgsm, pgd_step
from fastreg.ops.variational import vd_sample

BACKENDS = ["numba", "torch", "triton"]
CL = torch.channels_last


def _inputs(gen):
    """(name, x) with x float32: the layouts under test (a contiguous one as the control)."""
    def r(*shape):
        return torch.randn(shape, generator=gen)

    yield "contiguous", r(3, 5, 7)
    yield "channels_last", r(2, 8, 4, 4).contiguous(memory_format=CL)  # H*W % 4 == 0
    yield "channels_last odd", r(3, 5, 7, 9).contiguous(memory_format=CL)
    yield "permuted 3-D", r(5, 6, 7).permute(2, 0, 1)
    yield "permuted odd size-1", r(7, 1, 3).transpose(0, 2)
    yield "permuted 5-D", r(2, 3, 4, 5, 6).permute(0, 3, 1, 4, 2)
    yield "sliced (not dense)", r(6, 10)[:, ::2]
    yield "sliced channels_last", r(2, 3, 5, 8).contiguous(memory_format=CL)[..., 1:6]


def _like(t, x):
    """t's layout is the one torch gives an elementwise result of x."""
    assert t.shape == x.shape
    assert t.stride() == torch.empty_like(x).stride(), (t.stride(), x.stride())


def _same(a, b):
    assert a.dtype == b.dtype and torch.equal(a, b)


def _check(fn, x, *, extra=(), grad=True):
    """fn(x, *extra) against fn on contiguous copies: layout of the output and of the
    gradients, values bit for bit. extra: further tensor inputs laid out like x or not."""
    xs = [x.detach().clone().requires_grad_(grad)] + [e.detach().clone().requires_grad_(grad)
                                                     for e in extra]
    ref_in = [t.detach().contiguous().requires_grad_(grad) for t in xs]
    out = fn(*xs)
    ref = fn(*ref_in)
    _like(out, x)
    _same(out, ref)
    if not grad:
        return
    g = torch.randn(x.shape, dtype=out.dtype)
    out.backward(torch.empty_like(out).copy_(g))  # the gradient arrives in the output's layout
    ref.backward(g)
    for t, r in zip(xs, ref_in):
        _like(t.grad, t)
        _same(t.grad, r.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["seed", "bits"])
def test_dropout(backend, mask, gen):
    for name, x in _inputs(gen):
        with fastreg.use_backend(backend):
            _check(lambda t: fastreg.dropout(t, 0.3, seed=11, stream=2, mask=mask), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_dropout_op_bits_on_every_layout(backend, gen):
    """torch.ops.fastreg.dropout_fwd on every layout: the packed mask equals the contiguous
    call's ((n + 7) // 8 uint8 bytes in logical order), and without bits the second output is
    an empty uint8 tensor, as the fake kernel says."""
    st = torch.tensor(21)
    sliced_by_8 = ("sliced, numel % 8 == 0", torch.randn(4, 16, generator=gen)[:, ::2])
    for name, x in [*_inputs(gen), sliced_by_8]:
        with fastreg.use_backend(backend):
            out, bits = torch.ops.fastreg.dropout_fwd(x, st, 5, 0.35, True)
            ref, ref_bits = torch.ops.fastreg.dropout_fwd(x.contiguous(), st, 5, 0.35, True)
            _same(out, ref)
            assert bits.shape == ((x.numel() + 7) // 8,), name
            _same(bits, ref_bits)
            _, none = torch.ops.fastreg.dropout_fwd(x, st, 5, 0.35, False)
            assert none.dtype == torch.uint8 and none.shape == (0,), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_add(backend, gen):
    for name, x in _inputs(gen):
        same = x.detach().clone().mul_(2)  # residual in x's layout
        other = torch.randn(x.shape, generator=gen)  # residual contiguous
        with fastreg.use_backend(backend):
            for res in (same, other):
                _check(lambda t, r: fastreg.dropout_add(t, r, 0.4, seed=5), x, extra=(res,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_float16_and_float64(backend, gen):
    x = torch.randn(2, 8, 4, 4, generator=gen).contiguous(memory_format=CL)
    for dtype in (torch.float16, torch.float64):
        with fastreg.use_backend(backend):
            # the bits backward walks the grad in memory order; p = 0.3: a scale that float32
            # cannot hold exactly
            for mask in ("seed", "bits"):
                _check(lambda t: fastreg.dropout(t, 0.3, seed=3, mask=mask), x.to(dtype))
            _check(lambda t: fastreg.gaussian_dropout(t, 0.2, seed=3), x.to(dtype))
            _check(lambda m, v: vd_sample(m, v, seed=3), x.to(dtype), extra=(x.abs().to(dtype),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise(backend, gen):
    for name, x in _inputs(gen):
        with fastreg.use_backend(backend):
            _check(lambda t: fastreg.gaussian_dropout(t, 0.25, seed=9), x)
            _check(lambda t: fastreg.multiplicative_noise(t, 0.3, dist="uniform", seed=9), x)
            _check(lambda t: fastreg.input_noise(t, 0.3, seed=9, stream=4), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_with_learned_sigma(backend, gen):
    """sigma a tensor that requires grad: per channel (broadcast) and per element (laid out as
    x), the fused sigma gradient included."""
    x = torch.randn(2, 6, 3, 4, generator=gen).contiguous(memory_format=CL)
    per_channel = torch.rand(6, 1, 1, generator=gen)
    per_element = torch.rand(x.shape, generator=gen).contiguous(memory_format=CL)
    with fastreg.use_backend(backend):
        for sigma in (per_channel, per_element):
            for op in (fastreg.multiplicative_noise, fastreg.input_noise):
                s1 = sigma.clone().requires_grad_()
                s2 = sigma.clone().requires_grad_()
                xa = x.clone().requires_grad_()
                xb = x.contiguous().requires_grad_()
                out, ref = op(xa, s1, seed=4), op(xb, s2.contiguous(), seed=4)
                _like(out, x)
                _same(out, ref)
                g = torch.randn(x.shape, generator=gen)
                out.backward(torch.empty_like(out).copy_(g))
                ref.backward(g)
                _like(xa.grad, x)
                _same(xa.grad, xb.grad)
                assert s1.grad.stride() == torch.empty_like(s1).stride()
                torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vd_sample(backend, gen):
    for name, mu in _inputs(gen):
        var = mu.detach().abs()  # laid out as mu
        with fastreg.use_backend(backend):
            _check(lambda m, v: vd_sample(m, v, seed=21, stream=1), mu, extra=(var,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_steps(backend, gen):
    for name, x in _inputs(gen):
        g_same = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))
        g_contig = torch.randn(x.shape, generator=gen)
        x0 = torch.empty_like(x).copy_(x + 0.01)
        with fastreg.use_backend(backend):
            for g in (g_same, g_contig):
                _check(lambda t: fgsm(t, g, 0.1, clamp=(-1.0, 1.0)), x, grad=False)
                _check(lambda t: pgd_step(t, x0, g, 0.05, 0.1), x, grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules(backend, gen):
    x = torch.randn(2, 8, 4, 4, generator=gen).contiguous(memory_format=CL)
    torch.manual_seed(0)
    mods = [fastreg.nn.Dropout(0.3), fastreg.nn.GaussianDropout(0.3),
            fastreg.nn.MultiplicativeNoise((8, 1, 1))]
    with fastreg.use_backend(backend):
        for m in mods:
            m.seed = 17
            _check(m, x)


def test_channels_last_conv_net_keeps_its_layout(gen):
    """A channels_last CNN: every activation stays channels_last through fastreg's dropout
    (no layout conversion after it), and the net computes what its contiguous twin does."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              fastreg.nn.Dropout(0.2), torch.nn.Conv2d(8, 4, 3, padding=1),
                              fastreg.nn.GaussianDropout(0.1))
    for m in net:
        if hasattr(m, "seed"):
            m.seed = 7
    twin = torch.nn.Sequential(*[m for m in net])  # same parameters
    x = torch.randn(2, 3, 6, 6, generator=gen)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(
        o.is_contiguous(memory_format=CL))) for m in net[1:]]
    ref = twin(x.clone().requires_grad_())
    seen.clear()
    net.to(memory_format=CL)
    xc = x.contiguous(memory_format=CL).requires_grad_()
    out = net(xc)
    for h in hooks:
        h.remove()
    assert all(seen) and len(seen) == 4
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.backward(torch.ones_like(out))
    assert xc.grad.is_contiguous(memory_format=CL)


def test_fake_kernels_give_the_real_strides(gen):
    """opcheck (its fake-tensor test compares strides) on channels_last and permuted inputs."""
    seed = torch.tensor(3, dtype=torch.int64)
    for x in (torch.randn(2, 4, 3, 4, generator=gen).contiguous(memory_format=CL),
              torch.randn(3, 4, 5, generator=gen).permute(1, 2, 0)):
        xg = x.detach().clone().requires_grad_()
        r = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))
        sigma = torch.tensor(0.3)
        opcheck(torch.ops.fastreg.dropout_fwd, (xg, seed, 0, 0.3, False))
        opcheck(torch.ops.fastreg.dropout_fwd_cpu, (x, seed, 0, 0.3, True))
        opcheck(torch.ops.fastreg.dropout_add_fwd, (xg, r, seed, 0, 0.3))
        opcheck(torch.ops.fastreg.dropout_add_fwd_cpu, (x, r, seed, 0, 0.3))
        bits = torch.ops.fastreg.dropout_fwd(x, seed, 0, 0.3, True)[1]
        opcheck(torch.ops.fastreg.dropout_bits_apply_cpu, (x, bits, 0.3))
        opcheck(torch.ops.fastreg.noise_fwd, (xg, sigma, seed, 0, 0, False))
        opcheck(torch.ops.fastreg.noise_fwd_cpu, (x, sigma, seed, 0, 1, True))
        opcheck(torch.ops.fastreg.noise_bwd_cpu, (x, r, sigma, seed, 0, 0, False, True, True))
        opcheck(torch.ops.fastreg.vd_sample, (xg, r.abs(), seed, 0, 1e-8))
        opcheck(torch.ops.fastreg.vd_sample_cpu, (x, r.abs(), seed, 0, 1e-8))
        opcheck(torch.ops.fastreg.vd_sample_grad_var_cpu, (x, r.abs(), seed, 0, 1e-8))
        opcheck(torch.ops.fastreg.pgd_step, (x, None, r, 0.1, 0.0, -1.0, 1.0))
        opcheck(torch.ops.fastreg.adversarial_numba, (x, r, r, 0.1, 0.2, -1.0, 1.0))


def test_compiled_dropout_keeps_the_layout(gen):
    """torch.compile traces the ops (fake kernels): the compiled result has the eager one's
    strides and values."""
    x = torch.randn(2, 4, 3, 4, generator=gen).contiguous(memory_format=CL)
    seed = torch.tensor(5, dtype=torch.int64)
    f = torch.compile(lambda t: fastreg.dropout(t, 0.3, seed=seed), fullgraph=True)
    out = f(x)
    _like(out, x)
    _same(out, fastreg.dropout(x.contiguous(), 0.3, seed=seed))


def test_memory_dims():
    from fastreg._layout import memory_dims

    x = torch.empty(2, 8, 4, 4).contiguous(memory_format=CL)
    sizes, lstr, tile4 = memory_dims(tuple(x.shape), tuple(x.stride()))
    assert sizes.tolist() == [2, 16, 8] and lstr.tolist() == [128, 1, 16] and tile4
    x = torch.empty(3, 5, 7, 9).contiguous(memory_format=CL)
    assert not memory_dims(tuple(x.shape), tuple(x.stride()))[2]
    assert memory_dims((6, 5), (10, 2)) is None  # a slice: not dense
    assert memory_dims((2, 3), (1, 1)) is None  # overlapping


@pytest.mark.parametrize("shape", [(2, 600, 8, 8), (2, 3, 120, 100), (2, 5, 99, 71)])
def test_numba_memory_order_kernels_at_parallel_sizes(shape, gen):
    """The memory-order Numba kernels past their serial size (threaded drivers), with rows
    longer than a scratch block (600 channels), short rows (3 channels) and the per-element
    path (H*W odd): dropout (both mask modes), dropout_add, noise and vd_sample against the op on the contiguous tensor."""
    x = torch.randn(shape, generator=gen).contiguous(memory_format=CL)
    r = torch.randn(shape, generator=gen).contiguous(memory_format=CL)
    with fastreg.use_backend("numba"):
        out = fastreg.dropout(x, 0.2, seed=8, stream=1)
        add = fastreg.dropout_add(x, r, 0.2, seed=8, stream=1)
        _like(out, x)
        _like(add, x)
        _same(out, fastreg.dropout(x.contiguous(), 0.2, seed=8, stream=1))
        _same(add, fastreg.dropout_add(x.contiguous(), r.contiguous(), 0.2, seed=8, stream=1))
        for dist in ("gaussian", "uniform"):  # the noise kernels' memory-order path
            _check(lambda t: fastreg.multiplicative_noise(t, 0.3, dist=dist, seed=2), x)
            _check(lambda t: fastreg.input_noise(t, 0.3, dist=dist, seed=2), x, grad=False)
        _check(lambda m, v: vd_sample(m, v, seed=2), x, extra=(x.abs(),))
        _check(lambda t: fastreg.dropout(t, 0.2, seed=8, mask="bits"), x)
        st = torch.tensor(8)
        out, bits = torch.ops.fastreg.dropout_fwd(x, st, 1, 0.2, True)
        ref, ref_bits = torch.ops.fastreg.dropout_fwd(x.contiguous(), st, 1, 0.2, True)
        _like(out, x)
        _same(out, ref)
        _same(bits, ref_bits)  # the packed mask stays in logical order
