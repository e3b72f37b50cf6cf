"""Exact reversible momentum SGD (docs/reversible.md) as fused Numba CPU kernels.

Everything is int64 arithmetic: the coder state ("head") lives in [2^31, 2^63),
spill words are uint32 in a [capacity, numel] array, and no value is ever
mixed with an unsigned integer (Numba would turn the mix into a float).

Three kernels, one pass each:
  fwd_step     v <- gamma*v exactly (push v mod 2^k, pop a symbol mod n),
               v -= rint((1-gamma)(g + lam*w) 2^F), w += rint(alpha*v), writes p
  rev_restore  d_alpha += dw.v, w -= rint(alpha*v), writes p, dv += alpha*dw,
               u = (1-gamma)*dv (the HVP direction, in the model dtype)
  rev_step     v -= ..., v <- v/gamma exactly (push mod n, pop mod 2^k),
               d_gamma, d_lambda, dw -= hvp + (1-gamma)*lam*dv, dv *= gamma
The arithmetic is the same, operation for operation, as csrc/include/fastreg/reversible.h
and the PyTorch reference in fastreg/ops/reversible.py.
"""

import types

import numba
import numpy as np

L = np.int64(1) << np.int64(31)  # coder state lower bound; the empty state
MASK31 = (np.int64(1) << np.int64(31)) - np.int64(1)
MASK32 = (np.int64(1) << np.int64(32)) - np.int64(1)
LIMIT = np.int64(1) << np.int64(62)  # |w|, |v| must stay below this (fixed-point range)
FLIMIT = float(2.0**62)
DLIMIT = float(2.0**61)  # largest |increment| converted to int64

# status bits: kernels return the OR over elements (0: all good)
BAD_NONFINITE = 1
BAD_V_RANGE = 2
BAD_W_RANGE = 4
BAD_CAPACITY = 8


@numba.njit(inline="always", cache=True)
def _code(n_nf, n_v, n_w, n_c):
    code = 0
    if n_nf > 0:
        code |= BAD_NONFINITE
    if n_v > 0:
        code |= BAD_V_RANGE
    if n_w > 0:
        code |= BAD_W_RANGE
    if n_c > 0:
        code |= BAD_CAPACITY
    return code


@numba.njit(inline="always", cache=True)
def _floordiv_small(a, b, invb):
    """(a // b, a % b), floor semantics, for int64 a and 1 <= b < 2^31; invb = 1.0/b."""
    q = np.int64(np.floor(np.float64(a) * invb))
    r = a - q * b
    q2 = np.int64(np.floor(np.float64(r) * invb))
    q += q2
    r -= q2 * b
    while r < 0:
        r += b
        q -= 1
    while r >= b:
        r -= b
        q += 1
    return q, r


@numba.njit(inline="always", cache=True)
def _div_31(a, b, invb):
    """a // b for 0 <= a < 2^31, 1 <= b < 2^31: the double estimate is off by at most one."""
    s = np.int64(np.float64(a) * invb)
    r = a - s * b
    if r < 0:
        s -= 1
    elif r >= b:
        s += 1
    return s


@numba.njit(inline="always", cache=True)
def _sym_of_slot(slot, q, rr, thr, invq, invq1):
    """Quasi-uniform code over n symbols with total 2^31: symbol, frequency, cumulative."""
    if slot < thr:
        s = _div_31(slot, q + 1, invq1)
        return s, q + 1, s * (q + 1)
    s = _div_31(slot - thr, q, invq)
    return s + rr, q, thr + s * q


@numba.njit(inline="always", cache=True)
def _freq_of_sym(s, q, rr, thr):
    if s < rr:
        return q + 1, s * (q + 1)
    return q, thr + (s - rr) * q


def _fwd_step(w, v, head, count, spill, g, p_out, k, n, alpha, c1s, lam, inv_scale):
    """One forward step on one parameter tensor. Returns the OR of status bits (0: ok)."""
    N = w.shape[0]
    cap = spill.shape[0]
    dmask = (np.int64(1) << k) - np.int64(1)
    lim_push = np.int64(1) << (np.int64(63) - k)
    q = L // n
    rr = L - q * n
    thr = rr * (q + 1)
    invq = 1.0 / np.float64(q)
    invq1 = 1.0 / np.float64(q + 1)
    n_nf = 0
    n_v = 0
    n_w = 0
    n_c = 0
    for i in numba.prange(N):
        bad = 0
        x = head[i]
        c = np.int64(count[i])
        vi = v[i]
        wi = w[i]
        # -- v <- gamma v exactly: push v mod 2^k, then pop a symbol mod n (bits back)
        lo = vi & dmask
        vh = vi >> k
        if x >= lim_push:
            word = x & MASK32
            if c > 0 or word != 0:
                if c < cap:
                    spill[c, i] = np.uint32(word)
                    c += 1
                else:
                    bad |= BAD_CAPACITY
            x = x >> np.int64(32)
        x = (x << k) | lo
        slot = x & MASK31
        s, f, cum = _sym_of_slot(slot, q, rr, thr, invq, invq1)
        x = f * (x >> np.int64(31)) + slot - cum
        if x < L:
            word = np.int64(0)
            if c > 0:
                c -= 1
                word = np.int64(spill[c, i])
            x = (x << np.int64(32)) | word
        vi = vh * n + s
        # -- v -= (1 - gamma)(g + lam w), rounded to the grid
        wf = np.float64(wi) * inv_scale
        t = lam * wf
        t = np.float64(g[i]) + t
        t = c1s * t
        dv = np.rint(t)
        if not (abs(dv) < DLIMIT):
            bad |= BAD_NONFINITE
            dv = 0.0
        vi = vi - np.int64(dv)
        if not (abs(vi) < LIMIT):
            bad |= BAD_V_RANGE
            vi = np.int64(0)
        # -- w += alpha v, rounded to the grid
        dw = np.rint(alpha * np.float64(vi))
        if not (abs(dw) < DLIMIT):
            bad |= BAD_W_RANGE
            dw = 0.0
        wi = wi + np.int64(dw)
        if not (abs(wi) < LIMIT):
            bad |= BAD_W_RANGE
            wi = np.int64(0)
        head[i] = x
        count[i] = c
        v[i] = vi
        w[i] = wi
        p_out[i] = np.float64(wi) * inv_scale
        n_nf += bad & 1
        n_v += (bad >> 1) & 1
        n_w += (bad >> 2) & 1
        n_c += (bad >> 3) & 1
    return _code(n_nf, n_v, n_w, n_c)


