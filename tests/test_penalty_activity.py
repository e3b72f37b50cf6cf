"""fastreg.activity_penalty and fastreg.nn.ActivityPenalty against the float64 reference."""

import pytest
import torch

import fastreg
from fastreg.ops import penalty as ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _ref(x, gy, l1, l2):
    x64 = x.detach().to(torch.float64)
    v = l1 * x64.abs().sum() + l2 * (x64 * x64).sum()
    return v, gy.to(torch.float64) + l1 * torch.sign(x64) + 2 * l2 * x64


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,view", [((3, 77001), False), ((5, 7, 3), True), ((0, 4), False), ((), False)])
def test_forward_backward_match_reference(gen, backend, dtype, shape, view):
    base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if base.numel():
        base.reshape(-1)[::5] = 0.0  # exact zeros: sign(0) = 0
    x = (base.transpose(0, -1) if view else base).detach().requires_grad_(True)
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    l1, l2 = 0.3, 0.7
    with fastreg.use_backend(backend):
        y, v = fastreg.activity_penalty(x, l1=l1, l2=l2, return_value=True)
        assert torch.equal(y, x.detach()) and y.dtype == dtype and y.shape == x.shape
        y.backward(gy)
    rv, rg = _ref(x, gy, l1, l2)
    assert v.dtype == ops.compute_dtype(dtype) and v.dim() == 0 and not v.requires_grad
    assert float(v) == pytest.approx(float(rv), rel=1e-5, abs=1e-6)
    err = ((x.grad.to(torch.float64) - rg).abs() / rg.abs().clamp(min=1)).max().item() if x.numel() else 0
    assert err <= TOL[dtype]


def test_gradcheck_float64(gen):
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-2, torch.full_like(x, 0.5), x).requires_grad_(True)  # away from sign's kink

    def f(x):
        return torch.ops.fastreg.activity_penalty(x, 0.3, 0.7)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_opcheck(gen):
    x = torch.randn(5, 3, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.fastreg.activity_penalty.default, (x, 0.3, 0.7))
    gy = torch.randn(5, 3, generator=gen)
    gv = torch.tensor(2.0)
    torch.library.opcheck(torch.ops.fastreg.activity_penalty_backward.default, (gy, x.detach(), gv, 0.3, 0.7))


def test_equals_adding_penalty_to_loss(gen):
    lin = torch.nn.Linear(6, 5).double()
    inp = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    h = lin(inp)
    loss = (fastreg.activity_penalty(h, l1=0.1, l2=0.2) ** 2).sum()
    loss.backward()
    g1 = lin.weight.grad.clone()
    lin.zero_grad()
    h = lin(inp)
    (h**2).sum().add(0.1 * h.abs().sum() + 0.2 * (h * h).sum()).backward()
    torch.testing.assert_close(g1, lin.weight.grad, rtol=1e-12, atol=1e-12)


def test_module_and_saved_bytes(gen):
    m = fastreg.nn.ActivityPenalty(l1=0.5)
    assert m.last_value is None
    x = torch.randn(10, 10, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = m(x)
    assert float(m.last_value) == pytest.approx(0.5 * float(x.detach().abs().sum()), rel=1e-6)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()  # saves x, nothing else
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 + 0.5 * torch.sign(x.detach()))
    with pytest.raises(ValueError, match="l1"):
        fastreg.nn.ActivityPenalty(l1=-1)
    with pytest.raises(TypeError, match="^fastreg.activity_penalty: x must have a floating dtype"):
        fastreg.activity_penalty(torch.arange(4), l1=1.0)
    for name in ("l1", "l2"):
        with pytest.raises(ValueError, match=f"^fastreg.activity_penalty: {name} must be a finite "
                                             "number >= 0, got -1.0$"):
            fastreg.activity_penalty(x, **{name: -1.0})

    class Sub(torch.Tensor):
        pass

    with pytest.raises(TypeError, match="^fastreg.activity_penalty: x is a tensor subclass"):
        fastreg.activity_penalty(x.detach().as_subclass(Sub), l1=1.0)


def test_no_grad_path_and_compile(gen):
    x = torch.randn(6, generator=gen)
    with torch.no_grad():
        assert torch.equal(fastreg.activity_penalty(x, l2=1.0), x)

    def f(x):
        return fastreg.activity_penalty(x * 2, l1=0.1).sum()

    xc = torch.randn(7, generator=gen, requires_grad=True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    out.backward()
    torch.testing.assert_close(xc.grad, 2 + 0.2 * torch.sign(xc.detach()))
    assert ops.compute_dtype(torch.float16) == torch.float32


def test_direct_backward_op_checks_gy():
    """fastreg::activity_penalty_backward called directly: gy, read through a raw pointer for
    x.numel() elements, must have x's shape (a shorter one was read past its end)."""
    x, gv = torch.randn(100), torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"activity_penalty_backward: gy has shape \(10,\) on "
                                         r"cpu, needs x's shape \(100,\)"):
        torch.ops.fastreg.activity_penalty_backward(torch.randn(10), x, gv, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"gy has shape \(1000,\)"):
        torch.ops.fastreg.activity_penalty_backward(torch.randn(1000), x, gv, 0.1, 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_build_matches_reference(gen, dtype):
    """The C++ build of the CUDA kernels' arithmetic (penalty.h activity_grad), forward and backward."""
    if ops._native.native() is None:
        pytest.skip("fastreg._C not built")
    x = torch.randn(3, 70001, generator=gen, dtype=torch.float64).to(dtype)
    x.reshape(-1)[::7] = 0.0
    gy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    y, v = ops._activity_forward_native(x, 0.3, 0.7, cuda=False)
    assert torch.equal(y, x) and v.dtype == ops.compute_dtype(dtype)
    gv = torch.tensor(1.5)
    gx = ops._activity_backward_native(gy, x, gv, 0.3, 0.7, cuda=False)
    rv, rg = _ref(x, gy, 0.3 * 1.5, 0.7 * 1.5)
    assert float(v) * 1.5 == pytest.approx(float(rv), rel=1e-6)
    err = ((gx.to(torch.float64) - rg).abs() / rg.abs().clamp(min=1)).max().item()
    assert err <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(gen, dtype):
    x = torch.randn(3, 70001, generator=gen, dtype=torch.float64).to(dtype).cuda().requires_grad_(True)
    gy = torch.randn(x.shape, dtype=torch.float64, device="cuda").to(dtype)
    y, v = fastreg.activity_penalty(x, l1=0.3, l2=0.7, return_value=True)
    assert torch.equal(y, x.detach())
    y.backward(gy)
    rv, rg = _ref(x, gy, 0.3, 0.7)
    assert float(v) == pytest.approx(float(rv), rel=1e-5)
    err = ((x.grad.to(torch.float64) - rg).abs() / rg.abs().clamp(min=1)).max().item()
    assert err <= TOL[dtype]
    torch.library.opcheck(torch.ops.fastreg.activity_penalty.default, (x, 0.3, 0.7))
