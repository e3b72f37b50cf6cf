"""fastreg.adversarial: FGSM and PGD steps against the pure-PyTorch reference."""

import math

import pytest
import torch
from torch.library import opcheck

import fastreg
from fastreg import adversarial as A
from fastreg.kernels.numba.adversarial import PARALLEL_MIN
from helpers import assert_layout_like, run_without_interpreter

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = ["numba", "triton", "torch"]


def _inputs(shape, dtype, gen, layout="contiguous"):
    """x, x0 (= x plus small noise), grad; `layout` picks contiguous / transposed / sliced views."""
    def make(s):
        if layout == "transposed" and len(s) >= 2:
            t = torch.randn(*s[:-2], s[-1], s[-2], generator=gen).transpose(-1, -2)
        elif layout == "sliced":
            t = torch.randn(*s[:-1], 2 * s[-1] + 1, generator=gen)[..., 1::2]
        else:
            t = torch.randn(s, generator=gen)
        return t

    x = make(shape).to(dtype)
    x0 = (x.float() + 0.2 * torch.randn(shape, generator=gen)).to(dtype)
    if layout != "contiguous":
        x0 = make(shape).to(dtype).copy_(x0)
    g = make(shape)
    g.masked_fill_(torch.rand(shape, generator=gen) < 0.2, 0.0)  # sign(0) = 0: no step
    return x, x0, g.to(dtype)


