"""Triton kernels of the dropout family (docs/rng.md for the mask).

Each program takes BLOCK consecutive elements. One Philox call gives the words of
four consecutive elements (rng.block_words), laid out so that a thread's VEC
elements (16 bytes of data: VEC = 4 for 32-bit, 8 for 16-bit dtypes) come from its
own Philox calls. Full blocks load and store without a mask, hence 128-bit wide;
only the one partial block at the end masks per element (`n` is a runtime value:
a mask `offs < n` on every block would keep every access scalar). The mask is a
function of the logical index only, whatever BLOCK, VEC or the grid.

Index arithmetic: the block's first element is a 64-bit scalar; per-element
offsets within a block are 32-bit. The multiplier m = scale where kept, 0 where
dropped keeps NaN/Inf behaviour identical to torch's x * mask * scale. `scale`
arrives as the bits of a float64 (Triton would type a Python float as float32)
and is rounded to the compute dtype here, as the other backends do.
"""

import triton
import triton.language as tl

from fastreg.kernels.triton.convert import mul_rn, to_output
from fastreg.kernels.triton.rng import block_words, philox_block

BLOCK = 2048  # 16 elements per thread at Triton's default 4 warps: set-up amortised


def vec_for(dtype) -> int:
    """Elements per thread per 16-byte access (torch dtype)."""
    return 8 if dtype.itemsize == 2 else 4


@triton.jit
def _scale_value(scale_bits, COMPUTE_F64: tl.constexpr):
    s = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if not COMPUTE_F64:
        s = s.to(tl.float32)
    return s  # one return: the compiler types every return of a jit function alike


