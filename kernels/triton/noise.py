"""Triton kernels of the noise family: multiplicative and additive noise
(Gaussian dropout is multiplicative Gaussian noise with a scalar sigma).
Element k takes eps(start + k) (start % 4 == 0: the ops pass 0, tests reach
indices past 2^32).

Random numbers follow docs/rng.md (kernels/triton/rng.py): each program takes
BLOCK consecutive elements as a [BLOCK/4, 4] tile, one Philox call per row gives
the four words of that row; the Gaussian eps is Box-Muller on the lane pairs
(0,1), (2,3), the uniform eps is sqrt(3) * (2u - 1). Offsets are 64-bit.

sigma is read through its broadcast: x's shape collapsed to NDIM dims (sizes)
with sigma's strides (sstr, 0 on broadcast dims), both int64 tensors; SCALAR
skips the index arithmetic when sigma has one element.

The sigma gradient d(i) = g x eps (multiplicative) or g eps (additive) is
reduced to sigma's shape in the same pass: GS_MODE 1 stores it elementwise
(sigma has x's shape), 2 adds it atomically at sigma's offset (a float32 /
float64 buffer; the order of the additions, hence the last bits, is not fixed),
3 (scalar sigma) stores one partial sum per program, summed by the caller
(deterministic).
"""

import triton
import triton.language as tl

from fastreg.kernels.triton.convert import to_output
from fastreg.kernels.triton.rng import box_muller_fast, philox_block, uniform_from_word

BLOCK = 1024
# noise_bwd_kernel with a sigma of more than one element (sigma read and its gradient
# written through the broadcast index: GS_MODE 1 and 2): 4 elements per thread at Triton's
# default 4 warps instead of 8. At 1024 each thread keeps 8 int64 offsets and sigma offsets
# live beside its data, and ptxas spilled on sm_90 (Triton 3.6 fp64 GS_MODE 1 and 2, 3.8
# fp32 GS_MODE 2: 8 bytes stored and loaded at 56-96 registers); at 512 they compile to
# 56 registers at most, with no spill. The random numbers depend on the element index only,
# not on BLOCK.
BWD_GATHER_BLOCK = 512


def bwd_block(scalar_sigma: bool) -> int:
    """BLOCK of noise_bwd_kernel for a scalar sigma (True) or a broadcast one."""
    return BLOCK if scalar_sigma else BWD_GATHER_BLOCK


@triton.jit
def _tile(pid, BLOCK: tl.constexpr):
    """Element offsets [BLOCK/4, 4] of this program and its counters [BLOCK/4]."""
    rows = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
    offs = rows[:, None] * 4 + tl.arange(0, 4).to(tl.int64)[None, :]
    return offs, rows


@triton.jit
def eps_tile(seed, stream, counters, DIST: tl.constexpr):
    """eps of the [len(counters), 4] elements 4c + lane (float32)."""
    r0, r1, r2, r3 = philox_block(seed, stream, counters)
    lane = tl.arange(0, 4)[None, :]
    if DIST == 0:
        za, zb = box_muller_fast(uniform_from_word(r0), uniform_from_word(r1))
        zc, zd = box_muller_fast(uniform_from_word(r2), uniform_from_word(r3))
        return tl.where(lane == 0, za[:, None],
                        tl.where(lane == 1, zb[:, None],
                                 tl.where(lane == 2, zc[:, None], zd[:, None])))
    w = tl.where(lane == 0, r0[:, None],
                 tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))
    return 1.7320508075688772 * (2.0 * uniform_from_word(w) - 1.0)


@triton.jit
def sigma_offset(offs, sizes_ptr, sstr_ptr, NDIM: tl.constexpr, IDX32: tl.constexpr = False):
    """sigma's offset for element offsets offs. IDX32 (numel < 2^31, set by the launcher):
    the divisions run in 32 bits, several times cheaper than 64-bit ones on a GPU."""
    if IDX32:
        so = tl.zeros_like(offs).to(tl.int32)
        rem = offs.to(tl.int32)
        for dd in tl.static_range(NDIM):
            sz = tl.load(sizes_ptr + (NDIM - 1 - dd)).to(tl.int32)
            st = tl.load(sstr_ptr + (NDIM - 1 - dd)).to(tl.int32)
            so += (rem % sz) * st
            rem = rem // sz
        so = so.to(tl.int64)
    else:
        so = tl.zeros_like(offs)
        rem = offs
        for dd in tl.static_range(NDIM):
            sz = tl.load(sizes_ptr + (NDIM - 1 - dd))
            st = tl.load(sstr_ptr + (NDIM - 1 - dd))
            so += (rem % sz) * st
            rem = rem // sz
    return so


