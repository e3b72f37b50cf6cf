"""Triton kernel of locked (variational) dropout (docs/rng.md for the mask).

The input is viewed as (O, D, I) (D the locked dim); element i = (o, d, k) takes
mask index j = o * I + k and is kept iff word(j) >= t. Each program takes BLOCK
consecutive elements and computes word(j) per element (the D elements sharing a
j recompute it; Philox is cheap next to the memory traffic on a GPU). Offsets are
64-bit. `scale` arrives as the bits of a float64, as in kernels/triton/dropout.py.
"""

import triton
import triton.language as tl

from fastreg.kernels.triton.convert import to_output
from fastreg.kernels.triton.rng import philox_word

BLOCK = 1024


@triton.jit(do_not_specialize=["stream", "threshold", "scale_bits", "start"])
def locked_fwd_kernel(x_ptr, out_ptr, seed_ptr, stream, threshold, scale_bits, start, DI, I, n,
                      COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """out = x * keep(start + o * I + k) * scale, DI = D * I."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    j = (offs // DI) * I + offs % I + start
    w = philox_word(tl.load(seed_ptr), stream, j)
    keep = w.to(tl.uint64) >= threshold.to(tl.int64).to(tl.uint64)
    s = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    if COMPUTE_F64:
        y = x.to(tl.float64) * tl.where(keep, s, s * 0)
    else:
        s32 = s.to(tl.float32)
        y = x.to(tl.float32) * tl.where(keep, s32, s32 * 0)
    tl.store(out_ptr + offs, to_output(y, out_ptr.dtype.element_ty), mask=inb)


def grid(n):
    return (triton.cdiv(n, BLOCK),)
