"""Tensor kinds the native kernels cannot take (subclasses, sparse, meta) never reach them.

Every entry point that hands tensors to a Numba/C++/CUDA kernel refuses them with a TypeError
naming the argument, before any kernel runs. The kernels are replaced by stubs that fail the
test if called, so a check that lets one through is seen even when the kernel would not crash.
"""

import pytest
import torch

import fastreg
import fastreg.penalty as P
from fastreg import _boundary, _native
from fastreg.ops import reversible as rops
from helpers import Wrapper, host_hot_path_on


class Plain(torch.Tensor):
    """A plain Python subclass (has storage; torch.ops pass it to op bodies unchanged)."""


def _wrapper():
    return Wrapper(torch.randn(4, 3))


def _sparse():
    return torch.randn(4, 3).to_sparse()


def _meta():
    return torch.empty(4, 3, device="meta")


KINDS = {"wrapper": (_wrapper, "subclass"), "sparse": (_sparse, "layout"),
         "meta": (_meta, "meta")}


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    """Every native penalty and reversible kernel fails the test if it runs."""
    from fastreg.kernels.numba import penalty as nbp
    from fastreg.kernels.numba import reversible as nbr

    def boom(*a, **k):
        raise AssertionError("a native kernel ran")

    for name in ("accumulate", "prox", "explicit_norms", "activity_forward", "activity_backward"):
        monkeypatch.setattr(nbp, name, boom)
    for name in ("fwd_step", "rev_restore", "rev_step", "rev_step_restore"):
        monkeypatch.setattr(nbr, name, boom)
    C = _native.native()
    if C is not None:
        for name in dir(C):
            if name.startswith(("penalty_", "activity_penalty_", "reversible_")):
                monkeypatch.setattr(C, name, boom)


def test_plain_tensors_pass():
    for t in (torch.randn(3), torch.nn.Parameter(torch.randn(2, 2)), torch.randn(4, 4).t()):
        _boundary.check_plain(t, "x", "op")
        assert _boundary.is_plain(t)
    _boundary.check_plain_list([torch.randn(3), torch.nn.Parameter(torch.randn(2))], "xs", "op")


@pytest.mark.parametrize("kind", KINDS)
def test_check_names_argument_and_kind(kind):
    make, word = KINDS[kind]
    t = make()
    assert not _boundary.is_plain(t)
    with pytest.raises(TypeError, match=rf"fastreg\.op: xs\[1\] .*{word}"):
        _boundary.check_plain_list([torch.randn(2), t], "xs", "op")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _boundary.check_plain(None, "x", "op")
    assert not _boundary.is_plain_list([torch.randn(2), t])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", [None, "hot", "numba", "torch"])
def test_penalty_params_refused(kind, backend, monkeypatch):
    """backend "hot": the C++ host hot path switched on (it is off on a CPU without AVX-512),
    so the one-pass eager path's own check (`_plain_on`) is the one that must refuse."""
    make, word = KINDS[kind]
    if backend == "hot":
        host_hot_path_on(monkeypatch)
        backend = None
    other = torch.randn(3, 3, device="meta" if kind == "meta" else "cpu")  # one device per call
    ctx = fastreg.use_backend(backend) if backend else torch.no_grad()
    with ctx:
        with pytest.raises(TypeError, match=rf"params\[\d\].*{word}"):
            P.accumulate_([other, make()], l1=0.1, l2=0.1)
        with pytest.raises(TypeError, match=rf"params\[\d\].*{word}"):
            P.prox_([other, make()], 0.1, l1=0.1)
        with pytest.raises(TypeError, match=rf"params\[0\].*{word}"):
            P.sparsity([make()])


def test_penalty_sparse_grad_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.layout is torch.sparse_coo
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"\.grad\[0\].*layout"):
        P.accumulate_([emb.weight, lin.weight], l1=0.1)
    with pytest.raises(TypeError, match=r"\.grad\[0\].*layout"):
        P.accumulate_(emb.parameters(), l1=0.1, l2=0.2)


def test_penalty_direct_ops_refuse_subclasses():
    """Called directly, a plain subclass reaches the op body (the dispatcher does not unwrap
    it): the body refuses it."""
    w = torch.randn(3, 2).as_subclass(Plain)
    g = torch.randn(3, 2)
    with pytest.raises(TypeError, match=r"params\[0\].*subclass"):
        torch.ops.fastreg.penalty_accumulate([w], [g], [0.1, 0.0, 0.0], [0], [], [0])
    with pytest.raises(TypeError, match=r"grads\[0\].*subclass"):
        torch.ops.fastreg.penalty_accumulate([g], [w], [0.1, 0.0, 0.0], [0], [], [0])
    with pytest.raises(TypeError, match=r"params\[0\].*subclass"):
        torch.ops.fastreg.penalty_prox([w], 0.1, [0.1, 0.0, 0.0], [0], [])
    with pytest.raises(TypeError, match=r"x .*subclass"):
        torch.ops.fastreg.activity_penalty(w, 0.1, 0.1)
    with pytest.raises(TypeError, match=r"gy .*subclass"):
        torch.ops.fastreg.activity_penalty_backward(w, g, torch.ones(()), 0.1, 0.1)


