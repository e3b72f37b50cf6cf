"""Noise family: Gaussian dropout, multiplicative and additive (input) noise.

    multiplicative:  y = x * (1 + sigma * eps)      additive:  y = x + sigma * eps

eps(i) for the element at logical row-major index i follows docs/rng.md:
"gaussian" is the spec's Box-Muller normal z(i) ~ N(0, 1); "uniform" is
sqrt(3) * (2 u(i) - 1), uniform on (-sqrt(3), sqrt(3)): zero mean and unit
variance, so sigma is the standard deviation of the noise for both
distributions. sigma is a scalar or a tensor broadcast over x (per channel, per
feature, ...); gaussian_dropout is multiplicative Gaussian noise with
sigma = sqrt(p / (1 - p)) (Srivastava et al. 2014).

The op pattern is the dropout family's (fastreg/ops/dropout.py): the public ops
`fastreg::noise_fwd` and `fastreg::noise_bwd` are triton_ops whose bodies pick a
backend (Triton via wrap_triton on CUDA / the interpreter; an opaque inner
custom op running Numba on CPU; the reference composition for "torch"); the
seed is a 0-dim int64 tensor; backward regenerates eps from (seed, stream).

Saved for backward: the seed and sigma, never eps. x is saved only when sigma
needs a gradient in the multiplicative form (d y / d sigma = x * eps); so
Gaussian dropout and noise with a fixed sigma save 0 bytes per element.
Backward is one pass: grad_x = grad * (1 + sigma * eps) and, fused into the same
pass, grad_sigma = sum over sigma's broadcast dims of grad * x * eps (or
grad * eps for additive noise).

Layout: outputs and grad_x are laid out as torch.empty_like of the input (channels_last stays
channels_last), with the values of the op on the contiguous input: eps stays a function of the
logical index. With a scalar sigma, the Numba kernels walk a channels_last input whose H*W is a
multiple of 4 in memory order (noise_fwd_tiled); every other case computes in logical order and
copies once into that layout (fastreg/_layout.py). Contiguous inputs pay one is_contiguous()
test.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor
from torch.library import triton_op

from fastreg import _alloc, _backend, _layout
from fastreg._boundary import PLAIN_TYPES as _PLAIN_TYPES, check_plain
from fastreg._seed import check_seed, check_stream, seed_tensor
from fastreg._validate import (check_op_devices, check_float_tensor, check_op_code, check_op_like,
                               check_op_rng, check_probability, compute_dtype)
from fastreg.ops.rng import normals_reference, uniform_from_words_reference, words_reference

BACKENDS = ("numba", "triton")
DISTS = ("gaussian", "uniform")
SQRT3_F32 = 1.7320508075688772  # rounded to float32 where used, as every backend does


# ---------------------------------------------------------------- reference
def eps_reference(n: int, seed, stream: int, dist: int, device) -> Tensor:
    """eps(i) for i < n, float32 (dist 0: gaussian, 1: uniform with unit variance)."""
    idx = torch.arange(n, dtype=torch.int64, device=device)
    if dist == 0:
        return normals_reference(idx, seed, stream)
    u = uniform_from_words_reference(words_reference(idx, seed, stream))
    return torch.tensor(SQRT3_F32, dtype=torch.float32, device=device) * (2.0 * u - 1.0)


def noise_reference(x: Tensor, sigma: Tensor, seed, stream: int, dist: int,
                    additive: bool) -> Tensor:
    cd = compute_dtype(x.dtype)
    e = eps_reference(x.numel(), seed, stream, dist, x.device).to(cd).reshape(x.shape)
    s = sigma.to(cd)
    y = x.to(cd) + s * e if additive else x.to(cd) * (1 + s * e)
    return y.to(x.dtype)


def noise_bwd_reference(grad: Tensor, x: Tensor, sigma: Tensor, seed, stream: int, dist: int,
                        additive: bool, need_gx: bool, need_gs: bool):
    cd = compute_dtype(grad.dtype)
    e = eps_reference(grad.numel(), seed, stream, dist, grad.device).to(cd).reshape(grad.shape)
    g = grad.to(cd)
    s = sigma.to(cd)
    gx = (g * (1 + s * e)).to(grad.dtype) if need_gx else grad.new_empty(0)
    if need_gs:
        d = g * e if additive else g * x.to(cd) * e
        gs = d.to(torch.float64).sum_to_size(sigma.shape).to(sigma.dtype)
    else:
        gs = sigma.new_empty(0)
    return gx, gs


# ---------------------------------------------------------------- layout of sigma's broadcast
def broadcast_layout(shape, sshape) -> tuple[list[int], list[int]]:
    """x's shape collapsed to (sizes, sstr): sigma's offset of logical index i is
    sum_d index_d(i) * sstr[d] (sigma contiguous, sstr 0 on broadcast dims)."""
    nd = len(shape)
    ss = (1,) * (nd - len(sshape)) + tuple(sshape)
    dims = []
    acc = 1
    for d in reversed(range(nd)):
        st = 0 if ss[d] == 1 else acc
        acc *= ss[d]
        if shape[d] != 1:
            dims.append((int(shape[d]), st))
    dims.reverse()
    sizes, sstr = [], []
    for size, st in dims:
        if sizes and ((st == 0 and sstr[-1] == 0) or (st != 0 and sstr[-1] == st * size)):
            sizes[-1] *= size
            sstr[-1] = st
        else:
            sizes.append(size)
            sstr.append(st)
    if not sizes:
        return [1], [0]
    return sizes, sstr


def _gs_mode(x_numel: int, sigma: Tensor) -> int:
    """1: sigma has one value per element; 2: reduced over broadcast dims; 3: scalar."""
    if sigma.numel() == 1:
        return 3
    return 1 if sigma.numel() == x_numel else 2


# ---------------------------------------------------------------- Numba (CPU)
def _np_in(t: Tensor, cd):
    return _alloc.numpy_in(t, cd)


def _np_one(cd):
    return _ONES[cd == torch.float64]


def _ones():
    import numpy as np

    return (np.float32(1.0), np.float64(1.0))


_ONES = _ones()


@functools.lru_cache(maxsize=256)
def _np_layout_of(shape, sshape):
    """(sizes, sstr) of broadcast_layout as int64 arrays, per shape pair: layers call with the
    same shapes every step. The kernels only read them."""
    import numpy as np

    sizes, sstr = broadcast_layout(shape, sshape)
    return np.asarray(sizes, dtype=np.int64), np.asarray(sstr, dtype=np.int64)


def _np_layout(x: Tensor, sigma: Tensor):
    return _np_layout_of(x.shape, sigma.shape)


def _nthreads(n: int) -> int:
    """The thread count the kernels split n elements over: one below SERIAL_BELOW, where the
    by_size drivers run their serial copy (waking the pool costs more than the work)."""
    nb = _backend.numba_module("noise")
    return nb.numba.get_num_threads() if n >= nb.SERIAL_BELOW else 1


def _check_sigma(x: Tensor, sigma: Tensor, op: str) -> None:
    """sigma must broadcast over x without growing it, on x's device: the kernels read sigma at
    the offsets of x's broadcast layout (the ops may be called directly). O(ndim)."""
    xs, ss = x.shape, sigma.shape
    if (len(ss) > len(xs) or sigma.device != x.device
            or any(s != 1 and s != d for s, d in zip(reversed(ss), reversed(xs)))):
        raise ValueError(f"fastreg::{op}: sigma has shape {tuple(ss)} on {sigma.device}, needs a "
                         f"shape that broadcasts to {tuple(xs)} (each dim 1 or equal) on "
                         f"{x.device}")


