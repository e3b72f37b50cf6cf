"""Philox4x32-10 and the fastreg RNG spec (docs/rng.md) for Numba kernels.

Everything is uint64 arithmetic masked to 32 bits: Numba widens small integers,
and mixing signed with unsigned would turn into floats.
"""

import math

import numba
import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_S32 = np.uint64(32)
_S9 = np.uint64(9)
TWO_PI = np.float32(2.0 * math.pi)
U_SCALE = np.float32(2.0**-23)


@numba.njit(inline="always", cache=True)
def _round(c0, c1, c2, c3, k0, k1):
    p0 = _M0 * c0
    p1 = _M1 * c2
    return (p1 >> _S32) ^ c1 ^ k0, p1 & MASK32, (p0 >> _S32) ^ c3 ^ k1, p0 & MASK32


@numba.njit(inline="always", cache=True)
def _bump(k0, k1):
    return (k0 + _W0) & MASK32, (k1 + _W1) & MASK32


@numba.njit(inline="always", cache=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123 Philox4x32 with 10 rounds; arguments and results are uint64 < 2^32.

    The rounds are written out: a counted loop here was not always unrolled and then
    kept the callers' loops from vectorising."""
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    k0, k1 = _bump(k0, k1)
    return _round(c0, c1, c2, c3, k0, k1)


@numba.njit(inline="always", cache=True)
def philox_block(seed, stream, counter):
    """The four words of counter `counter` (uint64 seed, stream, counter)."""
    return philox4x32_10(counter & MASK32, counter >> _S32, stream & MASK32, stream >> _S32,
                         seed & MASK32, seed >> _S32)


@numba.njit(inline="always", cache=True)
def uniform_from_word(w):
    return (np.float32(w >> _S9) + np.float32(0.5)) * U_SCALE


@numba.njit(inline="always", cache=True)
def box_muller(ua, ub):
    rho = np.float32(math.sqrt(np.float32(-2.0) * np.float32(math.log(ua))))
    ang = TWO_PI * ub
    return rho * np.float32(math.cos(ang)), rho * np.float32(math.sin(ang))


# Counters per parallel chunk: big enough to amortise thread scheduling, small
# enough to balance 2 to 64 cores.
CHUNK = 1 << 14


@numba.njit(parallel=True, cache=True)
def philox_words(out, seed, stream, start):
    """out[k] = word(start + k) for k < out.size (out: uint32)."""
    n = out.size
    seed = np.uint64(seed)
    stream = np.uint64(stream)
    start = np.uint64(start)
    nchunks = (n + CHUNK - 1) // CHUNK
    for ch in numba.prange(nchunks):
        lo = ch * CHUNK
        hi = min(lo + CHUNK, n)
        for k in range(lo, hi):
            i = start + np.uint64(k)
            r0, r1, r2, r3 = philox_block(seed, stream, i >> np.uint64(2))
            lane = i & np.uint64(3)
            w = r0 if lane == 0 else (r1 if lane == 1 else (r2 if lane == 2 else r3))
            out[k] = np.uint32(w)


@numba.njit(parallel=True, cache=True)
def philox_uniforms(out, seed, stream, start):
    """out[k] = u(start + k) (out: float32)."""
    n = out.size
    seed = np.uint64(seed)
    stream = np.uint64(stream)
    start = np.uint64(start)
    nchunks = (n + CHUNK - 1) // CHUNK
    for ch in numba.prange(nchunks):
        lo = ch * CHUNK
        hi = min(lo + CHUNK, n)
        for k in range(lo, hi):
            i = start + np.uint64(k)
            r0, r1, r2, r3 = philox_block(seed, stream, i >> np.uint64(2))
            lane = i & np.uint64(3)
            w = r0 if lane == 0 else (r1 if lane == 1 else (r2 if lane == 2 else r3))
            out[k] = uniform_from_word(w)


@numba.njit(parallel=True, cache=True)
def philox_normals(out, seed, stream, start):
    """out[k] = z(start + k), Box-Muller on lanes (0,1) and (2,3) (out: float32)."""
    n = out.size
    seed = np.uint64(seed)
    stream = np.uint64(stream)
    start = np.uint64(start)
    nchunks = (n + CHUNK - 1) // CHUNK
    for ch in numba.prange(nchunks):
        lo = ch * CHUNK
        hi = min(lo + CHUNK, n)
        for k in range(lo, hi):
            i = start + np.uint64(k)
            r0, r1, r2, r3 = philox_block(seed, stream, i >> np.uint64(2))
            lane = i & np.uint64(3)
            if lane < 2:
                za, zb = box_muller(uniform_from_word(r0), uniform_from_word(r1))
            else:
                za, zb = box_muller(uniform_from_word(r2), uniform_from_word(r3))
            out[k] = za if (lane & np.uint64(1)) == 0 else zb
