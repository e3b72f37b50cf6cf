"""Numba CPU kernels of the variational-dropout family: the local reparameterisation
sample out = mu + sqrt(var + eps) * z and its gradient w.r.t. var, with z ~ N(0, 1)
from the fastreg RNG (docs/rng.md: Box-Muller on the lane pairs of each counter).

Loop structure as in the noise kernels, whose chunk filler they share: each parallel
chunk of BLOCK counters first fills a small array of normals (noise.fill_eps: unrolled
Philox, then the vectorised Box-Muller, a few ulp from the spec's libm normals; it
stays in L1), then streams the data through it. The libm Box-Muller this replaced cost
~28 ms of ~34 ms on one core at 2^22 float32 elements.
No full-size temporary exists, and backward regenerates z from (seed, stream)
instead of reading a saved copy.
Arrays are 1-D and contiguous, float32 or float64 (z is float32, as the spec says,
and widened in float64); element k has logical index k.
"""

import numba
import numpy as np

from fastreg.kernels.numba.drivers import by_size
from fastreg.kernels.numba.noise import (BLOCK, DIST_GAUSSIAN, SERIAL_BELOW, _chunk_eps, _keys,
                                         _row_start, _scratch, fill_eps_step)


@by_size(SERIAL_BELOW)
def vd_sample_fwd(mu, var, out, seed, stream, eps):
    """out = mu + sqrt(var + eps) * z."""
    n = mu.size
    k0, k1, s0, s1 = _keys(seed, stream)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        z, ua, ub = _scratch()  # float32 z, widened exactly where the data are float64
        base, length = _chunk_eps(z, ua, ub, k0, k1, s0, s1, np.uint64(0), ch, n, DIST_GAUSSIAN)
        m, v, o = mu[base:base + length], var[base:base + length], out[base:base + length]
        for e in range(length):  # slices, not base + e: this loop then vectorises
            o[e] = m[e] + np.sqrt(v[e] + eps) * z[e]


@by_size(SERIAL_BELOW)
def vd_sample_grad_var(g, var, out, seed, stream, eps, half):
    """out = g * z * half / sqrt(var + eps), half = 0.5 in the arrays' dtype
    (d out / d var of the forward, times g)."""
    n = g.size
    k0, k1, s0, s1 = _keys(seed, stream)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        z, ua, ub = _scratch()  # float32 z, widened exactly where the data are float64
        base, length = _chunk_eps(z, ua, ub, k0, k1, s0, s1, np.uint64(0), ch, n, DIST_GAUSSIAN)
        gs, v, o = g[base:base + length], var[base:base + length], out[base:base + length]
        for e in range(length):
            o[e] = gs[e] * z[e] * half / np.sqrt(v[e] + eps)


# ---------------------------------------------------------------- memory order (fastreg/_layout.py)
# channels_last (memory rows in aligned fours of logical neighbours, tile4 of
# fastreg._layout.memory_dims) walked in memory order, as noise.noise_fwd_tiled: the same
# normals, the same arithmetic, hence the same bits as the kernels above. mu, var, out (or g,
# var, out) are memory-order views of tensors sharing one layout.
@numba.njit(inline="always", cache=True)
def _tiled_chunk(ch, z, ua, ub, a, var, out, sizes, lstr, k0, k1, s0, s1, eps, half, GRAD):
    """Groups of four rows of parallel chunk ch (about 4 BLOCK elements)."""
    inner = sizes[sizes.size - 1]
    step = np.uint64(lstr[lstr.size - 1]) >> np.uint64(2)
    groups = a.size // (4 * inner)
    per = max(1, BLOCK // inner)
    for g in range(ch * per, min(groups, (ch + 1) * per)):
        c_row = np.uint64(_row_start(4 * g, sizes, lstr)) >> np.uint64(2)
        j0 = 4 * g * inner
        for b0 in range(0, inner, BLOCK):
            count = min(BLOCK, inner - b0)
            fill_eps_step(z, ua, ub, k0, k1, s0, s1, c_row + np.uint64(b0) * step, step,
                          count, DIST_GAUSSIAN)
            for lane in range(4):
                e0 = j0 + lane * inner + b0
                m, v, o = a[e0:e0 + count], var[e0:e0 + count], out[e0:e0 + count]
                zz = z[lane:lane + 4 * count:4]
                if GRAD:
                    for e in range(count):
                        o[e] = m[e] * zz[e] * half / np.sqrt(v[e] + eps)
                else:
                    for e in range(count):
                        o[e] = m[e] + np.sqrt(v[e] + eps) * zz[e]


@numba.njit(inline="always", cache=True)
def _nchunks_tiled(a, sizes):
    inner = sizes[sizes.size - 1]
    groups = a.size // (4 * inner)
    per = max(1, BLOCK // inner)
    return (groups + per - 1) // per


@by_size(SERIAL_BELOW)
def vd_sample_fwd_tiled(mu, var, out, sizes, lstr, seed, stream, eps):
    """vd_sample_fwd over memory-order views (sizes, lstr: memory_dims with tile4)."""
    k0, k1, s0, s1 = _keys(seed, stream)
    for ch in numba.prange(_nchunks_tiled(mu, sizes)):
        z, ua, ub = _scratch()
        _tiled_chunk(ch, z, ua, ub, mu, var, out, sizes, lstr, k0, k1, s0, s1, eps, eps, False)


@by_size(SERIAL_BELOW)
def vd_sample_grad_var_tiled(g, var, out, sizes, lstr, seed, stream, eps, half):
    """vd_sample_grad_var over memory-order views (sizes, lstr: memory_dims with tile4)."""
    k0, k1, s0, s1 = _keys(seed, stream)
    for ch in numba.prange(_nchunks_tiled(g, sizes)):
        z, ua, ub = _scratch()
        _tiled_chunk(ch, z, ua, ub, g, var, out, sizes, lstr, k0, k1, s0, s1, eps, half, True)