def _check_scalars(ref: Tensor, ref_name: str, seed: Tensor, stream: int, dist: int,
                   op: str) -> None:
    """The scalars of an op called directly (the wrappers check theirs; the eager fast path
    skips this). A dist outside 0..1 would silently draw uniform noise in the kernels. sigma is
    a tensor whose values the wrappers do not check either (a learned sigma may go negative)."""
    check_op_rng(seed, stream, ref, ref_name, op)
    check_op_code(dist, "dist", DISTS, op)


def _check_bwd_tensors(grad: Tensor, x: Tensor, sigma: Tensor, additive: bool, need_gs: bool,
                       op: str) -> None:
    """The tensors of noise_bwd called directly: sigma as in forward and, for the
    multiplicative sigma gradient (the only place x is read), x at grad's indices."""
    _check_sigma(grad, sigma, op)
    if need_gs and not additive:
        check_op_like(x, "x", grad, "grad", op)


def _numba_fwd(x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
               additive: bool) -> Tensor:
    nb = _backend.numba_module("noise")

    cd = compute_dtype(x.dtype)
    contiguous = x.is_contiguous()
    if not contiguous and sigma.numel() == 1:
        out = _numba_memory_order(nb, x, sigma, seed, stream, dist, additive)
        if out is not None:
            return out
    xa = _np_in(x, cd)
    out, oa = _alloc.out_like(x, cd)
    sizes, sstr = _np_layout(x, sigma)
    nb.noise_fwd(xa, _np_in(sigma, cd), oa, sizes, sstr, int(seed), stream, dist, additive,
                 _np_one(cd), 0, _nthreads(xa.size))
    out = _alloc.as_dtype(out, x.dtype)
    return out if contiguous else _layout.like(x, out)


