"""torch.ops.fastreg.* called directly, without the public wrappers: a tensor whose size, shape
or device disagrees with what the kernels index (residual, bits, bias, saved, sigma, x, var,
x0, grad, gy, gv, weight) is refused in the op body on every backend (Numba, Triton under the
interpreter, the torch reference), with a ValueError/TypeError naming the op and the argument,
before any kernel runs: a GPU kernel given a short tensor reads past its buffer.

The families' own files test the Numba path (test_direct_ops_check_sizes); the scalar
arguments are tested in test_direct_op_scalars.py.
"""

import importlib
import re

import pytest
import torch

import fastreg  # noqa: F401 - registers the ops

OPS = torch.ops.fastreg
# The kernel of an op for the CPU dispatch key: what the dispatcher runs for a CPU input mixed
# with a tensor of another device (a CUDA one on a GPU machine). Here the other device is meta,
# for which a plain call of a custom op would run its fake kernel instead.
CPU_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
META = torch.device("meta")
NUMBA_MODULES = ("dropout", "bias_act", "noise", "variational", "adversarial", "penalty")


def _specs():
    """op name -> (valid arguments in schema order, [(argument, bad value, exception, message
    after 'fastreg::<op>: ')], its *_cpu op or None, the backends it implements)."""
    x = torch.randn(4, 8)
    s = torch.tensor(7)
    b = torch.randn(8)
    bits = torch.full((4,), 0b10110101, dtype=torch.uint8)

    def like(name, ref_name, shape, device="cpu"):
        return (f"{name} has shape {shape} on {device}, needs {ref_name}'s shape (4, 8) on cpu")

    def bias_msg(shape, device="cpu", xshape="(4, 8)"):
        return (f"bias has shape {shape} on {device}, needs (8,) (the last dim of {xshape}) "
                "on cpu")

    def sigma_msg(shape, device="cpu"):
        return (f"sigma has shape {shape} on {device}, needs a shape that broadcasts to (4, 8) "
                "(each dim 1 or equal) on cpu")

    all3 = ("numba", "torch", "triton")
    return {
        "dropout_add_fwd": (
            dict(x=x, residual=x.clone(), seed=s, stream=0, p=0.5),
            [("residual", torch.randn(10), ValueError, like("residual", "x", "(10,)")),
             ("residual", torch.randn(8, 4), ValueError, like("residual", "x", "(8, 4)")),
             ("residual", torch.randn(4, 8, device=META), ValueError,
              like("residual", "x", "(4, 8)", "meta"))],
            "dropout_add_fwd_cpu", all3),
        "dropout_bits_apply": (
            dict(grad=x, bits=bits, p=0.5),
            [("bits", bits[:3], ValueError, "bits has 3 bytes, needs 4 for 32 elements"),
             ("bits", bits[:0], ValueError, "bits has 0 bytes, needs 4 for 32 elements"),
             ("bits", torch.zeros(4, dtype=torch.int64), TypeError,
              "bits must be uint8, got torch.int64"),
             ("bits", bits.reshape(4, 1), ValueError,
              "bits must be 1-D on grad's device (cpu), got 2-D on cpu"),
             ("bits", bits.to(META), ValueError,
              "bits must be 1-D on grad's device (cpu), got 1-D on meta")],
            "dropout_bits_apply_cpu", all3),
        "bias_act_dropout_fwd": (
            dict(x=x, bias=b, seed=s, stream=0, act=1, p=0.5),
            [("bias", torch.randn(3), ValueError, bias_msg("(3,)")),
             ("bias", torch.randn(0), ValueError, bias_msg("(0,)")),
             ("bias", b.reshape(1, 8), ValueError, bias_msg("(1, 8)")),
             ("bias", b.to(META), ValueError, bias_msg("(8,)", "meta")),
             ("x", torch.tensor(1.0), ValueError,
              "the input must have at least 1 dim, got a 0-dim tensor")],
            "bias_act_dropout_fwd_cpu", all3),
        "bias_act_dropout_bwd": (
            dict(grad=x, saved=x.clone(), bias=b, seed=s, stream=0, act=2, p=0.5),
            [("saved", torch.randn(3), ValueError, like("saved", "grad", "(3,)")),
             ("saved", torch.randn(4, 8, device=META), ValueError,
              like("saved", "grad", "(4, 8)", "meta")),
             ("bias", torch.randn(7), ValueError, bias_msg("(7,)"))],
            "bias_act_dropout_bwd_cpu", all3),
        "noise_fwd": (
            dict(x=x, sigma=torch.rand(8), seed=s, stream=0, dist=0, additive=False),
            [("sigma", torch.rand(3), ValueError, sigma_msg("(3,)")),
             ("sigma", torch.rand(2, 4, 8), ValueError, sigma_msg("(2, 4, 8)")),
             ("sigma", torch.rand(8, device=META), ValueError, sigma_msg("(8,)", "meta"))],
            "noise_fwd_cpu", all3),
        "noise_bwd": (
            dict(grad=x, x=x.clone(), sigma=torch.rand(8), seed=s, stream=0, dist=1,
                 additive=False, need_gx=True, need_gs=True),
            [("sigma", torch.rand(3), ValueError, sigma_msg("(3,)")),
             ("x", torch.randn(3), ValueError, like("x", "grad", "(3,)")),
             ("x", torch.randn(4, 8, device=META), ValueError,
              like("x", "grad", "(4, 8)", "meta"))],
            "noise_bwd_cpu", all3),
        "vd_sample": (
            dict(mu=x, var=x.abs(), seed=s, stream=0, eps=1e-8),
            [("var", torch.rand(10), ValueError, like("var", "mu", "(10,)")),
             ("var", torch.rand(4, 8, device=META), ValueError,
              like("var", "mu", "(4, 8)", "meta"))],
            "vd_sample_cpu", all3),
        "vd_sample_grad_var": (
            dict(grad=x, var=x.abs(), seed=s, stream=0, eps=1e-8),
            [("var", torch.rand(200), ValueError, like("var", "grad", "(200,)")),
             ("var", torch.rand(4, 8, device=META), ValueError,
              like("var", "grad", "(4, 8)", "meta"))],
            "vd_sample_grad_var_cpu", all3),
        "pgd_step": (
            dict(x=x, x0=x.clone(), grad=torch.randn(4, 8), step=0.1, eps=0.2, lo=-1.0, hi=1.0),
            [("grad", torch.randn(10), ValueError, like("grad", "x", "(10,)")),
             ("x0", torch.randn(10), ValueError, like("x0", "x", "(10,)")),
             ("grad", torch.randn(4, 8, device=META), ValueError,
              like("grad", "x", "(4, 8)", "meta"))],
            "adversarial_numba", all3),
        "dropconnect_linear": (
            dict(x=x, weight=torch.randn(3, 8), bias=torch.randn(3), seed=s, stream=0, p=0.5),
            [("weight", torch.randn(3, 8, device=META), ValueError,
              "weight must be on x's device (cpu), got meta"),
             ("bias", torch.randn(3, device=META), ValueError,
              "bias must be on x's device (cpu), got meta")],
            None, all3),
        "activity_penalty_backward": (
            dict(gy=x, x=x.clone(), gv=torch.tensor(1.0), l1=0.1, l2=0.2),
            [("gy", torch.randn(3), ValueError, like("gy", "x", "(3,)")),
             ("gv", torch.zeros(0), ValueError,
              "gv has shape (0,) on cpu, needs one element on x's device (cpu)"),
             ("gv", torch.zeros(2), ValueError,
              "gv has shape (2,) on cpu, needs one element on x's device (cpu)"),
             ("gv", torch.tensor(1.0, device=META), ValueError,
              "gv has shape () on meta, needs one element on x's device (cpu)")],
            None, ("numba", "torch")),  # no Triton kernel: Numba on CPU, CUDA on a GPU
    }


