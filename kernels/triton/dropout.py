"""Triton kernels of the dropout family (docs/rng.md for the mask).

Each program takes BLOCK consecutive elements as a [BLOCK/4, 4] tile: one Philox
call per row gives the four words of that row, so the generator runs once per
four elements. Offsets are 64-bit. The multiplier m = scale where kept, 0 where
dropped keeps NaN/Inf behaviour identical to torch's x * mask * scale. `scale`
arrives as the bits of a float64 (Triton would type a Python float as float32)
and is rounded to the compute dtype here, as the other backends do.
"""

import triton
import triton.language as tl

from fastreg.kernels.triton.convert import to_output
from fastreg.kernels.triton.rng import philox_block

BLOCK = 1024


@triton.jit
def _scale_value(scale_bits, COMPUTE_F64: tl.constexpr):
    s = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if not COMPUTE_F64:
        s = s.to(tl.float32)
    return s  # one return: the compiler types every return of a jit function alike


@triton.jit
def _tile(pid, start, BLOCK: tl.constexpr):
    """Element offsets [BLOCK/4, 4] of this program, and its counters [BLOCK/4]."""
    rows = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
    offs = rows[:, None] * 4 + tl.arange(0, 4).to(tl.int64)[None, :]
    counters = rows + start // 4
    return offs, counters


@triton.jit
def _multipliers(seed, stream, counters, threshold, scale, BLOCK: tl.constexpr):
    r0, r1, r2, r3 = philox_block(seed, stream, counters)
    lane = tl.arange(0, 4)[None, :]
    w = tl.where(lane == 0, r0[:, None],
                 tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))
    keep = w.to(tl.uint64) >= threshold.to(tl.int64).to(tl.uint64)
    return tl.where(keep, scale, scale * 0), keep


# Integer scalars that can equal 1 are never specialised (Triton would turn them into
# constexprs, which have no .to()), nor recompiled per value.
_RUNTIME_INTS = ["stream", "threshold", "scale_bits", "start", "n"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def dropout_fwd_kernel(x_ptr, out_ptr, bits_ptr, seed_ptr, stream, threshold, scale_bits, start, n,
                       WITH_BITS: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """out = x * keep * scale; with WITH_BITS also the packed mask (start % 8 == 0)."""
    pid = tl.program_id(0)
    offs, counters = _tile(pid, start, BLOCK)
    inb = offs < n
    scale = _scale_value(scale_bits, COMPUTE_F64)
    m, keep = _multipliers(tl.load(seed_ptr), stream, counters, threshold, scale, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    y = x.to(scale.dtype) * m
    tl.store(out_ptr + offs, to_output(y, out_ptr.dtype.element_ty), mask=inb)
    if WITH_BITS:
        kb = tl.reshape((keep & inb).to(tl.int32), (BLOCK // 8, 8))  # bits past n stay 0
        weights = (1 << tl.arange(0, 8))[None, :]
        byte = tl.sum(kb * weights, axis=1)
        boffs = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
        tl.store(bits_ptr + boffs, byte.to(tl.uint8), mask=boffs * 8 < n)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def dropout_add_fwd_kernel(x_ptr, r_ptr, out_ptr, seed_ptr, stream, threshold, scale_bits, start,
                           n, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """out = residual + x * keep * scale."""
    pid = tl.program_id(0)
    offs, counters = _tile(pid, start, BLOCK)
    inb = offs < n
    scale = _scale_value(scale_bits, COMPUTE_F64)
    m, keep = _multipliers(tl.load(seed_ptr), stream, counters, threshold, scale, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(scale.dtype)
    r = tl.load(r_ptr + offs, mask=inb, other=0.0).to(scale.dtype)
    tl.store(out_ptr + offs, to_output(r + x * m, out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["scale_bits", "n"])
def dropout_bits_apply_kernel(g_ptr, bits_ptr, out_ptr, scale_bits, n, COMPUTE_F64: tl.constexpr,
                              BLOCK: tl.constexpr):
    """out = g * bit * scale: the backward of the packed-mask mode."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
    offs = rows[:, None] * 8 + tl.arange(0, 8).to(tl.int64)[None, :]
    inb = offs < n
    scale = _scale_value(scale_bits, COMPUTE_F64)
    byte = tl.load(bits_ptr + rows, mask=rows * 8 < n, other=0).to(tl.int32)
    keep = ((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(scale.dtype)
    tl.store(out_ptr + offs, to_output(g * tl.where(keep, scale, scale * 0), out_ptr.dtype.element_ty),
             mask=inb)


def grid(n):
    return (triton.cdiv(n, BLOCK),)