def _numba_memory_order(nb, x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
                        additive: bool) -> Tensor | None:
    """x (1 + sigma eps) or x + sigma eps for a scalar sigma and a permuted dense x whose memory
    rows pair up as four logical neighbours (channels_last with H*W % 4 == 0), walked in memory
    order, the result in x's layout; None otherwise (the caller copies)."""
    dims = _layout.memory_dims(tuple(x.shape), tuple(x.stride()))
    if dims is None or not dims[2]:
        return None
    cd = compute_dtype(x.dtype)
    xs = x if x.dtype == cd else x.to(cd)  # .to keeps a dense layout
    out = torch.empty_like(xs)
    nb.noise_fwd_tiled(_layout.memory_numpy(xs), _layout.memory_numpy(out),
                       _np_in(sigma, cd)[0], dims[0], dims[1], int(seed), stream, dist, additive,
                       _np_one(cd))
    return _alloc.as_dtype(out, x.dtype)


@torch.library.custom_op("fastreg::noise_fwd_cpu", mutates_args=(), device_types="cpu")
def _noise_fwd_cpu(x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
                   additive: bool) -> Tensor:
    _check_scalars(x, "x", seed, stream, dist, "noise_fwd_cpu")
    _check_sigma(x, sigma, "noise_fwd_cpu")
    return _numba_fwd(x, sigma, seed, stream, dist, additive)


@_noise_fwd_cpu.register_fake
def _(x, sigma, seed, stream, dist, additive):
    check_op_devices("noise_fwd_cpu", x=x, sigma=sigma, seed=seed)
    return _layout.empty_out(x)


def _numba_bwd(grad: Tensor, x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
               additive: bool, need_gx: bool, need_gs: bool) -> tuple[Tensor, Tensor]:
    import numpy as np

    nb = _backend.numba_module("noise")

    cd = compute_dtype(grad.dtype)
    n = grad.numel()
    contiguous = grad.is_contiguous()
    if not contiguous and need_gx and not need_gs and not additive and sigma.numel() == 1:
        # grad_x = grad (1 + sigma eps): the forward's multiplicative kernel on grad
        gx = _numba_memory_order(nb, grad, sigma, seed, stream, dist, False)
        if gx is not None:
            return gx, sigma.new_empty(0)
    ga = _np_in(grad, cd)
    xa = _np_in(x, cd) if (need_gs and not additive) else ga
    sa = _np_in(sigma, cd)
    mode = 0 if not need_gs else min(_gs_mode(n, sigma), 2)
    nparts = _nthreads(n)
    # the kernel writes gx only if need_gx, gs only in mode 1 and part only in mode 2: the
    # others are shared placeholders, which saves three allocations per call
    gx_t = _alloc.empty((n,), cd) if need_gx else None
    gs_t = _alloc.empty((n,), cd) if mode == 1 else None
    if mode == 2:
        part = np.zeros((nparts, sigma.numel()), dtype=np.float64)
    else:
        part = _unused_part(nparts)
    unused = _unused_array(cd)
    sizes, sstr = _np_layout(grad, sigma)
    nb.noise_bwd(ga, xa, sa, unused if gx_t is None else gx_t.numpy(),
                 unused if gs_t is None else gs_t.numpy(), part, sizes, sstr, int(seed), stream,
                 dist, additive, need_gx, mode, _np_one(cd), 0)
    if need_gx:
        gx_t = _alloc.as_dtype(gx_t, grad.dtype).view(grad.shape)
        if not contiguous:
            gx_t = _layout.like(grad, gx_t)
    else:
        gx_t = grad.new_empty(0)
    if mode == 1:
        gs_t = _layout.like(sigma, gs_t.to(sigma.dtype).view(sigma.shape))
    elif mode == 2:
        gs_t = _layout.like(sigma, torch.from_numpy(part.sum(0)).to(sigma.dtype).view(sigma.shape))
    else:
        gs_t = sigma.new_empty(0)
    return gx_t, gs_t


