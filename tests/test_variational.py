"""Sparsifying variational dropout: the fused local-reparameterisation op and the layer."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastreg
from fastreg.nn import VariationalDropoutLinear
from fastreg.nn.variational import K1, K2, K3, total_kl, total_sparsity
from fastreg.ops import rng
from fastreg.ops import variational as V
from fastreg.kernels.numba.variational import BLOCK
from helpers import assert_layout_like, run_without_interpreter, saved_bytes

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = ["numba", "triton", "torch"]
# Against the reference fed the backend's own normals: a few ulp (sqrt, FMA contraction).
TOL = {torch.float32: (4e-7, 1e-6), torch.float64: (1e-15, 1e-14),
       torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}
SHAPES = {"numba": [(), (1,), (7, 13), (3, 5, 11), (4 * BLOCK * 2 + 37,)],
          "triton": [(), (1,), (7, 13), (3, 5, 11), (1029,)],
          "torch": [(), (7, 13), (3, 5, 11)]}


def _make(shape, gen, layout):
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        return torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen)[..., 1::2]
    return torch.randn(shape, generator=gen)


def _z(backend, n, seed, stream):
    if backend == "numba":  # the noise family's vectorised Box-Muller, as the kernels use
        from fastreg.kernels.numba import noise as nb

        out = np.empty(n, dtype=np.float32)
        nb.eps_fill(out, seed, stream, nb.DIST_GAUSSIAN, 0)
        return torch.from_numpy(out)
    return rng.normals(n, seed, stream, backend=backend)


# the fast backends only: "torch" fed its own normals would be the reference compared with itself
@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_forward_and_grad_var_match_reference(backend, dtype, layout, gen):
    rtol, atol = TOL[dtype]
    for shape in SHAPES[backend]:
        mu = _make(shape, gen, layout).to(dtype)
        var = _make(shape, gen, layout).abs().to(dtype)
        g = _make(shape, gen, layout).to(dtype)
        seed, stream = int(torch.randint(0, 2**62, (), generator=gen)), 2**33 + 7
        st = torch.tensor(seed)
        with fastreg.use_backend(backend):
            out = V.vd_sample(mu, var, seed=seed, stream=stream)
            gv = torch.ops.fastreg.vd_sample_grad_var(g, var, st, stream, 1e-8)
        assert out.dtype == dtype and out.shape == mu.shape
        # laid out as torch.empty_like(mu), grad_var as its gradient (docs/layout.md)
        assert_layout_like(out, mu)
        assert_layout_like(gv, g)
        z = _z(backend, mu.numel(), seed, stream)
        torch.testing.assert_close(out, V.vd_sample_reference(mu, var, seed, stream, 1e-8, z=z),
                                   rtol=rtol, atol=atol)
        torch.testing.assert_close(gv, V.vd_sample_grad_var_reference(g, var, seed, stream, 1e-8,
                                                                      z=z),
                                   rtol=rtol, atol=atol)
        # and against the spec's normals from the torch reference (a few float32 ulp apart)
        ref = V.vd_sample_reference(mu, var, seed, stream, 1e-8)
        s = torch.sqrt(var.double() + 1e-8)
        zd = z.view(mu.shape).abs().double()
        lim = rtol * ref.double().abs() + 4 * atol + 4e-6 * s * (1 + zd)
        assert bool(((out.double() - ref.double()).abs() <= lim).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_noise_is_the_rng_spec_and_nan_inf(backend):
    n = 203
    mu = torch.zeros(n)
    var = torch.ones(n) - 1e-8
    mu[5], var[9], var[11] = math.nan, math.inf, -2.0
    with fastreg.use_backend(backend):
        out = V.vd_sample(mu, var, seed=11, stream=9)
    z = _z(backend, n, 11, 9)
    keep = torch.ones(n, dtype=torch.bool)
    keep[[5, 9, 11]] = False
    assert torch.equal(out[keep], z[keep])  # sqrt(1) * z + 0 is z, bit for bit
    assert math.isnan(out[5]) and math.isnan(out[11]) and abs(out[9].item()) == math.inf


def test_statistics_and_seeding():
    n = 1 << 16
    mu = torch.full((n,), 2.0)
    var = torch.full((n,), 9.0)
    out = V.vd_sample(mu, var, seed=3)
    assert abs(float(out.mean()) - 2.0) < 0.05 and abs(float(out.std()) - 3.0) < 0.05
    assert torch.equal(out, V.vd_sample(mu, var, seed=3))
    assert not torch.equal(out, V.vd_sample(mu, var, seed=3, stream=1))
    torch.manual_seed(0)
    a = V.vd_sample(mu, var)
    torch.manual_seed(0)
    assert torch.equal(a, V.vd_sample(mu, var))
    assert not torch.equal(a, V.vd_sample(mu, var))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_regenerates_noise(backend, gen):
    mu = torch.randn(37, 29, generator=gen, requires_grad=True)
    var = (torch.rand(37, 29, generator=gen) + 0.1).requires_grad_()
    g = torch.randn(37, 29, generator=gen)
    with fastreg.use_backend(backend):
        out = V.vd_sample(mu, var, seed=123, stream=4)
        out.backward(g)
    z = (out.detach() - mu.detach()) / torch.sqrt(var.detach() + 1e-8)
    assert torch.equal(mu.grad, g)
    torch.testing.assert_close(var.grad, g * z * 0.5 / torch.sqrt(var.detach() + 1e-8),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, gen):
    mu = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    var = (torch.rand(5, 7, dtype=torch.float64, generator=gen) + 0.2).requires_grad_()
    with fastreg.use_backend(backend):
        assert torch.autograd.gradcheck(lambda m, v: V.vd_sample(m, v, seed=77, stream=2),
                                        (mu, var))
        assert torch.autograd.gradcheck(lambda v: V.vd_sample(mu.detach(), v, seed=77), (var,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype, gen):
    mu = torch.randn(6, 5, dtype=dtype, generator=gen, requires_grad=True)
    var = (torch.rand(6, 5, dtype=dtype, generator=gen) + 0.1).requires_grad_()
    seed = torch.tensor(99)
    # Under the interpreter, tracing records the reference in place of the Triton launch
    # (ops/variational.py, _interpreted_trace), so the aot_dispatch check compares Triton's
    # float32 normals with torch's: the spec lets them differ by a few ulp (libm), which
    # float64's default 1e-7 tolerance can catch. Allow 16 float32 ulp of the noise term.
    tol = {"rtol": 1e-6, "atol": 1e-6} if backend == "triton" else {}
    with fastreg.use_backend(backend):
        opcheck(torch.ops.fastreg.vd_sample, (mu, var, seed, 3, 1e-8), **tol)
        opcheck(torch.ops.fastreg.vd_sample_grad_var, (mu.detach(), var.detach(), seed, 3, 1e-8),
                **tol)
    if backend == "numba":
        opcheck(torch.ops.fastreg.vd_sample_cpu, (mu.detach(), var.detach(), seed, 3, 1e-8))
        opcheck(torch.ops.fastreg.vd_sample_grad_var_cpu,
                (mu.detach(), var.detach(), seed, 3, 1e-8))


def test_saves_nothing_per_element_for_the_noise():
    n = 4096
    mu = torch.randn(n, requires_grad=True)
    var = torch.rand(n, requires_grad=True)
    # var (float32) and the int64 seed; no z
    assert saved_bytes(lambda: V.vd_sample(mu, var, seed=1)) == 4 * n + 8
    # only the seed when var needs no gradient
    assert saved_bytes(lambda: V.vd_sample(mu, var.detach(), seed=1)) == 8


def test_empty():
    e = torch.empty(0, 4)
    assert V.vd_sample(e, e).shape == (0, 4)


def test_bad_inputs():
    x = torch.rand(3, 4)
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        V.vd_sample(1.0, x)
    with pytest.raises(TypeError, match="var must have a floating dtype"):
        V.vd_sample(x, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="var must have the same shape as mu"):
        V.vd_sample(x, torch.rand(4, 3))
    with pytest.raises(ValueError, match="var must have the same dtype as mu"):
        V.vd_sample(x, x.double())
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        V.vd_sample(x, x, eps=-1.0)
    with pytest.raises(TypeError, match="eps must be a real number"):
        V.vd_sample(x, x, eps="1")
    with pytest.raises(ValueError, match="seed must be in"):
        V.vd_sample(x, x, seed=-1)
    with pytest.raises(TypeError, match="stream must be an int"):
        V.vd_sample(x, x, stream=1.5)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        VariationalDropoutLinear(0, 3)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        VariationalDropoutLinear(2, 3, threshold=math.nan)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        VariationalDropoutLinear(2, 3, eps=-1e-3)


def test_direct_ops_check_sizes():
    """torch.ops.fastreg.* called directly: var, read at mu's (grad's) indices by the kernels,
    must have mu's (grad's) shape (a shorter one was read past its end)."""
    mu, seed = torch.randn(100), torch.tensor(3)
    for name in ("vd_sample_cpu", "vd_sample"):  # each op body checks
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: var has shape \(10,\) on cpu, "
                                             r"needs mu's shape \(100,\)"):
            op(mu, torch.rand(10), seed, 0, 1e-8)
    for name in ("vd_sample_grad_var_cpu", "vd_sample_grad_var"):
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: var has shape \(200,\) on "
                                             r"cpu, needs grad's shape \(100,\)"):
            op(mu, torch.rand(200), seed, 0, 1e-8)


# ---------------------------------------------------------------- the layer
def _layer(gen, bias=True, **kw):
    layer = VariationalDropoutLinear(11, 6, bias=bias, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 11, generator=gen) * 0.3)
        layer.log_sigma2.copy_(torch.randn(6, 11, generator=gen) * 4 - 4)
        layer.weight[0, :3] = 1e-6  # log alpha beyond the clip
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_layer_train_forward_is_local_reparameterisation(bias, gen):
    layer = _layer(gen, bias)
    x = torch.randn(9, 11, generator=gen)
    out = layer(x, seed=5)
    la = (layer.log_sigma2 - torch.log(layer.weight ** 2 + 1e-8)).clamp(-8, 8).detach()
    mean = x @ layer.weight.detach().T + (layer.bias.detach() if bias else 0)
    var = (x * x) @ (la.exp() * layer.weight.detach() ** 2).T
    z = rng.normals(out.numel(), 5, layer.stream, backend="numba").view(out.shape)
    torch.testing.assert_close(out.detach(), mean + torch.sqrt(var + 1e-8) * z, rtol=1e-5,
                               atol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    # the gradients of the same composition written out in float64 (z fixed)
    ps = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    la = (ps["log_sigma2"] - torch.log(ps["weight"] ** 2 + 1e-8)).clamp(-8, 8)
    xd = x.double()
    mean = xd @ ps["weight"].T + (ps["bias"] if bias else 0)
    var = (xd * xd) @ (la.exp() * ps["weight"] ** 2).T
    ((mean + torch.sqrt(var + 1e-8) * z.double()) * g.double()).sum().backward()
    for n, p in layer.named_parameters():
        want = ps[n].grad
        assert bool((want != 0).any()), n
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                   msg=n)


def test_layer_log_alpha_kl_sparsity_and_eval(gen):
    layer = _layer(gen)
    la = layer.log_alpha().detach()
    assert float(la.min()) >= -8 and float(la.max()) == 8.0
    raw = layer.log_sigma2.detach() - torch.log(layer.weight.detach() ** 2 + 1e-8)
    torch.testing.assert_close(la, raw.clamp(-8, 8))
    # KL against the paper's formula written out in float64
    lad = la.double()
    neg_kl = K1 / (1 + torch.exp(-(K2 + K3 * lad))) - 0.5 * torch.log1p(torch.exp(-lad)) - K1
    torch.testing.assert_close(layer.kl().double(), -neg_kl.sum(), rtol=1e-5, atol=1e-5)
    assert float(layer.kl().detach()) > 0
    pruned = la >= 3
    assert 0 < int(pruned.sum()) < la.numel()
    assert layer.sparsity() == pytest.approx(float(pruned.float().mean()))
    assert total_sparsity(torch.nn.Sequential(layer, torch.nn.ReLU())) == layer.sparsity()
    torch.testing.assert_close(total_kl(torch.nn.Sequential(layer)), layer.kl())
    layer.eval()
    x = torch.randn(4, 11, generator=gen)
    w = layer.weight.detach() * (~pruned)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=0, atol=0)
    assert torch.equal(layer(x), layer(x))  # deterministic


def test_layer_gradcheck_float64(gen):
    """Gradients of the whole training forward (and of kl) w.r.t. input and parameters."""
    layer = VariationalDropoutLinear(5, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(4, 5, generator=gen, dtype=torch.float64) - 3)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,), {"seed": 21})

    assert torch.autograd.gradcheck(f, (x, *params))

    class KL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self):
            return self.layer.kl()

    kl_module = KL()
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(kl_module, {f"layer.{n}": p for n, p in
                                                           zip(names, ps)}, ()), params)


def test_layer_kl_decreases_with_alpha():
    """The approximation is monotone: more noise, less KL (the sparsifying pressure)."""
    layer = VariationalDropoutLinear(1, 1, bias=False)
    vals = []
    for ls2 in (-6.0, -2.0, 0.0, 2.0, 6.0):
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.log_sigma2.fill_(ls2)
        vals.append(float(layer.kl().detach()))
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert abs(vals[-1]) < 0.01  # KL -> 0 as alpha -> infinity (here log alpha = 6)


def test_layer_compiles_without_graph_break(gen):
    layer = _layer(gen)
    x = torch.randn(8, 11, generator=gen)

    def loss(x):
        return layer(x, seed=3).square().mean() + 1e-3 * layer.kl()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    lc = compiled(x)
    lc.backward()
    gc = layer.log_sigma2.grad.clone()
    layer.zero_grad()
    le = loss(x)
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(gc, layer.log_sigma2.grad)


_COMPILE_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastreg.kernels.triton import variational as V
for kern in (V.vd_sample_fwd_kernel, V.vd_sample_grad_var_kernel):
    names = list(inspect.signature(kern.fn).parameters)
    for dt, stream_ty in (("fp32", "i32"), ("fp32", "i64"), ("fp64", "i64"), ("fp16", "i64"),
                          ("bf16", "i32")):
        p = "*" + dt
        types = [p, p, p, "*i64", stream_ty, "i64", "i64", "constexpr", "constexpr"]
        k = triton.compile(ASTSource(fn=kern, signature=dict(zip(names, types)),
                                     constexprs={"F64": dt == "fp64", "BLOCK": V.BLOCK}),
                           target=GPUTarget("cuda", 90, 32))
        assert "ptx" in k.asm and "cubin" in k.asm, (kern, dt)
print("compiled")
"""


