"""Fused bias + activation + dropout: y = dropout(act(x + bias)), one pass each way.

bias (C,) is broadcast over the last dim of x (..., C). act: "relu", "gelu" (the
exact erf form, torch.nn.functional.gelu's default) or None. The dropout mask is
fastreg.dropout's (docs/rng.md: keep iff word(i) >= round(p 2^32) at x's logical
index i), kept values scaled by 1 / (1 - p).

Backward is one pass computing grad_z = grad * keep / (1 - p) * act'(x + bias),
which is grad_x, and, in the same pass, grad_bias = sum of grad_z over all but
the last dim. Saved for backward per element:
* relu: the output y (relu'(z) * keep = [y > 0]: no mask regeneration needed;
  the next layer usually saves y anyway, so it adds no memory there),
* gelu: the input x (gelu' needs z; the mask is regenerated from (seed, stream)),
* None: nothing.
One caveat of the relu form: in float16, a kept z > 0 so small that z / (1 - p)
underflows to 0 gets a zero gradient (torch's relu would pass it).

The op pattern is the dropout family's (fastreg/ops/dropout.py).
"""

from __future__ import annotations


import torch
from torch import Tensor
from torch.library import triton_op

from fastreg import _alloc, _backend
from fastreg._seed import (check_seed, check_stream, dropout_scale, dropout_scale_bits,
                           keep_threshold, seed_tensor)
from fastreg._validate import (check_op_devices, check_float_tensor, check_op_code, check_op_like,
                               check_op_probability, check_op_rng, check_probability, compute_dtype)
from fastreg.ops.dropout import _kernel_scalars, dropout_multipliers_reference
from fastreg.ops.noise import _eager_fast_path, _nthreads

BACKENDS = ("numba", "triton")
ACTIVATIONS = (None, "relu", "gelu")


# ---------------------------------------------------------------- reference
def _act_reference(z: Tensor, act: int) -> Tensor:
    if act == 1:
        return torch.relu(z)
    if act == 2:  # in float64: float32 erf loses ~1e-4 relative to cancellation for z < 0
        return torch.nn.functional.gelu(z.to(torch.float64)).to(z.dtype)
    return z


def bias_act_dropout_reference(x: Tensor, bias: Tensor, seed, stream: int, act: int, p: float,
                               start: int = 0) -> Tensor:
    m, _ = dropout_multipliers_reference(x.numel(), seed, stream, p, x.dtype, x.device, start)
    cd = m.dtype
    z = x.to(cd) + bias.to(cd)
    return (_act_reference(z, act) * m.reshape(x.shape)).to(x.dtype)


def bias_act_dropout_bwd_reference(grad: Tensor, saved: Tensor, bias: Tensor, seed, stream: int,
                                   act: int, p: float):
    cd = compute_dtype(grad.dtype)
    g = grad.to(cd)
    if act == 1:  # saved = the output y
        gz = torch.where(saved.to(cd) > 0, g * torch.tensor(dropout_scale(p), dtype=cd), 0.0)
    else:
        m, _ = dropout_multipliers_reference(grad.numel(), seed, stream, p, grad.dtype, grad.device)
        gz = g * m.reshape(grad.shape)
        if act == 2:  # saved = x; gelu' in float64 (see _act_reference)
            z = (saved.to(cd) + bias.to(cd)).to(torch.float64)
            phi = torch.exp(-0.5 * z * z) * 0.3989422804014327
            gz = gz * (0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * phi).to(cd)
    gb = gz.to(torch.float64).reshape(-1, bias.numel()).sum(0).to(bias.dtype)
    return gz.to(grad.dtype), gb


# ---------------------------------------------------------------- Numba (CPU)
def _check_bias(x: Tensor, bias: Tensor, op: str) -> None:
    """bias must be (C,) with C = x's last dim, on x's device: the kernels take C = bias.numel()
    as the row length of x (the ops may be called directly)."""
    if x.dim() == 0:
        raise ValueError(f"fastreg::{op}: the input must have at least 1 dim, got a 0-dim tensor")
    C = x.shape[-1]
    if bias.dim() != 1 or bias.shape[0] != C or bias.device != x.device:
        raise ValueError(f"fastreg::{op}: bias has shape {tuple(bias.shape)} on {bias.device}, "
                         f"needs ({C},) (the last dim of {tuple(x.shape)}) on {x.device}")


