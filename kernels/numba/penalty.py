"""Multi-tensor penalty kernels for CPU tensors (docs/penalty.md).

One call handles every tensor of one storage dtype: the tensors are described by a
table of raw addresses (no concatenation, no copies) and the work by a flat list
of items, and one `numba.prange` runs over the items. An item is

* a flat element range [lo, hi) of a tensor without group lasso, or
* a range of groups [lo, hi) of a tensor viewed as (A, B, C) whose groups are the
  B slices (rows/filters: A = 1; cols/channels: A = size(0)); the item computes its
  groups' norms and then updates the same elements, which are still in cache, so
  each weight comes from memory once, or
* a flat range of a tensor with an explicit group index, whose per-group scale was
  computed first by `explicit_norms` (one parallel call over those tensors).

Tensor table columns (int64): see the T_* constants. Half-precision storage is
passed as uint16 (float16) or int16 (bfloat16) and converted with exact bit
arithmetic (round to nearest even on store); arithmetic is float32 for half and
float32 storage and float64 for float64 storage.

Reductions use fastmath={"reassoc"} only: it allows LLVM to reorder the sums (and so to
vectorise them) without assuming away NaN/Inf (no nnan/ninf). In practice these loops stayed
scalar on the 2-core EPYC, so float32/float64 take the C++ host kernels there
(fastreg.ops.penalty.HOST_HOT_PATH; docs/penalty.md); these kernels serve half precision,
explicit index groups and machines without the native build or AVX-512.
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

# tensor table columns
T_W, T_G, T_A, T_B, T_C, T_MODE, T_INIT, T_IDX, T_SOFF, T_NG = range(10)
NCOLS = 10
# modes
M_FLAT, M_BLOCK, M_EXPLICIT = 0, 1, 2
# coefficient columns: l1, l2, group weight (group_lasso * sqrt(|g|) for blocks, group_lasso
# for explicit groups)
FM = {"reassoc"}
SUB = 1024  # elements per compute-type partial sum


# ------------------------------------------------------------------ raw memory
@intrinsic
def _ptr(typingctx, addr, proto):
    """A CPointer(proto.dtype) from an integer address."""
    ptrty = types.CPointer(proto.dtype)
    sig = ptrty(addr, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return sig, codegen


@intrinsic
def _f32_from_bits(typingctx, x):
    sig = types.float32(x)

    def codegen(context, builder, signature, args):
        v = builder.trunc(args[0], ir.IntType(32)) if args[0].type.width > 32 else args[0]
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@numba.njit(cache=True)
def view(addr, n, proto):
    return numba.carray(_ptr(addr, proto), n)


# ------------------------------------------------------------------ half <-> float32
@numba.njit(cache=True)
def half_to_f32(h):
    h = np.uint32(h) & np.uint32(0xFFFF)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:
        v = np.float32(m) * np.float32(5.960464477539063e-08)  # m * 2^-24, exact
        return -v if sign else v
    if e == 31:
        return _f32_from_bits(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    return _f32_from_bits(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))


@numba.njit(cache=True)
def f32_to_half(f):
    """Round to nearest even (F. Giesen's float_to_half_fast3_rtne)."""
    x = _bits_from_f32(f)
    sign = x & np.uint32(0x80000000)
    x = x ^ sign
    if x >= np.uint32(0x47800000):  # >= 2^16 (after rounding: inf), inf or nan
        o = np.uint32(0x7E00) if x > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif x < np.uint32(0x38800000):  # below 2^-14: subnormal or zero
        magic = np.uint32(0x3F000000)  # ((127 - 15) + (23 - 10) + 1) << 23
        o = _bits_from_f32(_f32_from_bits(x) + _f32_from_bits(magic)) - magic
    else:
        odd = (x >> np.uint32(13)) & np.uint32(1)
        x = x + np.uint32(0xC8000FFF) + odd  # ((15 - 127) << 23) + 0xfff, mod 2^32
        o = x >> np.uint32(13)
    return np.uint16((o | (sign >> np.uint32(16))) & np.uint32(0xFFFF))


@numba.njit(cache=True)
def bf16_to_f32(h):
    return _f32_from_bits((np.uint32(h) & np.uint32(0xFFFF)) << np.uint32(16))


@numba.njit(cache=True)
def f32_to_bf16(f):
    x = _bits_from_f32(f)
    if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((x >> np.uint32(16)) | np.uint32(0x40))  # quiet NaN
    x = x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))
    return np.uint16(x >> np.uint32(16))


