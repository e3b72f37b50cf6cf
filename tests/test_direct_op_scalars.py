"""torch.ops.fastreg.* called directly, without the public wrappers: out-of-range scalar
arguments (p, act, dist, stream, eps, step, lo/hi, dim, l1/l2) and malformed seed tensors are
refused before any kernel runs, with a ValueError/TypeError that names the op and the argument.
The rules are the wrappers' (e.g. p = 1 is allowed, as fastreg.dropout allows it). The
tensor-size checks of direct calls are tested in test_direct_op_sizes.py and each family's file
(test_direct_ops_check_sizes).
"""

import math
import re

import pytest
import torch

import fastreg  # noqa: F401 - registers the ops

OPS = torch.ops.fastreg
NAN, INF = math.nan, math.inf
MAX_STREAM = 2**63 - 1


def _specs(device="cpu"):
    """op name -> (valid arguments in schema order, {scalar argument: kind}, its *_cpu op)."""
    x = torch.randn(4, 8, device=device)
    s = torch.tensor(123, device=device)
    b = torch.randn(8, device=device)
    sigma = torch.rand(8, device=device)
    bits = torch.full((4,), 0b10110101, dtype=torch.uint8, device=device)
    w = torch.randn(3, 8, device=device)
    rng = {"seed": "seed", "stream": "stream"}
    return {
        "dropout_fwd": (dict(x=x, seed=s, stream=0, p=0.5, with_bits=True),
                        {**rng, "p": "p"}, "dropout_fwd_cpu"),
        "dropout_add_fwd": (dict(x=x, residual=x.clone(), seed=s, stream=0, p=0.5),
                            {**rng, "p": "p"}, "dropout_add_fwd_cpu"),
        "dropout_bits_apply": (dict(grad=x, bits=bits, p=0.5), {"p": "p"},
                               "dropout_bits_apply_cpu"),
        "bias_act_dropout_fwd": (dict(x=x, bias=b, seed=s, stream=0, act=1, p=0.5),
                                 {**rng, "act": "act", "p": "p"}, "bias_act_dropout_fwd_cpu"),
        "bias_act_dropout_bwd": (dict(grad=x, saved=x.clone(), bias=b, seed=s, stream=0, act=2,
                                      p=0.5),
                                 {**rng, "act": "act", "p": "p"}, "bias_act_dropout_bwd_cpu"),
        "locked_dropout": (dict(x=x, seed=s, stream=0, p=0.5, dim=1),
                           {**rng, "p": "p", "dim": "dim"}, "locked_dropout_cpu"),
        "dropconnect_linear": (dict(x=x, weight=w, bias=None, seed=s, stream=0, p=0.5),
                               {**rng, "p": "p"}, None),
        "noise_fwd": (dict(x=x, sigma=sigma, seed=s, stream=0, dist=0, additive=False),
                      {**rng, "dist": "dist"}, "noise_fwd_cpu"),
        "noise_bwd": (dict(grad=x, x=x.clone(), sigma=sigma, seed=s, stream=0, dist=1,
                           additive=False, need_gx=True, need_gs=True),
                      {**rng, "dist": "dist"}, "noise_bwd_cpu"),
        "vd_sample": (dict(mu=x, var=x.abs(), seed=s, stream=0, eps=1e-8),
                      {**rng, "eps": "nonneg"}, "vd_sample_cpu"),
        "vd_sample_grad_var": (dict(grad=x, var=x.abs(), seed=s, stream=0, eps=1e-8),
                               {**rng, "eps": "nonneg"}, "vd_sample_grad_var_cpu"),
        "pgd_step": (dict(x=x, x0=x.clone(), grad=torch.randn(4, 8, device=device), step=0.1,
                          eps=0.2, lo=-1.0, hi=1.0),
                     {"step": "nonneg", "eps": "nonneg", "lo": "bound", "hi": "bound"},
                     "adversarial_numba"),
        # l1, l2 as fastreg.activity_penalty accepts them: finite and >= 0
        "activity_penalty": (dict(x=x, l1=0.1, l2=0.2), {"l1": "nonneg", "l2": "nonneg"}, None),
        "activity_penalty_backward": (dict(gy=x, x=x.clone(), gv=torch.tensor(1.0, device=device),
                                           l1=0.1, l2=0.2),
                                      {"l1": "nonneg", "l2": "nonneg"}, None),
    }