def test_triton_kernels_compile_for_cuda():
    """The compiled (not interpreted) Triton path goes to PTX and a cubin for sm_90 with
    no GPU present (the interpreter accepts code the compiler rejects)."""
    r = run_without_interpreter(_COMPILE_SCRIPT)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype, gen):
    rtol, atol = TOL[dtype]
    mu = torch.randn(333, 77, generator=gen).to(dtype)
    var = torch.rand(333, 77, generator=gen).to(dtype)
    g = torch.randn(333, 77, generator=gen).to(dtype)
    out = V.vd_sample(mu.cuda(), var.cuda(), seed=8, stream=1).cpu()
    gv = torch.ops.fastreg.vd_sample_grad_var(g.cuda(), var.cuda(), torch.tensor(8).cuda(), 1,
                                              1e-8).cpu()
    z = rng.normals(mu.numel(), 8, 1, backend="numba")
    # the GPU normals differ from the CPU ones by a few ulp (libm); FMA contraction
    torch.testing.assert_close(out, V.vd_sample_reference(mu, var, 8, 1, 1e-8, z=z),
                               rtol=max(rtol, 4e-6), atol=max(atol, 4e-6))
    torch.testing.assert_close(gv, V.vd_sample_grad_var_reference(g, var, 8, 1, 1e-8, z=z),
                               rtol=max(rtol, 4e-6), atol=max(atol, 4e-6))
    mu64 = mu.double().cuda().requires_grad_()
    var64 = (var.double().cuda() + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: V.vd_sample(m, v, seed=4), (mu64, var64))


