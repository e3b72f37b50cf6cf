"""Numba CPU kernel of locked (variational) dropout (docs/rng.md for the mask).

The input is viewed as (O, D, I): D is the locked dim, O the product of the dims
before it, I of the dims after. The mask has O * I entries; element (o, d, k)
takes mask index j = o * I + k (the logical row-major index of the input with
the locked dim removed) and is kept iff word(j) >= t.

Loop structure: a parallel task covers a block of mask indices [jlo, jhi) --
either OB whole rows o (when I is short) or one piece of KC entries of a row
(when I is long) -- fills their multipliers (scale or 0) in a small array with
the vectorised Philox of kernels/numba/noise.py, then streams the D slices of the
input that use them. No full-size temporary exists; backward is the same kernel
on the gradient (the op is linear), so nothing is saved per element.
"""

import numba
import numpy as np

from fastreg.kernels.numba.drivers import by_size
from fastreg.kernels.numba.noise import SERIAL_BELOW, _keys, address_as_ptr, philox_unrolled

TARGET = 2048  # mask entries per task
_S2 = np.uint64(2)


@numba.njit(cache=True)
def fill_keep(m, jlo, length, k0, k1, s0, s1, t, scale):
    """m[e + off] = scale if word(jlo + e) >= t else 0 for e < length; returns off (= jlo & 3).

    m needs length + 8 entries: whole counters are written, from counter jlo >> 2."""
    c_first = np.uint64(jlo) >> _S2
    count = (jlo - 4 * (jlo >> 2) + length + 3) // 4
    zero = scale - scale
    for j in range(count):
        r0, r1, r2, r3 = philox_unrolled(k0, k1, s0, s1, c_first + np.uint64(j))
        m[4 * j] = scale if r0 >= t else zero
        m[4 * j + 1] = scale if r1 >= t else zero
        m[4 * j + 2] = scale if r2 >= t else zero
        m[4 * j + 3] = scale if r3 >= t else zero
    return jlo - 4 * (jlo >> 2)


@numba.njit(inline="always", cache=True)
def _apply(dst, src, m):
    # slices: indices provably >= 0, so LLVM vectorises (a[base + k] would not)
    for k in range(dst.size):
        dst[k] = src[k] * m[k]


@by_size(SERIAL_BELOW)
def locked_fwd(x, out, O, D, I, seed, stream, threshold, scale, start):
    """out[o, d, k] = x[o, d, k] * keep(start + o * I + k) * scale (x, out flat, contiguous).

    start: added to every mask index (tests reach indices past 2^32; the op passes 0)."""
    k0, k1, s0, s1 = _keys(seed, stream)
    t = np.uint64(threshold)
    if I >= TARGET:
        ob, kc = 1, TARGET
    else:
        ob, kc = max(1, TARGET // max(I, 1)), I
    nob = (O + ob - 1) // ob
    nkc = (I + kc - 1) // kc if I > 0 else 0
    for task in numba.prange(nob * nkc):
        bo = task // nkc
        bk = task - bo * nkc
        o0 = bo * ob
        o1 = min(o0 + ob, O)
        klo = bk * kc
        klen = min(kc, I - klo)
        m = np.empty(ob * kc + 8, dtype=x.dtype)
        jlo = start + o0 * I + klo
        length = (o1 - o0 - 1) * I + klen  # contiguous j range: one row piece, or whole rows
        off = fill_keep(m, jlo, length, k0, k1, s0, s1, t, scale)
        for o in range(o0, o1):
            mo = off + (o - o0) * I
            mm = m[mo:mo + klen]
            for d in range(D):
                base = (o * D + d) * I + klo
                _apply(out[base:base + klen], x[base:base + klen], mm)


_locked_fwd_serial = locked_fwd.serial


@numba.njit(cache=True)
def locked_fwd_at(xp, op, n, O, D, I, seed, stream, threshold, scale):
    """locked_fwd.serial on the n = O * D * I elements at addresses xp (input) and op (output),
    of scale's dtype (kernels/numba/noise.address_as_ptr; the lean eager path)."""
    _locked_fwd_serial(numba.carray(address_as_ptr(xp, scale), (n,)),
                       numba.carray(address_as_ptr(op, scale), (n,)), O, D, I, seed, stream,
                       threshold, scale, 0)