# no Triton kernel (Numba on CPU, CUDA on a GPU): forcing Triton still refuses bad scalars
# (checked first) but cannot run valid ones
NO_TRITON = {"activity_penalty", "activity_penalty_backward"}


PUBLIC = list(_specs())
CPU_OPS = [(name, cpu) for name, (_, _, cpu) in _specs().items() if cpu is not None]


def _bad_values(kind, arg):
    """(bad value, exception type, regex for the message after 'fastreg::<op>: ')."""
    if kind == "seed":
        return [(torch.tensor(1.0), TypeError,
                 r"seed must be a 0-dim int64 tensor, got shape \(\) dtype torch.float32"),
                (torch.tensor([1, 2]), TypeError,
                 r"seed must be a 0-dim int64 tensor, got shape \(2,\) dtype torch.int64"),
                (torch.tensor(1, dtype=torch.int32), TypeError,
                 r"seed must be a 0-dim int64 tensor, got shape \(\) dtype torch.int32")]
    if kind == "stream":
        return [(v, ValueError, re.escape(f"stream must be in [0, 2^63), got {v}"))
                for v in (-1, -(2**63))]
    if kind == "p":
        return [(v, ValueError, re.escape(f"p must be in [0, 1], got {float(v)}"))
                for v in (-0.5, -1e-300, 1.5, 1.0000001, NAN, INF, -INF)]
    if kind == "act":
        return [(v, ValueError, r"act must be 0 \(none\), 1 \(relu\) or 2 \(gelu\), got "
                 + str(v)) for v in (3, -1, 5)]
    if kind == "dist":
        return [(v, ValueError, r"dist must be 0 \(gaussian\) or 1 \(uniform\), got " + str(v))
                for v in (2, -1)]
    if kind == "nonneg":
        return [(v, ValueError, re.escape(f"{arg} must be a finite number >= 0, got {v}"))
                for v in (-1e-3, -INF, INF, NAN)]
    if kind == "bound":
        return [(NAN, ValueError, f"{arg} must not be NaN")]
    if kind == "dim":
        return [(v, ValueError, re.escape(f"dim must be in [0, 2) for x of shape (4, 8), got {v}"))
                for v in (-1, 2, 5)]
    raise AssertionError(kind)


def _call(op, args, **changes):
    return op(*{**args, **changes}.values())


def _check_refused(op, opname, args, scalars):
    for arg, kind in scalars.items():
        for bad, exc, msg in _bad_values(kind, arg):
            # the Numba path of locked_dropout checks dim in the inner op (locked_dropout_cpu)
            prefix = re.escape(f"fastreg::{opname}") + ("(_cpu)?" if kind == "dim" else "")
            with pytest.raises(exc, match=f"^{prefix}: {msg}$"):
                _call(op, args, **{arg: bad})


@pytest.mark.parametrize("backend", ["numba", "torch", "triton"])
@pytest.mark.parametrize("name", PUBLIC)
def test_public_op_refuses_bad_scalars(name, backend):
    args, scalars, _ = _specs()[name]
    with fastreg.use_backend(backend):
        _check_refused(getattr(OPS, name), name, args, scalars)


@pytest.mark.parametrize("name,cpu", CPU_OPS)
def test_cpu_op_refuses_bad_scalars(name, cpu):
    args, scalars, _ = _specs()[name]
    _check_refused(getattr(OPS, cpu), cpu, args, scalars)


