"""Penalty family: accumulate_, prox_, sparsity against the float64 reference (docs/penalty.md)."""

import math

import pytest
import torch

import fastreg
import fastreg.penalty as P
from fastreg import _native
from fastreg.ops import penalty as ops
from helpers import host_hot_path_on

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# tolerance on the result (grad or new weight) relative to max(1, |ref|): one rounding of the
# stored dtype plus float32 arithmetic
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GROUPINGS = [None, "rows", "cols", "filters", "channels", "explicit"]
CPU_BACKENDS = ["numba", "torch"] + (["host"] if _native.native() is not None else [])


def _params(gen, dtype, grads=True):
    shapes = [(7, 5, 3), (11,), (4, 9), (), (3, 4, 2, 3), (0, 5), (2, 33000)]
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    # a non-contiguous parameter (transposed view) and exact zeros, including a whole zero row
    ps.append(torch.randn(6, 10, generator=gen, dtype=torch.float64).to(dtype).t())
    ps[2][1] = 0.0
    ps[0][0, 0, :] = 0.0
    if grads:
        for i, p in enumerate(ps):
            if i % 3 != 1:  # some parameters without .grad
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        ps[-1].grad = torch.randn(6, 10, generator=gen, dtype=torch.float64).to(dtype).t()  # strided grad
        # a transposed parameter without .grad: accumulate_ gives it a contiguous one
        ps.append(torch.randn(3, 5, generator=gen, dtype=torch.float64).to(dtype).t())
    return ps


def _groups(spec, ps, gen):
    if spec == "explicit":
        return [torch.randint(0, 5, p.shape, generator=gen) for p in ps]
    return spec


def _spec_of(gs, i):
    return gs[i] if isinstance(gs, list) else gs


def _run(backend, fn):
    if backend == "host":
        return fn()  # dispatch patched by the caller
    with fastreg.use_backend(backend):
        return fn()


def _host_patch(monkeypatch):
    """backend "host": every dtype through the C++ build of penalty.h."""
    monkeypatch.setattr(ops, "_accumulate_numba", lambda *a, **k: ops._accumulate_host(*a, **k))
    monkeypatch.setattr(ops, "_prox_numba", lambda *a, **k: ops._prox_host(*a, **k))


@pytest.fixture(autouse=True)
def _numba_kernels(request, monkeypatch):
    """backend "numba": the Numba kernels, not the C++ hot path that float32/float64 take."""
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "numba":
        monkeypatch.setattr(ops, "HOST_HOT_PATH", False)


