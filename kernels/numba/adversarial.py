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

from fastreg.kernels.numba.noise import address_as_ptr

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


# ---------------------------------------------------------------- by address (the lean eager path)
# Small contiguous calls whose x, grad (and x0) share one dtype: the tensors' data addresses
# become arrays here (kernels/numba/noise.address_as_ptr), which saves making and unboxing a
# numpy view per array. Same serial loops, same arguments: the same bits.
@numba.njit(cache=True)
def fgsm_at(xp, gp, op, n, eps, lo, hi):
    """_fgsm_serial on the n elements at addresses xp, gp (grad) and op (out), of eps's dtype."""
    _fgsm_serial(numba.carray(address_as_ptr(xp, eps), (n,)),
                 numba.carray(address_as_ptr(gp, eps), (n,)),
                 numba.carray(address_as_ptr(op, eps), (n,)), eps, lo, hi)


@numba.njit(cache=True)
def pgd_at(xp, x0p, gp, op, n, step, eps, lo, hi):
    """_pgd_serial on the n elements at addresses xp, x0p, gp and op, of step's dtype."""
    _pgd_serial(numba.carray(address_as_ptr(xp, step), (n,)),
                numba.carray(address_as_ptr(x0p, step), (n,)),
                numba.carray(address_as_ptr(gp, step), (n,)),
                numba.carray(address_as_ptr(op, step), (n,)), step, eps, lo, hi)
