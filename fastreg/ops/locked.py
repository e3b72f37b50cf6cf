"""Locked (variational) dropout and DropConnect.

locked_dropout (Gal & Ghahramani 2016): one dropout mask shared along `dim`
(time, for an RNN's inputs/outputs). The mask is the spec's dropout mask
(docs/rng.md: keep iff word(j) >= round(p 2^32)) over the mask index j = the
logical row-major index of the input with `dim` removed; kept elements are
scaled by 1 / (1 - p). Forward and backward are one pass each; the op is linear,
so its backward is the same op on the gradient, regenerating the mask from
(seed, stream): nothing is saved per element.

dropconnect_linear (Wan et al. 2013): y = x W_m^T + b with W_m = W * mask / (1 - p),
the mask being fastreg.dropout's over the weight's logical (row-major) index.
W_m is a temporary of W's size during forward, freed right after the matmul,
and never saved: backward regenerates it (grad_x = grad_y W_m) and applies the
same mask to grad_W = mask / (1 - p) * (grad_y^T x). Saved for backward: x and W
(the inputs, which a plain nn.Linear saves too) and the seed -- no masked copy
of W and no mask. The bias is not dropped.

The pattern is the dropout family's (fastreg/ops/dropout.py).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from fastreg import _alloc, _backend
from fastreg._boundary import PLAIN_TYPES as _PLAIN_TYPES, check_plain
from fastreg._seed import (check_seed, check_stream, dropout_scale_bits, keep_threshold,
                           seed_tensor)
from fastreg._validate import (check_op_devices, check_float_tensor, check_op_probability,
                               check_op_rng, check_probability, compute_dtype)
from fastreg.ops.dropout import _kernel_scalars, dropout_multipliers_reference
from fastreg.ops.noise import _eager_fast_path

BACKENDS = ("numba", "triton")


def _odi(shape, dim: int) -> tuple[int, int, int]:
    O = math.prod(shape[:dim])
    return O, int(shape[dim]), math.prod(shape[dim + 1:])


# ---------------------------------------------------------------- reference
def locked_dropout_reference(x: Tensor, seed, stream: int, p: float, dim: int,
                             start: int = 0) -> Tensor:
    O, D, I = _odi(x.shape, dim)
    m, _ = dropout_multipliers_reference(O * I, seed, stream, p, x.dtype, x.device, start)
    out = x.reshape(O, D, I).to(m.dtype) * m.reshape(O, 1, I)
    return out.to(x.dtype).reshape(x.shape)


# ---------------------------------------------------------------- checks of direct calls
def _check_scalars(x: Tensor, seed: Tensor, stream: int, p: float, op: str) -> None:
    """seed, stream and p of an op called directly, as the wrappers accept them (the eager fast
    path skips this; dim is checked where the kernel is chosen, _check_dim)."""
    check_op_rng(seed, stream, x, "x", op)
    check_op_probability(p, "p", op)


def _check_dim(x: Tensor, dim: int, op: str) -> None:
    if not 0 <= dim < x.dim():  # a negative dim made (O, D, I) cover more than x: a wrong mask
        raise ValueError(f"fastreg::{op}: dim must be in [0, {x.dim()}) for x of "
                         f"shape {tuple(x.shape)}, got {dim}")


# ---------------------------------------------------------------- Numba (CPU)
def _numba_locked(x: Tensor, seed: Tensor, stream: int, p: float, dim: int) -> Tensor:
    nb = _backend.numba_module("locked")

    _check_dim(x, dim, "locked_dropout_cpu")
    cd = compute_dtype(x.dtype)
    xa = _alloc.numpy_in(x, cd)
    out, oa = _alloc.out_like(x, cd)
    O, D, I = _odi(x.shape, dim)
    t, scale = _kernel_scalars(p, x.dtype)
    nb.locked_fwd(xa, oa, O, D, I, int(seed), stream, t, scale, 0)
    return _alloc.as_dtype(out, x.dtype)


@torch.library.custom_op("fastreg::locked_dropout_cpu", mutates_args=(), device_types="cpu")
def _locked_dropout_cpu(x: Tensor, seed: Tensor, stream: int, p: float, dim: int) -> Tensor:
    _check_scalars(x, seed, stream, p, "locked_dropout_cpu")
    return _numba_locked(x, seed, stream, p, dim)


@_locked_dropout_cpu.register_fake
def _(x, seed, stream, p, dim):
    check_op_devices("locked_dropout_cpu", x=x, seed=seed)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------- public op
def _locked_impl(x, seed, stream, p, dim, direct):
    backend = _backend.select(x.device, BACKENDS, "locked_dropout")
    n = x.numel()
    if backend == "numba":
        if direct:
            return _numba_locked(x, seed, stream, p, dim)
        return torch.ops.fastreg.locked_dropout_cpu(x, seed, stream, p, dim)
    _check_dim(x, dim, "locked_dropout")  # the Numba path checks it as locked_dropout_cpu
    if backend == "triton":
        from fastreg.kernels.triton import locked as tk

        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if n > 0 and _backend.launch_kernel(x):
            O, D, I = _odi(x.shape, dim)
            tk.launch(lambda k: _backend.launcher(k, direct), x.contiguous(), out, seed, stream,
                      keep_threshold(p), dropout_scale_bits(p), O, D, I)
        return out
    return locked_dropout_reference(x, seed, stream, p, dim)


@triton_op("fastreg::locked_dropout", mutates_args=())
def locked_dropout_op(x: Tensor, seed: Tensor, stream: int, p: float, dim: int) -> Tensor:
    """x * keep(j) / (1 - p), j = the row-major index of x with dim removed (dim >= 0)."""
    _check_scalars(x, seed, stream, p, "locked_dropout")
    return _locked_impl(x, seed, stream, p, dim, False)


def _locked_setup(ctx, inputs, output):
    _, seed, stream, p, dim = inputs
    ctx.stream, ctx.p, ctx.dim = stream, p, dim
    ctx.save_for_backward(seed)


def _locked_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return (torch.ops.fastreg.locked_dropout(grad, seed, ctx.stream, ctx.p, ctx.dim),
            None, None, None, None)


locked_dropout_op.register_autograd(_locked_backward, setup_context=_locked_setup)


class _LockedFn(torch.autograd.Function):
    """The eager fast path (as fastreg.dropout's): the same kernels without the op layers."""

    @staticmethod
    def forward(ctx, x, seed, stream, p, dim):
        ctx.stream, ctx.p, ctx.dim = stream, p, dim
        ctx.save_for_backward(seed)
        return _locked_impl(x, seed, stream, p, dim, True)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return _LockedFn.apply(grad, seed, ctx.stream, ctx.p, ctx.dim), None, None, None, None


# ---------------------------------------------------------------- lean eager path
# A contiguous float32/float64 CPU input on the Numba backend (the common case of the eager
# fast path): the kernel is called straight on the tensors, with the (O, D, I) split, the
# kernel scalars and the Python int seed computed once per call and kept for backward;
# without any autograd.Function when no gradient is recorded; and the backward runs the same
# kernel on the gradient directly (or, under create_graph, through this Function again, as
# _LockedFn does). Same kernel, same arguments: the values are the op's bit for bit, and
# nothing is saved per element.
_LEAN_DTYPES = (torch.float32, torch.float64)


def _lean_ok(x: Tensor) -> bool:
    return (x.dtype in _LEAN_DTYPES and x.is_contiguous()
            and _backend.select(x.device, BACKENDS, "locked_dropout") == "numba")


_odi_cached = functools.lru_cache(maxsize=256)(_odi)  # layers call with the same shapes


def _lean_kernel(src: Tensor, args) -> Tensor:
    """locked_fwd on a contiguous float32/float64 CPU tensor; args as _lean_locked makes."""
    nb = _backend.numba_module("locked")
    O, D, I, seed, stream, t, scale = args[:7]
    n = src.numel()
    if n < nb.SERIAL_BELOW:
        # the serial driver on the tensors' addresses: no numpy views to make and unbox
        out = torch.empty(src.shape, dtype=src.dtype)
        nb.locked_fwd_at(src.data_ptr(), out.data_ptr(), n, O, D, I, seed, stream, t, scale)
        return out
    out = _alloc.empty(src.shape, src.dtype)
    nb.locked_fwd.parallel(_alloc.np_view(src), _alloc.np_view(out), O, D, I, seed, stream, t,
                           scale, 0)
    return out


class _LeanLockedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, args):
        ctx.args = args
        return _lean_kernel(x, args)

    @staticmethod
    def backward(ctx, grad):
        args = ctx.args
        if type(grad) not in _PLAIN_TYPES:  # a hook's subclass: its memory is not the kernel's
            check_plain(grad, "grad", "locked_dropout backward")
        if grad.dtype not in _LEAN_DTYPES or not grad.is_contiguous():
            # an expanded or permuted gradient: the kernels of the fast path, which copy
            seed_t, p, dim = args[7:]
            if torch.is_grad_enabled():
                return _LockedFn.apply(grad, seed_t, args[4], p, dim), None
            return _numba_locked(grad, seed_t, args[4], p, dim), None
        if torch.is_grad_enabled():  # create_graph: the backward is this op again
            return _LeanLockedFn.apply(grad, args), None
        return _lean_kernel(grad, args), None