def _close(got, ref, dtype, what):
    err = ((got.to(torch.float64) - ref).abs() / ref.abs().clamp(min=1.0)).max().item() if ref.numel() else 0
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_accumulate_matches_reference(gen, backend, dtype, grouping, monkeypatch):
    if backend == "host":
        _host_patch(monkeypatch)
    ps = _params(gen, dtype)
    gs = _groups(grouping, ps, gen)
    l1, l2, gl = 0.03, 0.2, (0.0 if grouping is None else 0.7)
    g0 = [None if p.grad is None else p.grad.to(torch.float64, copy=True) for p in ps]
    strides = [None if p.grad is None else p.grad.stride() for p in ps]
    v = _run(backend, lambda: P.accumulate_(ps, l1=l1, l2=l2, group_lasso=gl, groups=gs))
    assert v.dtype == torch.float32 and v.dim() == 0
    total = 0.0
    for i, p in enumerate(ps):
        mode, idx = P._group_spec(_spec_of(gs, i), p, "t", "groups")
        rv, rg = ops.accumulate_reference_one(p, l1, l2, gl, mode, idx)
        total += float(rv)
        exp = rg + (0.0 if g0[i] is None else g0[i])
        assert p.grad is not None and p.grad.dtype == dtype and p.grad.shape == p.shape
        if strides[i] is not None:
            assert p.grad.stride() == strides[i]  # updated in place
        else:  # made here: contiguous whatever the parameter's strides (the one-pass path's kind)
            assert p.grad.is_contiguous()
        _close(p.grad, exp, dtype, f"grad {i} {tuple(p.shape)}")
        assert torch.isfinite(p.grad.float()).all()  # zero groups: subgradient 0, never NaN
    assert math.isclose(float(v), total, rel_tol=1e-5 if dtype != torch.float64 else 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_prox_matches_reference(gen, backend, dtype, grouping, monkeypatch):
    if backend == "host":
        _host_patch(monkeypatch)
    ps = _params(gen, dtype, grads=False)
    gs = _groups(grouping, ps, gen)
    lr, l1, l2, gl = 0.3, 0.4, 0.25, (0.0 if grouping is None else 1.1)
    before = [p.clone() for p in ps]
    _run(backend, lambda: P.prox_(ps, lr, l1=l1, l2=l2, group_lasso=gl, groups=gs))
    for i, p in enumerate(ps):
        mode, idx = P._group_spec(_spec_of(gs, i), p, "t", "groups")
        ref = ops.prox_reference_one(before[i], lr, l1, l2, gl, mode, idx)
        _close(p, ref, dtype, f"prox {i} {tuple(p.shape)}")
        # the same exact zeros, except where the threshold test is a tie within rounding: a
        # group norm (or |w|) equal to its threshold to float32 precision leaves the float64
        # reference a remnant of a few ulp of the weight, which float32 may round to zero
        # (half precision: zeros are not compared)
        if dtype in (torch.float32, torch.float64):
            tie = ref.double().abs() <= 64 * torch.finfo(dtype).eps * before[i].double().abs()
            assert torch.equal((p == 0) | tie, (ref == 0) | tie)


def test_prox_makes_exact_zeros_and_group_shrinkage(gen):
    w = torch.randn(20, 8, generator=gen)
    w[3] *= 1e-3  # a weak row: removed by group shrinkage
    P.prox_([w], 1.0, group_lasso=0.05, groups="rows")
    assert torch.all(w[3] == 0)
    s = P.sparsity([w], groups="rows")
    assert s["zero_groups"] >= 1 and s["num_groups"] == 20
    # soft-thresholding: entries with |w| <= lr * l1 become exact zeros, the rest shrink
    v = torch.tensor([0.5, -0.05, 0.09, -2.0, 0.0])
    P.prox_([v], 0.1, l1=1.0)
    assert v.tolist() == pytest.approx([0.4, 0.0, 0.0, -1.9, 0.0])
    # elastic net: divide by 1 + 2 lr l2
    v = torch.tensor([3.0, -1.0])
    P.prox_([v], 0.5, l2=1.0)
    assert v.tolist() == pytest.approx([1.5, -0.5])


def test_group_lasso_value_and_subgradient_at_zero():
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    w.grad = None
    v = P.accumulate_([w], group_lasso=2.0, groups="rows")
    # only row 1 has a nonzero norm: 2 * sqrt(4) * 5 = 20
    assert float(v) == pytest.approx(20.0)
    assert torch.equal(w.grad[0], torch.zeros(4)) and torch.equal(w.grad[2], torch.zeros(4))
    assert w.grad[1].tolist() == pytest.approx([2 * 2 * 3 / 5, 2 * 2 * 4 / 5, 0.0, 0.0])


def test_group_geometry():
    # rows of a Linear weight, cols = input features, filters / channels of a conv weight
    assert ops.block_shape((5, 7), ops.MODE_DIM0) == (1, 5, 7)
    assert ops.block_shape((5, 7), ops.MODE_DIM1) == (5, 7, 1)
    assert ops.block_shape((8, 3, 2, 2), ops.MODE_DIM1) == (8, 3, 4)
    assert ops.block_shape((6,), ops.MODE_DIM0) == (1, 6, 1)
    assert ops.block_shape((6,), ops.MODE_DIM1) == (6, 1, 1)
    idx, ng = ops.group_index((2, 3, 2), ops.MODE_DIM1)
    assert ng == 3 and idx.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]


def test_nan_and_inf_propagate():
    w = torch.tensor([float("nan"), float("inf"), 1.0, -2.0])
    w.grad = torch.zeros(4)
    v = P.accumulate_([w], l1=0.5)
    assert math.isnan(float(v))
    assert math.isnan(w.grad[0]) and w.grad[2] == 0.5 and w.grad[3] == -0.5
    u = torch.tensor([float("nan"), float("-inf"), 0.05])
    P.prox_([u], 0.1, l1=1.0)
    assert math.isnan(u[0]) and u[1] == float("-inf") and u[2] == 0.0


def test_param_groups_and_mixed_dtypes(gen):
    a = torch.randn(9, 4, generator=gen)
    b = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    c = torch.randn(3, 3, generator=gen).half()
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    v = P.accumulate_([{"params": [a, b], "l1": 0.1, "groups": "cols", "group_lasso": 0.2, "lr": 1.0},
                       {"params": [c], "l2": 0.3}])
    ref = 0.0
    for p, kw in ((a, (0.1, 0.0, 0.2, ops.MODE_DIM1)), (b, (0.1, 0.0, 0.2, ops.MODE_DIM1)),
                  (c, (0.0, 0.3, 0.0, ops.MODE_NONE))):
        rv, rg = ops.accumulate_reference_one(p, *kw)
        ref += float(rv)
        _close(p.grad, rg, p.dtype, "param group")
    assert float(v) == pytest.approx(ref, rel=1e-5)


