"""Numba CPU kernels of the dropout family (docs/rng.md for the mask).

Loop structure (it decides the speed; Philox itself is cheap): each parallel
chunk of BLOCK counters first fills a small multiplier array m[lane, counter]
(scale where kept, 0 where dropped) -- that loop is straight-line Philox with
contiguous stores, which LLVM vectorises -- then streams x through out = x * m.
m stays in L1; no full-size temporary exists. Arrays are 1-D and contiguous, float32 or
float64; element k has logical index start + k (start a multiple of 8). The
multiplier form keeps NaN/Inf behaviour identical to torch's x * mask * scale.
"""

import numba
import numpy as np

from fastreg.kernels.numba.drivers import by_size
from fastreg.kernels.numba.rng import MASK32, philox4x32_10

BLOCK = 512  # counters per chunk = 2048 elements: m is 8 KiB in float32
_S32 = np.uint64(32)
_S2 = np.uint64(2)


@numba.njit(inline="always", cache=True)
def _fill_multipliers(m, seed, stream, t, scale, c_first, count):
    """m[lane, j] = scale if word >= t else 0, for counters c_first + j, j < count.

    One row per lane keeps the stores of this loop contiguous, so LLVM vectorises
    the whole Philox (measured: 2x faster than element-ordered m[4j + lane])."""
    k0 = seed & MASK32
    k1 = seed >> _S32
    s0 = stream & MASK32
    s1 = stream >> _S32
    zero = scale - scale  # same type as scale (scale * 0 would widen to float64)
    for j in range(count):
        c = c_first + np.uint64(j)
        r0, r1, r2, r3 = philox4x32_10(c & MASK32, c >> _S32, s0, s1, k0, k1)
        m[0, j] = scale if r0 >= t else zero
        m[1, j] = scale if r1 >= t else zero
        m[2, j] = scale if r2 >= t else zero
        m[3, j] = scale if r3 >= t else zero


@numba.njit(inline="always", cache=True)
def _chunk(ch, n, start):
    """Element range [base, base+length) and first counter of chunk ch."""
    base = ch * 4 * BLOCK
    length = min(4 * BLOCK, n - base)
    c_first = (np.uint64(start) >> _S2) + np.uint64(ch * BLOCK)
    return base, length, c_first, (length + 3) // 4


# Each kernel is one chunk body (inlined) run by two drivers: `parallel` over
# chunks for large arrays, and a serial loop below SERIAL_BELOW elements, where
# waking the thread pool costs more than the work (and a busy core would stall
# the whole parallel region).
SERIAL_BELOW = 1 << 16


@numba.njit(inline="always", cache=True)
def _nchunks(n):
    return (n + 4 * BLOCK - 1) // (4 * BLOCK)


@numba.njit(inline="always", cache=True)
def _fwd_chunk(ch, x, out, seed, stream, t, scale, start):
    """out = x * m over chunk ch; returns m and the chunk's element range for callers
    that also pack the mask."""
    n = x.size
    base, length, c_first, count = _chunk(ch, n, start)
    m = np.empty((4, BLOCK), dtype=x.dtype)
    _fill_multipliers(m, seed, stream, t, scale, c_first, count)
    full = length // 4
    for j in range(full):
        e = base + 4 * j
        out[e] = x[e] * m[0, j]
        out[e + 1] = x[e + 1] * m[1, j]
        out[e + 2] = x[e + 2] * m[2, j]
        out[e + 3] = x[e + 3] * m[3, j]
    for lane in range(length - 4 * full):
        e = base + 4 * full + lane
        out[e] = x[e] * m[lane, full]
    return m, base, length


@numba.njit(inline="always", cache=True)
def _add_chunk(ch, x, residual, out, seed, stream, t, scale, start):
    n = x.size
    base, length, c_first, count = _chunk(ch, n, start)
    m = np.empty((4, BLOCK), dtype=x.dtype)
    _fill_multipliers(m, seed, stream, t, scale, c_first, count)
    full = length // 4
    for j in range(full):
        e = base + 4 * j
        out[e] = residual[e] + x[e] * m[0, j]
        out[e + 1] = residual[e + 1] + x[e + 1] * m[1, j]
        out[e + 2] = residual[e + 2] + x[e + 2] * m[2, j]
        out[e + 3] = residual[e + 3] + x[e + 3] * m[3, j]
    for lane in range(length - 4 * full):
        e = base + 4 * full + lane
        out[e] = residual[e] + x[e] * m[lane, full]


