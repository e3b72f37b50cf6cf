"""Adversarial perturbation steps (FGSM, PGD) as one fused pass on the CPU.

Every kernel reads its inputs once and writes its output once:
    v = x + step * sign(grad)                      (sign(0) = sign(NaN) = 0)
    v = maximum(minimum(v, x0 + eps), x0 - eps)    (PGD only; NaN-propagating)
    out = clamp(v, lo, hi)                         (NaN in v survives)
The loop bodies are branch-free (selects, non-short-circuit `|`), so LLVM
vectorises them. Arrays are 1-D and contiguous; x, x0 and out share one dtype,
float32 or float64, and the scalars come in that dtype; grad may be float32 or
float64 independently (only its sign is read). Inputs below PARALLEL_MIN elements
run on one thread (waking the pool costs more than the work).
"""

import numba

PARALLEL_MIN = 1 << 16


@numba.njit(inline="always", cache=True)
def _fgsm_elem(x, g, k, eps, lo, hi):
    gk = g[k]
    zero = eps - eps  # 0 in eps's type (eps is finite)
    up = eps if gk > 0 else zero
    down = eps if gk < 0 else zero
    v = x[k] + (up - down)  # x + eps * sign(g), the same bits as the reference
    v = lo if v < lo else v
    return hi if v > hi else v


@numba.njit(inline="always", cache=True)
def _pgd_elem(x, x0, g, k, step, eps, lo, hi):
    gk = g[k]
    zero = step - step
    up = step if gk > 0 else zero
    down = step if gk < 0 else zero
    v = x[k] + (up - down)
    lower = x0[k] - eps
    upper = x0[k] + eps
    # torch.maximum / torch.minimum: a NaN on either side wins
    v = lower if (v < lower) | (lower != lower) else v
    v = upper if (v > upper) | (upper != upper) else v
    v = lo if v < lo else v
    return hi if v > hi else v


# A flat prange over elements vectorises; a prange over chunks with an inner index
# loop did not (measured 15x slower on one thread), so the loops stay flat.
@numba.njit(parallel=True, cache=True)
def _fgsm_parallel(x, g, out, eps, lo, hi):
    for k in numba.prange(x.size):
        out[k] = _fgsm_elem(x, g, k, eps, lo, hi)


@numba.njit(cache=True)
def _fgsm_serial(x, g, out, eps, lo, hi):
    for k in range(x.size):
        out[k] = _fgsm_elem(x, g, k, eps, lo, hi)


@numba.njit(parallel=True, cache=True)
def _pgd_parallel(x, x0, g, out, step, eps, lo, hi):
    for k in numba.prange(x.size):
        out[k] = _pgd_elem(x, x0, g, k, step, eps, lo, hi)


@numba.njit(cache=True)
def _pgd_serial(x, x0, g, out, step, eps, lo, hi):
    for k in range(x.size):
        out[k] = _pgd_elem(x, x0, g, k, step, eps, lo, hi)


def fgsm(x, g, out, eps, lo, hi):
    """out = clamp(x + eps * sign(g), lo, hi)."""
    (_fgsm_parallel if x.size >= PARALLEL_MIN else _fgsm_serial)(x, g, out, eps, lo, hi)


def pgd_step(x, x0, g, out, step, eps, lo, hi):
    """out = clamp(project_{|v - x0| <= eps}(x + step * sign(g)), lo, hi)."""
    (_pgd_parallel if x.size >= PARALLEL_MIN else _pgd_serial)(x, x0, g, out, step, eps, lo, hi)