def test_empty_and_zero_size():
    assert float(P.accumulate_([], l1=1.0)) == 0.0
    z = torch.empty(0, 3)
    v = P.accumulate_([z], l1=1.0, group_lasso=1.0, groups="rows")
    assert float(v) == 0.0 and z.grad is not None and z.grad.shape == (0, 3)
    P.prox_([z], 0.1, l1=1.0)
    assert P.sparsity([z]) == {"weights": 0.0, "groups": 0.0, "zero_groups": 0, "num_groups": 0}


def test_bad_arguments():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="l1"):
        P.accumulate_([w], l1=-1.0)
    with pytest.raises(TypeError, match="l2"):
        P.accumulate_([w], l2="x")
    with pytest.raises(ValueError, match="groups"):
        P.accumulate_([w], group_lasso=1.0)
    with pytest.raises(ValueError, match="groups"):
        P.accumulate_([w], group_lasso=1.0, groups="diagonal")
    with pytest.raises(ValueError, match="groups"):
        P.accumulate_([w], group_lasso=1.0, groups=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="params"):
        P.accumulate_([torch.arange(3)], l1=1.0)
    with pytest.raises(TypeError, match="params"):
        P.accumulate_(3, l1=1.0)
    with pytest.raises(ValueError, match="lr"):
        P.prox_([w], -0.1, l1=1.0)
    with pytest.raises(TypeError, match="groups"):
        P.accumulate_([w], group_lasso=1.0, groups=torch.zeros(9))


def test_mixed_devices_rejected():
    a = torch.randn(3)
    b = torch.randn(3, device="meta")
    with pytest.raises(ValueError, match="one device"):
        P.accumulate_([a, b], l1=1.0)
    with pytest.raises(ValueError, match="one device"):
        P.prox_([a, b], 0.1, l1=1.0)


@pytest.mark.parametrize("one_pass", [True, False])
def test_stale_grad_rejected(gen, monkeypatch, one_pass):
    """`p.data = ...` can change a tensor's shape or dtype and leave its old .grad: refused
    with an error naming the tensor, never written past the gradient's end."""
    if one_pass:
        host_hot_path_on(monkeypatch)
    else:
        monkeypatch.setattr(P, "_onepass", lambda *a, **k: (False, None))
    ok = torch.nn.Parameter(torch.randn(3, generator=gen))
    ok.grad = torch.zeros(3)
    for new in (torch.randn(40, 30, generator=gen), torch.randn(2, 3, generator=gen),
                torch.randn(3, 4, generator=gen), torch.randn(4, 3, generator=gen, dtype=torch.float64)):
        p = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
        p.grad = torch.zeros(4, 3)
        p.data = new
        with pytest.raises(ValueError, match=r"^fastreg.penalty.accumulate_: tensor 1 of params "
                                             r".*\.grad has shape \(4, 3\)"):
            P.accumulate_([ok, p], l1=0.1)
        assert torch.equal(p.grad, torch.zeros(4, 3)) and torch.equal(ok.grad, torch.zeros(3))
    w = torch.randn(5, generator=gen)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        torch.ops.fastreg.penalty_accumulate([w], [torch.zeros(4)], [0.1, 0.0, 0.0], [0], [], [0])
    with pytest.raises(ValueError, match="1 params but 2 grads"):
        torch.ops.fastreg.penalty_accumulate([w], [torch.zeros(5)] * 2, [0.1, 0.0, 0.0], [0], [], [0])


def test_direct_ops_check_lists_and_group_index(gen):
    """torch.ops.fastreg.penalty_accumulate / penalty_prox called directly check what the
    wrappers check: an explicit group index the kernels use as offsets must have one entry
    per element, be >= 0 and sit on the tensor's device; list lengths must agree."""
    w = torch.randn(100, generator=gen)
    g = torch.zeros(100)
    cf = [0.0, 0.0, 0.1]
    ok = torch.arange(100) % 7
    acc = torch.ops.fastreg.penalty_accumulate
    prox = torch.ops.fastreg.penalty_prox
    for bad, msg in ((ok[:10], "100 elements"), (ok - 3, ">= 0"), (ok.float(), "integer tensor")):
        with pytest.raises(ValueError, match=msg):
            acc([w], [g], cf, [3], [bad], [0])
        with pytest.raises(ValueError, match=msg):
            prox([w], 0.1, cf, [3], [bad])
    with pytest.raises(ValueError, match="group_index has 0"):
        prox([w], 0.1, cf, [3], [])
    with pytest.raises(ValueError, match="1 modes and 3 coefs, got 0"):
        prox([w], 0.1, cf, [], [])
    with pytest.raises(ValueError, match="modes must be 0-3"):
        acc([w], [g], cf, [7], [], [0])
    acc([w], [g], cf, [3], [ok], [0])  # the well-formed call runs
    assert g.abs().sum() > 0