@functools.lru_cache(maxsize=None)
def _unused_part(nparts: int):
    import numpy as np

    return np.zeros((nparts, 1), dtype=np.float64)  # partitions the work; never written


@functools.lru_cache(maxsize=None)
def _unused_array(cd: torch.dtype):
    return torch.empty(0, dtype=cd).numpy()


@torch.library.custom_op("fastreg::noise_bwd_cpu", mutates_args=(), device_types="cpu")
def _noise_bwd_cpu(grad: Tensor, x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
                   additive: bool, need_gx: bool, need_gs: bool) -> tuple[Tensor, Tensor]:
    _check_scalars(grad, "grad", seed, stream, dist, "noise_bwd_cpu")
    _check_additive_gx(additive, need_gx, "noise_bwd_cpu")
    _check_bwd_tensors(grad, x, sigma, additive, need_gs, "noise_bwd_cpu")
    return _numba_bwd(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs)


@_noise_bwd_cpu.register_fake
def _(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs):
    check_op_devices("noise_bwd_cpu", grad=grad, x=x, sigma=sigma, seed=seed)
    gx = _layout.empty_out(grad) if need_gx else grad.new_empty(0)
    gs = _layout.empty_out(sigma) if need_gs else sigma.new_empty(0)
    return gx, gs


# ---------------------------------------------------------------- public ops
def _layout_tensors(x: Tensor, sigma: Tensor):
    """(sizes, sstr, ndim) for the Triton kernels: one int64 tensor holding both (a single
    host-to-device copy); a scalar sigma needs none (the kernels skip the index maths)."""
    if sigma.numel() == 1:
        return sigma, sigma, 1  # never read (SCALAR)
    sizes, sstr = broadcast_layout(x.shape, sigma.shape)
    both = torch.tensor(sizes + sstr, dtype=torch.int64, device=x.device)
    return both[:len(sizes)], both[len(sizes):], len(sizes)


def _fwd_impl(x, sigma, seed, stream, dist, additive, direct):
    backend = _backend.select(x.device, BACKENDS, "noise")
    n = x.numel()
    if backend == "numba":
        if direct:
            return _numba_fwd(x, sigma, seed, stream, dist, additive)
        return torch.ops.fastreg.noise_fwd_cpu(x, sigma, seed, stream, dist, additive)
    if backend == "triton":
        from fastreg.kernels.triton import noise as tk

        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if n > 0 and _backend.launch_kernel(x):
            sizes, sstr, ndim = _layout_tensors(x, sigma)
            _backend.launcher(tk.noise_fwd_kernel, direct)[tk.grid(n)](
                x.contiguous(), sigma.contiguous(), out, sizes, sstr, seed, stream, 0, n,
                NDIM=ndim, SCALAR=sigma.numel() == 1, DIST=dist, ADDITIVE=additive,
                COMPUTE_F64=x.dtype == torch.float64, BLOCK=tk.BLOCK, IDX32=n < 2**31)
        return _layout.like(x, out)
    return _layout.like(x, noise_reference(x, sigma, seed, stream, dist, additive).contiguous())


def _check_additive_gx(additive: bool, need_gx: bool, op: str) -> None:
    if additive and need_gx:
        raise ValueError(f"fastreg::{op}: additive noise has grad_x = grad; need_gx must be False")