@pytest.mark.parametrize("name", [n for n, (_, scalars, _) in _specs().items()
                                  if "seed" in scalars and n != "dropconnect_linear"])
def test_public_op_refuses_seed_on_another_device(name):
    """The GPU kernels dereference the seed on the input's device. A CPU seed with a CUDA input
    is tested in test_gpu_checks_and_seed_on_another_device; here a meta seed with CPU inputs (the
    dispatcher sends such a mix of the inner *_cpu ops and of dropconnect_linear, a plain
    custom op, to their fake kernels, which run nothing: the public ops run their bodies)."""
    args, _, _ = _specs()[name]
    ref = next(iter(args))
    with pytest.raises(ValueError, match=re.escape(f"fastreg::{name}: seed must be on {ref}'s "
                                                   f"device (cpu), got meta")):
        _call(getattr(OPS, name), args, seed=torch.tensor(1, device="meta"))


def _ops_with_several_tensors():
    """(op, its _specs name) for every public and inner op that takes two tensors or more."""
    for name, (args, _, cpu) in _specs().items():
        if sum(isinstance(v, torch.Tensor) for v in args.values()) > 1:
            yield from ((op, name) for op in ((name, cpu) if cpu else (name,)))


@pytest.mark.parametrize("opname,name", list(_ops_with_several_tensors()))
def test_a_meta_tensor_among_cpu_ones_is_refused(opname, name):
    """The dispatcher sends a call that mixes a meta tensor with CPU ones to the op's fake
    kernel where it has one (the *_cpu ops, the plain custom ops), whose uninitialised result
    came back as if computed. Each tensor argument but the first, moved to the meta device, is
    refused with an error that names the op and the argument."""
    args, _, _ = _specs()[name]
    first = next(iter(args))
    for arg, v in args.items():
        if arg != first and isinstance(v, torch.Tensor):
            with pytest.raises(ValueError, match=rf"^fastreg::{opname}: {arg} .*\bmeta\b"):
                _call(getattr(OPS, opname), args, **{arg: v.to("meta")})


def test_noise_bwd_refuses_additive_grad_x():
    args, _, _ = _specs()["noise_bwd"]
    for opname in ("noise_bwd", "noise_bwd_cpu"):
        with pytest.raises(ValueError, match=f"fastreg::{opname}: additive noise has grad_x = "
                                             "grad; need_gx must be False"):
            _call(getattr(OPS, opname), args, additive=True, need_gx=True)


def test_pgd_step_refuses_lo_above_hi():
    args, _, _ = _specs()["pgd_step"]
    for opname in ("pgd_step", "adversarial_numba"):
        with pytest.raises(ValueError, match=re.escape(f"fastreg::{opname}: lo must be <= hi, "
                                                       "got lo=1.0, hi=-1.0")):
            _call(getattr(OPS, opname), args, lo=1.0, hi=-1.0)


def _edge_values(kind, arg, args):
    """Valid values at the edges of what the wrappers accept."""
    if kind == "bound":  # infinite (unbounded) or equal to the other bound
        return [-INF, args["hi"]] if arg == "lo" else [INF, args["lo"]]
    return {"seed": [], "stream": [0, MAX_STREAM], "p": [0.0, 1.0, 1e-300], "act": [0, 1, 2],
            "dist": [0, 1], "nonneg": [0.0, 1e30], "dim": [0, 1]}[kind]


def _outputs(r):
    return r if isinstance(r, (tuple, list)) else (r,)


# the Triton interpreter computes masked-off lanes too: 0 / 0 there at eps = 0 (never stored)
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("name,backend", [(n, b) for n in PUBLIC for b in ("numba", "torch", "triton")
                                           if not (b == "triton" and n in NO_TRITON)])
