"""Penalty family: values the other penalty tests do not pin down (sparsity's fractions with
explicit groups and "cols", the activity penalty's float64 value, nn.ActivityPenalty(l2=...))."""

import pytest
import torch

import fastreg
import fastreg.penalty as P
from helpers import host_hot_path_on


def test_sparsity_values_explicit_groups_cols_and_whole_tensors():
    a = torch.tensor([[0.0, 1.5, 0.0],
                      [0.0, 0.0, 0.0],
                      [0.0, -2.0, 0.0],
                      [0.0, 0.0, 3.0]])  # 12 weights, 9 zeros; cols 0 all zero, col 1, 2 not
    b = torch.tensor([0.0, 0.25, 0.0, 0.0, -1.0])  # 5 weights, 3 zeros
    # whole tensors as groups (groups=None): neither is all zero
    got = P.sparsity([a, b])
    assert got == {"weights": 12 / 17, "groups": 0.0, "zero_groups": 0, "num_groups": 2}
    got = P.sparsity([a, torch.zeros(3)])
    assert got == {"weights": 12 / 15, "groups": 0.5, "zero_groups": 1, "num_groups": 2}
    # "cols": a has 3 columns (col 0 zero); a vector is one column, i.e. one group
    got = P.sparsity([a, b], groups="cols")
    assert got == {"weights": 12 / 17, "groups": 1 / 4, "zero_groups": 1, "num_groups": 4}
    # "rows": a's rows 1 zero of 4; b's elements are its rows: 3 zero of 5
    got = P.sparsity([a, b], groups="rows")
    assert got == {"weights": 12 / 17, "groups": 4 / 9, "zero_groups": 4, "num_groups": 9}
    # explicit index tensors, one per tensor: a in groups {0: col 0 + row 1, 1: the rest}
    ga = torch.ones(4, 3, dtype=torch.int64)
    ga[:, 0] = 0
    ga[1, :] = 0
    gb = torch.tensor([2, 0, 2, 1, 0])  # groups 0 (0.25, -1), 1 (0), 2 (0, 0)
    got = P.sparsity([a, b], groups=[ga, gb])
    assert got == {"weights": 12 / 17, "groups": 3 / 5, "zero_groups": 3, "num_groups": 5}
    # param-group dicts carry their own groups
    got = P.sparsity([{"params": [a], "groups": "cols"}, {"params": [b], "groups": gb}])
    assert got == {"weights": 12 / 17, "groups": 3 / 6, "zero_groups": 3, "num_groups": 6}


@pytest.mark.parametrize("backend", ["numba", None])
def test_activity_penalty_value_is_float64_for_float64(gen, backend):
    """The value of a float64 activation is computed in float64: about 1e-15 relative to the
    float64 sum, where float32 arithmetic would be off by about 1e-7."""
    x = (torch.randn(3, 5001, generator=gen, dtype=torch.float64) * 3).transpose(0, 1)
    l1, l2 = 0.3, 0.7
    with fastreg.use_backend(backend):
        _, v = fastreg.activity_penalty(x, l1=l1, l2=l2, return_value=True)
    want = l1 * x.abs().sum() + l2 * (x * x).sum()
    assert v.dtype == torch.float64
    assert abs(float(v) - float(want)) <= 1e-12 * float(want)


def test_nn_activity_penalty_l2(gen):
    """nn.ActivityPenalty(l2=...): identity forward, gradient + 2 l2 x, last_value = l2 |x|^2."""
    x = torch.randn(4, 33, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 33, generator=gen, dtype=torch.float64)
    m = fastreg.nn.ActivityPenalty(l2=0.25)
    assert m.last_value is None and "l1=0.0, l2=0.25" in repr(m)
    y = m(x)
    assert torch.equal(y, x.detach())
    y.backward(gy)
    xd = x.detach()
    torch.testing.assert_close(x.grad, gy + 0.5 * xd, rtol=1e-14, atol=1e-14)
    want = 0.25 * float((xd * xd).sum())
    assert abs(float(m.last_value) - want) <= 1e-12 * want
    # l1 and l2 together
    m2 = fastreg.nn.ActivityPenalty(l1=0.1, l2=0.25)
    x.grad = None
    m2(x).backward(gy)
    torch.testing.assert_close(x.grad, gy + 0.1 * torch.sign(xd) + 0.5 * xd, rtol=1e-14, atol=1e-14)