@pytest.mark.parametrize("kind", ["wrapper", "sparse"])
def test_activity_penalty_refused(kind):
    make, word = KINDS[kind]
    with pytest.raises(TypeError, match=rf"x .*{word}"):
        P.activity_penalty(make(), l1=0.1)


def test_activity_penalty_meta_is_shape_only():
    """A meta tensor goes through the op's fake kernel (shape inference), never a kernel."""
    y, v = P.activity_penalty(_meta(), l1=0.1, return_value=True)
    assert y.is_meta and y.shape == (4, 3) and v.is_meta


@pytest.mark.parametrize("kind", ["sparse"])
def test_reversible_params_refused(kind):
    """(A wrapper subclass is unwrapped through .data by the optimizer; its kernels take plain
    tensors only, test_reversible_kernel_entries_refuse.)"""
    from fastreg.optim import ReversibleSGD

    make, word = KINDS[kind]
    with pytest.raises(TypeError, match=word):
        ReversibleSGD([torch.nn.Parameter(torch.randn(3)), make()], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("backend", ["numba", "cpp", "torch"])
def test_reversible_sparse_grad_refused(backend):
    from fastreg.optim import ReversibleSGD

    if backend == "cpp" and _native.native() is None:
        pytest.skip("fastreg._C not built")
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ReversibleSGD(emb.parameters(), lr=0.1, momentum=0.9, backend=backend)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("kind", KINDS)
def test_reversible_kernel_entries_refuse(kind):
    """The kernel entry points themselves (the last line of defence behind the optimizer)."""
    make, word = KINDS[kind]
    n = 12
    i64 = lambda: torch.zeros(n, dtype=torch.int64)  # noqa: E731
    state = (i64(), i64(), torch.full((n,), rops.L, dtype=torch.int64),
             torch.zeros(n, dtype=torch.int32), torch.zeros((1, n), dtype=torch.int32))
    good = torch.zeros(n)
    bad = {"wrapper": lambda: Wrapper(torch.zeros(n)), "sparse": lambda: torch.zeros(n).to_sparse(),
           "meta": lambda: torch.empty(n, device="meta")}[kind]()
    for backend in ("numba", "cpp", "torch"):
        with pytest.raises(TypeError, match=rf"gradient.*{word}"):
            rops.fwd_step(backend, *state, bad, good, 16, 58982, 0.1, 1.0, 0.0, 2.0**-44)
        with pytest.raises(TypeError, match=rf"parameter.*{word}"):
            rops.fwd_step(backend, *state, good, bad, 16, 58982, 0.1, 1.0, 0.0, 2.0**-44)
        f64 = torch.zeros(n, dtype=torch.float64)
        with pytest.raises(TypeError, match=rf"hvp.*{word}"):
            rops.rev_step(backend, *state, good, bad, f64, f64.clone(), 16, 58982, 0.9, 1.0, 0.0,
                          0.1, 2.0**-44)
        with pytest.raises(TypeError, match=rf"u .*{word}"):
            rops.rev_restore(backend, state[0], state[1], f64, f64.clone(), bad, good, 0.1, 0.1,
                             2.0**-44)


class _HookSub(torch.Tensor):
    pass


@pytest.mark.parametrize("name", ["gaussian_dropout", "locked_dropout"])
def test_lean_backward_refuses_a_subclass_gradient(name):
    """The small-size eager paths call the Numba kernels on data addresses; a gradient turned
    into a subclass by a hook is refused by name instead of being read as plain memory."""
    from fastreg.ops import locked as L
    from fastreg.ops import noise as N

    x = torch.randn(4, 3, 5, requires_grad=True)
    with fastreg.use_backend("numba"):
        y = N.gaussian_dropout(x, 0.2, seed=1) if name == "gaussian_dropout" else \
            L.locked_dropout(x, 0.2, dim=0, seed=1)
        y.register_hook(lambda g: g.as_subclass(_HookSub))
        with pytest.raises(TypeError, match=r"grad is a tensor subclass"):
            y.sum().backward()
