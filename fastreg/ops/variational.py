"""Variational-dropout family: the local reparameterisation sample as one fused op.

    vd_sample(mu, var) = mu + sqrt(var + eps) * z,   z ~ N(0, 1) from the fastreg RNG

is the output of a layer whose weights carry Gaussian multiplicative noise, drawn on
the output instead of the weights (Kingma, Salimans & Welling 2015; Molchanov,
Ashukha & Vetrov 2017): mu = x W^T + b, var = (x^2)(sigma^2)^T. z is element i of
normals(seed, stream) at logical row-major index i (docs/rng.md), so it is never
stored: backward regenerates it. Gradients: d/dmu = 1, d/dvar = z / (2 sqrt(var + eps)).
Saved for backward: var (needed for d/dvar) and the 0-dim seed, nothing for z.

Ops (namespace fastreg), each a triton_op whose body dispatches by backend (Triton
on CUDA or forced under TRITON_INTERPRET=1; Numba through the opaque inner ops
*_cpu; the pure-PyTorch reference):
    vd_sample(Tensor mu, Tensor var, Tensor seed, int stream, float eps) -> Tensor
    vd_sample_grad_var(Tensor grad, Tensor var, Tensor seed, int stream, float eps) -> Tensor
Double backward is not implemented.

Layout: the sample is laid out as torch.empty_like(mu) (channels_last stays channels_last) and
grad_var as the incoming gradient, with the values of the op on contiguous tensors (z stays a
function of the logical index). The Numba kernels walk channels_last tensors (H*W % 4 == 0,
mu and var of one layout) in memory order; other cases compute in logical order, then copy
once (fastreg/_layout.py).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastreg import _alloc, _backend, _layout, _native
from fastreg._seed import check_stream, seed_tensor
from fastreg._validate import (check_op_devices, check_float_tensor, check_op_like,
                               check_op_nonneg, check_op_rng, check_same, compute_dtype)
from fastreg.ops.rng import normals_reference

BACKENDS = ("numba", "triton")


# ---------------------------------------------------------------- reference
def normals_like_reference(t: Tensor, seed, stream: int) -> Tensor:
    """z(i) for i < t.numel(), float32, shaped like t (the spec's normals).

    seed: an int or a 0-dim int64 tensor (kept a tensor, so tracing needs no sync)."""
    idx = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(t.device)
    return normals_reference(idx, seed, stream).reshape(t.shape)


def vd_sample_reference(mu: Tensor, var: Tensor, seed, stream: int, eps: float, z=None) -> Tensor:
    """mu + sqrt(var + eps) * z in the compute dtype; z defaults to the spec's normals."""
    ct = compute_dtype(mu.dtype)
    z = normals_like_reference(mu, seed, stream) if z is None else z.reshape(mu.shape)
    out = mu.to(ct) + torch.sqrt(var.to(ct) + eps) * z.to(ct)
    return out.to(mu.dtype).contiguous()


def vd_sample_grad_var_reference(grad: Tensor, var: Tensor, seed, stream: int, eps: float,
                                 z=None) -> Tensor:
    ct = compute_dtype(grad.dtype)
    z = normals_like_reference(grad, seed, stream) if z is None else z.reshape(grad.shape)
    out = grad.to(ct) * z.to(ct) * 0.5 / torch.sqrt(var.to(ct) + eps)
    return out.to(grad.dtype).contiguous()


# ---------------------------------------------------------------- Numba (opaque inner ops)
def _np(t: Tensor):
    return _alloc.numpy_in(t, compute_dtype(t.dtype))


def _np_scalar(v: float, dtype: torch.dtype):
    return (np.float64 if compute_dtype(dtype) == torch.float64 else np.float32)(v)


def _check_scalars(ref: Tensor, ref_name: str, seed: Tensor, stream: int, eps: float,
                   op: str) -> None:
    """seed, stream and eps of an op called directly, as vd_sample accepts them (a negative
    eps turns var = 0 into NaN)."""
    check_op_rng(seed, stream, ref, ref_name, op)
    check_op_nonneg(eps, "eps", op)


def _vd_sample_cpu_impl(mu: Tensor, var: Tensor, seed: Tensor, stream: int, eps: float) -> Tensor:
    nb = _backend.numba_module("variational")

    contiguous = mu.is_contiguous()
    if not contiguous:
        out = _memory_order(nb.vd_sample_fwd_tiled, mu, var, seed, stream, eps)
        if out is not None:
            return out
    ma, va = _np(mu), _np(var)
    out, oa = _alloc.out_like(mu, compute_dtype(mu.dtype))
    if oa.size:
        nb.vd_sample_fwd(ma, va, oa, int(seed), stream, _np_scalar(eps, mu.dtype))
    out = _alloc.as_dtype(out, mu.dtype)
    return out if contiguous else _layout.like(mu, out)


def _memory_order(kernel, a: Tensor, var: Tensor, seed: Tensor, stream: int, eps: float,
                  *half) -> Tensor | None:
    """The tiled Numba kernel over the memory of a permuted dense `a` and a `var` of the same
    strides whose rows pair up as logical neighbours (channels_last with H*W % 4 == 0), the
    result in a's layout; None otherwise (the caller computes in logical order and copies)."""
    if var.stride() != a.stride():
        return None
    dims = _layout.memory_dims(tuple(a.shape), tuple(a.stride()))
    if dims is None or not dims[2]:
        return None
    cd = compute_dtype(a.dtype)
    a_c = a if a.dtype == cd else a.to(cd)  # .to keeps a dense layout
    v_c = var if var.dtype == cd else var.to(cd)
    out = torch.empty_like(a_c)
    kernel(_layout.memory_numpy(a_c), _layout.memory_numpy(v_c), _layout.memory_numpy(out),
           dims[0], dims[1], int(seed), stream, _np_scalar(eps, a.dtype),
           *(_np_scalar(h, a.dtype) for h in half))
    return _alloc.as_dtype(out, a.dtype)


def _vd_sample_cpu_op(mu: Tensor, var: Tensor, seed: Tensor, stream: int, eps: float) -> Tensor:
    # a direct call of the inner op (the public op checks before calling the impl itself)
    _check_scalars(mu, "mu", seed, stream, eps, "vd_sample_cpu")
    check_op_like(var, "var", mu, "mu", "vd_sample_cpu")  # read at mu's indices
    return _vd_sample_cpu_impl(mu, var, seed, stream, eps)


_vd_sample_cpu = torch.library.custom_op("fastreg::vd_sample_cpu", _vd_sample_cpu_op,
                                         mutates_args=(), device_types="cpu")


@_vd_sample_cpu.register_fake
def _(mu, var, seed, stream, eps):
    check_op_devices("vd_sample_cpu", mu=mu, var=var, seed=seed)
    return _layout.empty_out(mu)


def _vd_sample_grad_var_cpu_impl(grad: Tensor, var: Tensor, seed: Tensor, stream: int,
                                 eps: float) -> Tensor:
    nb = _backend.numba_module("variational")

    contiguous = grad.is_contiguous()
    if not contiguous:
        out = _memory_order(nb.vd_sample_grad_var_tiled, grad, var, seed, stream, eps, 0.5)
        if out is not None:
            return out
    ga, va = _np(grad), _np(var)
    out, oa = _alloc.out_like(grad, compute_dtype(grad.dtype))
    if oa.size:
        nb.vd_sample_grad_var(ga, va, oa, int(seed), stream, _np_scalar(eps, grad.dtype),
                              _np_scalar(0.5, grad.dtype))
    out = _alloc.as_dtype(out, grad.dtype)
    return out if contiguous else _layout.like(grad, out)


def _vd_sample_grad_var_cpu_op(grad: Tensor, var: Tensor, seed: Tensor, stream: int,
                               eps: float) -> Tensor:
    _check_scalars(grad, "grad", seed, stream, eps, "vd_sample_grad_var_cpu")
    check_op_like(var, "var", grad, "grad", "vd_sample_grad_var_cpu")  # read at grad's indices
    return _vd_sample_grad_var_cpu_impl(grad, var, seed, stream, eps)


_vd_sample_grad_var_cpu = torch.library.custom_op(
    "fastreg::vd_sample_grad_var_cpu", _vd_sample_grad_var_cpu_op, mutates_args=(),
    device_types="cpu")


@_vd_sample_grad_var_cpu.register_fake
def _(grad, var, seed, stream, eps):
    check_op_devices("vd_sample_grad_var_cpu", grad=grad, var=var, seed=seed)
    return _layout.empty_out(grad)


def _plain(*ts) -> bool:
    """True when every tensor is a plain torch.Tensor (eager, no tracing subclass): the
    op body then calls the Numba implementation directly, skipping one torch.library
    dispatch. Fake/functional tensors (torch.compile, opcheck) go through the opaque
    op, so the graph records it."""
    return all(type(t) is torch.Tensor for t in ts)


# ---------------------------------------------------------------- Triton
def _interpreted_trace(t: Tensor) -> bool:
    """True while tracing CPU tensors for the Triton interpreter, which cannot be traced
    (wrap_triton hands back the plain Python kernel): the reference is recorded instead."""
    if not _native.triton_interpreted():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _launch(kernel, a: Tensor, var: Tensor, seed: Tensor, stream: int, eps: float) -> Tensor:
    from fastreg.kernels.triton import variational as tk

    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = a.numel()
    if n:
        grid = ((n + tk.BLOCK - 1) // tk.BLOCK,)
        wrap_triton(kernel)[grid](a.contiguous(), var.contiguous(), out, seed, stream,
                                  _backend.f64_bits(eps), n, F64=a.dtype == torch.float64,
                                  BLOCK=tk.BLOCK)
    return _layout.like(a, out)


# ---------------------------------------------------------------- public ops
@triton_op("fastreg::vd_sample", mutates_args=())
def vd_sample_op(mu: Tensor, var: Tensor, seed: Tensor, stream: int, eps: float) -> Tensor:
    """mu + sqrt(var + eps) * z, z the spec's normals at (seed, stream)."""
    _check_scalars(mu, "mu", seed, stream, eps, "vd_sample")
    check_op_like(var, "var", mu, "mu", "vd_sample")  # every backend reads var at mu's indices
    backend = _backend.select(mu.device, BACKENDS, "vd_sample")
    if backend == "numba":
        if _plain(mu, var, seed):
            return _vd_sample_cpu_impl(mu, var, seed, stream, eps)
        return torch.ops.fastreg.vd_sample_cpu(mu, var, seed, stream, eps)
    if backend == "triton" and not _interpreted_trace(mu):
        from fastreg.kernels.triton.variational import vd_sample_fwd_kernel

        return _launch(vd_sample_fwd_kernel, mu, var, seed, stream, eps)
    return _layout.like(mu, vd_sample_reference(mu, var, seed, stream, eps))


@triton_op("fastreg::vd_sample_grad_var", mutates_args=())
def vd_sample_grad_var_op(grad: Tensor, var: Tensor, seed: Tensor, stream: int,
                          eps: float) -> Tensor:
    """grad * z / (2 sqrt(var + eps)), z regenerated from (seed, stream)."""
    _check_scalars(grad, "grad", seed, stream, eps, "vd_sample_grad_var")
    check_op_like(var, "var", grad, "grad", "vd_sample_grad_var")  # as in vd_sample
    backend = _backend.select(grad.device, BACKENDS, "vd_sample")
    if backend == "numba":
        if _plain(grad, var, seed):
            return _vd_sample_grad_var_cpu_impl(grad, var, seed, stream, eps)
        return torch.ops.fastreg.vd_sample_grad_var_cpu(grad, var, seed, stream, eps)
    if backend == "triton" and not _interpreted_trace(grad):
        from fastreg.kernels.triton.variational import vd_sample_grad_var_kernel

        return _launch(vd_sample_grad_var_kernel, grad, var, seed, stream, eps)
    return _layout.like(grad, vd_sample_grad_var_reference(grad, var, seed, stream, eps))


def _setup(ctx, inputs, output):
    _, var, seed, stream, eps = inputs
    ctx.stream, ctx.eps = stream, eps
    ctx.save_for_backward(var if ctx.needs_input_grad[1] else None, seed)


def _backward(ctx, grad_out):
    var, seed = ctx.saved_tensors
    grad_mu = grad_out if ctx.needs_input_grad[0] else None
    grad_var = None
    if ctx.needs_input_grad[1]:
        grad_var = torch.ops.fastreg.vd_sample_grad_var(grad_out, var, seed, ctx.stream, ctx.eps)
    return grad_mu, grad_var, None, None, None


vd_sample_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- eager fast path
# As fastreg.dropout's (fastreg/ops/dropout.py): with plain tensors and no tracing, the same
# kernels run through one autograd.Function instead of the op layers (tens of microseconds a
# call). The wrapper has validated everything the op bodies check.
def _sample_eager(mu, var, seed, stream, eps):
    backend = _backend.select(mu.device, BACKENDS, "vd_sample")
    if backend == "numba":
        return _vd_sample_cpu_impl(mu, var, seed, stream, eps)
    if backend == "triton":
        from fastreg.kernels.triton.variational import vd_sample_fwd_kernel

        return _launch(vd_sample_fwd_kernel, mu, var, seed, stream, eps)
    return _layout.like(mu, vd_sample_reference(mu, var, seed, stream, eps))


def _grad_var_eager(grad, var, seed, stream, eps):
    backend = _backend.select(grad.device, BACKENDS, "vd_sample")
    if backend == "numba":
        return _vd_sample_grad_var_cpu_impl(grad, var, seed, stream, eps)
    if backend == "triton":
        from fastreg.kernels.triton.variational import vd_sample_grad_var_kernel

        return _launch(vd_sample_grad_var_kernel, grad, var, seed, stream, eps)
    return _layout.like(grad, vd_sample_grad_var_reference(grad, var, seed, stream, eps))


class _VdSampleFn(torch.autograd.Function):
    """The op's forward and backward without its dispatch layers (first-order, as the op)."""

    @staticmethod
    def forward(ctx, mu, var, seed, stream, eps):
        ctx.stream, ctx.eps = stream, eps
        ctx.save_for_backward(var if ctx.needs_input_grad[1] else None, seed)
        return _sample_eager(mu, var, seed, stream, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        var, seed = ctx.saved_tensors
        grad_var = None
        if ctx.needs_input_grad[1]:
            grad_var = _grad_var_eager(grad_out, var, seed, ctx.stream, ctx.eps)
        return (grad_out if ctx.needs_input_grad[0] else None), grad_var, None, None, None


# ---------------------------------------------------------------- Python API
def vd_sample(mu: Tensor, var: Tensor, *, seed=None, stream: int = 0, eps: float = 1e-8) -> Tensor:
    """mu + sqrt(var + eps) * z, z ~ N(0, 1) from the fastreg RNG, in one fused pass.

    mu, var: float tensors of the same shape, dtype and device (any strides); var >= 0
    (a negative var + eps gives NaN). eps >= 0 keeps d/dvar finite at var = 0.
    seed: None draws a fresh seed from torch's default generator for mu's device; an
    int in [0, 2^63) or a 0-dim int64 tensor fixes z. stream separates draws sharing a
    seed (e.g. different layers). Saves var and the seed for backward, nothing for z.
    The result is laid out as torch.empty_like(mu) (docs/layout.md).
    """
    op = "vd_sample"
    check_float_tensor(mu, "mu", op)
    check_float_tensor(var, "var", op)
    check_same(mu, var, ("mu", "var"), op)
    stream = check_stream(stream, op)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"fastreg.{op}: eps must be a real number >= 0, got {eps!r}")
    eps = float(eps)
    if not 0.0 <= eps < math.inf:  # also rejects NaN; comparisons trace under dynamic shapes
        raise ValueError(f"fastreg.{op}: eps must be a finite number >= 0, got {eps}")
    seed_t = seed_tensor(seed, mu.device, op)
    if _backend.eager_fast_path(mu, var, seed_t):
        return _VdSampleFn.apply(mu, var, seed_t, stream, eps)
    return torch.ops.fastreg.vd_sample(mu, var, seed_t, stream, eps)