@triton.jit
def _keep(seed_ptr, stream, threshold, cbase, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """keep(i) = word(i) >= t for the block's elements. t <= 2^32 - 1 compares in 32
    bits; t = 2^32 (p = 1) keeps nothing."""
    t = threshold.to(tl.int64)
    w = block_words(tl.load(seed_ptr), stream, cbase, BLOCK, VEC)
    return (w >= tl.minimum(t, 0xFFFFFFFF).to(tl.uint32)) & (t <= 0xFFFFFFFF)


@triton.jit
def _keep_bytes(seed_ptr, stream, threshold, cbase, BLOCK: tl.constexpr):
    """keep as a 1-D tile (8 elements per thread, VEC 8) and the packed bytes, built from
    the words of each thread's two counters without a reshape (which goes through shared
    memory)."""
    t = threshold.to(tl.int64)
    t32 = tl.minimum(t, 0xFFFFFFFF).to(tl.uint32)
    ok = t <= 0xFFFFFFFF
    seed = tl.load(seed_ptr)
    c = cbase + (tl.arange(0, BLOCK // 8) * 2).to(tl.int64)
    a0, a1, a2, a3 = philox_block(seed, stream, c)
    b0, b1, b2, b3 = philox_block(seed, stream, c + 1)
    ka0 = (a0 >= t32) & ok
    ka1 = (a1 >= t32) & ok
    ka2 = (a2 >= t32) & ok
    ka3 = (a3 >= t32) & ok
    kb0 = (b0 >= t32) & ok
    kb1 = (b1 >= t32) & ok
    kb2 = (b2 >= t32) & ok
    kb3 = (b3 >= t32) & ok
    keep = tl.reshape(tl.join(tl.join(tl.join(ka0, kb0), tl.join(ka2, kb2)),
                              tl.join(tl.join(ka1, kb1), tl.join(ka3, kb3))), (BLOCK, ))
    byte = (ka0.to(tl.int32) | (ka1.to(tl.int32) << 1) | (ka2.to(tl.int32) << 2)
            | (ka3.to(tl.int32) << 3) | (kb0.to(tl.int32) << 4) | (kb1.to(tl.int32) << 5)
            | (kb2.to(tl.int32) << 6) | (kb3.to(tl.int32) << 7))
    return keep, byte


@triton.jit
def _store_bytes(bits_ptr, byte, base, rem, BLOCK: tl.constexpr, FULL: tl.constexpr):
    bo = tl.arange(0, BLOCK // 8)
    ptr = bits_ptr + base // 8 + bo
    if FULL:
        tl.store(ptr, byte.to(tl.uint8))
    else:
        # bits past n stay 0: keep the low max(0, min(8, rem - 8k)) bits of byte k
        valid = tl.minimum(tl.maximum(rem - bo * 8, 0), 8).to(tl.int32)
        tl.store(ptr, (byte & ((1 << valid) - 1)).to(tl.uint8), mask=bo * 8 < rem)


@triton.jit
def _store_bits(bits_ptr, keep, base, rem, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Byte k of the block = its elements 8k..8k+7 (bit b = element 8k + b)."""
    kb = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8))
    byte = tl.sum(kb << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)
    bo = tl.arange(0, BLOCK // 8)
    ptr = bits_ptr + base // 8 + bo
    if FULL:
        tl.store(ptr, byte)
    else:
        tl.store(ptr, byte, mask=bo * 8 < rem)


# Every runtime integer: never specialised (an int equal to 1 would become a
# constexpr, a multiple of 16 a separate compile) nor recompiled per value.
_RUNTIME_INTS = ["stream", "threshold", "scale_bits", "start", "n"]


@triton.jit
def _load(ptr, offs, rem, FULL: tl.constexpr):
    if FULL:
        v = tl.load(ptr + offs)
    else:
        v = tl.load(ptr + offs, mask=offs < rem, other=0.0)
    return v


@triton.jit
def _store(ptr, offs, v, rem, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, v)
    else:
        tl.store(ptr + offs, v, mask=offs < rem)


# A kernel runs its block body in one of two instances: FULL (no masks, 128-bit
# access) or the partial last block. Everything, Philox included, is computed inside
# the instance, so that each has one register layout and no conversions between.

@triton.jit
def _fwd_block(x_ptr, out_ptr, bits_ptr, seed_ptr, stream, threshold, scale, start, base, rem,
               WITH_BITS: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
               FULL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if WITH_BITS and VEC == 8:
        keep, byte = _keep_bytes(seed_ptr, stream, threshold, (start + base) // 4, BLOCK)
    else:
        keep = _keep(seed_ptr, stream, threshold, (start + base) // 4, BLOCK, VEC)
    x = _load(x_ptr + base, offs, rem, FULL)
    y = x.to(scale.dtype) * tl.where(keep, scale, scale * 0)
    _store(out_ptr + base, offs, to_output(y, out_ptr.dtype.element_ty), rem, FULL)
    if WITH_BITS and VEC == 8:
        _store_bytes(bits_ptr, byte, base, rem, BLOCK, FULL)
    elif WITH_BITS:
        # 4 elements per thread: a byte spans two threads (packed through a reshape)
        if not FULL:
            keep = keep & (offs < rem)  # bits past n stay 0
        _store_bits(bits_ptr, keep, base, rem, BLOCK, FULL)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def dropout_fwd_kernel(x_ptr, out_ptr, bits_ptr, seed_ptr, stream, threshold, scale_bits, start, n,
                       WITH_BITS: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr,
                       VEC: tl.constexpr = 4):
    """out = x * keep * scale; with WITH_BITS also the packed mask (start % 8 == 0)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    scale = _scale_value(scale_bits, COMPUTE_F64)
    if base + BLOCK <= n:
        _fwd_block(x_ptr, out_ptr, bits_ptr, seed_ptr, stream, threshold, scale, start, base, BLOCK,
                   WITH_BITS, VEC, BLOCK, True)
    else:
        _fwd_block(x_ptr, out_ptr, bits_ptr, seed_ptr, stream, threshold, scale, start, base,
                   n - base, WITH_BITS, VEC, BLOCK, False)


@triton.jit
def _add_block(x_ptr, r_ptr, out_ptr, seed_ptr, stream, threshold, scale, start, base, rem,
               VEC: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    keep = _keep(seed_ptr, stream, threshold, (start + base) // 4, BLOCK, VEC)
    offs = tl.arange(0, BLOCK)
    x = _load(x_ptr + base, offs, rem, FULL).to(scale.dtype)
    r = _load(r_ptr + base, offs, rem, FULL).to(scale.dtype)
    y = r + mul_rn(x, tl.where(keep, scale, scale * 0))
    _store(out_ptr + base, offs, to_output(y, out_ptr.dtype.element_ty), rem, FULL)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def dropout_add_fwd_kernel(x_ptr, r_ptr, out_ptr, seed_ptr, stream, threshold, scale_bits, start,
                           n, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr = 4):
    """out = residual + x * keep * scale, the product rounded before the add (as on the
    CPU: an FMA would round once and differ in the last bit)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    scale = _scale_value(scale_bits, COMPUTE_F64)
    if base + BLOCK <= n:
        _add_block(x_ptr, r_ptr, out_ptr, seed_ptr, stream, threshold, scale, start, base, BLOCK,
                   VEC, BLOCK, True)
    else:
        _add_block(x_ptr, r_ptr, out_ptr, seed_ptr, stream, threshold, scale, start, base,
                   n - base, VEC, BLOCK, False)


@triton.jit
def _bits_apply_block(g_ptr, bits_ptr, out_ptr, scale, base, rem, BLOCK: tl.constexpr,
                      FULL: tl.constexpr):
    bo = tl.arange(0, BLOCK // 8)
    if FULL:
        byte = tl.load(bits_ptr + base // 8 + bo)
    else:
        byte = tl.load(bits_ptr + base // 8 + bo, mask=bo * 8 < rem, other=0)
    keep = tl.reshape(((byte.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0,
                      (BLOCK, ))
    offs = tl.arange(0, BLOCK)
    g = _load(g_ptr + base, offs, rem, FULL).to(scale.dtype)
    y = g * tl.where(keep, scale, scale * 0)
    _store(out_ptr + base, offs, to_output(y, out_ptr.dtype.element_ty), rem, FULL)


@triton.jit(do_not_specialize=["scale_bits", "n"])
def dropout_bits_apply_kernel(g_ptr, bits_ptr, out_ptr, scale_bits, n, COMPUTE_F64: tl.constexpr,
                              BLOCK: tl.constexpr):
    """out = g * bit * scale: the backward of the packed-mask mode."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    scale = _scale_value(scale_bits, COMPUTE_F64)
    if base + BLOCK <= n:
        _bits_apply_block(g_ptr, bits_ptr, out_ptr, scale, base, BLOCK, BLOCK, True)
    else:
        _bits_apply_block(g_ptr, bits_ptr, out_ptr, scale, base, n - base, BLOCK, False)


def grid(n):
    return (triton.cdiv(n, BLOCK),)