def _bwd_impl(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs, direct):
    _check_additive_gx(additive, need_gx, "noise_bwd")
    backend = _backend.select(grad.device, BACKENDS, "noise")
    n = grad.numel()
    if backend == "numba":
        if direct:
            return _numba_bwd(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs)
        return torch.ops.fastreg.noise_bwd_cpu(grad, x, sigma, seed, stream, dist, additive,
                                                need_gx, need_gs)
    if backend == "triton":
        from fastreg.kernels.triton import noise as tk

        cd = compute_dtype(grad.dtype)
        gx = torch.empty(grad.shape if need_gx else (0,), dtype=grad.dtype, device=grad.device)
        mode = _gs_mode(n, sigma) if need_gs else 0
        block = tk.bwd_block(sigma.numel() == 1)
        nprog = tk.grid(n, block)[0]
        if mode == 1:
            gsb = torch.empty(n, dtype=cd, device=grad.device)
        elif mode == 2:
            gsb = torch.zeros(sigma.numel(), dtype=cd, device=grad.device)
        else:
            gsb = torch.zeros(nprog if mode == 3 else 0, dtype=cd, device=grad.device)
        if n > 0 and (need_gx or need_gs) and _backend.launch_kernel(grad):
            sizes, sstr, ndim = _layout_tensors(grad, sigma)
            xx = x.contiguous() if (need_gs and not additive) else grad
            _backend.launcher(tk.noise_bwd_kernel, direct)[tk.grid(n, block)](
                grad.contiguous(), xx, sigma.contiguous(), gx, gsb, sizes, sstr, seed, stream,
                0, n, NDIM=ndim, SCALAR=sigma.numel() == 1, DIST=dist, ADDITIVE=additive,
                NEED_GX=need_gx, GS_MODE=mode, COMPUTE_F64=cd == torch.float64,
                BLOCK=block, IDX32=n < 2**31)
        if not need_gs:
            gs = sigma.new_empty(0)
        elif mode == 3:
            gs = _layout.like(sigma, gsb.sum().to(sigma.dtype).reshape(sigma.shape))
        else:
            gs = _layout.like(sigma, gsb.to(sigma.dtype).reshape(sigma.shape))
        return (_layout.like(grad, gx) if need_gx else gx), gs
    gx, gs = noise_bwd_reference(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs)
    if need_gx:
        gx = _layout.like(grad, gx.contiguous())
    if need_gs:
        gs = _layout.like(sigma, gs.contiguous())
    return gx, gs


@triton_op("fastreg::noise_fwd", mutates_args=())
def noise_fwd(x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
              additive: bool) -> Tensor:
    """x * (1 + sigma * eps), or x + sigma * eps when additive (sigma broadcast over x)."""
    _check_scalars(x, "x", seed, stream, dist, "noise_fwd")
    _check_sigma(x, sigma, "noise_fwd")  # before any backend (the eager path skips it)
    return _fwd_impl(x, sigma, seed, stream, dist, additive, False)


@triton_op("fastreg::noise_bwd", mutates_args=())
def noise_bwd(grad: Tensor, x: Tensor, sigma: Tensor, seed: Tensor, stream: int, dist: int,
              additive: bool, need_gx: bool, need_gs: bool) -> tuple[Tensor, Tensor]:
    """(grad_x or an empty tensor, grad_sigma or an empty tensor) in one pass.

    grad_x = grad * (1 + sigma * eps) (multiplicative only: the additive one is grad);
    grad_sigma = sum over sigma's broadcast dims of grad * x * eps (additive: grad * eps).
    x is read only for the multiplicative grad_sigma (else pass any tensor)."""
    _check_scalars(grad, "grad", seed, stream, dist, "noise_bwd")
    _check_bwd_tensors(grad, x, sigma, additive, need_gs, "noise_bwd")  # before any backend
    return _bwd_impl(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs, False)


# ---------------------------------------------------------------- autograd
def _noise_setup(ctx, inputs, output):
    x, sigma, seed, stream, dist, additive = inputs
    ctx.stream, ctx.dist, ctx.additive = stream, dist, additive
    need_gs = ctx.needs_input_grad[1]
    # x only when d y / d sigma = x * eps is needed: Gaussian dropout saves nothing per element.
    keep_x = x if (need_gs and not additive) else None
    ctx.save_for_backward(keep_x, sigma, seed)


def _backward_body(ctx, grad, bwd):
    x, sigma, seed = ctx.saved_tensors
    need_gx, need_gs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if x is None:
        x = grad
    if ctx.additive:
        gx = grad if need_gx else None
        gs = None
        if need_gs:
            gs = bwd(grad, x, sigma, seed, ctx.stream, ctx.dist, True, False, True)[1]
        return gx, gs, None, None, None, None
    if not (need_gx or need_gs):
        return None, None, None, None, None, None
    gx, gs = bwd(grad, x, sigma, seed, ctx.stream, ctx.dist, False, need_gx, need_gs)
    return (gx if need_gx else None), (gs if need_gs else None), None, None, None, None