def test_half_accumulates_in_float32():
    # 1 + 3 * 2^-12 is not a half; the update must round once from the float32 sum
    w = torch.full((4,), 2.0**-10, dtype=torch.float16)
    w.grad = torch.ones(4, dtype=torch.float16)
    P.accumulate_([w], l1=3 * 2.0**-12)
    assert w.grad[0].item() == float(torch.tensor(1 + 3 * 2.0**-12).half())


def test_half_conversions_exact():
    from fastreg.kernels.numba import penalty as nb
    import numpy as np

    bits = np.arange(65536, dtype=np.uint32)
    h = torch.from_numpy(bits.astype(np.int32)).to(torch.int16).view(torch.float16)
    f = np.array([nb.half_to_f32(np.uint16(b)) for b in bits[::7]], np.float32)
    ref = h.float().numpy()[::7]
    assert np.array_equal(np.isnan(f), np.isnan(ref)) and np.array_equal(f[~np.isnan(f)], ref[~np.isnan(ref)])
    x = torch.randn(5000, dtype=torch.float64) * torch.logspace(-9, 6, 5000, dtype=torch.float64)
    xf = torch.cat([x.float(), torch.tensor([65519.0, 65520.0, 1e9, float("inf"), -0.0])])
    got = np.array([nb.f32_to_half(np.float32(v)) for v in xf.numpy()], np.uint16)
    assert np.array_equal(got, xf.half().view(torch.int16).numpy().view(np.uint16))
    got = np.array([nb.f32_to_bf16(np.float32(v)) for v in xf.numpy()], np.uint16)
    assert np.array_equal(got, xf.bfloat16().view(torch.int16).numpy().view(np.uint16))


def test_launches_independent_of_parameter_count(monkeypatch):
    from fastreg.kernels.numba import penalty as nb

    monkeypatch.setattr(ops, "HOST_HOT_PATH", False)
    calls = []
    real = nb.accumulate
    monkeypatch.setattr(nb, "accumulate", lambda *a: (calls.append(1), real(*a))[1])
    for n in (3, 300):
        calls.clear()
        ps = [torch.randn(4, 5) for _ in range(n)]
        with fastreg.use_backend("numba"):
            P.accumulate_(ps, l1=0.1, group_lasso=0.1, groups="rows")
        assert len(calls) == 1


def test_opcheck_ops(gen):
    ps = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen, dtype=torch.float64)]
    gs = [torch.randn_like(p) for p in ps]
    idx = torch.randint(0, 3, (7,), generator=gen)
    torch.library.opcheck(torch.ops.fastreg.penalty_accumulate.default,
                          (ps, gs, [0.1, 0.2, 0.3, 0.0, 0.1, 0.5], [ops.MODE_DIM1, ops.MODE_EXPLICIT],
                           [idx], [0, 0]))
    torch.library.opcheck(torch.ops.fastreg.penalty_prox.default,
                          ([p.clone() for p in ps], 0.1, [0.1, 0.2, 0.3, 0.0, 0.1, 0.5],
                           [ops.MODE_DIM0, ops.MODE_EXPLICIT], [idx]))


def test_value_matches_accumulate(gen):
    ps = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    v1 = P.value(ps, l1=0.1, l2=0.2, group_lasso=0.3, groups="cols")
    v2 = P.accumulate_(ps, l1=0.1, l2=0.2, group_lasso=0.3, groups="cols")
    assert float(v1) == pytest.approx(float(v2), rel=1e-6)