def _lean_locked(x: Tensor, seed: Tensor, stream: int, p: float, dim: int) -> Tensor:
    """The lean path (the caller checked _eager_fast_path and _lean_ok)."""
    O, D, I = _odi_cached(x.shape, dim)
    t, scale = _kernel_scalars(p, x.dtype)
    args = (O, D, I, int(seed), stream, t, scale, seed, p, dim)
    if x.requires_grad and torch.is_grad_enabled():
        return _LeanLockedFn.apply(x, args)
    return _lean_kernel(x, args)


# ---------------------------------------------------------------- DropConnect op
def _masked_weight(weight: Tensor, seed: Tensor, stream: int, p: float, direct: bool) -> Tensor:
    """weight * mask / (1 - p): fastreg.dropout's mask (bit for bit) over weight's logical
    index, computed by the locked-dropout kernel with a locked dim of size 1 (mask index
    = element index), whose vectorised Philox is the faster of the two on CPU. direct: call
    the kernels (inside the op body) or the op (in backward, which AOT autograd traces)."""
    w = weight.unsqueeze(0)
    if direct:
        return _locked_impl(w, seed, stream, p, 0, True).squeeze(0)
    return torch.ops.fastreg.locked_dropout(w, seed, stream, p, 0).squeeze(0)


@torch.library.custom_op("fastreg::dropconnect_linear", mutates_args=())
def dropconnect_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], seed: Tensor,
                          stream: int, p: float) -> Tensor:
    """x (W * mask / (1 - p))^T + bias; the masked weight is a temporary."""
    _check_scalars(x, seed, stream, p, "dropconnect_linear")
    # the mask kernel runs on weight's device and reads the seed there (checked on x's device)
    check_op_devices("dropconnect_linear", x=x, weight=weight, bias=bias)
    return torch.nn.functional.linear(x, _masked_weight(weight, seed, stream, p, True), bias)