CASES = [(name, backend) for name, spec in _specs().items() for backend in spec[3]]
CPU_OPS = [(name, spec[2]) for name, spec in _specs().items() if spec[2] is not None]


def _is_meta(v):
    return isinstance(v, torch.Tensor) and v.device == META


def _call(opname, args):
    """The op as a direct call makes it; with a meta tensor, its kernel for the CPU key."""
    op = getattr(OPS, opname)
    if any(_is_meta(v) for v in args.values()):
        return op.default.redispatch(CPU_KEY, *args.values())
    return op(*args.values())


def _check_refused(opname, args, bad_cases):
    for arg, bad, exc, msg in bad_cases:
        with pytest.raises(exc, match="^" + re.escape(f"fastreg::{opname}: {msg}") + "$"):
            _call(opname, {**args, arg: bad})


def _kernel_ran(what):
    def ran(*args, **kwargs):
        raise AssertionError(f"{what} ran before the arguments were checked")

    return ran


@pytest.fixture
def no_kernels(monkeypatch):
    """Every Triton launch under the interpreter and every call into the Numba kernel modules
    fails the test: the checks must come first."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", _kernel_ran("a Triton kernel"))
    for name in NUMBA_MODULES:
        mod = importlib.import_module(f"fastreg.kernels.numba.{name}")
        for attr, v in list(vars(mod).items()):
            if callable(v) and getattr(v, "__module__", None) == mod.__name__:
                monkeypatch.setattr(mod, attr, _kernel_ran(f"{mod.__name__}.{attr}"))


@pytest.mark.parametrize("name,backend", CASES)
def test_public_op_refuses_bad_sizes(name, backend, no_kernels):
    args, bad_cases, _, _ = _specs()[name]
    with fastreg.use_backend(backend):
        _check_refused(name, args, bad_cases)


@pytest.mark.parametrize("name,cpu", CPU_OPS)
def test_cpu_op_refuses_bad_sizes(name, cpu, no_kernels):
    args, bad_cases, _, _ = _specs()[name]
    _check_refused(cpu, args, bad_cases)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_the_guard_catches_kernels(backend, no_kernels):
    """The no_kernels fixture does catch a kernel run by valid arguments (so the tests above
    would see a check that came too late)."""
    args, _, _, _ = _specs()["dropout_add_fwd"]
    with fastreg.use_backend(backend), pytest.raises(AssertionError, match="ran before"):
        _call("dropout_add_fwd", args)


@pytest.mark.parametrize("name,backend", CASES)
def test_valid_sizes_still_run(name, backend):
    """The valid arguments, and the ones the checks must keep allowing (sigma of every
    broadcastable shape, bits longer than needed, a 1-element gv of any dim, act 0 with any
    saved, need_gs without x), run on every backend."""
    args, _, _, _ = _specs()[name]
    extra = {
        "noise_fwd": [dict(sigma=torch.rand(s)) for s in ((), (1,), (4, 1), (1, 8), (4, 8))],
        "noise_bwd": [dict(x=torch.empty(0), need_gs=False),
                      dict(x=torch.empty(0), additive=True, need_gx=False)],
        "dropout_bits_apply": [dict(bits=torch.full((9,), 0b10110101, dtype=torch.uint8))],
        "bias_act_dropout_bwd": [dict(saved=torch.empty(0), act=0)],
        "pgd_step": [dict(x0=None)],
        "dropconnect_linear": [dict(bias=None)],
        "activity_penalty_backward": [dict(gv=torch.ones(1, 1))],
    }.get(name, [])
    with fastreg.use_backend(backend):
        for changes in [{}] + extra:
            out = _call(name, {**args, **changes})
            out = out[0] if isinstance(out, (tuple, list)) else out
            want = (4, 3) if name == "dropconnect_linear" else (4, 8)
            if changes.get("need_gx") is False:  # grad_x not asked for: an empty tensor
                want = (0,)
            assert out.shape == want, changes


def test_triton_bits_apply_reads_an_expanded_bits_view():
    """bits of 4 logical bytes held in 1 (a stride-0 view) passes the size check; the Triton
    path reads it in logical order, as the Numba and torch paths do, not past its storage."""
    grad = torch.randn(4, 8)
    bits = torch.full((1,), 0b10110101, dtype=torch.uint8).expand(4)
    outs = []
    for backend in ("numba", "torch", "triton"):
        with fastreg.use_backend(backend):
            outs.append(OPS.dropout_bits_apply(grad, bits, 0.5))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_compiled_ops_still_trace():
    """The checks run on fake tensors too (metadata only): torch.compile of direct calls."""
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    seed = torch.tensor(3)

    def f(x, r):
        y = OPS.dropout_add_fwd(x, r, seed, 0, 0.5)
        return OPS.noise_fwd(y, torch.full((8,), 0.1), seed, 1, 0, False)

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, r)
    assert torch.equal(out, f(x, r))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_specs()))
def test_gpu_refuses_a_cpu_tensor(name):
    """With CUDA inputs, each tensor of the meta cases above given on the CPU instead (its
    pointer would reach a GPU kernel) is refused on the default backend, before any launch."""
    args, bad_cases, _, _ = _specs()[name]
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    op = getattr(OPS, name)
    for arg, bad, exc, _ in bad_cases:
        if _is_meta(bad):
            cpu = torch.zeros(bad.shape, dtype=bad.dtype)
            with pytest.raises(exc, match=f"^fastreg::{name}: {arg} .*cpu"):
                op(*{**args, arg: cpu}.values())
    torch.cuda.synchronize()