def _noise_backward(ctx, grad):
    return _backward_body(ctx, grad, torch.ops.fastreg.noise_bwd)


noise_fwd.register_autograd(_noise_backward, setup_context=_noise_setup)


# ---------------------------------------------------------------- eager fast path
# As in fastreg/ops/dropout.py: in plain eager mode the dispatcher layers of the ops
# cost tens of microseconds per call, more than the kernel at small sizes. With plain
# tensors, no dispatch mode and no tracing, the public functions run the same kernels
# through one autograd.Function; anything else goes through the ops. Its backward is
# first-order (the ops' backward is not differentiable either).
_eager_fast_path = _backend.eager_fast_path


def _bwd_direct(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs):
    return _bwd_impl(grad, x, sigma, seed, stream, dist, additive, need_gx, need_gs, True)


class _NoiseFn(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: the latter makes every
    # apply() bind default arguments through inspect (tens of microseconds)
    @staticmethod
    def forward(ctx, x, sigma, seed, stream, dist, additive):
        out = _fwd_impl(x, sigma, seed, stream, dist, additive, True)
        _noise_setup(ctx, (x, sigma, seed, stream, dist, additive), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _backward_body(ctx, grad, _bwd_direct)


@functools.lru_cache(maxsize=256)
def _const_sigma(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim sigma tensor per value, dtype and device, made once: a layer calls with the same
    sigma every step, and a new tensor (and its numpy view) costs microseconds per call. Used
    only by the eager fast path, where nothing writes to it; made outside inference mode, so
    that autograd may save it."""
    with torch.inference_mode(False):
        return torch.full((), sigma, dtype=dtype, device=device)


# ---------------------------------------------------------------- lean eager path
# A number sigma (gaussian_dropout, multiplicative_noise/input_noise with a float) on a
# contiguous float32/float64 CPU input, Numba backend: the forward kernel is called straight
# on the tensors (no _fwd_impl/_numba_fwd layers, cached sigma view, the Python int seed),
# without any autograd.Function when no gradient is recorded, and the backward is the same
# forward kernel on the gradient (grad_x = grad (1 + sigma eps), the multiplicative form;
# additive noise passes grad through). The kernels and their arithmetic are the op's, so the
# values are bit for bit those of fastreg::noise_fwd / noise_bwd; nothing more is saved.
_LEAN_DTYPES = (torch.float32, torch.float64)


def _lean_ok(x: Tensor) -> bool:
    return (x.dtype in _LEAN_DTYPES and x.is_contiguous()
            and _backend.select(x.device, BACKENDS, "noise") == "numba")


@functools.lru_cache(maxsize=256)
def _const_sigma_np(sigma: float, dtype: torch.dtype, device: torch.device):
    """(_const_sigma's tensor, its numpy view): the view lives as long as the cached tensor."""
    t = _const_sigma(sigma, dtype, device)
    return t, _alloc.np_view(t)


def _lean_kernel(src: Tensor, sa, seed: int, stream: int, dist: int, additive: bool) -> Tensor:
    """src (1 + sigma eps), or src + sigma eps: noise_fwd on a contiguous float32/float64 CPU
    tensor, sa: the scalar sigma as a one-element numpy array of src's dtype."""
    nb = _backend.numba_module("noise")
    n = src.numel()
    sizes, sstr = _np_layout_of(src.shape, ())
    if n < nb.SERIAL_BELOW:
        # the serial driver on the tensors' addresses: no numpy views to make and unbox (about
        # 3 us of a 12 us call at 2^12); huge-page advice does not apply at these sizes
        out = torch.empty(src.shape, dtype=src.dtype)
        nb.noise_fwd_at(src.data_ptr(), out.data_ptr(), n, sa, sizes, sstr, seed, stream, dist,
                        additive, _np_one(src.dtype))
        return out
    out = _alloc.empty(src.shape, src.dtype)
    nb.noise_fwd.parallel(_alloc.np_view(src), sa, _alloc.np_view(out), sizes, sstr, seed,
                          stream, dist, additive, _np_one(src.dtype), 0, _nthreads(n))
    return out


class _LeanNoiseFn(torch.autograd.Function):
    """The lean path's node: args = (sigma tensor, its numpy view, seed int, stream, dist,
    additive). Saves no tensor (sigma is a cached constant, the seed a Python int)."""

    @staticmethod
    def forward(ctx, x, args):
        ctx.args = args
        return _lean_kernel(x, *args[1:])

    @staticmethod
    def backward(ctx, grad):
        # first-order, as _NoiseFn's: under create_graph the once_differentiable form (a
        # second backward raises); a plain backward runs without grad mode, and skips its
        # wrapper (about 9 us per call)
        if torch.is_grad_enabled():
            return _lean_backward_once(ctx, grad)
        return _lean_backward(ctx, grad)


def _lean_backward(ctx, grad):
    sigma, sa, seed, stream, dist, additive = ctx.args
    if additive:
        return grad, None
    if type(grad) not in _PLAIN_TYPES:  # a hook's subclass: its memory is not the kernel's to read
        check_plain(grad, "grad", "multiplicative_noise backward")
    if grad.dtype in _LEAN_DTYPES and grad.is_contiguous():
        return _lean_kernel(grad, sa, seed, stream, dist, False), None
    # an expanded or permuted gradient: the op's forward path, which handles layouts
    return _numba_fwd(grad, sigma, seed, stream, dist, False), None


_lean_backward_once = torch.autograd.function.once_differentiable(_lean_backward)


def _lean_noise(x: Tensor, sigma: float, seed: Tensor, stream: int, dist: int,
                additive: bool) -> Tensor:
    """The lean path (the caller checked _eager_fast_path and _lean_ok)."""
    st, sa = _const_sigma_np(sigma, x.dtype, x.device)
    args = (st, sa, int(seed), stream, dist, additive)
    if x.requires_grad and torch.is_grad_enabled():
        return _LeanNoiseFn.apply(x, args)
    return _lean_kernel(x, *args[1:])


def _noise(x, sigma, seed, stream, dist, additive):
    """sigma: a validated tensor, or a float (a number >= 0 given by the caller)."""
    tensors = (x, sigma, seed) if isinstance(sigma, Tensor) else (x, seed)
    if _eager_fast_path(*tensors):
        if not isinstance(sigma, Tensor):
            if _lean_ok(x):
                return _lean_noise(x, sigma, seed, stream, dist, additive)
            # in the compute dtype: every backend rounds sigma to it (so does the reference)
            sigma = _const_sigma(sigma, compute_dtype(x.dtype), x.device)
        return _NoiseFn.apply(x, sigma, seed, stream, dist, additive)
    if not isinstance(sigma, Tensor):
        sigma = torch.full((), sigma, dtype=torch.float64, device=x.device)
    return torch.ops.fastreg.noise_fwd(x, sigma, seed, stream, dist, additive)


# ---------------------------------------------------------------- Python API
def _check_dist(dist, op: str) -> int:
    if dist not in DISTS:
        raise ValueError(f"fastreg.{op}: dist must be one of {DISTS}, got {dist!r}")
    return DISTS.index(dist)


def _sigma_tensor(sigma, input: Tensor, op: str):
    """sigma as a tensor on input's device that broadcasts over input without growing it, or
    a number as a float >= 0 (made a tensor by _noise)."""
    if isinstance(sigma, Tensor):
        if not sigma.dtype.is_floating_point:
            raise TypeError(f"fastreg.{op}: sigma must be a real number or a floating tensor, "
                            f"got a tensor of dtype {sigma.dtype}")
        check_float_tensor(sigma, "sigma", op)
        if sigma.device != input.device:
            if sigma.dim() == 0 and sigma.device.type == "cpu":
                sigma = sigma.to(input.device)
            else:
                raise ValueError(f"fastreg.{op}: sigma must be on input's device ({input.device}),"
                                 f" got {sigma.device}")
        # broadcasting sigma over input leaves input's shape iff each of sigma's dims, aligned
        # from the right, is 1 or input's (torch.broadcast_shapes says the same at ~10 us)
        ss, xs = sigma.shape, input.shape
        if len(ss) > len(xs) or any(a != 1 and a != b for a, b in zip(reversed(ss), reversed(xs))):
            raise ValueError(f"fastreg.{op}: sigma must broadcast over input without changing its "
                             f"shape: sigma.shape={tuple(sigma.shape)}, "
                             f"input.shape={tuple(input.shape)}")
        return sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"fastreg.{op}: sigma must be a real number or a floating tensor, "
                        f"got {sigma!r}")
    sigma = float(sigma)
    if not 0.0 <= sigma < math.inf:  # also rejects NaN; comparisons trace symbolically
        raise ValueError(f"fastreg.{op}: sigma must be a finite number >= 0, got {sigma}")
    return sigma


def _check_training(training, op: str) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"fastreg.{op}: training must be a bool, got {training!r}")


def gaussian_dropout(input: Tensor, p: float = 0.5, training: bool = True, *, seed=None,
                     stream: int = 0) -> Tensor:
    """Gaussian dropout: input * (1 + sigma * eps), eps ~ N(0, 1), sigma = sqrt(p / (1 - p)).

    The multiplicative noise has mean 1 and the variance p / (1 - p) of dropout's
    keep / (1 - p) factor. p in [0, 1). Saves nothing per element for backward
    (eps is regenerated from (seed, stream)). seed: None draws a fresh seed from
    torch's default generator for input's device; an int in [0, 2^63) or a 0-dim
    int64 tensor fixes the noise. training=False, p=0 or an empty input return
    the input itself. The result is laid out as torch.empty_like(input), as every
    noise op's (docs/layout.md).
    """
    check_float_tensor(input, "input", "gaussian_dropout")
    p = check_probability(p, "p", "gaussian_dropout")
    if p >= 1.0:
        raise ValueError("fastreg.gaussian_dropout: p must be in [0, 1) (sigma = sqrt(p/(1-p)) "
                         f"is infinite at p = 1), got {p}")
    _check_training(training, "gaussian_dropout")
    stream = check_stream(stream, "gaussian_dropout")
    check_seed(seed, "gaussian_dropout")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    seed_t = seed_tensor(seed, input.device, "gaussian_dropout")
    if _eager_fast_path(input, seed_t):
        if _lean_ok(input):
            return _lean_noise(input, math.sqrt(p / (1.0 - p)), seed_t, stream, 0, False)
        sigma = _const_sigma(math.sqrt(p / (1.0 - p)), compute_dtype(input.dtype), input.device)
        return _NoiseFn.apply(input, sigma, seed_t, stream, 0, False)
    # in the compute dtype: the kernels round sigma to it anyway
    sigma = torch.full((), math.sqrt(p / (1.0 - p)), dtype=compute_dtype(input.dtype),
                       device=input.device)
    return torch.ops.fastreg.noise_fwd(input, sigma, seed_t, stream, 0, False)


def multiplicative_noise(input: Tensor, sigma, *, dist: str = "gaussian", seed=None,
                         stream: int = 0) -> Tensor:
    """input * (1 + sigma * eps), eps of zero mean and unit variance.

    dist="gaussian": eps ~ N(0, 1); dist="uniform": eps = sqrt(3) * (2u - 1),
    u ~ U(0, 1), i.e. eps uniform on (-sqrt(3), sqrt(3)). sigma: a number >= 0, or
    a floating tensor that broadcasts over input (per channel, per feature, ...);
    it may require grad, its gradient is fused into the backward pass.
    Saves nothing per element unless sigma requires grad (then input is saved).
    """
    check_float_tensor(input, "input", "multiplicative_noise")
    d = _check_dist(dist, "multiplicative_noise")
    sigma_t = _sigma_tensor(sigma, input, "multiplicative_noise")
    stream = check_stream(stream, "multiplicative_noise")
    check_seed(seed, "multiplicative_noise")
    seed_t = seed_tensor(seed, input.device, "multiplicative_noise")
    return _noise(input, sigma_t, seed_t, stream, d, False)


def input_noise(input: Tensor, sigma, *, dist: str = "gaussian", seed=None,
                stream: int = 0) -> Tensor:
    """Additive input perturbation: input + sigma * eps (eps as in multiplicative_noise).

    sigma: a number >= 0 or a floating tensor broadcast over input, may require grad
    (its gradient, sum of grad * eps over the broadcast dims, is one fused pass).
    Saves nothing per element.
    """
    check_float_tensor(input, "input", "input_noise")
    d = _check_dist(dist, "input_noise")
    sigma_t = _sigma_tensor(sigma, input, "input_noise")
    stream = check_stream(stream, "input_noise")
    check_seed(seed, "input_noise")
    seed_t = seed_tensor(seed, input.device, "input_noise")
    return _noise(input, sigma_t, seed_t, stream, d, True)


def gaussian_dropout_sigma(p: float) -> float:
    return math.sqrt(p / (1.0 - p))