@numba.njit(inline="always", cache=True)
def _bits_chunk(ch, x, out, bits, seed, stream, t, scale, start):
    """Also packs the keep mask: bit b of bits[k] is element 8k+b. Needs p < 1
    (scale > 0), so that keep is exactly m != 0; p = 1 has t = 2^32, m = 0, bits 0."""
    m, base, length = _fwd_chunk(ch, x, out, seed, stream, t, scale, start)
    for b in range((length + 7) // 8):
        byte = 0
        for j in range(8):
            e = 8 * b + j
            if e < length and m[j & 3, 2 * b + (j >> 2)] != 0:
                byte |= 1 << j
        bits[base // 8 + b] = np.uint8(byte)


@numba.njit(inline="always", cache=True)
def _apply_chunk(ch, g, bits, out, scale):
    """out = g * bit * scale for chunk ch: one mask byte per 8 elements."""
    n = g.size
    zero = scale - scale
    base = ch * 4 * BLOCK
    length = min(4 * BLOCK, n - base)
    b0 = base // 8
    for b in range(length // 8):
        byte = bits[b0 + b]
        e = base + 8 * b
        for j in range(8):
            out[e + j] = g[e + j] * (scale if (byte >> j) & 1 else zero)
    for e in range(base + 8 * (length // 8), base + length):
        out[e] = g[e] * (scale if (bits[e >> 3] >> (e & 7)) & 1 else zero)


def _fwd_driver(x, out, seed, stream, t, scale, start):
    for ch in numba.prange(_nchunks(x.size)):
        _fwd_chunk(ch, x, out, seed, stream, t, scale, start)


def _add_driver(x, residual, out, seed, stream, t, scale, start):
    for ch in numba.prange(_nchunks(x.size)):
        _add_chunk(ch, x, residual, out, seed, stream, t, scale, start)


def _bits_driver(x, out, bits, seed, stream, t, scale, start):
    for ch in numba.prange(_nchunks(x.size)):
        _bits_chunk(ch, x, out, bits, seed, stream, t, scale, start)


def _apply_driver(g, bits, out, scale):
    for ch in numba.prange(_nchunks(g.size)):
        _apply_chunk(ch, g, bits, out, scale)


_fwd = by_size(SERIAL_BELOW)(_fwd_driver)
_add = by_size(SERIAL_BELOW)(_add_driver)
_bits = by_size(SERIAL_BELOW)(_bits_driver)
_apply = by_size(SERIAL_BELOW)(_apply_driver)


def _u64(v):
    return np.uint64(v)


def dropout_fwd(x, out, seed, stream, threshold, scale, start):
    """out = x * keep * scale. `start` (logical index of x[0]) a multiple of 8."""
    _fwd(x, out, _u64(seed), _u64(stream), _u64(threshold), scale, start)


def dropout_add_fwd(x, residual, out, seed, stream, threshold, scale, start):
    """out = residual + x * keep * scale."""
    _add(x, residual, out, _u64(seed), _u64(stream), _u64(threshold), scale, start)


def dropout_fwd_bits(x, out, bits, seed, stream, threshold, scale, start):
    """dropout_fwd that also writes the packed keep mask."""
    _bits(x, out, bits, _u64(seed), _u64(stream), _u64(threshold), scale, start)


def dropout_bits_apply(g, bits, out, scale):
    """out = g * bit * scale: the backward of the packed-mask mode."""
    _apply(g, bits, out, scale)


# ---------------------------------------------------------------- memory order (fastreg/_layout.py)
# A dense, non-overlapping input that is not contiguous (channels_last, a transpose) is walked
# in memory order: x and out are 1-D views of the memory, and element j's logical index (what
# the mask depends on) comes from its digits in `sizes`, the memory-order dims, times `lstr`,
# their logical strides. The innermost dim is a row; each element of a row draws its own
# Philox counter (its logical neighbours lie in other rows), so this costs up to four times
# the Philox work of the logical-order kernels, and no copy in or out.

@numba.njit(inline="always", cache=True)
def _row_start(r, sizes, lstr):
    """Logical index of the first element of memory row r (the rows are the inner dim)."""
    i0 = 0
    q = np.int64(r)  # a new variable: parfors refuses an update of the prange index
    for d in range(sizes.size - 2, -1, -1):
        sz = sizes[d]
        i0 += (q % sz) * lstr[d]
        q = q // sz
    return i0


@numba.njit(inline="always", cache=True)
def _word_at(i, k0, k1, s0, s1):
    c = i >> _S2
    r0, r1, r2, r3 = philox4x32_10(c & MASK32, c >> _S32, s0, s1, k0, k1)
    lane = i & np.uint64(3)
    return r0 if lane == 0 else (r1 if lane == 1 else (r2 if lane == 2 else r3))


@numba.njit(inline="always", cache=True)
def _strided_row(r, x, residual, out, seed, stream, t, scale, sizes, lstr, ADD):
    inner = sizes[sizes.size - 1]
    li = np.uint64(lstr[lstr.size - 1])
    i0 = np.uint64(_row_start(r, sizes, lstr))
    j0 = r * inner
    k0 = seed & MASK32
    k1 = seed >> _S32
    s0 = stream & MASK32
    s1 = stream >> _S32
    zero = scale - scale
    for m in range(inner):
        w = _word_at(i0 + np.uint64(m) * li, k0, k1, s0, s1)
        v = x[j0 + m] * (scale if w >= t else zero)
        if ADD:
            v = residual[j0 + m] + v
        out[j0 + m] = v


@numba.njit(inline="always", cache=True)
def _tiled_rows(g, m, x, residual, out, seed, stream, t, scale, sizes, lstr, ADD):
    """Memory rows 4g..4g+3, whose logical indices are i, i+1, i+2, i+3 at every position of
    the row with i % 4 == 0 (tile4 of fastreg._layout.memory_dims: channels_last with H*W a
    multiple of 4, ...): one Philox counter serves the four rows' elements at a position, as
    in the logical-order kernels, and the loops are theirs: multipliers m[lane, position] for
    a block of positions (the counter steps by lstr/4), then the four rows streamed. m is the
    caller's (4, BLOCK) scratch array."""
    inner = sizes[sizes.size - 1]
    li = np.uint64(lstr[lstr.size - 1])
    i0 = np.uint64(_row_start(4 * g, sizes, lstr))
    j0 = 4 * g * inner
    k0 = seed & MASK32
    k1 = seed >> _S32
    s0 = stream & MASK32
    s1 = stream >> _S32
    zero = scale - scale
    step = li >> _S2
    for b0 in range(0, inner, BLOCK):
        count = min(BLOCK, inner - b0)
        c_first = (i0 >> _S2) + np.uint64(b0) * step
        for j in range(count):
            c = c_first + np.uint64(j) * step
            r0, r1, r2, r3 = philox4x32_10(c & MASK32, c >> _S32, s0, s1, k0, k1)
            m[0, j] = scale if r0 >= t else zero
            m[1, j] = scale if r1 >= t else zero
            m[2, j] = scale if r2 >= t else zero
            m[3, j] = scale if r3 >= t else zero
        for lane in range(4):
            e = j0 + lane * inner + b0
            if ADD:
                for j in range(count):
                    out[e + j] = residual[e + j] + x[e + j] * m[lane, j]
            else:
                for j in range(count):
                    out[e + j] = x[e + j] * m[lane, j]


@numba.njit(inline="always", cache=True)
def _tiled_chunking(x, sizes):
    """(groups of four rows, groups per parallel chunk: about 4 BLOCK elements, so that the
    scratch array is allocated once per chunk, not once per group of short rows)."""
    inner = sizes[sizes.size - 1]
    groups = x.size // (4 * inner)
    per = max(1, BLOCK // inner)
    return groups, per, (groups + per - 1) // per


def _fwd_tiled_driver(x, out, seed, stream, t, scale, sizes, lstr):
    groups, per, nch = _tiled_chunking(x, sizes)
    for ch in numba.prange(nch):
        m = np.empty((4, BLOCK), dtype=x.dtype)
        for g in range(ch * per, min(groups, (ch + 1) * per)):
            _tiled_rows(g, m, x, x, out, seed, stream, t, scale, sizes, lstr, False)


def _add_tiled_driver(x, residual, out, seed, stream, t, scale, sizes, lstr):
    groups, per, nch = _tiled_chunking(x, sizes)
    for ch in numba.prange(nch):
        m = np.empty((4, BLOCK), dtype=x.dtype)
        for g in range(ch * per, min(groups, (ch + 1) * per)):
            _tiled_rows(g, m, x, residual, out, seed, stream, t, scale, sizes, lstr, True)


def _fwd_strided_driver(x, out, seed, stream, t, scale, sizes, lstr):
    rows = x.size // sizes[sizes.size - 1]
    for r in numba.prange(rows):
        _strided_row(r, x, x, out, seed, stream, t, scale, sizes, lstr, False)


def _add_strided_driver(x, residual, out, seed, stream, t, scale, sizes, lstr):
    rows = x.size // sizes[sizes.size - 1]
    for r in numba.prange(rows):
        _strided_row(r, x, residual, out, seed, stream, t, scale, sizes, lstr, True)


_fwd_strided = by_size(SERIAL_BELOW)(_fwd_strided_driver)
_add_strided = by_size(SERIAL_BELOW)(_add_strided_driver)
_fwd_tiled = by_size(SERIAL_BELOW)(_fwd_tiled_driver)
_add_tiled = by_size(SERIAL_BELOW)(_add_tiled_driver)


def dropout_fwd_strided(x, out, seed, stream, threshold, scale, sizes, lstr, tile4):
    """dropout_fwd over memory-order views x, out (out laid out as x): the mask of each element
    at its logical index (sizes, lstr, tile4: fastreg._layout.memory_dims)."""
    (_fwd_tiled if tile4 else _fwd_strided)(x, out, _u64(seed), _u64(stream), _u64(threshold),
                                            scale, sizes, lstr)


def dropout_add_fwd_strided(x, residual, out, seed, stream, threshold, scale, sizes, lstr,
                            tile4):
    """dropout_add_fwd over memory-order views (residual laid out as x)."""
    (_add_tiled if tile4 else _add_strided)(x, residual, out, _u64(seed), _u64(stream),
                                            _u64(threshold), scale, sizes, lstr)


# ---------------------------------------------------------------- packed masks of memory-order calls
@numba.njit(inline="always", cache=True)
def _keep_bytes_chunk(ch, bits, nbits, seed, stream, t):
    """bits[k] for the bytes of chunk ch (BLOCK // 2 bytes: two counters each): bit b of byte
    k is keep(8k + b); bits past nbits are 0."""
    k0 = seed & MASK32
    k1 = seed >> _S32
    s0 = stream & MASK32
    s1 = stream >> _S32
    b_first = ch * (BLOCK // 2)
    count = min(BLOCK // 2, bits.size - b_first)
    for j in range(count):
        k = b_first + j
        c = np.uint64(2 * k)
        r0, r1, r2, r3 = philox4x32_10(c & MASK32, c >> _S32, s0, s1, k0, k1)
        c = c + np.uint64(1)
        q0, q1, q2, q3 = philox4x32_10(c & MASK32, c >> _S32, s0, s1, k0, k1)
        byte = ((r0 >= t) * 1 | (r1 >= t) * 2 | (r2 >= t) * 4 | (r3 >= t) * 8
                | (q0 >= t) * 16 | (q1 >= t) * 32 | (q2 >= t) * 64 | (q3 >= t) * 128)
        valid = nbits - 8 * k  # bits past nbits stay 0
        if valid < 8:
            byte &= (1 << max(valid, 0)) - 1
        bits[k] = np.uint8(byte)


def _keep_bits_driver(bits, nbits, seed, stream, t):
    for ch in numba.prange((bits.size + BLOCK // 2 - 1) // (BLOCK // 2)):
        _keep_bytes_chunk(ch, bits, nbits, seed, stream, t)


def _apply_strided_driver(g, bits, out, scale, sizes, lstr):
    inner = sizes[sizes.size - 1]
    li = lstr[lstr.size - 1]
    zero = scale - scale
    for r in numba.prange(g.size // inner):
        i0 = _row_start(r, sizes, lstr)
        j0 = r * inner
        for m in range(inner):
            i = i0 + m * li
            out[j0 + m] = g[j0 + m] * (scale if (bits[i >> 3] >> (i & 7)) & 1 else zero)


_keep_bits = by_size(SERIAL_BELOW // 8)(_keep_bits_driver)
_apply_strided = by_size(SERIAL_BELOW)(_apply_strided_driver)


def dropout_keep_bits(bits, n, seed, stream, threshold):
    """The packed keep mask of n elements alone (bits: (n + 7) // 8 bytes), in logical order:
    the mask of a memory-order forward (dropout_fwd_strided writes the values)."""
    _keep_bits(bits, n, _u64(seed), _u64(stream), _u64(threshold))


def dropout_bits_apply_strided(g, bits, out, scale, sizes, lstr):
    """dropout_bits_apply over memory-order views g, out (the bits in logical order; sizes,
    lstr: fastreg._layout.memory_dims)."""
    _apply_strided(g, bits, out, scale, sizes, lstr)