def _check_scalars(ref: Tensor, ref_name: str, seed: Tensor, stream: int, act: int, p: float,
                   op: str) -> None:
    """The scalars of an op called directly (the wrapper checks its own; the eager fast path
    skips this). An act outside 0..2 would run as no activation in every kernel."""
    check_op_rng(seed, stream, ref, ref_name, op)
    check_op_code(act, "act", ("none", "relu", "gelu"), op)
    check_op_probability(p, "p", op)


def _check_saved(grad: Tensor, saved: Tensor, bias: Tensor, act: int, op: str) -> None:
    """The tensors of the backward op called directly: bias as in forward and, unless act is
    0, saved (y or x), which the kernels read at grad's indices."""
    _check_bias(grad, bias, op)
    if act != 0:
        check_op_like(saved, "saved", grad, "grad", op)


def _numba_fwd(x: Tensor, bias: Tensor, seed: Tensor, stream: int, act: int, p: float) -> Tensor:
    nb = _backend.numba_module("bias_act")

    cd = compute_dtype(x.dtype)
    xa = _alloc.numpy_in(x, cd)
    out, oa = _alloc.out_like(x, cd)
    t, scale = _kernel_scalars(p, x.dtype)
    nb.bias_act_fwd(xa, _alloc.numpy_in(bias, cd), oa, bias.numel(), int(seed), stream, t, scale,
                    act, 0)
    return _alloc.as_dtype(out, x.dtype)


@torch.library.custom_op("fastreg::bias_act_dropout_fwd_cpu", mutates_args=(), device_types="cpu")
def _fwd_cpu(x: Tensor, bias: Tensor, seed: Tensor, stream: int, act: int, p: float) -> Tensor:
    _check_scalars(x, "x", seed, stream, act, p, "bias_act_dropout_fwd_cpu")
    _check_bias(x, bias, "bias_act_dropout_fwd_cpu")
    return _numba_fwd(x, bias, seed, stream, act, p)


@_fwd_cpu.register_fake
def _(x, bias, seed, stream, act, p):
    check_op_devices("bias_act_dropout_fwd_cpu", x=x, bias=bias, seed=seed)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _numba_bwd(grad: Tensor, saved: Tensor, bias: Tensor, seed: Tensor, stream: int, act: int,
               p: float) -> tuple[Tensor, Tensor]:
    import numpy as np

    nb = _backend.numba_module("bias_act")

    cd = compute_dtype(grad.dtype)
    ga = _alloc.numpy_in(grad, cd)
    sa = _alloc.numpy_in(saved, cd) if act != 0 else ga
    gx, gxa = _alloc.out_like(grad, cd)
    C = bias.numel()
    t, scale = _kernel_scalars(p, grad.dtype)
    part = np.zeros((_nthreads(ga.size), C), dtype=np.float64)
    nb.bias_act_bwd(ga, sa, _alloc.numpy_in(bias, cd), gxa, part, C, int(seed), stream, t, scale,
                    act, 0)
    return _alloc.as_dtype(gx, grad.dtype), torch.from_numpy(part.sum(0)).to(bias.dtype)


@torch.library.custom_op("fastreg::bias_act_dropout_bwd_cpu", mutates_args=(), device_types="cpu")
def _bwd_cpu(grad: Tensor, saved: Tensor, bias: Tensor, seed: Tensor, stream: int, act: int,
             p: float) -> tuple[Tensor, Tensor]:
    _check_scalars(grad, "grad", seed, stream, act, p, "bias_act_dropout_bwd_cpu")
    _check_saved(grad, saved, bias, act, "bias_act_dropout_bwd_cpu")
    return _numba_bwd(grad, saved, bias, seed, stream, act, p)