def test_value_defaults_dtype_and_explicit_groups():
    """penalty.value: 0 with the default strengths, a 0-dim float32, and each term by hand
    (explicit group index tensors included; |g| counts a group's elements)."""
    a = torch.tensor([[3.0, -4.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([2.0, -2.0, 1.0])
    v = P.value([a, b])
    assert v.dtype == torch.float32 and v.dim() == 0 and float(v) == 0.0
    assert float(P.value([a, b], l1=0.5)) == 0.5 * (8 + 5)
    assert float(P.value([a, b], l2=0.25)) == 0.25 * (26 + 9)
    ga = torch.tensor([[0, 0], [1, 1]])  # rows: norms 5 and 1, two elements each
    gb = torch.tensor([0, 0, 2])  # groups {2, -2} (norm sqrt 8), {} (empty), {1}
    want = 0.1 * (2**0.5 * 5 + 2**0.5 * 1) + 0.1 * (2**0.5 * 8**0.5 + 1.0)
    got = P.value([a, b], group_lasso=0.1, groups=[ga, gb])
    assert abs(float(got) - want) <= 1e-6 * want
    assert float(P.value([], l1=1.0)) == 0.0
    # its refusals name fastreg.penalty.value and the argument
    with pytest.raises(ValueError, match=r"^fastreg.penalty.value: params l2 must be a finite "
                                         r"number >= 0, got -1.0$"):
        P.value([a], l2=-1.0)
    with pytest.raises(ValueError, match=r"^fastreg.penalty.value: groups must be one of"):
        P.value([a], group_lasso=0.1, groups="x")


def test_activity_penalty_default_strengths_are_zero(gen):
    """l1 and l2 default to 0: one given alone is the whole penalty (value and gradient)."""
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    for kw, val, grad in (({"l1": 0.3}, 0.3 * x.abs().sum(), 0.3 * torch.sign(x)),
                          ({"l2": 0.7}, 0.7 * (x * x).sum(), 1.4 * x)):
        xr = x.clone().requires_grad_(True)
        y, v = fastreg.activity_penalty(xr, return_value=True, **kw)
        torch.testing.assert_close(v.double(), val, rtol=1e-12, atol=0)
        y.backward(torch.zeros_like(x))  # the penalty's gradient alone
        torch.testing.assert_close(xr.grad, grad, rtol=1e-12, atol=0)


def test_value_of_one_tensor_and_sparsity_past_an_empty_tensor():
    """penalty.value of a single tensor; sparsity counts the tensors after a zero-size one."""
    w = torch.tensor([[0.0, 2.0], [0.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert float(P.value(w, l1=0.5)) == 1.5
    assert float(P.value([w], l2=0.25, group_lasso=0.0)) == 1.25
    got = P.sparsity([torch.empty(0, 2), w], groups="rows")
    assert got == P.sparsity([w], groups="rows") == {"weights": 4 / 6, "groups": 1 / 3,
                                                    "zero_groups": 1, "num_groups": 3}


class _Sub(torch.Tensor):
    """A tensor subclass, which the native kernels refuse."""


def test_accumulate_errors_name_the_op_and_no_params_give_float32(monkeypatch):
    """accumulate_'s checks on the general path (explicit groups) name
    fastreg.penalty.accumulate_ and what is at fault; with no tensors it returns a float32 0
    whatever the default dtype (as value does)."""

    idx = torch.zeros(3, 4, dtype=torch.int64)
    sub = torch.randn(3, 4).as_subclass(_Sub).requires_grad_()
    with pytest.raises(TypeError, match=r"^fastreg.penalty.accumulate_: params\[0\] is a tensor "
                                        "subclass"):
        P.accumulate_([sub], group_lasso=0.1, groups=idx)
    for bad, what in ((torch.randn(3, 4).to_sparse(), "must be a dense"),
                      (torch.randn(3, 4).as_subclass(_Sub), "is a tensor subclass")):
        w = torch.randn(3, 4, requires_grad=True)
        w.grad = bad
        with pytest.raises(TypeError, match=r"^fastreg.penalty.accumulate_: params' .grad\[0\] "
                                            + what):
            P.accumulate_([w], group_lasso=0.1, groups=idx)
    with pytest.raises(ValueError, match=r"^fastreg.penalty.accumulate_: groups\[1\] must be one"):
        P.accumulate_([torch.randn(2, requires_grad=True)] * 2, groups=["rows", "x"])
    host_hot_path_on(monkeypatch, required=False)
    for dtype in (torch.float32, torch.float16):  # one-pass path (a .grad there), general path
        w = torch.randn(2, 3, dtype=dtype, requires_grad=True)
        w.grad = torch.zeros_like(w)
        with pytest.raises(ValueError, match="^fastreg.penalty.accumulate_: groups must be one of"):
            P.accumulate_([w], group_lasso=0.1, groups="x")
        for name in ("l1", "l2", "group_lasso"):
            with pytest.raises(ValueError, match=f"^fastreg.penalty.accumulate_: params {name} must "
                                                 "be a finite number >= 0, got -1.0$"):
                P.accumulate_([w], **{name: -1.0})
    w = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="^fastreg.penalty.accumulate_: groups has 3 entries but "
                                         "params has 2$"):
        P.accumulate_([w, w], groups=["rows"] * 3)
    with pytest.raises(ValueError, match=r"^fastreg.penalty.accumulate_: params\[1\] \(a dict\) "
                                         "needs a 'params' entry$"):
        P.accumulate_([w, {"l1": 0.1}])
    with pytest.raises(TypeError, match="^fastreg.penalty.accumulate_: params must be an iterable "
                                        r"of tensors or of dicts \(param groups\), got int$"):
        P.accumulate_(3)
    torch.set_default_dtype(torch.float64)
    try:
        assert P.accumulate_([]).dtype == torch.float32
        assert P.accumulate_([], group_lasso=0.1, groups=[]).dtype == torch.float32
        monkeypatch.setattr(P, "_onepass", lambda *a, **k: (False, None))
        assert P.accumulate_([]).dtype == torch.float32  # the general path's own early return
    finally:
        torch.set_default_dtype(torch.float32)


def _grads(params_spec, **kw):
    """accumulate_ on fresh copies of the tensors named in params_spec (tensors, or dicts of
    them), returning the value and the gradients in order of appearance."""
    seen = []

    def fresh(t):
        t = t.detach().clone().requires_grad_()
        seen.append(t)
        return t

    spec = [fresh(e) if isinstance(e, torch.Tensor) else
            {k: (fresh(v) if isinstance(v, torch.Tensor) else [fresh(t) for t in v])
             if k == "params" else v for k, v in e.items()} for e in params_spec]
    value = P.accumulate_(spec, **kw)
    return value, [t.grad for t in seen]


def test_param_group_dicts_and_explicit_groups_without_group_term(gen):
    """Dicts take the call's groups (a per-tensor list applies within each dict) and may hold one
    tensor as 'params'; an index-tensor group with group_lasso 0 in one dict leaves the other
    dict's index groups where they belong. Each is compared with calls on plain lists."""
    a = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    ia = torch.randint(0, 3, (4, 6), generator=gen)
    ib = torch.randint(0, 5, (4, 6), generator=gen)
    kw = dict(l1=0.1, group_lasso=0.2, groups=["rows", "cols"])
    v1, g1 = _grads([{"params": [a, b]}], **kw)
    v2, g2 = _grads([a, b], **kw)
    assert torch.equal(v1, v2) and all(torch.equal(x, y) for x, y in zip(g1, g2))
    v1, g1 = _grads([{"params": a, "l2": 0.3}], group_lasso=0.2, groups="cols")
    v2, g2 = _grads([a], l2=0.3, group_lasso=0.2, groups="cols")
    assert torch.equal(v1, v2) and torch.equal(g1[0], g2[0])
    v, g = _grads([{"params": [a], "group_lasso": 0.0, "groups": [ia]},
                   {"params": [b], "group_lasso": 0.3, "groups": [ib]}], l1=0.1)
    va, ga = _grads([a], l1=0.1)
    vb, gb = _grads([b], l1=0.1, group_lasso=0.3, groups=[ib])
    torch.testing.assert_close(v, va + vb, rtol=1e-6, atol=0)  # float32 values
    assert torch.equal(g[0], ga[0]) and torch.equal(g[1], gb[0])


def test_one_pass_with_group_lasso_one(gen, monkeypatch):
    """The one-pass paths of accumulate_ and prox_ with group_lasso = 1.0 exactly (groups
    planned from the shapes) and one tensor equal the general path."""
    host_hot_path_on(monkeypatch)
    real, taken = P._onepass, []

    def spy(*a, **k):
        out = real(*a, **k)
        taken.append(out[0])
        return out

    monkeypatch.setattr(P, "_onepass", spy)
    # row norms about 0.3, 3 and 30: the prox (threshold 0.5 sqrt(8)) zeroes the first row only
    w = torch.randn(3, 8, generator=gen) * torch.tensor([[0.1], [1.0], [10.0]])
    kw = dict(l1=0.05, group_lasso=1.0, groups="rows")
    outs = []
    for one_pass in (True, False):
        if not one_pass:
            monkeypatch.setattr(P, "_onepass", lambda *a, **k: (False, None))
        p = w.clone().requires_grad_()
        p.grad = torch.zeros_like(p)
        outs.append((P.accumulate_([p], **kw), p.grad))
        q = w.clone()
        P.prox_([q], 0.5, **kw)
        outs[-1] += (q,)
        if one_pass:
            assert taken == [True, True]
    a, b = outs
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not a[2][0].any() and a[2][2].any()  # (an element of row 2 may fall below lr l1)


def test_group_errors_name_the_op_and_int32_index_groups(gen):
    """Group specifications are checked with messages that name fastreg.penalty.<op> and the
    entry at fault; an int32 index tensor groups as its int64 copy does."""
    w = torch.randn(3, 4, generator=gen, requires_grad=True)
    A = "^fastreg.penalty.accumulate_: "
    cases = [
        (ValueError, A + "groups index tensor must have one entry per element: numel 5",
         dict(group_lasso=0.1, groups=torch.zeros(5, dtype=torch.int64))),
        (ValueError, A + r"groups\[0\] index tensor must have one entry per element",
         dict(group_lasso=0.1, groups=[torch.zeros(5, dtype=torch.int64)])),
        (ValueError, A + "groups index tensor must be >= 0$",
         dict(group_lasso=0.1, groups=torch.full((3, 4), -1))),
        (ValueError, A + "groups index tensor is on meta but its parameter is on cpu$",
         dict(group_lasso=0.1, groups=torch.zeros(3, 4, dtype=torch.int64, device="meta"))),
        (TypeError, A + "groups must be a str, an index tensor, a list of those, or None; got float$",
         dict(group_lasso=0.1, groups=3.5)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            P.accumulate_([w], **kw)
    with pytest.raises(TypeError, match=A + "params must hold tensors, got float$"):
        P.accumulate_([w, 3.0])
    with pytest.raises(ValueError, match=r"^fastreg.penalty.accumulate_: params\[0\]: groups has 1 "
                                         "entries but there are 2 tensors$"):
        P.accumulate_([{"params": [w, w], "groups": ["rows"]}])
    idx = torch.randint(0, 3, (3, 4), generator=gen)
    v64, g64 = _grads([w], l1=0.1, group_lasso=0.2, groups=idx)
    v32, g32 = _grads([w], l1=0.1, group_lasso=0.2, groups=idx.to(torch.int32))
    assert torch.equal(v64, v32) and torch.equal(g64[0], g32[0])


def test_sparsity_errors_name_the_op():
    w = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"^fastreg.penalty.sparsity: params\[0\] is a tensor "
                                        "subclass"):
        P.sparsity([w.as_subclass(_Sub)])
    with pytest.raises(ValueError, match="^fastreg.penalty.sparsity: groups must be one of"):
        P.sparsity([w], groups="x")


def test_prox_errors_name_the_op(monkeypatch):
    """prox_'s checks, on the one-pass path (float32) and the general one (float16), name
    fastreg.penalty.prox_ and the argument."""
    host_hot_path_on(monkeypatch, required=False)

    with pytest.raises(ValueError, match="^fastreg.penalty.prox_: lr must be a finite number >= 0, "
                                         "got -1.0$"):
        P.prox_([torch.randn(3)], -1.0, l1=0.1)
    for dtype in (torch.float32, torch.float16):
        w = torch.randn(2, 3, dtype=dtype)
        with pytest.raises(ValueError, match="^fastreg.penalty.prox_: groups must be one of"):
            P.prox_([w], 0.1, group_lasso=0.1, groups="x")
        with pytest.raises(ValueError, match="^fastreg.penalty.prox_: params l1 must be"):
            P.prox_([w], 0.1, l1=-1.0)
    with pytest.raises(TypeError, match=r"^fastreg.penalty.prox_: params\[0\] is a tensor subclass"):
        P.prox_([torch.randn(3).as_subclass(_Sub)], 0.1, l1=0.1, groups=[None])