def ld(a, i):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


def st(a, i, v):  # pragma: no cover
    raise NotImplementedError


@overload(ld)
def _ld(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: half_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: bf16_to_f32(np.uint16(a[i]))
    return lambda a, i: a[i]


@overload(st)
def _st(a, i, v):
    if a.dtype == types.uint16:
        def f(a, i, v):
            a[i] = f32_to_half(np.float32(v))
        return f
    if a.dtype == types.int16:
        def f(a, i, v):
            a[i] = np.int16(f32_to_bf16(np.float32(v)))
        return f

    def f(a, i, v):
        a[i] = v
    return f


# ------------------------------------------------------------------ element maths
@numba.njit(cache=True)
def sgn(w):
    """sign(w) with sign(0) = 0 and sign(NaN) = NaN, in w's type."""
    return np.sign(w)


@numba.njit(cache=True)
def soft(w, tau):
    """Soft-thresholding sign(w) max(|w| - tau, 0) (tau finite); NaN stays NaN (sign(NaN) = NaN)."""
    return np.sign(w) * max(abs(w) - tau, tau - tau)


# ------------------------------------------------------------------ accumulate
@numba.njit(parallel=True, cache=True, fastmath=FM)
def accumulate(tab, coefs, items, scales, proto, vals):
    """grad += l1 sign(w) + 2 l2 w + group term; vals[item] = the item's penalty (float64)."""
    for k in numba.prange(items.shape[0]):
        t = items[k, 0]
        lo = items[k, 1]
        hi = items[k, 2]
        A = tab[t, T_A]
        B = tab[t, T_B]
        C = tab[t, T_C]
        n = A * B * C
        W = view(tab[t, T_W], n, proto)
        G = view(tab[t, T_G], n, proto)
        init = tab[t, T_INIT] != 0
        mode = tab[t, T_MODE]
        l1 = coefs[t, 0]
        zero = l1 - l1
        l2x2 = coefs[t, 1] + coefs[t, 1]
        gw = coefs[t, 2]
        s1 = 0.0
        s2 = 0.0
        sg = 0.0
        if mode == M_BLOCK:
            nb = hi - lo
            sc = np.zeros(nb, coefs.dtype)
            sums = np.zeros(nb, np.float64)
            if C == 1:  # 2-D "cols": the groups run along the contiguous dimension
                for a in range(A):
                    base = a * B
                    for b in range(lo, hi):
                        w = ld(W, base + b)
                        sums[b - lo] += np.float64(w * w)
            else:
                for a in range(A):
                    for b in range(lo, hi):
                        base = (a * B + b) * C
                        s = zero
                        for c in range(C):
                            w = ld(W, base + c)
                            s += w * w
                        sums[b - lo] += np.float64(s)
            for j in range(nb):
                nrm = math.sqrt(sums[j])
                sg += nrm
                sc[j] = gw / nrm if nrm > 0 else (0 if nrm == 0 else nrm)
            sg *= np.float64(gw)
            if C == 1:
                for a in range(A):
                    base = a * B
                    p1 = zero
                    p2 = zero
                    for b in range(lo, hi):
                        i = base + b
                        w = ld(W, i)
                        g = zero if init else ld(G, i)
                        st(G, i, g + (l1 * sgn(w) + (l2x2 + sc[b - lo]) * w))
                        p1 += abs(w)
                        p2 += w * w
                    s1 += np.float64(p1)
                    s2 += np.float64(p2)
            for a in range(A if C != 1 else 0):
                for b in range(lo, hi):
                    base = (a * B + b) * C
                    f = sc[b - lo]
                    p1 = zero
                    p2 = zero
                    if init:
                        for c in range(C):
                            i = base + c
                            w = ld(W, i)
                            st(G, i, l1 * sgn(w) + (l2x2 + f) * w)
                            p1 += abs(w)
                            p2 += w * w
                    else:
                        for c in range(C):
                            i = base + c
                            w = ld(W, i)
                            st(G, i, ld(G, i) + (l1 * sgn(w) + (l2x2 + f) * w))
                            p1 += abs(w)
                            p2 += w * w
                    s1 += np.float64(p1)
                    s2 += np.float64(p2)
        elif mode == M_EXPLICIT:
            idx = view(tab[t, T_IDX], n, np.empty(0, np.int64))
            soff = tab[t, T_SOFF]
            for b0 in range(lo, hi, SUB):
                p1 = zero
                p2 = zero
                for i in range(b0, min(b0 + SUB, hi)):
                    w = ld(W, i)
                    g = zero if init else ld(G, i)
                    f = scales[soff + idx[i]]
                    st(G, i, g + (l1 * sgn(w) + (l2x2 + f) * w))
                    p1 += abs(w)
                    p2 += w * w
                s1 += np.float64(p1)
                s2 += np.float64(p2)
        else:
            # partial sums in the compute type over SUB elements (vectorised), then float64
            for b0 in range(lo, hi, SUB):
                b1 = min(b0 + SUB, hi)
                p1 = zero
                p2 = zero
                if init:
                    for i in range(b0, b1):
                        w = ld(W, i)
                        st(G, i, l1 * sgn(w) + l2x2 * w)
                        p1 += abs(w)
                        p2 += w * w
                else:
                    for i in range(b0, b1):
                        w = ld(W, i)
                        st(G, i, ld(G, i) + (l1 * sgn(w) + l2x2 * w))
                        p1 += abs(w)
                        p2 += w * w
                s1 += np.float64(p1)
                s2 += np.float64(p2)
        vals[k] = np.float64(l1) * s1 + np.float64(coefs[t, 1]) * s2 + sg


@numba.njit(parallel=True, cache=True, fastmath=FM)
def explicit_norms(tab, coefs, which, scales, proto, gvals, prox_tau, prox):
    """For each explicit-group tensor tab[which[j]]: per-group norms -> scales.

    accumulate (prox = False): scales[g] = gl sqrt(|g|) / ||w_g|| (0 at ||w_g|| = 0) and
    gvals[j] = sum_g gl sqrt(|g|) ||w_g||.
    prox (prox = True): norms of soft(w, prox_tau[j]); scales[g] = the shrink factor
    max(0, 1 - tau_g / ||z_g||) with tau_g = gw sqrt(|g|) (gw already holds lr * group_lasso).
    """
    for j in numba.prange(which.shape[0]):
        t = which[j]
        n = tab[t, T_A] * tab[t, T_B] * tab[t, T_C]
        W = view(tab[t, T_W], n, proto)
        idx = view(tab[t, T_IDX], n, np.empty(0, np.int64))
        soff = tab[t, T_SOFF]
        ng = tab[t, T_NG]
        sums = np.zeros(ng, np.float64)
        cnt = np.zeros(ng, np.int64)
        tau = prox_tau[j]
        for i in range(n):
            w = ld(W, i)
            if prox:
                w = soft(w, tau)
            sums[idx[i]] += np.float64(w * w)
            cnt[idx[i]] += 1
        gl = np.float64(coefs[t, 2])
        v = 0.0
        for g in range(ng):
            nrm = math.sqrt(sums[g])
            tg = gl * math.sqrt(np.float64(cnt[g]))
            if prox:
                f = 1.0 - tg / nrm if nrm > 0 else 0.0
                if nrm != nrm:
                    f = nrm
                scales[soff + g] = max(f, 0.0) if f == f else f
            else:
                v += tg * nrm
                if nrm > 0:
                    scales[soff + g] = tg / nrm
                elif nrm == 0:
                    scales[soff + g] = 0.0
                else:
                    scales[soff + g] = nrm
        gvals[j] = v


# ------------------------------------------------------------------ prox
@numba.njit(parallel=True, cache=True, fastmath=FM)
def prox(tab, coefs, items, scales, proto):
    """w <- GS(soft(w, tau1), tau_g) * inv, in place.

    coefs columns: tau1 = lr * l1, inv = 1 / (1 + 2 lr l2), tau_g = lr * group_lasso * sqrt(|g|)
    (blocks) or lr * group_lasso (explicit: the factor comes from `scales`).
    """
    for k in numba.prange(items.shape[0]):
        t = items[k, 0]
        lo = items[k, 1]
        hi = items[k, 2]
        A = tab[t, T_A]
        B = tab[t, T_B]
        C = tab[t, T_C]
        n = A * B * C
        W = view(tab[t, T_W], n, proto)
        mode = tab[t, T_MODE]
        tau = coefs[t, 0]
        inv = coefs[t, 1]
        tg = coefs[t, 2]
        if mode == M_BLOCK:
            nb = hi - lo
            sc = np.zeros(nb, coefs.dtype)
            sums = np.zeros(nb, np.float64)
            if C == 1:
                for a in range(A):
                    base = a * B
                    for b in range(lo, hi):
                        z = soft(ld(W, base + b), tau)
                        sums[b - lo] += np.float64(z * z)
            else:
                for a in range(A):
                    for b in range(lo, hi):
                        base = (a * B + b) * C
                        s = tau - tau
                        for c in range(C):
                            z = soft(ld(W, base + c), tau)
                            s += z * z
                        sums[b - lo] += np.float64(s)
            for j in range(nb):
                nrm = math.sqrt(sums[j])
                if nrm > 0:
                    f = 1.0 - np.float64(tg) / nrm
                    sc[j] = (f if f > 0 else 0.0) * inv
                elif nrm == 0:
                    sc[j] = 0
                else:
                    sc[j] = nrm
            if C == 1:
                for a in range(A):
                    base = a * B
                    for b in range(lo, hi):
                        st(W, base + b, soft(ld(W, base + b), tau) * sc[b - lo])
            for a in range(A if C != 1 else 0):
                for b in range(lo, hi):
                    base = (a * B + b) * C
                    f = sc[b - lo]
                    for c in range(C):
                        i = base + c
                        st(W, i, soft(ld(W, i), tau) * f)
        elif mode == M_EXPLICIT:
            idx = view(tab[t, T_IDX], n, np.empty(0, np.int64))
            soff = tab[t, T_SOFF]
            for i in range(lo, hi):
                f = scales[soff + idx[i]] * inv
                st(W, i, soft(ld(W, i), tau) * f)
        else:
            for i in range(lo, hi):
                st(W, i, soft(ld(W, i), tau) * inv)


# ------------------------------------------------------------------ activity penalty
ACT_CHUNK = 1 << 15


@numba.njit(parallel=True, cache=True, fastmath=FM)
def activity_forward(x_addr, y_addr, n, proto, l1, l2, vals):
    """y = x (a copy) and vals[chunk] = l1 sum|x| + l2 sum x^2 over the chunk, in one pass."""
    X = view(x_addr, n, proto)
    Y = view(y_addr, n, proto)
    nch = (n + ACT_CHUNK - 1) // ACT_CHUNK
    for k in numba.prange(nch):
        lo = k * ACT_CHUNK
        hi = min(lo + ACT_CHUNK, n)
        s1 = 0.0
        s2 = 0.0
        for i in range(lo, hi):
            v = X[i]
            Y[i] = v
            w = ld(X, i)
            s1 += np.float64(abs(w))
            s2 += np.float64(w * w)
        vals[k] = l1 * s1 + l2 * s2


@numba.njit(parallel=True, cache=True)
def activity_backward(gy_addr, x_addr, gx_addr, n, proto, c1, c2):
    """gx = gy + c1 sign(x) + c2 x (c1 = gv l1, c2 = 2 gv l2, in the compute type)."""
    GY = view(gy_addr, n, proto)
    X = view(x_addr, n, proto)
    GX = view(gx_addr, n, proto)
    nch = (n + ACT_CHUNK - 1) // ACT_CHUNK
    for k in numba.prange(nch):
        lo = k * ACT_CHUNK
        hi = min(lo + ACT_CHUNK, n)
        for i in range(lo, hi):
            w = ld(X, i)
            st(GX, i, ld(GY, i) + (c1 * sgn(w) + c2 * w))
