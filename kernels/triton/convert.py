"""Stores that round the same way on every backend, and a rounding barrier.

Triton's interpreter converts float32 to bfloat16 by truncation, while GPUs (and
torch, Numba via torch) round to nearest even. Under the interpreter `to_output`
rounds bfloat16 by hand with integer ops (RNE, NaN kept quiet) so that the CI run
checks the bits a GPU produces; compiled, it uses the hardware's RNE conversion
(one instruction for two values, where the integer form costs five per value).
Other dtypes use the ordinary conversion.
"""

import os

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_output(y, OUT_DTYPE: tl.constexpr):
    if OUT_DTYPE == tl.bfloat16 and INTERPRETED:
        y32 = y.to(tl.float32)
        b = y32.to(tl.uint32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        nan = y32 != y32
        h = tl.where(nan, (b >> 16) | 0x40, rounded)
        out = h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(OUT_DTYPE)
    return out


@triton.jit
def rounded(v, zero):
    """v itself, but opaque to the compiler: a product passed through here is rounded
    before a following add instead of being fused into one FMA (one rounding on the
    GPU against two on the CPU backends and in torch). `zero` is a runtime integer
    scalar that is always 0 but that the compiler cannot know; the xor costs one
    integer instruction per element."""
    if v.dtype == tl.float64:
        out = (v.to(tl.int64, bitcast=True) ^ zero.to(tl.int64)).to(tl.float64, bitcast=True)
    else:
        out = (v.to(tl.int32, bitcast=True) ^ zero.to(tl.int32)).to(tl.float32, bitcast=True)
    return out
