"""The host path of the ops: argument conversion, backend selection, the eager fast paths, and
fastreg._launch's direct launcher (its logic on a CPU against a fake Triton; its bits on a GPU)."""

import inspect

import numpy as np
import pytest
import torch

import fastreg
from fastreg import _alloc, _backend, _launch
from fastreg.adversarial import fgsm, pgd_step
from fastreg.ops.variational import vd_sample


# ---------------------------------------------------------------- backend selection
def test_env_backend_is_read_per_call(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTREG_BACKEND", raising=False)
    assert _backend.select(cpu, ("numba", "triton"), "t") == "numba"
    monkeypatch.setenv("FASTREG_BACKEND", "torch")
    assert _backend.select(cpu, ("numba", "triton"), "t") == "torch"
    monkeypatch.setenv("FASTREG_BACKEND", " ")
    assert _backend.select(cpu, ("numba", "triton"), "t") == "numba"
    monkeypatch.setenv("FASTREG_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTREG_BACKEND"):
        _backend.select(cpu, ("numba",), "t")
    monkeypatch.delenv("FASTREG_BACKEND")
    assert _backend.forced_backend() is None


def test_forced_backend_overrides_the_cached_choice(monkeypatch):
    monkeypatch.delenv("FASTREG_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert _backend.select(cpu, ("numba", "triton"), "t") == "numba"  # now cached
    with fastreg.use_backend("torch"):
        assert _backend.select(cpu, ("numba", "triton"), "t") == "torch"
    with fastreg.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="not implemented"):
            _backend.select(cpu, ("numba", "triton"), "t")
    assert _backend.select(cpu, ("numba", "triton"), "t") == "numba"


# ---------------------------------------------------------------- numpy views
def test_numpy_in_shares_when_it_can_and_copies_in_logical_order_otherwise(gen):
    x = torch.randn(6, 5, generator=gen, requires_grad=True)
    a = _alloc.numpy_in(x, torch.float32)
    assert a.shape == (30,) and a.ctypes.data == x.data_ptr()  # a view, no copy
    t = x.detach().t()  # non-contiguous
    b = _alloc.numpy_in(t, torch.float32)
    assert torch.equal(torch.from_numpy(b.copy()), t.reshape(-1))
    c = _alloc.numpy_in(x.detach().half(), torch.float32)
    assert c.dtype.name == "float32" and torch.equal(torch.from_numpy(c.copy()),
                                                     x.detach().half().float().reshape(-1))
    out, oa = _alloc.out_like(t, torch.float64)
    assert out.shape == t.shape and out.is_contiguous() and oa.ctypes.data == out.data_ptr()


# ---------------------------------------------------------------- eager fast paths
def _op_and_fast(fn, *args):
    """fn run on the eager fast path and, under a dispatch mode that disables it, on the ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    fast = fn(*args)
    with Passthrough():
        slow = fn(*args)
    return fast, slow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_vd_sample_fast_path_equals_the_op(gen, dtype):
    mu = torch.randn(37, 11, generator=gen).to(dtype).requires_grad_(True)
    var = torch.rand(37, 11, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(37, 11, generator=gen).to(dtype)

    def run(m, v):
        y = vd_sample(m, v, seed=123, stream=4, eps=1e-6)
        return (y,) + torch.autograd.grad(y, (m, v), g)

    fast, slow = _op_and_fast(run, mu, var)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_adversarial_fast_path_equals_the_op_and_never_requires_grad(gen):
    x = torch.rand(33, 7, generator=gen, requires_grad=True)
    x0 = torch.rand(33, 7, generator=gen)
    grad = torch.randn(33, 7, generator=gen, dtype=torch.float64)
    for fn in (lambda: fgsm(x, grad, 0.1, clamp=(0, 1)),
               lambda: pgd_step(x, x0, grad, 0.02, 0.1, clamp=(0, None))):
        fast, slow = _op_and_fast(fn)
        assert torch.equal(fast, slow) and not fast.requires_grad
    with fastreg.use_backend("torch"):  # the reference composes x: still no grad
        assert not fgsm(x, grad, 0.1).requires_grad


def test_parameters_take_the_fast_path_with_the_same_result(gen, monkeypatch):
    x = torch.nn.Parameter(torch.randn(8, 16, generator=gen))
    b = torch.nn.Parameter(torch.randn(16, generator=gen))
    calls = []
    real = _backend.eager_fast_path
    monkeypatch.setattr("fastreg.ops.bias_act._eager_fast_path",
                        lambda *t: calls.append(real(*t)) or calls[-1])
    y = fastreg.bias_act_dropout(x, b, activation="gelu", p=0.3, seed=9)
    gx, gb = torch.autograd.grad(y.sum(), (x, b))
    assert calls == [True]
    y2 = fastreg.bias_act_dropout(x.detach().requires_grad_(True), b.detach(), activation="gelu",
                                  p=0.3, seed=9)
    assert torch.equal(y, y2)
    sub = torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), x.detach())
    assert not _backend.eager_fast_path(sub)


def test_number_sigma_fast_path_equals_the_op_with_a_float64_sigma(gen):
    x = torch.randn(50, 3, generator=gen, requires_grad=True)
    g = torch.randn(50, 3, generator=gen)
    for fn in (fastreg.multiplicative_noise, fastreg.input_noise):
        def run(t, fn=fn):
            y = fn(t, 0.3, seed=5, stream=2)
            return y, torch.autograd.grad(y, (t,), g)[0]
        fast, slow = _op_and_fast(run, x)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_cached_sigma_made_under_inference_mode_can_be_saved_for_backward(gen):
    x = torch.randn(64, generator=gen)
    p = 0.123456  # a p no other test uses, so the cached sigma is made here
    with torch.inference_mode():
        fastreg.gaussian_dropout(x, p, seed=1)
    xg = x.clone().requires_grad_(True)
    y = fastreg.gaussian_dropout(xg, p, seed=1)
    (gx,) = torch.autograd.grad(y.sum(), (xg,))
    assert torch.allclose(gx * x, y.detach(), rtol=1e-6, atol=1e-6)  # y = x * (1 + sigma eps)


# ---------------------------------------------------------------- lean eager paths
def _grads_of(y, x, kind, gen):
    """The gradient of y w.r.t. x for an upstream gradient that is contiguous, expanded (a sum)
    or permuted: the lean backward takes the first, the layout-handling path the others."""
    if kind == "sum":
        return torch.autograd.grad(y.sum(), (x,))[0]
    if kind == "permuted" and y.dim() == 2:
        g = torch.randn(y.shape[1], y.shape[0], generator=gen, dtype=y.dtype).t()
    else:
        g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    return torch.autograd.grad(y, (x,), g)[0]


def _count(monkeypatch, target):
    calls = []
    mod, name = target.rsplit(".", 1)
    real = getattr(__import__(mod, fromlist=[name]), name)
    monkeypatch.setattr(target, lambda *a: calls.append(1) or real(*a))
    return calls


NOISE_CASES = [("gaussian_dropout", None), ("multiplicative_noise", "gaussian"),
               ("multiplicative_noise", "uniform"), ("input_noise", "gaussian"),
               ("input_noise", "uniform")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4096,), (24, 37)])
@pytest.mark.parametrize("kind", ["dense", "sum", "permuted"])
@pytest.mark.parametrize("op,dist", NOISE_CASES)
def test_lean_noise_path_equals_the_op_and_the_reference(gen, monkeypatch, dtype, shape, kind,
                                                          op, dist):
    from fastreg.ops import noise

    x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)

    def fwd(t):
        if op == "gaussian_dropout":
            return fastreg.gaussian_dropout(t, 0.3, seed=77, stream=3)
        return getattr(fastreg, op)(t, 0.45, dist=dist, seed=77, stream=3)

    def run(t):
        y = fwd(t)
        return y, _grads_of(y, t, kind, torch.Generator().manual_seed(1))

    calls = _count(monkeypatch, "fastreg.ops.noise._lean_kernel")
    fast, slow = _op_and_fast(run, x)
    assert calls, "the lean path was not taken"
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[1].stride() == slow[1].stride()  # a permuted gradient keeps its layout
    assert fast[0].shape == shape and fast[0].is_contiguous() and fast[1].shape == shape
    sigma = noise.gaussian_dropout_sigma(0.3) if op == "gaussian_dropout" else 0.45
    d = 0 if dist in (None, "gaussian") else 1
    ref = noise.noise_reference(x.detach(), torch.tensor(sigma, dtype=dtype), 77, 3, d,
                                op == "input_noise")
    if d == 1:
        assert torch.equal(fast[0], ref)
    else:  # the kernels' polynomial log/sin/cos: a few ulp from the libm normals (test_noise)
        torch.testing.assert_close(fast[0], ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no autograd.Function at all: the same values
        assert torch.equal(fwd(x), fast[0])


def test_lean_noise_backward_stays_first_order(gen):
    x = torch.randn(64, generator=gen, requires_grad=True)
    g = torch.randn(64, generator=gen, requires_grad=True)
    y = fastreg.gaussian_dropout(x, 0.4, seed=3)
    (gx,) = torch.autograd.grad(y, (x,), g, create_graph=True)  # the values, as usual
    assert torch.equal(gx, torch.autograd.grad(fastreg.gaussian_dropout(x, 0.4, seed=3), (x,),
                                               g.detach())[0])
    with pytest.raises(RuntimeError, match="once_differentiable"):  # as _NoiseFn's backward
        gx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", [((4, 1024), 0), ((3, 5, 7), 1), ((6, 9), 1)])
@pytest.mark.parametrize("kind", ["dense", "sum", "permuted"])
def test_lean_locked_path_equals_the_op_and_the_reference(gen, monkeypatch, dtype, shape, dim,
                                                          kind):
    from fastreg.ops import locked

    x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)

    def run(t):
        y = fastreg.locked_dropout(t, 0.35, dim=dim, seed=41, stream=2)
        return y, _grads_of(y, t, kind, torch.Generator().manual_seed(2))

    calls = _count(monkeypatch, "fastreg.ops.locked._lean_kernel")
    fast, slow = _op_and_fast(run, x)
    assert calls, "the lean path was not taken"
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[1].stride() == slow[1].stride()  # a permuted gradient keeps its layout
    assert torch.equal(fast[0], locked.locked_dropout_reference(x.detach(), 41, 2, 0.35, dim))
    assert fast[0].shape == shape and fast[0].is_contiguous()


def test_lean_locked_double_backward_is_the_op_again(gen):
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = fastreg.locked_dropout(x, 0.3, dim=0, seed=8)
    (gx,) = torch.autograd.grad(y, (x,), g, create_graph=True)
    (gg,) = torch.autograd.grad(gx.sum(), (g,))  # d gx / d g: the mask again
    from fastreg.ops import locked
    assert torch.equal(gx, locked.locked_dropout_reference(g.detach(), 8, 0, 0.3, 0))
    assert torch.equal(gg, locked.locked_dropout_reference(torch.ones_like(g), 8, 0, 0.3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4096,), (33, 7), ()])
def test_lean_adversarial_path_equals_the_op(gen, monkeypatch, dtype, shape):
    x = torch.rand(shape, generator=gen, dtype=dtype)
    x0 = torch.rand(shape, generator=gen, dtype=dtype)
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    calls = _count(monkeypatch, "fastreg.ops.adversarial._lean_numba")
    for fn in (lambda: fgsm(x, grad, 0.1, clamp=(0.0, 1.0)),
               lambda: fgsm(x, grad, 0.1, clamp=(0, 1)),
               lambda: pgd_step(x, x0, grad, 0.02, 0.1, clamp=(0.0, None))):
        fast, slow = _op_and_fast(fn)
        assert torch.equal(fast, slow) and fast.shape == shape and fast.dtype == dtype
        assert not fast.requires_grad
    assert len(calls) == 3


def test_fgsm_clamp_fast_check_still_rejects(gen):
    x = torch.rand(8, generator=gen)
    for clamp in ((1.0, 0.0), (float("nan"), 1.0), (0.0, float("nan"))):
        with pytest.raises(ValueError):
            fgsm(x, x, 0.1, clamp=clamp)
    for eps in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            fgsm(x, x, eps)


# ---------------------------------------------------------------- the direct launcher, CPU
class _Param:
    def __init__(self, p: inspect.Parameter, constexpr: bool):
        self.name, self.is_constexpr, self.default = p.name, constexpr, p.default


class _Runtime:
    launch_enter_hook = None
    launch_exit_hook = None


class _Compiled:
    """A compiled specialisation: its launcher refuses arguments of another specialisation, as
    a real kernel would silently misbehave on them."""

    def __init__(self, spec, fake):
        self.spec, self.fake = spec, fake
        self.function, self.packed_metadata = 1000 + len(fake.compiled), ("meta", spec)
        self._run = self._launcher

    @property
    def run(self):
        return self._run

    def _launcher(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *values):
        if self.fake.extra:  # this "Triton" passes one argument more before the kernel's
            assert values[0] is None, "launched without the extra argument"
            values = values[1:]
        assert self.fake.spec_of(values) == self.spec, "launched with another specialisation"
        assert function == self.function and packed == self.packed_metadata
        self.fake.launches.append((g0, g1, g2, stream))
        self.fake.body(*values)


class FakeTriton:
    """A JITFunction's protocol (params, kernel[grid](...) returning the compiled kernel,
    the launcher's calling convention) around a Python body that does the work on CPU."""

    def __init__(self, body, constexprs, extra_launch_arg=False):
        sig = inspect.signature(body)
        self.params = [_Param(p, p.name in constexprs) for p in sig.parameters.values()]
        self.sig, self.body, self.extra = sig, body, extra_launch_arg
        self.compiled, self.launches, self.standard_calls = {}, [], 0
        self.pre_run_hooks = []

    def spec_of(self, values):
        out = []
        for p, v in zip(self.params, values):
            if p.is_constexpr:
                out.append(v)
            elif isinstance(v, torch.Tensor):
                out.append((v.dtype, v.data_ptr() % 16 == 0))
            elif isinstance(v, int) and not isinstance(v, bool):
                out.append((v == 1, v % 16 == 0))
            else:
                out.append(type(v))
        return tuple(out)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.standard_calls += 1
            bound = self.sig.bind(*args, **kwargs)
            bound.apply_defaults()
            values = tuple(bound.arguments.values())
            spec = self.spec_of(values)
            ck = self.compiled.setdefault(spec, _Compiled(spec, self))
            g = tuple(grid(bound.arguments) if callable(grid) else grid) + (1, 1)
            extra = (None,) if self.extra else ()
            ck.run(g[0], g[1], g[2], 77, ck.function, ck.packed_metadata, None, None, None,
                   *extra, *values)
            return ck
        return call


def _scale_body(x_ptr, out_ptr, n, s, FLIP: bool = False, BLOCK: int = 4):
    out_ptr.view(-1)[:n] = x_ptr.view(-1)[:n] * (-s if FLIP else s)


def _fake_fast(**kw):
    fake = FakeTriton(_scale_body, {"FLIP", "BLOCK"}, **kw)
    rt = _Runtime()
    fk = _launch.FastKernel(fake, runtime=rt, device_index=lambda: 0, raw_stream=lambda d: 77)
    return fake, fk, rt


def test_direct_launch_after_a_verified_standard_launch(gen):
    fake, fk, _ = _fake_fast()
    x = torch.randn(64, generator=gen)
    for i in range(5):
        out = torch.empty(64)
        fk[(4,)](x, out, 64, 2.5, BLOCK=4)
        assert torch.equal(out, x * 2.5)
    assert fake.standard_calls == 2  # compile, then the recorded one; the rest launch directly
    assert len(fake.launches) == 5 and fake.launches[-1] == (4, 1, 1, 77)


def test_a_new_specialisation_never_reuses_another_compiled_kernel(gen):
    fake, fk, _ = _fake_fast()
    x = torch.randn(80, generator=gen)
    for _ in range(3):
        # a misaligned view, n == 1 (against 3), another constexpr: each differs from the
        # previous case in that alone
        for n, args, kw in ((64, (x,), {}), (64, (x[1:],), {}), (3, (x,), {}), (1, (x,), {}),
                            (64, (x,), {"FLIP": True})):
            out = torch.empty(80)
            fk[(1,)](*args, out, n, 0.5, **kw)
            ref = args[0][:n] * (-0.5 if kw else 0.5)
            assert torch.equal(out[:n], ref)
    assert len(fake.compiled) == 5
    assert fake.standard_calls == 10  # each key: compile, verify; then direct


def test_another_launcher_convention_falls_back_for_good(gen):
    fake, fk, _ = _fake_fast(extra_launch_arg=True)  # Triton passing one more argument
    x = torch.randn(16, generator=gen)
    for _ in range(4):
        out = torch.empty(16)
        fk[(1,)](x, out, 16, 3.0)
        assert torch.equal(out, x * 3.0)
    assert fake.standard_calls == 4


def test_launch_hooks_callable_grids_and_unknown_types_take_the_standard_launch(gen):
    fake, fk, rt = _fake_fast()
    x = torch.randn(16, generator=gen)
    out = torch.empty(16)
    for _ in range(3):
        fk[(1,)](x, out, 16, 1.5)
    assert fake.standard_calls == 2
    rt.launch_enter_hook = lambda *a: None  # a profiler attached
    fk[(1,)](x, out, 16, 1.5)
    assert fake.standard_calls == 3
    rt.launch_enter_hook = None
    fk[lambda meta: (1,)](x, out, 16, 1.5)
    fk[(1,)](x, out, 16, np.float64(1.5))  # not a type the key knows
    assert fake.standard_calls == 5
    fk[(1,)](x, out, 16, 1.5)
    assert fake.standard_calls == 5


def test_launcher_is_the_plain_kernel_when_off_and_under_the_interpreter(monkeypatch):
    k = object()
    monkeypatch.setattr(_launch, "ENABLED", False)
    assert _backend.launcher(k, True) is k
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.launcher(k, True) is k


# ---------------------------------------------------------------- the direct launcher, GPU
def _gpu_cases(x, x2, b, mu, var):
    return {
        "dropout": lambda: fastreg.dropout(x, 0.3, seed=11),
        "dropout bits": lambda: fastreg.dropout(x, 0.3, seed=11, mask="bits"),
        "dropout_add": lambda: fastreg.dropout_add(x, x * 2, 0.3, seed=11),
        "gaussian_dropout": lambda: fastreg.gaussian_dropout(x, 0.3, seed=11),
        "multiplicative_noise": lambda: fastreg.multiplicative_noise(x2, 0.2, seed=11),
        "input_noise": lambda: fastreg.input_noise(x2, b, dist="uniform", seed=11),
        "locked_dropout": lambda: fastreg.locked_dropout(x2, 0.3, dim=0, seed=11),
        "bias_act_dropout": lambda: fastreg.bias_act_dropout(x2, b, activation="gelu", p=0.3,
                                                             seed=11),
        "vd_sample": lambda: vd_sample(mu, var, seed=11),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_direct_launch_is_bit_identical_to_the_standard_launch(dtype, monkeypatch):
    monkeypatch.delenv("FASTREG_BACKEND", raising=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4099, device="cuda", generator=g).to(dtype).requires_grad_(True)
    x2 = torch.randn(17, 96, device="cuda", generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(96, device="cuda", generator=g).to(dtype).requires_grad_(True)
    mu = torch.randn(4099, device="cuda", generator=g).to(dtype).requires_grad_(True)
    var = torch.rand(4099, device="cuda", generator=g).to(dtype).requires_grad_(True)
    cases = _gpu_cases(x, x2, b, mu, var)

    def run(name):
        y = cases[name]()
        leaves = [t for t in (x, x2, b, mu, var) if t.requires_grad]
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
        return [y] + [gr for gr in grads if gr is not None]

    monkeypatch.setattr(_launch, "ENABLED", False)
    want = {name: run(name) for name in cases}
    monkeypatch.setattr(_launch, "ENABLED", True)
    _launch._FAST.clear()
    for _ in range(3):  # compile, verify, then direct
        for name in cases:
            got = run(name)
            assert all(torch.equal(a, w) for a, w in zip(got, want[name])), name
    torch.cuda.synchronize()
    states = [e if e == "refused" else e[0]
              for fk in _launch._FAST.values() if isinstance(fk, _launch.FastKernel)
              for e in fk._entries.values()]
    assert states and all(s == "ready" for s in states), states


@pytest.mark.gpu
def test_gpu_compile_still_traces_with_the_direct_launcher_on(monkeypatch):
    x = torch.randn(1000, device="cuda")
    monkeypatch.setattr(_launch, "ENABLED", False)
    want = fastreg.dropout(x, 0.3, seed=3)
    monkeypatch.setattr(_launch, "ENABLED", True)
    torch._dynamo.reset()
    f = torch.compile(lambda t: fastreg.dropout(t, 0.3, seed=3), fullgraph=True)
    assert torch.equal(f(x), want)  # traced through the ops (wrap_triton), not the fast path