def test_cuda_part_compiled():
    C = _native.native()
    if C is None:
        pytest.skip("fastreg._C not built")
    assert hasattr(C, "penalty_accumulate_host") and hasattr(C, "penalty_prox_host")
    if C.with_cuda:
        assert hasattr(C, "penalty_accumulate_cuda") and hasattr(C, "penalty_prox_cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_cuda_matches_reference(gen, dtype, grouping):
    ps = [p.cuda() for p in _params(gen, dtype, grads=False)]
    for i, p in enumerate(ps):
        if i % 3 != 1:
            p.grad = torch.randn(p.shape, dtype=torch.float64, device="cuda").to(dtype)
    gs = _groups(grouping, ps, gen)
    gs = [g.cuda() for g in gs] if isinstance(gs, list) else gs
    l1, l2, gl = 0.03, 0.2, (0.0 if grouping is None else 0.7)
    g0 = [None if p.grad is None else p.grad.to(torch.float64, copy=True) for p in ps]
    v = P.accumulate_(ps, l1=l1, l2=l2, group_lasso=gl, groups=gs)
    total = 0.0
    for i, p in enumerate(ps):
        mode, idx = P._group_spec(_spec_of(gs, i), p, "t", "groups")
        rv, rg = ops.accumulate_reference_one(p, l1, l2, gl, mode, idx)
        total += float(rv)
        _close(p.grad, rg + (0.0 if g0[i] is None else g0[i]), dtype, f"cuda grad {i}")
    assert v.device.type == "cuda" and float(v) == pytest.approx(total, rel=1e-5)
    before = [p.detach().clone() for p in ps]
    P.prox_(ps, 0.3, l1=0.4, l2=0.25, group_lasso=gl * 1.5, groups=gs)
    for i, p in enumerate(ps):
        mode, idx = P._group_spec(_spec_of(gs, i), p, "t", "groups")
        _close(p, ops.prox_reference_one(before[i], 0.3, 0.4, 0.25, gl * 1.5, mode, idx), dtype, f"cuda prox {i}")


@pytest.mark.gpu
def test_cuda_launches_fixed():
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for n in (4, 400):
        ps = [torch.randn(16, 8, device="cuda") for _ in range(n)]
        P.accumulate_(ps, l1=0.1, group_lasso=0.1, groups="rows")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            P.accumulate_(ps, l1=0.1, group_lasso=0.1, groups="rows")
            torch.cuda.synchronize()
        counts.append(sum(1 for e in prof.events() if e.device_type.name == "CUDA"))
    assert counts[0] == counts[1]


def test_hot_path_choice(gen, monkeypatch):
    """float32/float64 take the C++ host kernels when built, halves and explicit groups Numba."""
    host_hot_path_on(monkeypatch)
    used = []
    monkeypatch.setattr(ops, "_accumulate_host", lambda *a, **k: used.append("host") or torch.zeros(()))
    monkeypatch.setattr(ops, "_accumulate_numba", lambda *a, **k: used.append("numba") or torch.zeros(()))
    w32 = torch.randn(4, 4, generator=gen)
    P.accumulate_([w32], l1=0.1)
    P.accumulate_([w32.half()], l1=0.1)
    P.accumulate_([w32], group_lasso=0.1, groups=torch.zeros(16, dtype=torch.int64))
    assert used == ["host", "numba", "numba"]


def test_one_pass_path_matches_general_path(gen, monkeypatch):
    """The one-pass eager paths of accumulate_ and prox_ launch what the general path launches:
    the same gradients, weights and value, bit for bit. They are taken for plain lists (and
    generators) of contiguous float32/float64 CPU tensors (with grads, for accumulate_), and
    decline everything else."""
    host_hot_path_on(monkeypatch)
    real = P._onepass
    taken = []

    def spy(*a):
        out = real(*a)
        taken.append(out[0])
        return out

    def general(*a):
        return False, None

    shapes = [(7, 5), (33,), (3, 4, 3, 3), (1,), ()]
    cases = [dict(l1=0.01, l2=0.02), dict(l2=0.1, group_lasso=0.05, groups="rows"),
             dict(group_lasso=0.2, groups="channels"), dict(l1=0.03, group_lasso=0.1, groups="cols")]
    for dtype in (torch.float32, torch.float64):
        for kw in cases:
            ws = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
            gs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
            a = [torch.nn.Parameter(w.clone()) for w in ws]
            b = [torch.nn.Parameter(w.clone()) for w in ws]
            for pa, pb, g in zip(a, b, gs):
                pa.grad, pb.grad = g.clone(), g.clone()
            monkeypatch.setattr(P, "_onepass", spy)
            va = P.accumulate_(iter(a), **kw)
            assert taken.pop() is True
            monkeypatch.setattr(P, "_onepass", general)
            vb = P.accumulate_(b, **kw)
            assert torch.equal(va, vb), kw
            for pa, pb in zip(a, b):
                assert torch.equal(pa.grad, pb.grad), (kw, dtype, pa.shape)
            for pa in a:
                pa.grad = None  # prox_ needs none
            monkeypatch.setattr(P, "_onepass", spy)
            P.prox_(iter(a), 5.0, **kw)
            assert taken.pop() is True
            monkeypatch.setattr(P, "_onepass", general)
            P.prox_(b, 5.0, **kw)
            for pa, pb in zip(a, b):
                assert torch.equal(pa, pb), (kw, dtype, pa.shape)
            assert any(bool((pa == 0).any()) for pa in a), kw  # the prox made exact zeros
    monkeypatch.setattr(P, "_onepass", spy)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    for grad in (None, torch.randn(4, 6, generator=gen).t()):  # no grad yet; a strided grad
        w.grad = grad
        P.accumulate_([w], l1=0.1)
        assert taken.pop() is False
    w.grad = torch.randn(6, 4, generator=gen)
    P.accumulate_([w, torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], l1=0.1)
    assert taken.pop() is False  # mixed dtypes
    P.accumulate_([w], l1=0.1, groups=[None])
    assert taken.pop() is False  # per-tensor group specs
    e = torch.nn.Parameter(torch.zeros(0))
    e.grad = torch.zeros(0)
    P.accumulate_([w, e], l1=0.1)
    assert taken.pop() is False  # a 0-size tensor
    with pytest.raises(TypeError):
        P.accumulate_([w, "not a tensor"], l1=0.1)
    assert taken.pop() is False  # declined; the general path names the bad element
    s = torch.nn.Parameter(torch.randn(3, 3, generator=gen))
    s.grad = torch.eye(3).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        P.accumulate_([w, s], l1=0.1)
    assert taken.pop() is False  # a sparse grad
    P.prox_([w, torch.randn(4, 6, generator=gen).t()], 0.1, l1=0.1)
    assert taken.pop() is False  # a strided tensor
    with pytest.raises(ValueError, match="groups"):
        P.prox_([w], 0.1, group_lasso=0.1)
    assert taken.pop() is False  # group lasso without groups: the general path's error


def test_version_counters_bumped(gen):
    w = torch.randn(5, 3, generator=gen, requires_grad=True)
    w.grad = torch.randn(5, 3, generator=gen)
    g0 = w.grad._version
    P.accumulate_([w], l1=0.1)
    assert w.grad._version > g0
    v0 = w._version
    P.prox_([w], 0.1, l1=0.1)
    assert w._version > v0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tall_matrix_cols_accuracy(gen, backend, monkeypatch):
    """Column groups summed over many rows (the C++ short-slice path) stay float32-accurate."""
    if backend == "host":
        _host_patch(monkeypatch)
    w = torch.randn(3001, 7, generator=gen)
    w.grad = torch.zeros_like(w)
    v = _run(backend, lambda: P.accumulate_([w], group_lasso=0.3, groups="cols"))
    rv, rg = ops.accumulate_reference_one(w, 0.0, 0.0, 0.3, ops.MODE_DIM1)
    _close(w.grad, rg, torch.float32, "tall cols")
    assert float(v) == pytest.approx(float(rv), rel=1e-6)


def test_host_launches_independent_of_parameter_count(monkeypatch):
    host_hot_path_on(monkeypatch)
    C = _native.native()
    calls = []
    real = C.penalty_accumulate_host
    monkeypatch.setattr(C, "penalty_accumulate_host", lambda *a: (calls.append(1), real(*a))[1])
    for n in (3, 300):
        calls.clear()
        ps = [torch.randn(4, 5) for _ in range(n)] + [torch.randn(3, dtype=torch.float64)]
        P.accumulate_(ps, l1=0.1, group_lasso=0.1, groups="rows")
        assert len(calls) == 2  # one per dtype


# ---------------------------------------------------------------- launch tables kept between calls
def _cache_list(gen, dtype=torch.float32, n=6):
    shapes = [(9, 7), (33,), (4, 3, 3, 3), (5,), (40000,), (2, 3)][:n]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    return ps


def _builds():
    return ops.STATS["builds"]


def _check_call(ps, kw, g0):
    """accumulate_ on ps against the reference (grads g0 before the call); returns the value."""
    v = P.accumulate_(ps, **kw)
    total = 0.0
    for p, g in zip(ps, g0):
        mode, idx = P._group_spec(kw.get("groups"), p, "t", "groups")
        rv, rg = ops.accumulate_reference_one(p, kw.get("l1", 0.0), kw.get("l2", 0.0),
                                              kw.get("group_lasso", 0.0), mode, idx)
        total += float(rv)
        _close(p.grad, rg + g.to(torch.float64), p.dtype, "cached grad")
    assert float(v) == pytest.approx(total, rel=1e-6)
    return v


CACHE_CASES = [dict(l1=0.01, l2=0.02), dict(l2=0.1, group_lasso=0.05, groups="rows"),
               dict(l1=0.03, group_lasso=0.1, groups="cols")]


@pytest.fixture
def host_cache(monkeypatch):
    """The C++ host path (the CUDA path's table logic, tested on the CPU), a fresh cache."""
    host_hot_path_on(monkeypatch)
    monkeypatch.setattr(ops, "CACHE_TABLES", True)
    ops.clear_cache()
    yield
    ops.clear_cache()


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("kw", CACHE_CASES, ids=["l1l2", "rows", "cols"])
def test_tables_built_once_while_list_unchanged(gen, host_cache, monkeypatch, one_pass, kw):
    """Warm calls reuse the tables (no build), and still see the weights' current values."""
    if not one_pass:
        monkeypatch.setattr(P, "_onepass", lambda *a: (False, None))
    ps = _cache_list(gen)
    b0 = _builds()
    for it in range(3):
        with torch.no_grad():
            for p in ps:  # in place: same storage, new values
                p.mul_(1.5).add_(0.25)
        _check_call(ps, kw, [p.grad.clone() for p in ps])
        assert _builds() == b0 + 1, f"call {it} rebuilt the tables"
    P.prox_(ps, 0.1, **kw)
    P.prox_(ps, 0.1, **kw)
    assert _builds() == b0 + 2  # prox_: one more launch (kept too)


def _replace_data(p, gen):
    p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _reshape_data(p, gen):
    p.data = torch.randn(p.numel() + 6, generator=gen, dtype=p.dtype)
    p.grad = None


def _change_dtype(p, gen):
    p.data = p.data.double()
    p.grad = None


def _transpose(p, gen):
    p.data = torch.randn(p.shape[::-1], generator=gen, dtype=p.dtype).t()
    p.grad = None


def _new_grad(p, gen):
    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _new_list_order(p, gen):
    pass  # handled by the test: the list is reversed


CHANGES = {"data replaced": _replace_data, "shape": _reshape_data, "dtype": _change_dtype,
           "strides": _transpose, "grad replaced": _new_grad, "order": _new_list_order}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("one_pass", [True, False])
def test_tables_rebuilt_on_each_change(gen, host_cache, monkeypatch, change, one_pass):
    """Each kind of change to the list gives a new launch (or none cached, for a strided
    tensor), and the results stay those of the reference."""
    if not one_pass:
        monkeypatch.setattr(P, "_onepass", lambda *a: (False, None))
    kw = dict(l1=0.02, l2=0.05)
    ps = _cache_list(gen)
    _check_call(ps, kw, [p.grad.clone() for p in ps])
    b0 = _builds()
    if change == "order":
        ps = ps[::-1]
    else:
        CHANGES[change](ps[0], gen)
    g0 = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps]
    _check_call(ps, kw, g0)
    assert _builds() > b0, "a changed list reused the old tables"
    _check_call(ps, kw, [p.grad.clone() for p in ps])  # (a new .grad: the first call made it)
    b1 = _builds()
    _check_call(ps, kw, [p.grad.clone() for p in ps])
    if change == "strides":
        assert _builds() > b1  # a strided tensor is computed in a contiguous copy: never cached
    else:
        assert _builds() == b1  # warm again


