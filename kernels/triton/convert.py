"""Stores that round the same way on every backend, and a product that is never fused.

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
def mul_rn(a, b):
    """a * b rounded to the nearest even, never contracted with a following add into an
    FMA (one rounding on the GPU against two on the CPU backends and in torch). Compiled,
    it is PTX mul.rn, which the compiler may not fuse; the interpreter (numpy) never fuses,
    so there it is the plain product. float32 or float64 operands of one dtype."""
    if INTERPRETED:
        out = a * b
    elif a.dtype == tl.float64:
        out = tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b],
                                        dtype=tl.float64, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                        dtype=tl.float32, is_pure=True, pack=1)
    return out
