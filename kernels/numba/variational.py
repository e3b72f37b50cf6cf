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
from fastreg.kernels.numba.noise import BLOCK, DIST_GAUSSIAN, SERIAL_BELOW, _chunk_eps, _keys, _scratch


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
