"""Numba CPU kernels of the variational-dropout family: the local reparameterisation
sample out = mu + sqrt(var + eps) * z and its gradient w.r.t. var, with z ~ N(0, 1)
from the fastreg RNG (docs/rng.md: Box-Muller on the lane pairs of each counter).

Loop structure as in the dropout kernels: each parallel chunk of BLOCK counters
first fills a small array of normals (4 per counter, one Philox call each; it stays
in L1), then streams the data through it. Measured on one core at 2^22 float32
elements: Philox ~2 ms, Box-Muller (scalar libm log/cos/sin) ~28 ms, the stream ~4 ms.
No full-size temporary exists, and backward regenerates z from (seed, stream)
instead of reading a saved copy.
Arrays are 1-D and contiguous, float32 or float64 (z is float32, as the spec says,
and widened in float64); element k has logical index k.
"""

import numba
import numpy as np

from fastreg.kernels.numba.rng import box_muller, philox_block, uniform_from_word

BLOCK = 512  # counters per chunk = 2048 elements


@numba.njit(inline="always", cache=True)
def _fill_normals(z, seed, stream, c_first, count):
    for j in range(count):
        r0, r1, r2, r3 = philox_block(seed, stream, c_first + np.uint64(j))
        za, zb = box_muller(uniform_from_word(r0), uniform_from_word(r1))
        zc, zd = box_muller(uniform_from_word(r2), uniform_from_word(r3))
        z[4 * j] = za
        z[4 * j + 1] = zb
        z[4 * j + 2] = zc
        z[4 * j + 3] = zd


@numba.njit(parallel=True, cache=True)
def vd_sample_fwd(mu, var, out, seed, stream, eps):
    """out = mu + sqrt(var + eps) * z."""
    n = mu.size
    seed, stream = np.uint64(seed), np.uint64(stream)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base = ch * 4 * BLOCK
        length = min(4 * BLOCK, n - base)
        z = np.empty(4 * BLOCK, dtype=mu.dtype)  # float32 normals, widened exactly in float64
        _fill_normals(z, seed, stream, np.uint64(ch * BLOCK), (length + 3) // 4)
        m, v, o = mu[base:base + length], var[base:base + length], out[base:base + length]
        for e in range(length):  # slices, not base + e: this loop then vectorises
            o[e] = m[e] + np.sqrt(v[e] + eps) * z[e]


@numba.njit(parallel=True, cache=True)
def vd_sample_grad_var(g, var, out, seed, stream, eps, half):
    """out = g * z * half / sqrt(var + eps), half = 0.5 in the arrays' dtype
    (d out / d var of the forward, times g)."""
    n = g.size
    seed, stream = np.uint64(seed), np.uint64(stream)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        base = ch * 4 * BLOCK
        length = min(4 * BLOCK, n - base)
        z = np.empty(4 * BLOCK, dtype=g.dtype)
        _fill_normals(z, seed, stream, np.uint64(ch * BLOCK), (length + 3) // 4)
        gs, v, o = g[base:base + length], var[base:base + length], out[base:base + length]
        for e in range(length):
            o[e] = gs[e] * z[e] * half / np.sqrt(v[e] + eps)