def test_valid_direct_calls_still_run(name, backend):
    """The default arguments and each scalar at the edges of its range run, on every backend the
    op has, and the public op and its *_cpu op agree."""
    args, scalars, cpu = _specs()[name]
    op = getattr(OPS, name)
    refs = {}
    if backend != "torch":  # the values at the edges: the reference's
        with fastreg.use_backend("torch"):
            refs = {(arg, v): _outputs(_call(op, args, **{arg: v})) for arg, kind in scalars.items()
                    for v in _edge_values(kind, arg, args)}
    with fastreg.use_backend(backend):
        base = _outputs(_call(op, args))
        for arg, kind in scalars.items():
            for v in _edge_values(kind, arg, args):
                out = _outputs(_call(op, args, **{arg: v}))
                assert out[0].shape == base[0].shape, (arg, v)
                for a, r in zip(out, refs.get((arg, v), ())):
                    # a few float32 ulp of the normals, times sqrt(1e30) at eps = 1e30
                    torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-5, equal_nan=True,
                                               msg=f"{name} {arg}={v}")
                if kind == "p" and v == 1e-300:  # keeps everything, scale 1: as p = 0
                    zero = _outputs(_call(op, args, **{arg: 0.0}))
                    assert all(torch.equal(a, b) for a, b in zip(out, zero)), name
                if kind == "stream" and v == MAX_STREAM:  # another stream: other random numbers
                    assert not torch.equal(out[0], _outputs(_call(op, args, stream=0))[0]), name
    assert base[0].shape == ((4, 3) if name == "dropconnect_linear" else (4, 8))
    if backend == "numba" and cpu is not None:
        for a, b in zip(base, _outputs(_call(getattr(OPS, cpu), args))):
            assert torch.equal(a, b)


def test_valid_direct_call_matches_the_wrapper():
    """One direct call per family against its wrapper: the checks change no result."""
    x, b = torch.randn(4, 8), torch.randn(8)
    s = torch.tensor(99)
    assert torch.equal(OPS.dropout_fwd(x, s, 3, 1.0, False)[0],
                       fastreg.dropout(x, 1.0, seed=99, stream=3))
    assert torch.equal(OPS.bias_act_dropout_fwd(x, b, s, 2, 2, 0.25),
                       fastreg.bias_act_dropout(x, b, activation="gelu", p=0.25, seed=99,
                                                stream=2))
    assert torch.equal(OPS.locked_dropout(x, s, MAX_STREAM, 0.5, 0),
                       fastreg.locked_dropout(x, 0.5, dim=0, seed=99, stream=MAX_STREAM))
    assert torch.equal(OPS.noise_fwd(x, torch.tensor(0.3, dtype=torch.float64), s, 1, 1, True),
                       fastreg.input_noise(x, 0.3, dist="uniform", seed=99, stream=1))
    y, v = fastreg.activity_penalty(x, l1=0.0, l2=0.5, return_value=True)
    assert all(torch.equal(a, b) for a, b in zip(OPS.activity_penalty(x, 0.0, 0.5), (y, v)))
    x0 = x + 0.01
    assert torch.equal(OPS.pgd_step(x, x0, b.expand(4, 8), 0.5, 0.0, -INF, INF),
                       fastreg.adversarial.pgd_step(x, x0, b.expand(4, 8), 0.5, 0.0))


@pytest.mark.gpu
def test_gpu_checks_and_seed_on_another_device():
    """On CUDA the same checks run (no device sync: the seed's value is never read), and a CPU
    seed with CUDA inputs, which the kernels would dereference as a device pointer, is refused."""
    for name, (args, scalars, _) in _specs("cuda").items():
        op = getattr(OPS, name)
        _check_refused(op, name, args, scalars)
        _call(op, args)
        if "seed" in scalars:
            ref = next(iter(args))
            with pytest.raises(ValueError, match=re.escape(
                    f"fastreg::{name}: seed must be on {ref}'s device (cuda:0), got cpu")):
                _call(op, args, seed=torch.tensor(5))
    torch.cuda.synchronize()
