"""Adversarial perturbation steps: FGSM and one projected-gradient (PGD) step, fused.

    fgsm(x, grad, eps)            = clamp(x + eps * sign(grad), lo, hi)
    pgd_step(x, x0, grad, s, eps) = clamp(proj_{||v - x0||_inf <= eps}(x + s * sign(grad)), lo, hi)

Each is one pass over memory (read x, [x0,] grad; write out) on every backend. The result
is laid out as torch.empty_like(x): the Numba kernel walks a permuted dense x (channels_last)
in memory order when grad (and x0) share its strides; otherwise the kernels compute in logical
order and copy once (fastreg/_layout.py).
sign(0) = 0 and, as torch.sign does, sign(NaN) = 0: a NaN gradient takes no step.
A NaN in x or x0 propagates to the output (torch.maximum/minimum/clamp semantics).

These are attack *steps*, not layers: they are not differentiable. Their outputs
never require grad (the autograd registration marks them non-differentiable), so
`x_adv = fgsm(x, x.grad, eps)` is already detached, as adversarial training wants.

Ops (namespace fastreg):
    pgd_step(Tensor x, Tensor? x0, Tensor grad, float step, float eps, float lo, float hi)
        the one public op (a triton_op: torch.compile sees the Triton kernel);
        x0=None is FGSM. Its body dispatches by backend: Triton (CUDA, or forced
        under TRITON_INTERPRET=1), the Numba kernel through the opaque inner op
        adversarial_numba (called directly on plain eager tensors), or the
        pure-PyTorch reference.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch.library import triton_op, wrap_triton

from fastreg import _alloc, _backend, _layout, _native
from fastreg._validate import (check_op_devices, check_float_tensor, check_op_like,
                               check_op_nonneg, check_same, compute_dtype)

_SUPPORTED = ("numba", "triton")
_BLOCK = 1024


# ---------------------------------------------------------------- reference
def pgd_step_reference(x, x0, grad, step, eps, lo=-math.inf, hi=math.inf):
    """The oracle: plain torch, in float64 for float64 inputs and float32 otherwise.

    x0=None is FGSM (no projection). Returns a contiguous tensor of x's dtype.
    """
    ct = compute_dtype(x.dtype)
    d = (grad > 0).to(ct) - (grad < 0).to(ct)
    v = x.to(ct) + step * d
    if x0 is not None:
        x0c = x0.to(ct)
        v = torch.minimum(torch.maximum(v, x0c - eps), x0c + eps)
    v = v.clamp(lo, hi)
    return v.to(x.dtype).contiguous()


def fgsm_reference(x, grad, eps, lo=-math.inf, hi=math.inf):
    """The FGSM oracle: pgd_step_reference with no projection and step = eps."""
    return pgd_step_reference(x, None, grad, eps, 0.0, lo, hi)


# ---------------------------------------------------------------- checks of direct calls
def _check_op_scalars(step: float, eps: float, lo: float, hi: float, op: str) -> None:
    """The scalars of an op called directly, as fgsm/pgd_step accept them (fgsm passes its eps
    as step and 0 as eps): step, eps finite >= 0; lo, hi not NaN (+-inf: unbounded), lo <= hi."""
    check_op_nonneg(step, "step", op)
    check_op_nonneg(eps, "eps", op)
    if lo != lo or hi != hi:  # NaN: the clamp would make every output NaN
        raise ValueError(f"fastreg::{op}: {'lo' if lo != lo else 'hi'} must not be NaN")
    if lo > hi:
        raise ValueError(f"fastreg::{op}: lo must be <= hi, got lo={lo}, hi={hi}")


def _check_op_tensors(x: torch.Tensor, x0: torch.Tensor | None, grad: torch.Tensor,
                      op: str) -> None:
    """Every kernel reads grad and x0 at x's indices (grad may have another float dtype)."""
    check_op_like(grad, "grad", x, "x", op)
    if x0 is not None:
        check_op_like(x0, "x0", x, "x", op)