@_bwd_cpu.register_fake
def _(grad, saved, bias, seed, stream, act, p):
    check_op_devices("bias_act_dropout_bwd_cpu", grad=grad, saved=saved, bias=bias, seed=seed)
    return (torch.empty(grad.shape, dtype=grad.dtype, device=grad.device),
            torch.empty(bias.shape, dtype=bias.dtype, device=bias.device))


# ---------------------------------------------------------------- public ops
def _fwd_impl(x, bias, seed, stream, act, p, direct):
    backend = _backend.select(x.device, BACKENDS, "bias_act_dropout")
    if backend == "numba":
        if direct:
            return _numba_fwd(x, bias, seed, stream, act, p)
        return torch.ops.fastreg.bias_act_dropout_fwd_cpu(x, bias, seed, stream, act, p)
    if backend == "triton":
        from fastreg.kernels.triton import bias_act as tk

        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        C = bias.numel()
        R = x.numel() // C if C else 0
        if R > 0 and _backend.launch_kernel(x):
            _backend.launcher(tk.bias_act_fwd_kernel, direct)[tk.grid(R, C)](
                x.contiguous(), bias.contiguous(), out, seed, stream, keep_threshold(p),
                dropout_scale_bits(p), 0, R, C, ACT=act, COMPUTE_F64=x.dtype == torch.float64,
                BLOCK_R=tk.BLOCK_R, BLOCK_C=tk.BLOCK_C, ALIGNED=C % 4 == 0)
        return out
    return bias_act_dropout_reference(x, bias, seed, stream, act, p)


def _bwd_impl(grad, saved, bias, seed, stream, act, p, direct):
    backend = _backend.select(grad.device, BACKENDS, "bias_act_dropout")
    if backend == "numba":
        if direct:
            return _numba_bwd(grad, saved, bias, seed, stream, act, p)
        return torch.ops.fastreg.bias_act_dropout_bwd_cpu(grad, saved, bias, seed, stream, act, p)
    if backend == "triton":
        from fastreg.kernels.triton import bias_act as tk

        cd = compute_dtype(grad.dtype)
        gx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        C = bias.numel()
        R = grad.numel() // C if C else 0
        nrb = tk.grid(R, C)[0] if R > 0 else 0
        part = torch.zeros((nrb, C), dtype=cd, device=grad.device)
        if R > 0 and _backend.launch_kernel(grad):
            sv = saved.contiguous() if act != 0 else grad
            _backend.launcher(tk.bias_act_bwd_kernel, direct)[tk.grid(R, C)](
                grad.contiguous(), sv, bias.contiguous(), gx, part, seed, stream,
                keep_threshold(p), dropout_scale_bits(p), 0, R, C, ACT=act,
                COMPUTE_F64=cd == torch.float64, BLOCK_R=tk.BLOCK_R, BLOCK_C=tk.BLOCK_C,
                ALIGNED=C % 4 == 0)
        return gx, part.sum(0).to(bias.dtype)
    return bias_act_dropout_bwd_reference(grad, saved, bias, seed, stream, act, p)


@triton_op("fastreg::bias_act_dropout_fwd", mutates_args=())
def bias_act_dropout_fwd(x: Tensor, bias: Tensor, seed: Tensor, stream: int, act: int,
                         p: float) -> Tensor:
    """act(x + bias) * keep / (1 - p); act 0 none, 1 relu, 2 gelu."""
    _check_scalars(x, "x", seed, stream, act, p, "bias_act_dropout_fwd")
    _check_bias(x, bias, "bias_act_dropout_fwd")  # before any backend (the eager path skips it)
    return _fwd_impl(x, bias, seed, stream, act, p, False)