def _exact(got, ref, x=None):
    """got equals ref bit for bit and is laid out as torch.empty_like(x) (contiguous when no
    x is given: the inputs of those calls are contiguous)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if x is None:
        assert got.is_contiguous()
    else:
        assert_layout_like(got, x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


SHAPES_FAST = [(), (1,), (7, 13), (3, 5, 11), (PARALLEL_MIN * 2 + 37,)]
SHAPES_TRITON = [(), (1,), (7, 13), (3, 5, 11), (1029,)]


# the fast backends: the "torch" backend is the reference itself (test_reference_obeys_definition
# checks it against the definition)
@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_matches_reference(backend, dtype, layout, gen):
    shapes = SHAPES_TRITON if backend == "triton" else SHAPES_FAST
    for shape in shapes:
        if layout != "contiguous" and len(shape) < 2:
            continue
        x, x0, g = _inputs(shape, dtype, gen, layout)
        for clamp, lo, hi in (((-1.0, 0.5), -1.0, 0.5), (None, -math.inf, math.inf),
                              ((None, 0.25), -math.inf, 0.25)):
            with fastreg.use_backend(backend):
                f = A.fgsm(x, g, 0.3, clamp=clamp)
                p = A.pgd_step(x, x0, g, 0.15, 0.1, clamp=clamp)
            _exact(f, A.fgsm_reference(x, g, 0.3, lo, hi), x)
            _exact(p, A.pgd_step_reference(x, x0, g, 0.15, 0.1, lo, hi), x)


def test_reference_obeys_definition(gen):
    """The oracle against the definition, elementwise in float64 Python arithmetic."""
    x, x0, g = _inputs((9, 11), torch.float64, gen)
    step, eps, lo, hi = 0.15, 0.1, -1.0, 0.8
    out = A.pgd_step_reference(x, x0, g, step, eps, lo, hi)
    fg = A.fgsm_reference(x, g, 0.3, lo, hi)
    for i in range(x.numel()):
        xi, x0i, gi = x.view(-1)[i].item(), x0.view(-1)[i].item(), g.view(-1)[i].item()
        d = 1.0 if gi > 0 else (-1.0 if gi < 0 else 0.0)
        v = min(max(xi + step * d, x0i - eps), x0i + eps)
        assert out.view(-1)[i].item() == min(max(v, lo), hi)
        assert fg.view(-1)[i].item() == min(max(xi + 0.3 * d, lo), hi)
    assert bool((((out - x0).abs() <= eps + 1e-15) | (out == lo) | (out == hi)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf(backend):
    nan, inf = math.nan, math.inf
    x = torch.tensor([nan, 1.0, 2.0, inf, -inf, 0.5, 0.0, -0.0])
    g = torch.tensor([1.0, nan, -1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    x0 = torch.tensor([0.0, 1.0, nan, inf, 0.0, 0.5, 0.0, 0.0])
    with fastreg.use_backend(backend):
        f = A.fgsm(x, g, 0.25)
        fc = A.fgsm(x, g, 0.25, clamp=(-1, 1))
        p = A.pgd_step(x, x0, g, 0.25, 0.1)
    _exact(f, A.fgsm_reference(x, g, 0.25))
    _exact(fc, A.fgsm_reference(x, g, 0.25, -1.0, 1.0))
    _exact(p, A.pgd_step_reference(x, x0, g, 0.25, 0.1))
    assert math.isnan(f[0]) and f[1] == 1.0  # NaN x propagates; NaN grad takes no step
    assert math.isnan(p[2])  # NaN x0 propagates through the projection
    assert fc[3] == 1.0 and fc[4] == -1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_dtype_may_differ_and_output_is_detached(backend, gen):
    x = torch.randn(6, 10, generator=gen, requires_grad=True)
    g = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    g[0, :4] = torch.tensor([1e-50, -1e-50, 1e-300, -0.0], dtype=torch.float64)  # sign survives
    with fastreg.use_backend(backend):
        out = A.fgsm(x, g, 0.1)
        out2 = A.pgd_step(x, x.detach(), g.half(), 0.05, 0.1)
    assert not out.requires_grad and not out2.requires_grad
    assert out[0, 0] > x[0, 0] and out[0, 1] < x[0, 1] and out[0, 2] > x[0, 2]
    _exact(out, A.fgsm_reference(x.detach(), g, 0.1))
    _exact(out2, A.pgd_step_reference(x.detach(), x.detach(), g.half(), 0.05, 0.1))


def test_empty():
    x = torch.empty(0, 3)
    assert A.fgsm(x, x, 0.1).shape == (0, 3)
    assert A.pgd_step(x, x, x, 0.1, 0.1).shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype, gen):
    x, x0, g = _inputs((4, 9), dtype, gen)
    x.requires_grad_()
    with fastreg.use_backend(backend):
        opcheck(torch.ops.fastreg.pgd_step, (x, x0, g, 0.1, 0.2, -1.0, 1.0))
        opcheck(torch.ops.fastreg.pgd_step, (x, None, g, 0.1, 0.0, -math.inf, math.inf))
    if backend == "numba":
        opcheck(torch.ops.fastreg.adversarial_numba, (x.detach(), x0, g, 0.1, 0.2, -1.0, 1.0))


def test_compile_fullgraph(gen):
    """Attack steps inside a compiled loss: no graph break (torch.autograd.grad itself is
    not traceable by dynamo, so the input gradient is an argument here)."""
    lin = torch.nn.Linear(8, 3)
    x = torch.randn(5, 8, generator=gen)
    gx = torch.randn(5, 8, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)

    def adv_loss(x, gx):
        x1 = A.fgsm(x, gx, 0.1, clamp=(-2, 2))
        x2 = A.pgd_step(x1, x, gx, 0.05, 0.1, clamp=(-2, 2))
        return torch.nn.functional.cross_entropy(lin(x2), y), x2

    compiled = torch.compile(adv_loss, fullgraph=True, backend="aot_eager")
    (lc, xc), (le, xe) = compiled(x, gx), adv_loss(x, gx)
    _exact(xc, xe)
    lc.backward()
    assert lin.weight.grad is not None


def test_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        A.fgsm([1.0], x, 0.1)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        A.fgsm(torch.ones(3, 4, dtype=torch.int32), x, 0.1)
    with pytest.raises(TypeError, match="grad must have a floating dtype"):
        A.fgsm(x, torch.ones(3, 4, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="grad must have the same shape"):
        A.fgsm(x, torch.randn(4, 3), 0.1)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        A.fgsm(x, x, -0.1)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        A.fgsm(x, x, math.nan)
    with pytest.raises(TypeError, match="eps must be a real number"):
        A.fgsm(x, x, True)
    with pytest.raises(TypeError, match="eps must be a real number"):
        A.fgsm(x, x, torch.tensor(0.1))
    with pytest.raises(ValueError, match="lo <= hi"):
        A.fgsm(x, x, 0.1, clamp=(1.0, 0.0))
    with pytest.raises(TypeError, match="clamp must be None or a pair"):
        A.fgsm(x, x, 0.1, clamp=1.0)
    with pytest.raises(TypeError, match=r"clamp\[0\] \(lo\) must be a real number"):
        A.fgsm(x, x, 0.1, clamp=("a", 1.0))
    with pytest.raises(ValueError, match=r"clamp\[1\] \(hi\) must not be NaN"):
        A.fgsm(x, x, 0.1, clamp=(0.0, math.nan))
    with pytest.raises(ValueError, match="x0 must have the same dtype as x"):
        A.pgd_step(x, x.double(), x, 0.1, 0.1)
    with pytest.raises(ValueError, match="x0 must have the same shape as x"):
        A.pgd_step(x, x[:2], x, 0.1, 0.1)
    with pytest.raises(ValueError, match="step must be a finite number >= 0"):
        A.pgd_step(x, x, x, math.inf, 0.1)
    with fastreg.use_backend("cuda"), pytest.raises(RuntimeError, match="not implemented"):
        A.fgsm(x, x, 0.1)


def test_direct_ops_check_sizes():
    """torch.ops.fastreg.* called directly: grad and x0, read at x's indices by the kernels, must
    have x's shape (a shorter one was read past its end: a segfault at 2^24 elements)."""
    x = torch.randn(100)
    for name in ("adversarial_numba", "pgd_step"):  # each op body checks
        op = getattr(torch.ops.fastreg, name)
        with pytest.raises(ValueError, match=rf"{name}: grad has shape \(10,\) on cpu, "
                                             r"needs x's shape \(100,\)"):
            op(x, None, torch.randn(10), 0.1, 0.0, -math.inf, math.inf)
        with pytest.raises(ValueError, match=rf"{name}: x0 has shape \(10,\)"):
            op(x, torch.randn(10), x, 0.1, 0.1, -math.inf, math.inf)
        with pytest.raises(ValueError, match=r"grad has shape \(200,\)"):
            op(x, x, torch.randn(200), 0.1, 0.1, -math.inf, math.inf)