# ---------------------------------------------------------------- Numba (opaque inner op)
def _adversarial_numba_impl(x: torch.Tensor, x0: torch.Tensor | None, grad: torch.Tensor,
                            step: float, eps: float, lo: float, hi: float) -> torch.Tensor:
    nb = _backend.numba_module("adversarial")

    ct = compute_dtype(x.dtype)
    # grad keeps its precision (a float64 1e-50 must stay positive); halves widen exactly
    gt = grad.dtype if grad.dtype in _NUMPY_FLOATS else torch.float32
    contiguous = x.is_contiguous()
    if not contiguous and _same_dense_layout(x, x0, grad):
        # no random numbers: a permuted dense x (channels_last, ...) is walked in memory order
        out = torch.empty_like(x, dtype=ct)
        npt = np.float64 if ct == torch.float64 else np.float32
        oa, xa = _layout.memory_numpy(out), _layout.memory_numpy(x.to(ct))
        ga = _layout.memory_numpy(grad.to(gt))
        if x0 is None:
            nb.fgsm(xa, ga, oa, npt(step), npt(lo), npt(hi))
        else:
            nb.pgd_step(xa, _layout.memory_numpy(x0.to(ct)), ga, oa, npt(step), npt(eps),
                        npt(lo), npt(hi))
        return _alloc.as_dtype(out, x.dtype)
    # float16/bfloat16: Numba has no such arrays; convert around the kernel
    # (same rounding as the reference: compute in float32, round once at the end).
    out, oa = _alloc.out_like(x, ct)
    if oa.size:
        xa = _alloc.numpy_in(x, ct)
        ga = _alloc.numpy_in(grad, gt)
        npt = np.float64 if ct == torch.float64 else np.float32
        if x0 is None:
            nb.fgsm(xa, ga, oa, npt(step), npt(lo), npt(hi))
        else:
            nb.pgd_step(xa, _alloc.numpy_in(x0, ct), ga, oa, npt(step), npt(eps), npt(lo),
                        npt(hi))
    out = _alloc.as_dtype(out, x.dtype)
    return out if contiguous else _layout.like(x, out)


_NUMPY_FLOATS = (torch.float32, torch.float64)


def _same_dense_layout(x, x0, grad) -> bool:
    """x is dense and non-overlapping, and grad (and x0) have its strides."""
    st = x.stride()
    return (grad.stride() == st and (x0 is None or x0.stride() == st)
            and _layout.permuted_dense(x))


def _adversarial_numba_op(x: torch.Tensor, x0: torch.Tensor | None, grad: torch.Tensor,
                          step: float, eps: float, lo: float, hi: float) -> torch.Tensor:
    # a direct call of the inner op (the public op checks before calling the impl itself)
    _check_op_scalars(step, eps, lo, hi, "adversarial_numba")
    _check_op_tensors(x, x0, grad, "adversarial_numba")
    return _adversarial_numba_impl(x, x0, grad, step, eps, lo, hi)


_adversarial_numba = torch.library.custom_op(
    "fastreg::adversarial_numba", _adversarial_numba_op, mutates_args=(), device_types="cpu")


@_adversarial_numba.register_fake
def _(x, x0, grad, step, eps, lo, hi):
    check_op_devices("adversarial_numba", x=x, x0=x0, grad=grad)
    return _layout.empty_out(x)


def _plain(*ts) -> bool:
    """True when every tensor is a plain torch.Tensor (eager, no tracing subclass): the
    body may then call the Numba implementation directly, skipping one torch.library
    dispatch. Fake/functional tensors (torch.compile, opcheck) go through the
    opaque op, so the graph records it."""
    return all(t is None or type(t) is torch.Tensor for t in ts)


