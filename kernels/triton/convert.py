"""Stores that round the same way on every backend.

Triton's interpreter converts float32 to bfloat16 by truncation, while GPUs (and
torch, Numba via torch) round to nearest even. `to_output` rounds bfloat16 by
hand with integer ops (RNE, NaN kept quiet) so the interpreter run in CI checks
the bits a GPU produces. Other dtypes use the ordinary conversion.
"""

import triton
import triton.language as tl


@triton.jit
def to_output(y, OUT_DTYPE: tl.constexpr):
    if OUT_DTYPE == tl.bfloat16:
        y32 = y.to(tl.float32)
        b = y32.to(tl.uint32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        nan = y32 != y32
        h = tl.where(nan, (b >> 16) | 0x40, rounded)
        return h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(OUT_DTYPE)