@dropconnect_linear_op.register_fake
def _(x, weight, bias, seed, stream, p):
    check_op_devices("dropconnect_linear", x=x, weight=weight, bias=bias, seed=seed)
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _dc_setup(ctx, inputs, output):
    x, weight, bias, seed, stream, p = inputs
    ctx.stream, ctx.p = stream, p
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, seed)


def _dc_backward(ctx, grad):
    x, weight, seed = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = gw = gb = None
    if need_x:
        gx = grad @ _masked_weight(weight, seed, ctx.stream, ctx.p, False)  # regenerated, not saved
    if need_w:
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gw = _masked_weight(g2.t() @ x2, seed, ctx.stream, ctx.p, False)  # same mask on grad_W
    if need_b and ctx.has_bias:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gw, gb, None, None, None


dropconnect_linear_op.register_autograd(_dc_backward, setup_context=_dc_setup)


# ---------------------------------------------------------------- Python API
def _check_training(training, op):
    if not isinstance(training, bool):
        raise TypeError(f"fastreg.{op}: training must be a bool, got {training!r}")


def locked_dropout(input: Tensor, p: float = 0.5, *, dim: int, training: bool = True, seed=None,
                   stream: int = 0) -> Tensor:
    """Dropout with one mask shared along `dim` (Gal & Ghahramani 2016).

    The element at index (..., i_dim, ...) is kept iff mask index j (the logical
    row-major index of input with dim removed) is kept: every slice along dim sees
    the same mask. Kept elements are scaled by 1 / (1 - p). Nothing is saved per
    element for backward. training=False, p=0 or an empty input return the input.
    The result is contiguous whatever input's strides (a sequence tensor, read in logical
    order): unlike fastreg.dropout it does not keep a permuted input's layout.
    """
    check_float_tensor(input, "input", "locked_dropout")
    p = check_probability(p, "p", "locked_dropout")
    # type(dim) is int first: the ABC check costs about a microsecond (a bool is not an int here)
    if type(dim) is not int and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
        raise TypeError(f"fastreg.locked_dropout: dim must be an int, got {dim!r}")
    nd = input.dim()
    if not -max(nd, 1) <= dim < max(nd, 1) or nd == 0:
        raise ValueError(f"fastreg.locked_dropout: dim must be in [-{nd}, {nd}) for an input of "
                         f"{nd} dims, got {dim}")
    dim = int(dim) % nd
    _check_training(training, "locked_dropout")
    stream = check_stream(stream, "locked_dropout")
    check_seed(seed, "locked_dropout")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    seed_t = seed_tensor(seed, input.device, "locked_dropout")
    if _eager_fast_path(input, seed_t):
        if _lean_ok(input):
            return _lean_locked(input, seed_t, stream, p, dim)
        return _LockedFn.apply(input, seed_t, stream, p, dim)
    return torch.ops.fastreg.locked_dropout(input, seed_t, stream, p, dim)