# ---------------------------------------------------------------- Triton
def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _pgd_triton(x, x0, grad, step, eps, lo, hi):
    from fastreg.kernels.triton.adversarial import pgd_kernel

    if _native.triton_interpreted() and _is_fake(x):
        # The interpreter cannot be traced (wrap_triton hands back the plain Python
        # kernel): while tracing CPU tensors, record the reference, which computes
        # the same values. Compiled Triton on CUDA is traced as a kernel call.
        return _layout.like(x, pgd_step_reference(x, x0, grad, step, eps, lo, hi))
    xin = x
    x = x.contiguous()
    grad = grad.contiguous()
    x0c = x if x0 is None else x0.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n:
        grid = ((n + _BLOCK - 1) // _BLOCK,)
        wrap_triton(pgd_kernel)[grid](x, x0c, grad, out, n, _backend.f64_bits(step), _backend.f64_bits(eps),
                                      _backend.f64_bits(lo), _backend.f64_bits(hi), HAS_X0=x0 is not None,
                                      F64=x.dtype == torch.float64, BLOCK=_BLOCK)
    return _layout.like(xin, out)


# ---------------------------------------------------------------- the public op
@triton_op("fastreg::pgd_step", mutates_args=())
def _pgd_step_op(x: torch.Tensor, x0: torch.Tensor | None, grad: torch.Tensor, step: float,
                 eps: float, lo: float, hi: float) -> torch.Tensor:
    _check_op_scalars(step, eps, lo, hi, "pgd_step")
    _check_op_tensors(x, x0, grad, "pgd_step")  # before any backend
    backend = _backend.select(x.device, _SUPPORTED, "adversarial")
    if backend == "numba":
        if _plain(x, x0, grad):
            return _adversarial_numba_impl(x, x0, grad, step, eps, lo, hi)
        return torch.ops.fastreg.adversarial_numba(x, x0, grad, step, eps, lo, hi)
    if backend == "triton":
        return _pgd_triton(x, x0, grad, step, eps, lo, hi)
    return _layout.like(x, pgd_step_reference(x, x0, grad, step, eps, lo, hi))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _backward(ctx, grad_out):
    return None, None, None, None, None, None, None


_pgd_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- eager fast path
# Small contiguous float32/float64 inputs whose grad (and x0) are contiguous in x's dtype:
# the serial loops on the tensors' data addresses (kernels/numba/adversarial.fgsm_at, pgd_at:
# no numpy views to make and unbox), the scalars cast once. Same loops and arguments as
# _adversarial_numba_impl, so the same bits.
_LEAN_DTYPES = (torch.float32, torch.float64)
_LEAN_BELOW = 1 << 16  # the kernels' own serial threshold (kernels/numba/adversarial.py)
_NP_OF = {torch.float32: np.float32, torch.float64: np.float64}


def _lean_ok(x, x0, grad) -> bool:
    dt = x.dtype
    return (dt in _LEAN_DTYPES and grad.dtype == dt and x.is_contiguous()
            and grad.is_contiguous() and (x0 is None or (x0.dtype == dt and x0.is_contiguous())))


def _lean_numba(x, x0, grad, step, eps, lo, hi):
    nb = _backend.numba_module("adversarial")
    npt = _NP_OF[x.dtype]
    out = torch.empty(x.shape, dtype=x.dtype)
    n = x.numel()
    if n:  # the serial loops on the tensors' addresses (no numpy views to make and unbox)
        if x0 is None:
            nb.fgsm_at(x.data_ptr(), grad.data_ptr(), out.data_ptr(), n, npt(step), npt(lo),
                       npt(hi))
        else:
            nb.pgd_at(x.data_ptr(), x0.data_ptr(), grad.data_ptr(), out.data_ptr(), n,
                      npt(step), npt(eps), npt(lo), npt(hi))
    return out


def _pgd_step(x, x0, grad, step, eps, lo, hi):
    """The op, or in plain eager mode its body without the dispatch layers (as fastreg.dropout
    does): the steps are not differentiable, so no autograd node is needed, and the wrappers
    have validated what the op body checks."""
    if not _backend.eager_fast_path(x, grad, *(() if x0 is None else (x0,))):
        return torch.ops.fastreg.pgd_step(x, x0, grad, step, eps, lo, hi)
    backend = _backend.select(x.device, _SUPPORTED, "adversarial")
    if backend == "numba" and x.numel() < _LEAN_BELOW and _lean_ok(x, x0, grad):
        return _lean_numba(x, x0, grad, step, eps, lo, hi)
    # the kernels write fresh tensors, which never require grad (the op's output is marked
    # non-differentiable); the reference composes x, so it runs without autograd
    if backend == "numba":
        return _adversarial_numba_impl(x, x0, grad, step, eps, lo, hi)
    if backend == "triton":
        return _pgd_triton(x, x0, grad, step, eps, lo, hi)
    with torch.no_grad():
        return _layout.like(x, pgd_step_reference(x, x0, grad, step, eps, lo, hi))


# ---------------------------------------------------------------- validation + public API
def _check_scalar(v, name: str, op: str, *, nonneg: bool) -> float:
    if type(v) is float and (0.0 if nonneg else -math.inf) <= v < math.inf:
        return v  # the common case, without the ABC check below (about a microsecond)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fastreg.adversarial.{op}: {name} must be a real number, got {v!r}")
    v = float(v)
    if not -math.inf < v < math.inf or (nonneg and v < 0):  # comparisons trace symbolically
        raise ValueError(f"fastreg.adversarial.{op}: {name} must be a finite number"
                         f"{' >= 0' if nonneg else ''}, got {v}")
    return v


def _check_clamp(clamp, op: str) -> tuple[float, float]:
    if clamp is None:
        return -math.inf, math.inf
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"fastreg.adversarial.{op}: clamp must be None or a pair (lo, hi) of "
                        f"numbers or None, got {clamp!r}")
    lo, hi = clamp
    if type(lo) is float and type(hi) is float and -math.inf <= lo <= hi <= math.inf:
        return lo, hi  # two ordered non-NaN floats: the common case, without the ABC checks
    out = []
    for name, v, default in (("clamp[0] (lo)", lo, -math.inf), ("clamp[1] (hi)", hi, math.inf)):
        if v is None:
            out.append(default)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"fastreg.adversarial.{op}: {name} must be a real number or None, "
                            f"got {v!r}")
        if float(v) != float(v):  # NaN
            raise ValueError(f"fastreg.adversarial.{op}: {name} must not be NaN")
        out.append(float(v))
    if out[0] > out[1]:
        raise ValueError(f"fastreg.adversarial.{op}: clamp must have lo <= hi, got {clamp!r}")
    return out[0], out[1]


