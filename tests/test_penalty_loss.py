"""fastreg.penalty.loss: the penalty as a differentiable scalar. Against autograd of the
plain-torch penalty (values, weight and strength gradients, Hessian-vector products),
gradcheck and gradgradcheck in float64, the conventions at w = 0, the fused kernels on the
backward path, bad arguments, and an L1 strength's hypergradient through
ReversibleSGD.reverse against float64 unrolled autograd."""

import math

import pytest
import torch

import fastreg
from fastreg.ops import penalty as _ops
from fastreg.optim import ReversibleSGD

P = fastreg.penalty


def plain(ws, l1, l2, gl, groups):
    """The penalty in plain torch ops (autograd differentiates it)."""
    n = len(ws)
    per = lambda v: [v[i] for i in range(n)] if isinstance(v, (list, tuple)) or (  # noqa: E731
        isinstance(v, torch.Tensor) and v.dim() == 1) else [v] * n
    total = 0.0
    for w, a, b, c, g in zip(ws, per(l1), per(l2), per(gl), groups):
        total = total + a * w.abs().sum() + b * (w * w).sum()
        if g is None:
            continue
        if isinstance(g, torch.Tensor):
            idx = g.reshape(-1)
            ng = int(idx.max()) + 1
            sq = torch.zeros(ng, dtype=w.dtype).index_add(0, idx, (w * w).reshape(-1))
            cnt = torch.bincount(idx, minlength=ng).to(w.dtype)
        else:
            w2 = w if w.dim() >= 2 else w.reshape(-1, 1)
            dim = 0 if g == "rows" else 1
            moved = w2.movedim(dim, 0).reshape(w2.shape[dim], -1)
            sq = (moved * moved).sum(1)
            cnt = torch.full_like(sq, moved.shape[1])
        total = total + c * (cnt.sqrt() * sq.sqrt()).sum()
    return total


def make(dtype, seed=0, noncontig=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(9, 14, generator=g, dtype=torch.float64)
    ws = [base[:, ::2] if noncontig else base[:, :7].contiguous(),  # (9, 7), strided view
          torch.randn(3, 5, 2, 2, generator=g, dtype=torch.float64),
          torch.randn(11, generator=g, dtype=torch.float64),
          torch.randn(6, 4, generator=g, dtype=torch.float64)]
    ws = [w.to(dtype).requires_grad_() for w in ws]
    groups = ["rows", "cols", None, torch.randint(0, 3, (6, 4), generator=g)]
    return ws, groups


TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["numbers", "shared tensors", "per-tensor tensors", "lists"])
def test_against_autograd_of_the_plain_penalty(dtype, kind):
    ws, groups = make(dtype)
    if kind == "numbers":
        l1, l2, gl = 0.03, 0.2, 0.5
    elif kind == "shared tensors":
        l1, l2, gl = (torch.tensor(v, dtype=dtype, requires_grad=True) for v in (0.03, 0.2, 0.5))
    elif kind == "per-tensor tensors":
        l1, l2, gl = (torch.tensor(v, dtype=dtype, requires_grad=True) for v in
                      ([0.03, 0.0, 0.1, 0.02], [0.2, 0.4, 0.0, 0.1], [0.5, 0.7, 0.0, 0.3]))
    else:
        l1, l2, gl = [0.03, 0.0, 0.1, 0.02], [0.2, 0.4, 0.0, 0.1], [0.5, 0.7, 0.0, 0.3]
    got = P.loss(ws, l1=l1, l2=l2, group_lasso=gl, groups=groups)
    assert got.dtype == dtype and got.dim() == 0
    strengths = [s for s in (l1, l2, gl) if isinstance(s, torch.Tensor)]
    g_got = torch.autograd.grad(got, ws + strengths)
    # the oracle in float64
    ws64 = [w.detach().double().requires_grad_() for w in ws]
    s64 = [s.detach().double().requires_grad_() for s in strengths]
    it = iter(s64)
    want = plain(ws64, *(next(it) if isinstance(s, torch.Tensor) else s for s in (l1, l2, gl)), groups)
    g_want = torch.autograd.grad(want, ws64 + s64)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape and a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype):
    ws, groups = make(dtype, noncontig=False)
    got = torch.autograd.grad(P.loss(ws, l1=0.03, l2=0.2, group_lasso=0.5, groups=groups), ws)
    ws64 = [w.detach().double().requires_grad_() for w in ws]
    want = torch.autograd.grad(plain(ws64, 0.03, 0.2, 0.5, groups), ws64)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-2)


