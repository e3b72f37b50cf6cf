"""Dropout family: torch.library ops, fake kernels, autograd and dispatch.

The pattern every elementwise family follows:

* A public op (`torch.ops.fastreg.dropout_fwd`, ...) is a `triton_op`: its body
  picks a backend by device (fastreg._backend.select). On CUDA (or the Triton
  interpreter) it launches the Triton kernel through `wrap_triton`, so
  torch.compile sees inside; on CPU it calls an opaque inner custom op
  (`fastreg::dropout_fwd_cpu`) that runs Numba; the "torch" backend is the
  reference composition below.
* The seed is a 0-dim int64 tensor on the input's device (fastreg._seed), so a
  fresh seed per call neither recompiles nor syncs; `stream` is an int.
* Backward regenerates the mask from (seed, stream): dropout is linear in its
  input, so its backward is the same op applied to the gradient. mask="bits"
  saves a 1-bit packed mask instead (bit b of byte k is element 8k + b).
* Inputs of any strides are read in logical row-major order; outputs (and gradients) are
  laid out as torch.empty_like(input): a channels_last or permuted dense input gives a result
  in its layout with the values of the op on input.contiguous() (fastreg/_layout.py). The
  Numba kernels walk such an input in memory order; the other paths compute in logical
  order and copy once. Packed bit masks stay in logical order.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.library import triton_op

from fastreg import _alloc, _backend, _layout
from fastreg._seed import (check_seed, check_stream, dropout_scale, dropout_scale_bits,
                           keep_threshold, seed_tensor)
from fastreg._validate import (check_op_devices, check_float_tensor, check_op_like,
                               check_op_probability, check_op_rng, check_probability, check_same,
                               compute_dtype)
from fastreg.ops.rng import words_reference

BACKENDS = ("numba", "triton")
MASK_MODES = ("seed", "bits")


# ---------------------------------------------------------------- reference
def dropout_multipliers_reference(n: int, seed, stream: int, p: float, dtype, device, start=0):
    """m[i] = scale if word(start + i) >= t else 0, in the compute dtype of `dtype`."""
    idx = torch.arange(n, dtype=torch.int64, device=device) + start
    keep = words_reference(idx, seed, stream) >= keep_threshold(p)
    cd = compute_dtype(dtype)
    scale = torch.tensor(dropout_scale(p), dtype=cd, device=device)
    return torch.where(keep, scale, torch.zeros((), dtype=cd, device=device)), keep


def pack_bits_reference(keep: Tensor) -> Tensor:
    """Bit b of byte k is keep[8k + b]."""
    n = keep.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.int32, device=keep.device)
    padded[:n] = keep.to(torch.int32)
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=keep.device)
    return (padded.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits_reference(bits: Tensor, n: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    return ((bits.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def dropout_reference(x: Tensor, seed, stream: int, p: float, start: int = 0):
    """(out, keep): out = x * keep * scale computed in the compute dtype."""
    m, keep = dropout_multipliers_reference(x.numel(), seed, stream, p, x.dtype, x.device, start)
    out = (x.reshape(-1).to(m.dtype) * m).to(x.dtype).reshape(x.shape)
    return out, keep.reshape(x.shape)


# ---------------------------------------------------------------- Numba (CPU)
def _numba_in(t: Tensor):
    """Contiguous 1-D numpy view of t in its compute dtype (no copy when it already is)."""
    return _alloc.numpy_in(t, compute_dtype(t.dtype))


@functools.lru_cache(maxsize=256)
def _kernel_scalars(p: float, dtype: torch.dtype) -> tuple:
    """(keep threshold, scale as the kernel's numpy scalar) for p: the same few p recur."""
    import numpy as np

    np_type = np.float64 if compute_dtype(dtype) == torch.float64 else np.float32
    return keep_threshold(p), np_type(dropout_scale(p))


def _np_scale(p: float, dtype: torch.dtype):
    return _kernel_scalars(p, dtype)[1]


def _check_scalars(x: Tensor, seed: Tensor, stream: int, p: float, op: str) -> None:
    """The scalars of an op called directly (the wrappers check theirs; the eager fast path
    skips this): seed, stream and p as fastreg.dropout accepts them."""
    check_op_rng(seed, stream, x, "x", op)
    check_op_probability(p, "p", op)


def _numba_fwd(x: Tensor, seed: Tensor, stream: int, p: float,
               with_bits: bool, op_result: bool = True) -> tuple[Tensor, Tensor]:
    """(out, bits); without bits, an empty tensor as the op returns, or None for the eager
    path (op_result=False), which never reads it."""
    nb = _backend.numba_module("dropout")

    if not x.is_contiguous():  # the one layout test of the contiguous path
        return _numba_fwd_layout(nb, x, seed, stream, p, with_bits, op_result)
    xa = _numba_in(x)
    out, oa = _alloc.out_like(x, compute_dtype(x.dtype))
    t, scale = _kernel_scalars(p, x.dtype)
    if with_bits:
        bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
        nb.dropout_fwd_bits(xa, oa, bits.numpy(), int(seed), stream, t, scale, 0)
        return _alloc.as_dtype(out, x.dtype), bits
    nb.dropout_fwd(xa, oa, int(seed), stream, t, scale, 0)
    return _alloc.as_dtype(out, x.dtype), torch.empty(0, dtype=torch.uint8) if op_result else None


def _numba_fwd_layout(nb, x, seed, stream, p, with_bits, op_result):
    """_numba_fwd of a non-contiguous x, the result laid out as torch.empty_like(x): in memory
    order when x is dense (the packed mask, in logical order, from a second pass of Philox
    alone), else in logical order and one copy."""
    out = _numba_fwd_memory_order(nb, x, seed, stream, p)
    if out is not None:
        if with_bits:
            bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
            nb.dropout_keep_bits(bits.numpy(), x.numel(), int(seed), stream,
                                 _kernel_scalars(p, x.dtype)[0])
            return out, bits
        return out, torch.empty(0, dtype=torch.uint8) if op_result else None
    xa = _numba_in(x)
    out, oa = _alloc.out_like(x, compute_dtype(x.dtype))
    t, scale = _kernel_scalars(p, x.dtype)
    if with_bits:
        bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
        nb.dropout_fwd_bits(xa, oa, bits.numpy(), int(seed), stream, t, scale, 0)
        return _layout.like(x, _alloc.as_dtype(out, x.dtype)), bits
    nb.dropout_fwd(xa, oa, int(seed), stream, t, scale, 0)
    out = _layout.like(x, _alloc.as_dtype(out, x.dtype))
    return out, torch.empty(0, dtype=torch.uint8) if op_result else None


def _numba_fwd_memory_order(nb, x: Tensor, seed: Tensor, stream: int, p: float,
                            residual: Tensor | None = None) -> Tensor | None:
    """dropout (or dropout_add) of a permuted dense x (channels_last, a transpose) walked in
    memory order, the result in x's layout; None when x is not dense (or residual is not laid
    out as x): the caller then computes in logical order."""
    dims = _layout.memory_dims(tuple(x.shape), tuple(x.stride()))
    if dims is None or (residual is not None and residual.stride() != x.stride()):
        return None
    cd = compute_dtype(x.dtype)
    xs = x if x.dtype == cd else x.to(cd)  # .to keeps a dense layout
    out = torch.empty_like(xs)
    t, scale = _kernel_scalars(p, x.dtype)
    if residual is None:
        nb.dropout_fwd_strided(_layout.memory_numpy(xs), _layout.memory_numpy(out), int(seed),
                               stream, t, scale, *dims)
    else:
        rs = residual if residual.dtype == cd else residual.to(cd)
        nb.dropout_add_fwd_strided(_layout.memory_numpy(xs), _layout.memory_numpy(rs),
                                   _layout.memory_numpy(out), int(seed), stream, t, scale, *dims)
    return _alloc.as_dtype(out, x.dtype)


@torch.library.custom_op("fastreg::dropout_fwd_cpu", mutates_args=(), device_types="cpu")
def _dropout_fwd_cpu(x: Tensor, seed: Tensor, stream: int, p: float,
                     with_bits: bool) -> tuple[Tensor, Tensor]:
    _check_scalars(x, seed, stream, p, "dropout_fwd_cpu")
    return _numba_fwd(x, seed, stream, p, with_bits)


@_dropout_fwd_cpu.register_fake
def _(x, seed, stream, p, with_bits):
    check_op_devices("dropout_fwd_cpu", x=x, seed=seed)
    nbits = (x.numel() + 7) // 8 if with_bits else 0
    return _layout.empty_out(x), x.new_empty(nbits, dtype=torch.uint8)


def _numba_add(x: Tensor, residual: Tensor, seed: Tensor, stream: int, p: float) -> Tensor:
    nb = _backend.numba_module("dropout")

    contiguous = x.is_contiguous()
    if not contiguous:
        out = _numba_fwd_memory_order(nb, x, seed, stream, p, residual)
        if out is not None:
            return out
    cd = compute_dtype(x.dtype)
    xa, ra = _alloc.numpy_in(x, cd), _alloc.numpy_in(residual, cd)
    out, oa = _alloc.out_like(x, cd)
    t, scale = _kernel_scalars(p, x.dtype)
    nb.dropout_add_fwd(xa, ra, oa, int(seed), stream, t, scale, 0)
    out = _alloc.as_dtype(out, x.dtype)
    return out if contiguous else _layout.like(x, out)


@torch.library.custom_op("fastreg::dropout_add_fwd_cpu", mutates_args=(), device_types="cpu")
def _dropout_add_fwd_cpu(x: Tensor, residual: Tensor, seed: Tensor, stream: int, p: float) -> Tensor:
    _check_scalars(x, seed, stream, p, "dropout_add_fwd_cpu")
    check_op_like(residual, "residual", x, "x", "dropout_add_fwd_cpu")  # read at x's indices
    return _numba_add(x, residual, seed, stream, p)


@_dropout_add_fwd_cpu.register_fake
def _(x, residual, seed, stream, p):
    check_op_devices("dropout_add_fwd_cpu", x=x, residual=residual, seed=seed)
    return _layout.empty_out(x)


def _check_bits(grad: Tensor, bits: Tensor, op: str) -> None:
    """The kernels read byte k >> 3 for element k of grad: bits must be a 1-D uint8 tensor of
    at least (numel + 7) // 8 bytes on grad's device (the op may be called directly). O(1)."""
    n = grad.numel()
    need = (n + 7) // 8
    if bits.dtype != torch.uint8:
        raise TypeError(f"fastreg::{op}: bits must be uint8, got {bits.dtype}")
    if bits.dim() != 1 or bits.device != grad.device:
        raise ValueError(f"fastreg::{op}: bits must be 1-D on grad's device ({grad.device}), "
                         f"got {bits.dim()}-D on {bits.device}")
    if bits.numel() < need:
        raise ValueError(f"fastreg::{op}: bits has {bits.numel()} bytes, needs {need} for {n} "
                         "elements")


def _numba_bits_apply(grad: Tensor, bits: Tensor, p: float) -> Tensor:
    nb = _backend.numba_module("dropout")

    contiguous = grad.is_contiguous()
    dims = None if contiguous else _layout.memory_dims(tuple(grad.shape), tuple(grad.stride()))
    if dims is not None:  # a permuted dense grad: walked in memory order, bits read by index
        cd = compute_dtype(grad.dtype)
        gs = grad if grad.dtype == cd else grad.to(cd)  # .to keeps a dense layout
        out = torch.empty_like(gs)
        nb.dropout_bits_apply_strided(_layout.memory_numpy(gs), _alloc.numpy_in(bits, torch.uint8),
                                      _layout.memory_numpy(out), _np_scale(p, grad.dtype),
                                      dims[0], dims[1])
        return _alloc.as_dtype(out, grad.dtype)
    ga = _numba_in(grad)
    out, oa = _alloc.out_like(grad, compute_dtype(grad.dtype))
    nb.dropout_bits_apply(ga, _alloc.numpy_in(bits, torch.uint8), oa, _np_scale(p, grad.dtype))
    out = _alloc.as_dtype(out, grad.dtype)
    return out if contiguous else _layout.like(grad, out)


@torch.library.custom_op("fastreg::dropout_bits_apply_cpu", mutates_args=(), device_types="cpu")
def _dropout_bits_apply_cpu(grad: Tensor, bits: Tensor, p: float) -> Tensor:
    check_op_probability(p, "p", "dropout_bits_apply_cpu")
    _check_bits(grad, bits, "dropout_bits_apply_cpu")
    return _numba_bits_apply(grad, bits, p)


@_dropout_bits_apply_cpu.register_fake
def _(grad, bits, p):
    check_op_devices("dropout_bits_apply_cpu", grad=grad, bits=bits)
    return _layout.empty_out(grad)


# ---------------------------------------------------------------- public ops
def _is_f64(t: Tensor) -> bool:
    return t.dtype == torch.float64


def _fwd_impl(x, seed, stream, p, with_bits, direct):
    backend = _backend.select(x.device, BACKENDS, "dropout")
    n = x.numel()
    if backend == "numba":
        if direct:
            return _numba_fwd(x, seed, stream, p, with_bits, False)
        return torch.ops.fastreg.dropout_fwd_cpu(x, seed, stream, p, with_bits)
    if backend == "triton":
        from fastreg.kernels.triton import dropout as tk

        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        bits = torch.empty((n + 7) // 8 if with_bits else 0, dtype=torch.uint8, device=x.device)
        if n > 0 and _backend.launch_kernel(x):
            _backend.launcher(tk.dropout_fwd_kernel, direct)[tk.grid(n)](
                x.contiguous(), out, bits, seed, stream, keep_threshold(p), dropout_scale_bits(p), 0, n,
                WITH_BITS=with_bits, COMPUTE_F64=_is_f64(x), VEC=tk.vec_for(x.dtype),
                BLOCK=tk.BLOCK)
        return _layout.like(x, out), bits
    out, keep = dropout_reference(x, seed, stream, p)
    bits = pack_bits_reference(keep.reshape(-1)) if with_bits else x.new_empty(0, dtype=torch.uint8)
    return _layout.like(x, out.contiguous()), bits


def _add_impl(x, residual, seed, stream, p, direct):
    backend = _backend.select(x.device, BACKENDS, "dropout_add")
    n = x.numel()
    if backend == "numba":
        if direct:
            return _numba_add(x, residual, seed, stream, p)
        return torch.ops.fastreg.dropout_add_fwd_cpu(x, residual, seed, stream, p)
    if backend == "triton":
        from fastreg.kernels.triton import dropout as tk

        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if n > 0 and _backend.launch_kernel(x):
            _backend.launcher(tk.dropout_add_fwd_kernel, direct)[tk.grid(n)](
                x.contiguous(), residual.contiguous(), out, seed, stream, keep_threshold(p),
                dropout_scale_bits(p), 0, n, COMPUTE_F64=_is_f64(x), VEC=tk.vec_for(x.dtype),
                BLOCK=tk.BLOCK)
        return _layout.like(x, out)
    m, _ = dropout_multipliers_reference(n, seed, stream, p, x.dtype, x.device)
    cd = m.dtype
    out = residual.reshape(-1).to(cd) + x.reshape(-1).to(cd) * m
    return _layout.like(x, out.to(x.dtype).reshape(x.shape))


def _bits_apply_impl(grad, bits, p, direct):
    backend = _backend.select(grad.device, BACKENDS, "dropout")
    n = grad.numel()
    if backend == "numba":
        if direct:
            return _numba_bits_apply(grad, bits, p)
        return torch.ops.fastreg.dropout_bits_apply_cpu(grad, bits, p)
    if backend == "triton":
        from fastreg.kernels.triton import dropout as tk

        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        if n > 0 and _backend.launch_kernel(grad):
            # the kernel indexes bits as contiguous bytes (an expanded view holds fewer)
            _backend.launcher(tk.dropout_bits_apply_kernel, direct)[tk.grid(n)](
                grad.contiguous(), bits.contiguous(), out, dropout_scale_bits(p), n,
                COMPUTE_F64=_is_f64(grad), BLOCK=tk.BLOCK)
        return _layout.like(grad, out)
    keep = unpack_bits_reference(bits, n)
    cd = compute_dtype(grad.dtype)
    scale = torch.tensor(dropout_scale(p), dtype=cd, device=grad.device)
    m = torch.where(keep, scale, torch.zeros((), dtype=cd, device=grad.device))
    return _layout.like(grad, (grad.reshape(-1).to(cd) * m).to(grad.dtype).reshape(grad.shape))


@triton_op("fastreg::dropout_fwd", mutates_args=())
def dropout_fwd(x: Tensor, seed: Tensor, stream: int, p: float,
                with_bits: bool) -> tuple[Tensor, Tensor]:
    """(x * keep / (1 - p), packed keep bits if with_bits else an empty uint8 tensor)."""
    _check_scalars(x, seed, stream, p, "dropout_fwd")
    return _fwd_impl(x, seed, stream, p, with_bits, False)


@triton_op("fastreg::dropout_add_fwd", mutates_args=())
def dropout_add_fwd(x: Tensor, residual: Tensor, seed: Tensor, stream: int, p: float) -> Tensor:
    """residual + x * keep / (1 - p), in one pass."""
    _check_scalars(x, seed, stream, p, "dropout_add_fwd")
    # before any backend: every kernel reads residual at x's indices
    check_op_like(residual, "residual", x, "x", "dropout_add_fwd")
    return _add_impl(x, residual, seed, stream, p, False)


@triton_op("fastreg::dropout_bits_apply", mutates_args=())
def dropout_bits_apply(grad: Tensor, bits: Tensor, p: float) -> Tensor:
    """grad * keep / (1 - p) with keep read from the packed mask."""
    check_op_probability(p, "p", "dropout_bits_apply")
    _check_bits(grad, bits, "dropout_bits_apply")  # before any backend, as residual above
    return _bits_apply_impl(grad, bits, p, False)


# ---------------------------------------------------------------- autograd
def _fwd_setup(ctx, inputs, output):
    _, seed, stream, p, with_bits = inputs
    bits = output[1]
    ctx.mark_non_differentiable(bits)
    ctx.stream, ctx.p, ctx.with_bits = stream, p, with_bits
    ctx.save_for_backward(bits if with_bits else seed)


def _fwd_backward(ctx, grad_out, _grad_bits):
    (saved,) = ctx.saved_tensors
    if ctx.with_bits:
        g = torch.ops.fastreg.dropout_bits_apply(grad_out, saved, ctx.p)
    else:
        g = torch.ops.fastreg.dropout_fwd(grad_out, saved, ctx.stream, ctx.p, False)[0]
    return g, None, None, None, None


dropout_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _add_setup(ctx, inputs, output):
    _, _, seed, stream, p = inputs
    ctx.stream, ctx.p = stream, p
    ctx.save_for_backward(seed)


def _add_backward(ctx, grad_out):
    (seed,) = ctx.saved_tensors
    g = torch.ops.fastreg.dropout_fwd(grad_out, seed, ctx.stream, ctx.p, False)[0]
    return g, grad_out, None, None, None


dropout_add_fwd.register_autograd(_add_backward, setup_context=_add_setup)


def _bits_setup(ctx, inputs, output):
    _, bits, p = inputs
    ctx.p = p
    ctx.save_for_backward(bits)


def _bits_backward(ctx, grad_out):
    (bits,) = ctx.saved_tensors
    return torch.ops.fastreg.dropout_bits_apply(grad_out, bits, ctx.p), None, None


dropout_bits_apply.register_autograd(_bits_backward, setup_context=_bits_setup)


# ---------------------------------------------------------------- eager fast path
# In plain eager mode the dispatcher layers of the ops (autograd wrapper, triton_op,
# inner CPU op) cost tens of microseconds per call, more than the kernel at small
# sizes. With plain tensors, no dispatch mode and no tracing, fastreg.dropout runs
# the same kernels through one autograd.Function instead; anything else (compile,
# export, fake tensors, subclasses, functorch) goes through the ops.
_eager_fast_path = _backend.eager_fast_path


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, stream, p, with_bits):
        out, bits = _fwd_impl(x, seed, stream, p, with_bits, True)
        ctx.stream, ctx.p, ctx.with_bits = stream, p, with_bits
        ctx.save_for_backward(bits if with_bits else seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (saved,) = ctx.saved_tensors
        return _grad_input(grad_out, saved, ctx.stream, ctx.p, ctx.with_bits), None, None, None, None


class _BitsApplyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, bits, p):
        ctx.p = p
        ctx.save_for_backward(bits)
        return _bits_apply_impl(grad, bits, p, True)

    @staticmethod
    def backward(ctx, grad_out):
        (bits,) = ctx.saved_tensors
        return _grad_input(grad_out, bits, 0, ctx.p, True), None, None


class _DropoutAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, seed, stream, p):
        ctx.stream, ctx.p = stream, p
        ctx.save_for_backward(seed)
        return _add_impl(x, residual, seed, stream, p, True)

    @staticmethod
    def backward(ctx, grad_out):
        (seed,) = ctx.saved_tensors
        return _grad_input(grad_out, seed, ctx.stream, ctx.p, False), grad_out, None, None, None