_COMPILE_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastreg.kernels.triton import adversarial as A
for dt, has_x0 in itertools.product(("fp32", "fp64", "fp16", "bf16"), (True, False)):
    p = "*" + dt
    sig = {"x_ptr": p, "x0_ptr": p, "g_ptr": "*fp64" if dt == "fp32" else p, "out_ptr": p,
           "n": "i64", "step_bits": "i64", "eps_bits": "i64", "lo_bits": "i64", "hi_bits": "i32",
           "HAS_X0": "constexpr", "F64": "constexpr", "BLOCK": "constexpr"}
    k = triton.compile(ASTSource(fn=A.pgd_kernel, signature=sig,
                                 constexprs={"HAS_X0": has_x0, "F64": dt == "fp64", "BLOCK": 1024}),
                       target=GPUTarget("cuda", 90, 32))
    assert "ptx" in k.asm and "cubin" in k.asm, (dt, has_x0)
print("compiled")
"""


def test_triton_kernel_compiles_for_cuda():
    """The compiled (not interpreted) Triton path: the kernel goes to PTX and a cubin for
    sm_90 with no GPU present. The interpreter accepts code the compiler rejects (e.g. a
    constexpr branch returning another type), so this runs without TRITON_INTERPRET."""
    r = run_without_interpreter(_COMPILE_SCRIPT)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype, gen):
    x, x0, g = _inputs((1000, 37), dtype, gen, "transposed")
    xc, x0c, gc = x.cuda(), x0.cuda(), g.cuda()
    _exact(A.pgd_step(xc, x0c, gc, 0.1, 0.05, clamp=(-1, 1)).cpu(),
           A.pgd_step_reference(x, x0, g, 0.1, 0.05, -1.0, 1.0))
    _exact(A.fgsm(xc, gc, 0.1).cpu(), A.fgsm_reference(x, g, 0.1))
    opcheck(torch.ops.fastreg.pgd_step, (xc, x0c, gc, 0.1, 0.2, -1.0, 1.0))
