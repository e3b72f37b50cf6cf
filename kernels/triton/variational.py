"""Triton kernels of the variational-dropout family: the local reparameterisation
sample out = mu + sqrt(var + eps) * z and its gradient w.r.t. var, z ~ N(0, 1) from
the fastreg RNG (docs/rng.md). Each program takes BLOCK consecutive elements as a
[BLOCK/4, 4] tile: one Philox call per row gives the four normals of that row.
Offsets are 64-bit. eps arrives as the bits of a float64 in an int64 argument.
"""

import triton
import triton.language as tl

from fastreg.kernels.triton.adversarial import store_rounded
from fastreg.kernels.triton.convert import mul_rn
from fastreg.kernels.triton.rng import box_muller, philox_block, uniform_from_word

BLOCK = 1024


@triton.jit
def _tile_normals(seed_ptr, stream, n, BLOCK: tl.constexpr):
    """Element offsets [BLOCK/4, 4], in-bounds mask and float32 normals of this program."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
    lane = tl.arange(0, 4)[None, :]
    offs = rows[:, None] * 4 + lane.to(tl.int64)
    r0, r1, r2, r3 = philox_block(tl.load(seed_ptr), stream, rows)
    za, zb = box_muller(uniform_from_word(r0), uniform_from_word(r1))
    zc, zd = box_muller(uniform_from_word(r2), uniform_from_word(r3))
    z = tl.where(lane == 0, za[:, None],
                 tl.where(lane == 1, zb[:, None], tl.where(lane == 2, zc[:, None], zd[:, None])))
    return offs, offs < n, z


@triton.jit
def _eps(eps_bits, F64: tl.constexpr):
    v = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if not F64:  # one return (see adversarial._scalar)
        v = v.to(tl.float32)
    return v


@triton.jit
def _sqrt(v, F64: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is approximate in float32)."""
    if F64:
        r = tl.sqrt(v)
    else:
        r = tl.sqrt_rn(v)
    return r


@triton.jit(do_not_specialize=["stream", "eps_bits"])
def vd_sample_fwd_kernel(mu_ptr, var_ptr, out_ptr, seed_ptr, stream, eps_bits, n,
                         F64: tl.constexpr, BLOCK: tl.constexpr):
    """out = mu + sqrt(var + eps) * z."""
    offs, m, z = _tile_normals(seed_ptr, stream, n, BLOCK)
    eps = _eps(eps_bits, F64)
    mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(eps.dtype)
    var = tl.load(var_ptr + offs, mask=m, other=0.0).to(eps.dtype)
    s = _sqrt(var + eps, F64)
    store_rounded(out_ptr + offs, mu + mul_rn(s, z.to(eps.dtype)), m)


@triton.jit(do_not_specialize=["stream", "eps_bits"])
def vd_sample_grad_var_kernel(g_ptr, var_ptr, out_ptr, seed_ptr, stream, eps_bits, n,
                              F64: tl.constexpr, BLOCK: tl.constexpr):
    """out = g * z * 0.5 / sqrt(var + eps)."""
    offs, m, z = _tile_normals(seed_ptr, stream, n, BLOCK)
    eps = _eps(eps_bits, F64)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(eps.dtype)
    var = tl.load(var_ptr + offs, mask=m, other=0.0).to(eps.dtype)
    s = _sqrt(var + eps, F64)
    num = g * z.to(eps.dtype) * 0.5
    if F64:
        q = num / s  # IEEE in float64
    else:
        q = tl.div_rn(num, s)
    store_rounded(out_ptr + offs, q, m)