def dropconnect_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       p: float = 0.5, training: bool = True, *, seed=None,
                       stream: int = 0) -> Tensor:
    """DropConnect: linear(input, weight * mask / (1 - p), bias), mask over weight's
    logical index (fastreg.dropout's mask for weight's shape and (seed, stream)).

    The masked weight is never saved for backward (it is regenerated); only input,
    weight and the seed are. training=False or p=0 give the plain linear layer.
    """
    op = "dropconnect_linear"
    check_float_tensor(input, "input", op)
    check_float_tensor(weight, "weight", op)
    if weight.dim() != 2:
        raise ValueError(f"fastreg.{op}: weight must be 2-D (out_features, in_features), got "
                         f"shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"fastreg.{op}: input's last dim must equal weight.shape[1] = "
                         f"{weight.shape[1]}, got input.shape {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise ValueError(f"fastreg.{op}: {name} must have input's dtype and device "
                             f"({input.dtype}, {input.device}), got ({t.dtype}, {t.device})")
    if bias is not None:
        check_float_tensor(bias, "bias", op)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"fastreg.{op}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    p = check_probability(p, "p", op)
    _check_training(training, op)
    stream = check_stream(stream, op)
    check_seed(seed, op)
    if not training or p == 0.0:
        return torch.nn.functional.linear(input, weight, bias)
    seed_t = seed_tensor(seed, input.device, op)
    return torch.ops.fastreg.dropconnect_linear(input, weight, bias, seed_t, stream, p)