def test_strength_change_rebuilds(gen, host_cache):
    ps = _cache_list(gen)
    P.accumulate_(ps, l1=0.1)
    b0 = _builds()
    _check_call(ps, dict(l1=0.2), [p.grad.clone() for p in ps])
    assert _builds() == b0 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", CACHE_CASES, ids=["l1l2", "rows", "cols"])
def test_cached_bit_identical_to_uncached(gen, host_cache, monkeypatch, dtype, kw):
    """A warm call gives the bits of a call whose tables are built afresh (general and one-pass
    paths), for the value, the gradients and the prox."""
    ws = [p.detach().clone() for p in _cache_list(gen, dtype)]
    gs = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in ws]
    results = []
    for cache in (True, False):
        monkeypatch.setattr(ops, "CACHE_TABLES", cache)
        for one_pass in (True, False):
            ps = [torch.nn.Parameter(w.clone()) for w in ws]
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            if not one_pass:
                monkeypatch.setattr(P, "_onepass", lambda *a: (False, None))
            vals = [P.accumulate_(ps, **kw) for _ in range(2)]  # cold then warm
            P.prox_(ps, 0.05, **kw)
            P.prox_(ps, 0.05, **kw)
            results.append((vals, [p.grad.clone() for p in ps], [p.detach().clone() for p in ps]))
            monkeypatch.setattr(P, "_onepass", _REAL_ONEPASS)
    ref_vals, ref_grads, ref_ws = results[0]
    for vals, grads, wts in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(vals, ref_vals))
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        assert all(torch.equal(a, b) for a, b in zip(wts, ref_ws))


