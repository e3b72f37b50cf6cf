"""Adversarial perturbation steps (FGSM, PGD) as one fused pass on the CPU.

Every kernel reads its inputs once and writes its output once:
    v = x + step * sign(grad)                      (sign(0) = sign(NaN) = 0)
    v = maximum(minimum(v, x0 + eps), x0 - eps)    (PGD only; NaN-propagating)
    out = clamp(v, lo, hi)                         (NaN in v survives)
Arrays are 1-D, contiguous, all float32 or all float64 (the caller converts
float16/bfloat16); the scalars come in the arrays' dtype.
"""

import numba
import numpy as np

CHUNK = 1 << 14  # elements per parallel chunk


@numba.njit(inline="always", cache=True)
def _signed_step(g, step):
    """step * sign(g) with sign(0) = sign(NaN) = 0, exactly as step * d for d in {-1, 0, 1}."""
    if g > 0:
        return step
    if g < 0:
        return -step
    return step * 0  # +0.0: what step * 0.0 gives for a finite, non-negative step


@numba.njit(inline="always", cache=True)
def _clamp(v, lo, hi):
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return v


@numba.njit(parallel=True, cache=True)
def fgsm(x, g, out, eps, lo, hi):
    """out = clamp(x + eps * sign(g), lo, hi)."""
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for ch in numba.prange(nchunks):
        start = ch * CHUNK
        stop = min(start + CHUNK, n)
        for k in range(start, stop):
            out[k] = _clamp(x[k] + _signed_step(g[k], eps), lo, hi)


@numba.njit(parallel=True, cache=True)
def pgd_step(x, x0, g, out, step, eps, lo, hi):
    """out = clamp(project_{|v - x0| <= eps}(x + step * sign(g)), lo, hi)."""
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for ch in numba.prange(nchunks):
        start = ch * CHUNK
        stop = min(start + CHUNK, n)
        for k in range(start, stop):
            v = x[k] + _signed_step(g[k], step)
            lower = x0[k] - eps
            upper = x0[k] + eps
            # torch.maximum / torch.minimum semantics: a NaN on either side wins
            if v < lower or lower != lower:
                v = lower
            if v > upper or upper != upper:
                v = upper
            out[k] = _clamp(v, lo, hi)