@triton_op("fastreg::bias_act_dropout_bwd", mutates_args=())
def bias_act_dropout_bwd(grad: Tensor, saved: Tensor, bias: Tensor, seed: Tensor, stream: int,
                         act: int, p: float) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_bias) in one pass. saved: the output (relu), x (gelu), any (none)."""
    _check_scalars(grad, "grad", seed, stream, act, p, "bias_act_dropout_bwd")
    _check_saved(grad, saved, bias, act, "bias_act_dropout_bwd")  # before any backend
    return _bwd_impl(grad, saved, bias, seed, stream, act, p, False)


def _setup(ctx, inputs, output):
    x, bias, seed, stream, act, p = inputs
    ctx.stream, ctx.act, ctx.p = stream, act, p
    saved = output if act == 1 else (x if act == 2 else None)
    ctx.save_for_backward(saved, bias, seed)


def _backward(ctx, grad):
    saved, bias, seed = ctx.saved_tensors
    if saved is None:
        saved = grad
    gx, gb = torch.ops.fastreg.bias_act_dropout_bwd(grad, saved, bias, seed, ctx.stream, ctx.act,
                                                    ctx.p)
    return gx, gb, None, None, None, None


bias_act_dropout_fwd.register_autograd(_backward, setup_context=_setup)


class _BiasActFn(torch.autograd.Function):
    """The eager fast path (as fastreg.dropout's): the same kernels without the op layers.
    Its backward is first-order, like the op's."""

    @staticmethod
    def forward(ctx, x, bias, seed, stream, act, p):
        out = _fwd_impl(x, bias, seed, stream, act, p, True)
        ctx.stream, ctx.act, ctx.p = stream, act, p
        ctx.save_for_backward(out if act == 1 else (x if act == 2 else None), bias, seed)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved, bias, seed = ctx.saved_tensors
        gx, gb = _bwd_impl(grad, grad if saved is None else saved, bias, seed, ctx.stream,
                           ctx.act, ctx.p, True)
        return gx, gb, None, None, None, None


# ---------------------------------------------------------------- Python API
def bias_act_dropout(input: Tensor, bias: Tensor, *, activation: str | None = "relu",
                     p: float = 0.5, training: bool = True, seed=None, stream: int = 0) -> Tensor:
    """dropout(act(input + bias), p): one fused pass forward, one backward (bias gradient included).

    bias: shape (C,) with C = input.shape[-1], input's dtype and device.
    activation: "relu", "gelu" (erf form) or None. training=False (or p=0) gives
    act(input + bias) with no dropout, still fused. The mask is fastreg.dropout's
    for (seed, stream) at input's logical index.
    The result is contiguous whatever input's strides: input is a (..., C) activation of a
    linear layer, whose memory layout (unlike a convolution's channels_last) torch keeps
    contiguous itself; a permuted input is read in logical order.
    """
    op = "bias_act_dropout"
    check_float_tensor(input, "input", op)
    check_float_tensor(bias, "bias", op)
    if input.dim() < 1:
        raise ValueError(f"fastreg.{op}: input must have at least 1 dim, got a 0-dim tensor")
    if bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
        raise ValueError(f"fastreg.{op}: bias must have shape ({input.shape[-1]},) (input's last "
                         f"dim), got {tuple(bias.shape)}")
    if bias.dtype != input.dtype or bias.device != input.device:
        raise ValueError(f"fastreg.{op}: bias must have input's dtype and device ({input.dtype}, "
                         f"{input.device}), got ({bias.dtype}, {bias.device})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastreg.{op}: activation must be one of {ACTIVATIONS}, "
                         f"got {activation!r}")
    p = check_probability(p, "p", op)
    if not isinstance(training, bool):
        raise TypeError(f"fastreg.{op}: training must be a bool, got {training!r}")
    stream = check_stream(stream, op)
    check_seed(seed, op)
    if not training:
        p = 0.0
    # p = 0 keeps everything (word >= 0): no seed is drawn, the generator is untouched
    seed_t = (seed_tensor(seed, input.device, op) if p > 0.0
              else torch.zeros((), dtype=torch.int64, device=input.device))
    act = ACTIVATIONS.index(activation)
    if _eager_fast_path(input, bias, seed_t):
        return _BiasActFn.apply(input, bias, seed_t, stream, act, p)
    return torch.ops.fastreg.bias_act_dropout_fwd(input, bias, seed_t, stream, act, p)