def test_layer_reset_parameters_and_totals_over_layers(gen):
    """reset_parameters re-draws W and b as torch.nn.Linear does and sets every log sigma^2;
    total_kl and total_sparsity add up over several layers (weighted by their sizes)."""
    layer = _layer(gen)
    torch.manual_seed(7)
    layer.reset_parameters(init_log_sigma2=-6.0)
    torch.manual_seed(7)
    lin = torch.nn.Linear(11, 6)
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)
    assert torch.equal(layer.log_sigma2, torch.full((6, 11), -6.0))
    layer.reset_parameters()
    assert torch.equal(layer.log_sigma2, torch.full((6, 11), -10.0))
    a, b = _layer(gen), VariationalDropoutLinear(6, 3, bias=False)
    with torch.no_grad():
        b.weight.copy_(torch.randn(3, 6, generator=gen) * 0.3)
        b.log_sigma2.copy_(torch.randn(3, 6, generator=gen) * 4 - 2)
    model = torch.nn.Sequential(a, torch.nn.ReLU(), torch.nn.Sequential(b))
    torch.testing.assert_close(total_kl(model), a.kl() + b.kl(), rtol=1e-6, atol=0)
    pa, pb = int((~a.mask()).sum()), int((~b.mask()).sum())
    assert pa > 0 and pb > 0 and a.sparsity() != b.sparsity()
    assert total_sparsity(model) == (pa + pb) / (66 + 18)
    assert total_sparsity(torch.nn.ReLU()) == 0.0 and float(total_kl(torch.nn.ReLU())) == 0.0
