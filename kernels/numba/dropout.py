"""Numba CPU kernels of the dropout family (docs/rng.md for the mask).

Loop structure (it decides the speed; Philox itself is cheap): each parallel
chunk of BLOCK counters first fills a small multiplier array m (scale where kept,
0 where dropped; 4 elements per counter) -- that loop is straight-line Philox
and LLVM vectorises it -- then streams x through out = x * m. m stays in L1;
no full-size temporary exists. Arrays are 1-D and contiguous, float32 or
float64; element k has logical index start + k (start a multiple of 8). The
multiplier form keeps NaN/Inf behaviour identical to torch's x * mask * scale.
"""

import numba
import numpy as np

from fastreg.kernels.numba.rng import MASK32, philox4x32_10

BLOCK = 512  # counters per chunk = 2048 elements: m is 8 KiB in float32
_S32 = np.uint64(32)
_S2 = np.uint64(2)


@numba.njit(inline="always", cache=True)
def _fill_multipliers(m, seed, stream, t, scale, c_first, count):
    """m[4j + lane] = scale if word >= t else 0, for counters c_first .. c_first+count-1."""
    k0 = seed & MASK32
    k1 = seed >> _S32
    s0 = stream & MASK32
    s1 = stream >> _S32
    zero = scale - scale  # same type as scale (scale * 0 would widen to float64)
    for j in range(count):
        c = c_first + np.uint64(j)
        r0, r1, r2, r3 = philox4x32_10(c & MASK32, c >> _S32, s0, s1, k0, k1)
        m[4 * j] = scale if r0 >= t else zero
        m[4 * j + 1] = scale if r1 >= t else zero
        m[4 * j + 2] = scale if r2 >= t else zero
        m[4 * j + 3] = scale if r3 >= t else zero


@numba.njit(inline="always", cache=True)
def _chunk(ch, n, start):
    """Element range [base, base+length) and first counter of chunk ch."""
    base = ch * 4 * BLOCK
    length = min(4 * BLOCK, n - base)
    c_first = (np.uint64(start) >> _S2) + np.uint64(ch * BLOCK)
    return base, length, c_first, (length + 3) // 4


@numba.njit(parallel=True, cache=True)
def dropout_fwd(x, out, seed, stream, threshold, scale, start):
    """out = x * keep * scale."""
    n = x.size
    seed, stream, t = np.uint64(seed), np.uint64(stream), np.uint64(threshold)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base, length, c_first, count = _chunk(ch, n, start)
        m = np.empty(4 * BLOCK, dtype=x.dtype)
        _fill_multipliers(m, seed, stream, t, scale, c_first, count)
        for e in range(length):
            out[base + e] = x[base + e] * m[e]


@numba.njit(parallel=True, cache=True)
def dropout_add_fwd(x, residual, out, seed, stream, threshold, scale, start):
    """out = residual + x * keep * scale."""
    n = x.size
    seed, stream, t = np.uint64(seed), np.uint64(stream), np.uint64(threshold)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base, length, c_first, count = _chunk(ch, n, start)
        m = np.empty(4 * BLOCK, dtype=x.dtype)
        _fill_multipliers(m, seed, stream, t, scale, c_first, count)
        for e in range(length):
            out[base + e] = residual[base + e] + x[base + e] * m[e]


@numba.njit(parallel=True, cache=True)
def dropout_fwd_bits(x, out, bits, seed, stream, threshold, scale, start):
    """dropout_fwd that also packs the keep mask: bit b of bits[k] is element 8k+b.
    Needs p < 1 (scale > 0), so that keep is exactly m != 0."""
    n = x.size
    seed, stream, t = np.uint64(seed), np.uint64(stream), np.uint64(threshold)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base, length, c_first, count = _chunk(ch, n, start)
        m = np.empty(4 * BLOCK, dtype=x.dtype)
        _fill_multipliers(m, seed, stream, t, scale, c_first, count)
        for e in range(length):
            out[base + e] = x[base + e] * m[e]
        for b in range((length + 7) // 8):
            byte = 0
            for j in range(8):
                e = 8 * b + j
                if e < length and m[e] != 0:
                    byte |= 1 << j
            bits[base // 8 + b] = np.uint8(byte)


@numba.njit(parallel=True, cache=True)
def dropout_bits_apply(g, bits, out, scale):
    """out = g * bit * scale: the backward of the packed-mask mode."""
    n = g.size
    zero = scale - scale  # same type as scale (scale * 0 would widen to float64)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base = ch * 4 * BLOCK
        length = min(4 * BLOCK, n - base)
        for e in range(length):
            i = base + e
            out[i] = g[i] * (scale if (bits[i >> 3] >> (i & 7)) & 1 else zero)
