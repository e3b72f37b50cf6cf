"""Numba CPU kernels of the fused bias + activation + dropout (docs/rng.md for the mask).

    z = x + bias[c],  y = act(z) * keep(i) / (1 - p)        (x viewed as R rows of C)

act: 0 none, 1 relu, 2 gelu (exact, erf form, as torch.nn.functional.gelu).
Backward, one pass: gz = grad * keep * scale * act'(z); grad_x = gz and
grad_bias[c] = sum over rows of gz (float64 partial sums per thread partition,
summed by the caller). For relu the saved tensor is the output y (y > 0 exactly
where the element was kept and z > 0), so the mask need not be regenerated; for
gelu it is x (the mask is regenerated from (seed, stream)); for none nothing.

Loop structure: a chunk of 4 * BLOCK elements fills its keep multipliers with the
vectorised Philox (kernels/numba/locked.fill_keep), then walks the chunk in runs
along a row, where bias[c + k] is contiguous.
"""

import math

import numba
import numpy as np

from fastreg.kernels.numba.locked import fill_keep
from fastreg.kernels.numba.drivers import by_size
from fastreg.kernels.numba.noise import SERIAL_BELOW, _keys

BLOCK = 512  # counters per chunk = 2048 elements
ACT_NONE = 0
ACT_RELU = 1
ACT_GELU = 2
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@numba.njit(inline="always", cache=True)
def _act(z, act, zero, half, one):
    if act == ACT_RELU:
        return zero if z <= zero else z  # NaN stays NaN, as torch.relu
    if act == ACT_GELU:
        return half * z * (one + math.erf(z * _INV_SQRT2))
    return z


@numba.njit(inline="always", cache=True)
def _dact(z, act, half, one):
    """gelu'(z) = Phi(z) + z phi(z)."""
    return half * (one + math.erf(z * _INV_SQRT2)) + z * math.exp(-half * z * z) * _INV_SQRT_2PI


# Runs over slices: indices provably >= 0, so LLVM vectorises (a[i + k] would not).
@numba.njit(inline="always", cache=True)
def _fwd_run(dst, xs, bs, ms, act, zero, half, one):
    if act == ACT_RELU:
        for k in range(dst.size):
            z = xs[k] + bs[k]
            dst[k] = (zero if z <= zero else z) * ms[k]
    elif act == ACT_GELU:
        for k in range(dst.size):
            dst[k] = _act(xs[k] + bs[k], ACT_GELU, zero, half, one) * ms[k]
    else:
        for k in range(dst.size):
            dst[k] = (xs[k] + bs[k]) * ms[k]


@numba.njit(inline="always", cache=True)
def _bwd_run(gx, prow, gs, ss, bs, ms, act, scale, zero, half, one):
    if act == ACT_RELU:
        for k in range(gx.size):
            gz = gs[k] * scale if ss[k] > zero else zero
            gx[k] = gz
            prow[k] += gz
    elif act == ACT_GELU:
        for k in range(gx.size):
            gz = gs[k] * ms[k] * _dact(ss[k] + bs[k], ACT_GELU, half, one)
            gx[k] = gz
            prow[k] += gz
    else:
        for k in range(gx.size):
            gz = gs[k] * ms[k]
            gx[k] = gz
            prow[k] += gz


@by_size(SERIAL_BELOW)
def bias_act_fwd(x, b, out, C, seed, stream, threshold, scale, act, start):
    """out[i] = act(x[i] + b[i % C]) * keep(start + i) * scale (flat, contiguous arrays)."""
    n = x.size
    k0, k1, s0, s1 = _keys(seed, stream)
    t = np.uint64(threshold)
    zero = scale - scale
    one = zero + 1
    half = one / 2
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base = ch * 4 * BLOCK
        length = min(4 * BLOCK, n - base)
        m = np.empty(4 * BLOCK + 8, dtype=x.dtype)
        off = fill_keep(m, start + base, length, k0, k1, s0, s1, t, scale)
        e = 0
        while e < length:
            i = base + e
            c0 = i % C
            run = min(C - c0, length - e)
            _fwd_run(out[i:i + run], x[i:i + run], b[c0:c0 + run], m[off + e:off + e + run], act,
                     zero, half, one)
            e += run


@by_size(SERIAL_BELOW)
def bias_act_bwd(g, saved, b, gx, part, C, seed, stream, threshold, scale, act, start):
    """gx = grad_z; part[t, c] += grad_z over thread partition t (float64).

    saved: the output y for relu, x for gelu, unused (pass g) for none."""
    n = g.size
    k0, k1, s0, s1 = _keys(seed, stream)
    t_ = np.uint64(threshold)
    zero = scale - scale
    one = zero + 1
    half = one / 2
    nch = (n + 4 * BLOCK - 1) // (4 * BLOCK)
    nparts = part.shape[0]
    for t in numba.prange(nparts):
        m = np.empty(4 * BLOCK + 8, dtype=g.dtype)
        for ch in range(nch * t // nparts, nch * (t + 1) // nparts):
            base = ch * 4 * BLOCK
            length = min(4 * BLOCK, n - base)
            off = 0
            if act != ACT_RELU:
                off = fill_keep(m, start + base, length, k0, k1, s0, s1, t_, scale)
            e = 0
            while e < length:
                i = base + e
                c0 = i % C
                run = min(C - c0, length - e)
                _bwd_run(gx[i:i + run], part[t, c0:c0 + run], g[i:i + run], saved[i:i + run],
                         b[c0:c0 + run], m[off + e:off + e + run], act, scale, zero, half, one)
                e += run