@triton.jit
def _load_sigma(sig_ptr, offs, inb, sizes_ptr, sstr_ptr, NDIM: tl.constexpr, SCALAR: tl.constexpr,
                IDX32: tl.constexpr):
    if SCALAR:
        so = tl.zeros_like(offs)
        s = tl.load(sig_ptr + so)
    else:
        so = sigma_offset(offs, sizes_ptr, sstr_ptr, NDIM, IDX32)
        s = tl.load(sig_ptr + so, mask=inb, other=0.0)
    return s, so


@triton.jit(do_not_specialize=["stream", "start"])
def noise_fwd_kernel(x_ptr, sig_ptr, out_ptr, sizes_ptr, sstr_ptr, seed_ptr, stream, start, n,
                     NDIM: tl.constexpr, SCALAR: tl.constexpr, DIST: tl.constexpr,
                     ADDITIVE: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr,
                     IDX32: tl.constexpr = False):
    """out = x * (1 + sigma * eps), or x + sigma * eps with ADDITIVE."""
    offs, rows = _tile(tl.program_id(0), BLOCK)
    inb = offs < n
    z = eps_tile(tl.load(seed_ptr), stream, rows + start // 4, DIST)
    s, so = _load_sigma(sig_ptr, offs, inb, sizes_ptr, sstr_ptr, NDIM, SCALAR, IDX32)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    if COMPUTE_F64:
        x = x.to(tl.float64)
        s = s.to(tl.float64)
        z = z.to(tl.float64)
    else:
        x = x.to(tl.float32)
        s = s.to(tl.float32)
    if ADDITIVE:
        y = x + s * z
    else:
        y = x * (1.0 + s * z)
    tl.store(out_ptr + offs, to_output(y, out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["stream", "start"])
def noise_bwd_kernel(g_ptr, x_ptr, sig_ptr, gx_ptr, gs_ptr, sizes_ptr, sstr_ptr, seed_ptr, stream,
                     start, n, NDIM: tl.constexpr, SCALAR: tl.constexpr, DIST: tl.constexpr,
                     ADDITIVE: tl.constexpr, NEED_GX: tl.constexpr, GS_MODE: tl.constexpr,
                     COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr, IDX32: tl.constexpr = False):
    """gx = g * (1 + sigma * eps) (NEED_GX) and the sigma gradient (GS_MODE, module doc)."""
    pid = tl.program_id(0)
    offs, rows = _tile(pid, BLOCK)
    inb = offs < n
    z = eps_tile(tl.load(seed_ptr), stream, rows + start // 4, DIST)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    if COMPUTE_F64:
        g = g.to(tl.float64)
        z = z.to(tl.float64)
    else:
        g = g.to(tl.float32)
    if NEED_GX:
        s, so = _load_sigma(sig_ptr, offs, inb, sizes_ptr, sstr_ptr, NDIM, SCALAR, IDX32)
        s = s.to(g.dtype)
        tl.store(gx_ptr + offs, to_output(g * (1.0 + s * z), gx_ptr.dtype.element_ty), mask=inb)
    if GS_MODE != 0:
        if ADDITIVE:
            d = g * z
        else:
            d = g * tl.load(x_ptr + offs, mask=inb, other=0.0).to(g.dtype) * z
        if GS_MODE == 1:
            tl.store(gs_ptr + offs, d.to(gs_ptr.dtype.element_ty), mask=inb)
        elif GS_MODE == 2:
            so2 = sigma_offset(offs, sizes_ptr, sstr_ptr, NDIM, IDX32)
            tl.atomic_add(gs_ptr + so2, d.to(gs_ptr.dtype.element_ty), mask=inb)
        else:
            tl.store(gs_ptr + pid, tl.sum(tl.sum(d, axis=1), axis=0).to(gs_ptr.dtype.element_ty))


def grid(n, block=BLOCK):
    return (triton.cdiv(n, block),)