def _fn(groups, n):
    def f(*xs):
        return P.loss(list(xs[:n]), l1=xs[n], l2=xs[n + 1], group_lasso=xs[n + 2], groups=groups)
    return f


@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_and_gradgradcheck(seed):
    ws, groups = make(torch.float64, seed)
    strengths = [torch.tensor(0.03, dtype=torch.float64, requires_grad=True),
                 torch.tensor([0.2, 0.4, 0.05, 0.1], dtype=torch.float64, requires_grad=True),
                 torch.tensor([0.5, 0.7, 0.05, 0.3], dtype=torch.float64, requires_grad=True)]
    f = _fn(groups, len(ws))
    assert torch.autograd.gradcheck(f, (*ws, *strengths))
    assert torch.autograd.gradgradcheck(f, (*ws, *strengths))


def test_hessian_vector_products_against_plain_torch():
    ws, groups = make(torch.float64, 3)
    gl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    l1 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    us = [torch.randn_like(w) for w in ws]

    def hvp(fn):
        gs = torch.autograd.grad(fn(ws, l1, 0.2, gl, groups), ws, create_graph=True)
        return torch.autograd.grad(gs, ws + [l1, gl], grad_outputs=us)

    got = hvp(lambda *a: P.loss(a[0], l1=a[1], l2=a[2], group_lasso=a[3], groups=a[4]))
    want = hvp(plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conventions_at_zero():
    # exact zeros: sign(0) = 0 for L1, and an all-zero group gets gradient 0 and Hessian 0
    w = torch.tensor([[0.0, 0.0, 0.0], [0.5, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    v = P.loss([w], l1=0.1, l2=0.2, group_lasso=0.3, groups="rows")
    (g,) = torch.autograd.grad(v, [w], create_graph=True)
    row = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    nrm = float(row.norm())
    want = torch.zeros(2, 3, dtype=torch.float64)
    want[1] = 0.1 * torch.sign(row) + 0.4 * row + 0.3 * math.sqrt(3) * row / nrm
    torch.testing.assert_close(g.detach(), want, rtol=1e-13, atol=1e-13)
    (h,) = torch.autograd.grad(g, [w], grad_outputs=torch.ones_like(w))
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[0], torch.full((3,), 0.4, dtype=torch.float64))  # 2 l2 only


def test_backward_runs_the_fused_kernels(monkeypatch):
    calls = []
    real = _ops._run_accumulate

    def spy(params, grads, coefs, modes, group_index, init):
        calls.append((len(params), list(init)))
        return real(params, grads, coefs, modes, group_index, init)

    monkeypatch.setattr(_ops, "_run_accumulate", spy)
    ws, groups = make(torch.float32)
    P.loss(ws, l1=0.1, l2=0.2, group_lasso=0.3, groups=groups).backward()
    assert calls == [(4, [1, 1, 1, 1])]  # one pass over all tensors, into fresh buffers
    gs = torch.autograd.grad(P.loss(ws, l1=0.1, groups=groups), ws, create_graph=True)
    assert len(calls) == 2 and all(g.requires_grad is False or g.grad_fn is not None for g in gs)


def test_bad_arguments():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="l1"):
        P.loss([w], l1=-0.1)
    with pytest.raises(ValueError, match="l2"):
        P.loss([w], l2=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="l1"):
        P.loss([w], l1=torch.tensor(math.nan))
    with pytest.raises(ValueError, match="one entry per tensor"):
        P.loss([w], l1=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="l2 has 2 entries"):
        P.loss([w], l2=[0.1, 0.2])
    with pytest.raises(TypeError, match="l1"):
        P.loss([w], l1=torch.tensor(1))
    with pytest.raises(ValueError, match="needs groups"):
        P.loss([w], group_lasso=0.1)
    with pytest.raises(ValueError, match="groups"):
        P.loss([w], group_lasso=0.1, groups="diagonal")
    with pytest.raises(ValueError, match="groups has 2 entries"):
        P.loss([w], groups=["rows", "cols"])
    with pytest.raises(TypeError, match=r"params\[1\]"):
        P.loss([w, 3.0])
    with pytest.raises(TypeError, match="int64"):
        P.loss([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"params\[1\] must be a tensor, got dict \(param-group"):
        P.loss([w, {"params": [w]}])
    with pytest.raises(TypeError, match="^fastreg.penalty.loss: params must be a tensor or an "
                                        "iterable of tensors, got float$"):
        P.loss(3.0)
    with pytest.raises(ValueError, match="^fastreg.penalty.loss: l1 must be a number, a 0-dim tensor "
                                         r"or a 1-D tensor .* got shape \(1, 1\)"):
        P.loss([w], l1=torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"^fastreg.penalty.loss: l2\[1\] must be"):
        P.loss([w, w], l2=[0.1, -1.0])
    with pytest.raises(ValueError, match="^fastreg.penalty.loss: l2 must be"):
        P.loss([w], l2=-1.0)
    with pytest.raises(ValueError, match="^fastreg.penalty.loss: l1 must be finite"):
        P.loss([w], l1=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="^fastreg.penalty.loss: group_lasso must be"):
        P.loss([w], group_lasso=-1.0)
    with pytest.raises(ValueError, match="^fastreg.penalty.loss: group_lasso=0.5 for params"
                                         r"\[0\] needs groups \('rows', 'cols'"):
        P.loss([w], group_lasso=torch.tensor(0.5))  # a tensor strength is checked as well
    with pytest.raises(ValueError, match=r"^fastreg.penalty.loss: groups\[1\] must be one of"):
        P.loss([w, w], groups=["rows", "diagonal"])
    with pytest.raises(ValueError, match=r"^fastreg.penalty.loss: groups must be one of"):
        P.loss([w, w], groups="diagonal")
    with pytest.raises(ValueError, match=r"^fastreg.penalty.loss: groups index tensor must have "
                                         "one entry per element: numel 5 != parameter numel 12"):
        P.loss([w], group_lasso=0.1, groups=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^fastreg.penalty.loss: params\[0\] must be dense, got "
                                        "torch.sparse_coo"):
        P.loss([torch.eye(3).to_sparse()])
    with pytest.raises(ValueError, match="^fastreg.penalty.loss: params must all be on one device, "
                                         "got cpu and meta"):
        P.loss([w, torch.empty(3, device="meta")])

    class Sub(torch.Tensor):
        pass

    with pytest.raises(TypeError, match=r"^fastreg.penalty.loss: params\[0\] is a Sub; only plain "
                                        "tensors and Parameters are accepted"):
        P.loss([w.detach().as_subclass(Sub)])
    assert float(P.loss([])) == 0.0
    torch.set_default_dtype(torch.float64)
    try:  # float32 for no tensors, as for float32 ones, whatever the default dtype
        assert P.loss([]).dtype == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)


def test_one_index_tensor_for_one_tensor():
    """groups given as one index tensor (not a list) applies to the single tensor of params."""
    w = torch.randn(6, 4, dtype=torch.float64)
    idx = torch.randint(0, 3, (6, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(P.loss([w], group_lasso=0.3, groups=idx),
                               plain([w], 0.0, 0.0, 0.3, [idx]), rtol=1e-13, atol=0)


def test_default_strengths_are_zero():
    """l1, l2 and group_lasso default to 0: a penalty names only the terms it wants."""
    w = torch.randn(3, 4, dtype=torch.float64)
    assert float(P.loss([w])) == 0.0
    torch.testing.assert_close(P.loss([w], l2=0.5), 0.5 * (w * w).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(P.loss([w], l1=0.5), 0.5 * w.abs().sum(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(), (2,)])
def test_float32_strengths_with_float64_tensors(shape):
    """Strength tensors of another dtype are taken in float64: with an outer gradient other
    than 1, a float32 strength kept float32 rounds gout * strength to float32 (an error of
    ~4e-8 in the float64 weight gradients)."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True),
          torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)]
    s = torch.tensor([0.1, 0.3] if shape else 0.3, dtype=torch.float32)
    (P.loss(ws, l1=s, l2=s) / 3).backward()
    for i, w in enumerate(ws):
        c = float(s[i] if shape else s)
        want = (c * torch.sign(w.detach()) + 2 * c * w.detach()) / 3
        torch.testing.assert_close(w.grad, want, rtol=1e-13, atol=0)


# ------------------------------------------------------------ hypergradients through reverse
def _unrolled_l1(model, w0, X, y, T, lr, mom, l1, l2, bs=16):
    """float64 unrolled autograd through T momentum-SGD steps with the plain-torch penalty."""
    names = [n for n, _ in model.named_parameters()]
    ws = list(w0)
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(T):
        idx = (torch.arange(bs) + 5 * t) % X.shape[0]
        out = torch.func.functional_call(model, dict(zip(names, ws)), (X[idx],))
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        loss = loss + plain([ws[0], ws[2]], l1, l2, 0.0, [None, None])
        gs = torch.autograd.grad(loss, ws, create_graph=True)
        vs = [mom[t] * v - (1 - mom[t]) * g for v, g in zip(vs, gs)]
        ws = [w + lr * v for w, v in zip(ws, vs)]
    out = torch.func.functional_call(model, dict(zip(names, ws)), (X,))
    return torch.nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_l1_hypergradient_through_reverse_matches_unrolled(seed):
    T = 15
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(48, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    l1 = torch.tensor([0.02, 0.05], dtype=torch.float64, requires_grad=True)  # per layer
    l2 = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    lr = 0.2
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.9)
    mom = torch.tensor([opt.quantized_momentum(0, t) for t in range(T)], dtype=torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    weights = [model[0].weight, model[2].weight]

    def train_loss(t):
        idx = (torch.arange(16) + 5 * t) % 48
        return (torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
                + P.loss(weights, l1=l1, l2=l2))

    for t in range(T):
        opt.zero_grad()
        train_loss(t).backward()
        opt.step()
    l1.grad = l2.grad = None  # the forward run's backward() calls accumulated into them
    opt.reverse(lambda: torch.nn.functional.cross_entropy(model(X), y), train_loss)
    got = [l1.grad, l2.grad] + [p.grad for p in model.parameters()]
    assert got[0] is not None and float(got[0].abs().min()) > 0

    l1_r, l2_r = l1.detach().clone().requires_grad_(), l2.detach().clone().requires_grad_()
    w0_r = [w.clone().requires_grad_() for w in w0]
    obj = _unrolled_l1(model, w0_r, X, y, T, lr, mom, [l1_r[0], l1_r[1]], l2_r)
    want = torch.autograd.grad(obj, [l1_r, l2_r] + w0_r)
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm()) <= 1e-6


def test_torch_compile_fullgraph_matches_eager():
    # named groups and tensor strengths; row 0 is all zero (the subgradient conventions)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w[0] = 0.0
    w = w.requires_grad_()
    v = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    l1 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    l2 = torch.tensor([0.2, 0.05], dtype=torch.float64, requires_grad=True)

    def f(w, v, l1, l2):
        return P.loss([w, v], l1=l1, l2=l2, group_lasso=0.3, groups=["rows", "cols"])

    eager = f(w, v, l1, l2)
    g_eager = torch.autograd.grad(eager, [w, v, l1, l2])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(w, v, l1, l2)
    g_comp = torch.autograd.grad(compiled, [w, v, l1, l2])
    torch.testing.assert_close(compiled, eager, rtol=1e-14, atol=1e-14)
    for a, b in zip(g_comp, g_eager):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