def _rev_restore(w, v, dw, dv, u, p_out, alpha, omg, inv_scale):
    """First half of a reverse step. Returns sum_i dw_i * v_i (the d alpha of this step)."""
    N = w.shape[0]
    da = 0.0
    for i in numba.prange(N):
        vi = v[i]
        vf = np.float64(vi)
        dwi = dw[i]
        da += dwi * (vf * inv_scale)
        inc = np.rint(alpha * vf)
        wi = w[i] - np.int64(inc)
        w[i] = wi
        p_out[i] = np.float64(wi) * inv_scale
        dvt = dv[i] + alpha * dwi
        dv[i] = dvt
        u[i] = omg * dvt
    return da


def _rev_step(w, v, head, count, spill, g, hvp, dw, dv, k, n, gamma, c1s, lam, omg, inv_scale):
    """Second half of a reverse step (after the HVP). Returns (status, d_gamma, sum dv.w)."""
    N = w.shape[0]
    cap = spill.shape[0]
    dmask = (np.int64(1) << k) - np.int64(1)
    q = L // n
    rr = L - q * n
    thr = rr * (q + 1)
    invn = 1.0 / np.float64(n)
    invq = 1.0 / np.float64(q)
    invq1 = 1.0 / np.float64(q + 1)
    n_nf = 0
    n_v = 0
    n_w = 0
    n_c = 0
    dg = 0.0
    dl = 0.0
    for i in numba.prange(N):
        bad = 0
        x = head[i]
        c = np.int64(count[i])
        wi = w[i]
        wf = np.float64(wi) * inv_scale
        gi = np.float64(g[i])
        t = lam * wf
        t = gi + t
        t = c1s * t
        inc = np.rint(t)
        if not (abs(inc) < DLIMIT):
            bad |= BAD_NONFINITE
            inc = 0.0
        vi = v[i] + np.int64(inc)
        if not (abs(vi) < LIMIT):
            bad |= BAD_V_RANGE
            vi = np.int64(0)
        # -- v <- v / gamma exactly: push v mod n, then pop the low k bits
        vh, s = _floordiv_small(vi, n, invn)
        f, cum = _freq_of_sym(s, q, rr, thr)
        if x >= (f << np.int64(32)):
            word = x & MASK32
            if c > 0 or word != 0:
                if c < cap:
                    spill[c, i] = np.uint32(word)
                    c += 1
                else:
                    bad |= BAD_CAPACITY
            x = x >> np.int64(32)
        if f == q:
            xq, xr = _floordiv_small(x, f, invq)
        else:
            xq, xr = _floordiv_small(x, f, invq1)
        x = (xq << np.int64(31)) + cum + xr
        lo = x & dmask
        x = x >> k
        if x < L:
            word = np.int64(0)
            if c > 0:
                c -= 1
                word = np.int64(spill[c, i])
            x = (x << np.int64(32)) | word
        vi = vh * (dmask + np.int64(1)) + lo
        head[i] = x
        count[i] = c
        v[i] = vi
        # -- hypergradient accumulation
        dvt = dv[i]
        dg += dvt * (np.float64(vi) * inv_scale + (gi + lam * wf))
        dl += dvt * wf
        dw[i] = dw[i] - (np.float64(hvp[i]) + omg * lam * dvt)
        dv[i] = gamma * dvt
        n_nf += bad & 1
        n_v += (bad >> 1) & 1
        n_w += (bad >> 2) & 1
        n_c += (bad >> 3) & 1
    return _code(n_nf, n_v, n_w, n_c), dg, dl


def _copy_named(fn, suffix):
    """`fn` under another name: Numba's on-disk cache is keyed by the function's name and
    line, not by its compile flags, so a serial and a parallel njit of one function would
    load each other's machine code (the parallel kernels ran on one thread)."""
    f = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                           fn.__closure__)
    f.__qualname__ = fn.__qualname__ + suffix
    f.__doc__ = fn.__doc__
    return f


# One compiled copy for large tensors (threads) and one for small ones, where waking the
# thread pool costs more than the work (below SERIAL_BELOW elements).
SERIAL_BELOW = 1 << 15
fwd_step = numba.njit(parallel=True, cache=True)(_copy_named(_fwd_step, "_parallel"))
rev_restore = numba.njit(parallel=True, cache=True)(_copy_named(_rev_restore, "_parallel"))
rev_step = numba.njit(parallel=True, cache=True)(_copy_named(_rev_step, "_parallel"))
fwd_step_serial = numba.njit(cache=True)(_copy_named(_fwd_step, "_serial"))
rev_restore_serial = numba.njit(cache=True)(_copy_named(_rev_restore, "_serial"))
rev_step_serial = numba.njit(cache=True)(_copy_named(_rev_step, "_serial"))