def _check_grad(x, grad, op: str) -> None:
    check_float_tensor(grad, "grad", op)
    if x.shape == grad.shape and x.device == grad.device:
        return
    for attr in ("shape", "device"):
        if getattr(x, attr) != getattr(grad, attr):
            raise ValueError(f"fastreg.adversarial.{op}: grad must have the same {attr} as x: "
                             f"x.{attr}={getattr(x, attr)}, grad.{attr}={getattr(grad, attr)}")


def fgsm(x: torch.Tensor, grad: torch.Tensor, eps: float, *, clamp=None) -> torch.Tensor:
    """Fast gradient sign step: clamp(x + eps * sign(grad), lo, hi), in one fused pass.

    x: float tensor of any shape and strides; grad: the loss gradient w.r.t. x (same
    shape and device, any float dtype: only its sign is read). eps >= 0.
    clamp: None, or (lo, hi) with either side None for unbounded (e.g. (0, 1) for images).
    The result is laid out as torch.empty_like(x) (channels_last stays channels_last), has
    x's dtype, and does not require grad.
    """
    op = "fgsm"
    check_float_tensor(x, "x", op)
    _check_grad(x, grad, op)
    eps = _check_scalar(eps, "eps", op, nonneg=True)
    lo, hi = _check_clamp(clamp, op)
    return _pgd_step(x, None, grad, eps, 0.0, lo, hi)


def pgd_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step: float, eps: float, *,
             clamp=None) -> torch.Tensor:
    """One projected-gradient-descent (ascent) step of an L-inf attack, in one fused pass:

        clamp(min(max(x + step * sign(grad), x0 - eps), x0 + eps), lo, hi)

    x: the current iterate; x0: the clean input (same shape, dtype and device);
    grad: the loss gradient w.r.t. x (same shape and device). step, eps >= 0.
    The result is laid out as torch.empty_like(x) (channels_last stays channels_last), has
    x's dtype, and does not require grad.
    """
    op = "pgd_step"
    check_float_tensor(x, "x", op)
    check_float_tensor(x0, "x0", op)
    check_same(x, x0, ("x", "x0"), f"adversarial.{op}")
    _check_grad(x, grad, op)
    step = _check_scalar(step, "step", op, nonneg=True)
    eps = _check_scalar(eps, "eps", op, nonneg=True)
    lo, hi = _check_clamp(clamp, op)
    return _pgd_step(x, x0, grad, step, eps, lo, hi)