_REAL_ONEPASS = P._onepass


def test_value_summed_in_fixed_order(gen, host_cache, monkeypatch):
    """The value is the per-item values summed in penalty.h's order (256 strided lanes, then a
    pairwise tree), the order the CUDA kernel's last block uses. Checked on the float64 sum the
    host entry returns (float32 would hide the order), with hundreds of items."""
    monkeypatch.setattr(ops, "ITEM", 64)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(50000,), (7000,), (5, 5)]]
    for p in ps:
        p.grad = torch.zeros_like(p)
    v = P.accumulate_(ps, l1=0.3, l2=0.7)
    (launch,) = list(ops._LAUNCHES.values())
    total = launch.accumulate()  # the same launch again: the same per-item values
    vals = launch.vals.tolist()
    assert len(vals) > 3 * 256
    lanes = [0.0] * 256
    for i, x in enumerate(vals):
        lanes[i % 256] += x
    h = 128
    while h:
        for lane in range(h):
            lanes[lane] += lanes[lane + h]
        h //= 2
    assert total == lanes[0]
    assert torch.equal(v, torch.tensor(lanes[0], dtype=torch.float32))


def test_cache_is_bounded(gen, host_cache):
    for _ in range(3 * ops.CACHE_SIZE):
        ps = _cache_list(gen, n=2)
        P.accumulate_(ps, l1=0.1)
    assert len(ops._LAUNCHES) <= ops.CACHE_SIZE


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(l1=1e-5, l2=1e-4), dict(l2=1e-4, group_lasso=1e-3,
                                                            groups="rows")], ids=["l1l2", "rows"])