def _grad_input(grad_out, saved, stream, p, with_bits):
    """grad_out times the same mask and scale: the backward of every function above. Under
    create_graph it is itself differentiable (an autograd.Function again); in a plain
    backward the kernel runs directly, without a second Function's overhead."""
    if torch.is_grad_enabled():
        if with_bits:
            return _BitsApplyFn.apply(grad_out, saved, p)
        return _DropoutFn.apply(grad_out, saved, stream, p, False)
    if with_bits:
        return _bits_apply_impl(grad_out, saved, p, True)
    return _fwd_impl(grad_out, saved, stream, p, False, True)[0]


# ---------------------------------------------------------------- Python API
def _check_training(training, op):
    if not isinstance(training, bool):
        raise TypeError(f"fastreg.{op}: training must be a bool, got {training!r}")


def dropout(input: Tensor, p: float = 0.5, training: bool = True, *, seed=None, stream: int = 0,
            mask: str = "seed") -> Tensor:
    """Dropout: input * keep / (1 - p), keep from the fastreg RNG spec (docs/rng.md).

    seed: None draws a fresh seed from torch's default generator for input's
    device (so torch.manual_seed makes runs reproducible); an int in [0, 2^63)
    or a 0-dim int64 tensor fixes the mask. stream separates draws sharing a seed.
    mask: "seed" saves nothing per element (backward regenerates the mask);
    "bits" saves a 1-bit-per-element packed mask.
    training=False, p=0 or an empty input return the input itself, as torch does.
    The result and the gradient are laid out as torch.empty_like(input) (channels_last
    stays channels_last), with the values of dropout(input.contiguous()): the mask
    follows the logical index (docs/layout.md).
    """
    check_float_tensor(input, "input", "dropout")
    p = check_probability(p, "p", "dropout")
    _check_training(training, "dropout")
    if mask not in MASK_MODES:
        raise ValueError(f"fastreg.dropout: mask must be one of {MASK_MODES}, got {mask!r}")
    stream = check_stream(stream, "dropout")
    check_seed(seed, "dropout")
    if not training or p == 0.0 or input.numel() == 0:
        return input  # draws no seed: eval mode leaves the generator untouched
    seed_t = seed_tensor(seed, input.device, "dropout")
    if _eager_fast_path(input, seed_t):
        return _DropoutFn.apply(input, seed_t, stream, p, mask == "bits")
    return torch.ops.fastreg.dropout_fwd(input, seed_t, stream, p, mask == "bits")[0]


def dropout_add(input: Tensor, residual: Tensor, p: float = 0.5, training: bool = True, *,
                seed=None, stream: int = 0) -> Tensor:
    """residual + dropout(input), one pass forward and one pass backward, nothing saved
    per element. training=False or p=0 give input + residual. The result is laid out as
    torch.empty_like(input), as fastreg.dropout's."""
    check_float_tensor(input, "input", "dropout_add")
    check_float_tensor(residual, "residual", "dropout_add")
    check_same(input, residual, ("input", "residual"), "dropout_add")
    p = check_probability(p, "p", "dropout_add")
    _check_training(training, "dropout_add")
    stream = check_stream(stream, "dropout_add")
    check_seed(seed, "dropout_add")
    if not training or p == 0.0 or input.numel() == 0:
        return residual + input
    seed_t = seed_tensor(seed, input.device, "dropout_add")
    if _eager_fast_path(input, residual, seed_t):
        return _DropoutAddFn.apply(input, residual, seed_t, stream, p)
    return torch.ops.fastreg.dropout_add_fwd(input, residual, seed_t, stream, p)