def test_cuda_warm_call_one_launch_no_copy(gen, kw):
    """Once warm, a call is at most 3 GPU activities, none of them a copy, and builds nothing;
    the results match the reference; moving the list to another device or changing it rebuilds."""
    from torch.profiler import ProfilerActivity, profile

    ops.clear_cache()
    shapes = [(64, 3, 7, 7), (64,), (64,)] + [(64, 64, 3, 3), (64,), (64,)] * 4 + \
        [(128, 64, 3, 3), (128,), (256, 128, 3, 3), (512, 256, 3, 3), (512,), (1000, 512), (1000,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        P.accumulate_(ps, **kw)
    torch.cuda.synchronize()
    b0, u0 = ops.STATS["builds"], ops.STATS["uploads"]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        P.accumulate_(ps, **kw)
        torch.cuda.synchronize()
    acts = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(acts) <= 3, acts
    assert not any("memcpy" in a.lower() or "memset" in a.lower() for a in acts), acts
    assert (ops.STATS["builds"], ops.STATS["uploads"]) == (b0, u0)
    g0 = [p.grad.detach().to(torch.float64, copy=True) for p in ps]
    _check_call(ps, kw, g0)
    ps[0].data = torch.randn_like(ps[0])  # a replaced tensor: rebuilt, still right
    _check_call(ps, kw, [p.grad.to(torch.float64, copy=True) for p in ps])
    assert ops.STATS["builds"] > b0
    cpu = [torch.nn.Parameter(p.detach().cpu()) for p in ps]
    for c, p in zip(cpu, ps):
        c.grad = p.grad.cpu()
    assert float(P.accumulate_(cpu, **kw)) == pytest.approx(float(P.accumulate_(ps, **kw)), rel=1e-5)


@pytest.mark.parametrize("kw", CACHE_CASES, ids=["l1l2", "rows", "cols"])
def test_gpu_item_size_through_host_build(gen, host_cache, monkeypatch, kw):
    """The GPU's smaller items (ITEM_GPU), run through the host build of the same tables: many
    items per tensor, the value summed over all of them, still the reference."""
    monkeypatch.setattr(ops, "ITEM", ops.ITEM_GPU)
    ps = _cache_list(gen)
    ps.append(torch.nn.Parameter(torch.randn(3 * ops.ITEM_GPU + 5, generator=gen)))
    ps[-1].grad = torch.randn(ps[-1].shape, generator=gen)
    _check_call(ps, kw, [p.grad.clone() for p in ps])
    (launch,) = list(ops._LAUNCHES.values())
    if "groups" not in kw:  # (row items take up to 8 ITEM elements of short groups)
        assert launch.vals.numel() > len(ps) + 3
