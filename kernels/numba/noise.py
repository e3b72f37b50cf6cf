"""Numba CPU kernels of the noise family: multiplicative and additive noise
(Gaussian dropout is multiplicative Gaussian noise with a scalar sigma).

Random numbers follow docs/rng.md: element i (logical row-major index) takes
word(i) of Philox4x32-10 at counter i >> 2; the Gaussian eps(i) is Box-Muller
on the lane pairs (0,1), (2,3) of its counter; the uniform eps is
sqrt(3) * (2 u(i) - 1) (zero mean, unit variance).

Loop structure (it decides the speed): each parallel chunk of BLOCK counters
(4 * BLOCK elements) fills a small eps array first -- two straight-line loops,
Philox then Box-Muller, that LLVM vectorises -- and then streams the elements
through it in runs along the innermost dimension of sigma's broadcast. eps stays
in L1; no full-size temporary exists.

Why this file carries its own forms of the RNG building blocks:
* `philox_unrolled` is kernels/numba/rng.philox4x32_10 (whose ten rounds are
  written out so that the counter loops vectorise) in this file's argument order.
* `box_muller_fast` is rng.box_muller with float32 polynomial log / sin / cos
  (Cephes coefficients, Cody-Waite reduction of the float32 angle 2*pi*u) in
  place of libm, because libm calls are scalar: the libm form runs at about
  170 ms per 2^24 normals here, this one at about 15 ms. It agrees with the
  libm normals to a few ulp (test_noise.py bounds the difference), as
  DESIGN.md allows for normals across backends.
box_muller_fast would belong in kernels/numba/rng.py; it lives here until that file adopts it.
"""

import contextlib
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from fastreg.kernels.numba.drivers import by_size
from fastreg.kernels.numba.rng import MASK32, philox4x32_10

BLOCK = 512  # counters per chunk = 2048 elements: the eps buffer is 8 KiB
F = np.float32
_S32 = np.uint64(32)
_S9 = np.uint64(9)
U_SCALE = F(2.0**-23)
TWO_PI = F(2.0 * math.pi)  # float32(2*pi), as rng.box_muller uses
SQRT3 = F(math.sqrt(3.0))
DIST_GAUSSIAN = 0
DIST_UNIFORM = 1
SERIAL_BELOW = 1 << 16  # elements: below this a call runs on the calling thread only


@contextlib.contextmanager
def threads_for(n):
    """Yields the thread count to use for n elements: small calls run on one thread
    (waking the worker threads costs more than the work, and far more on a busy machine).
    The drivers called inside are `by_size(SERIAL_BELOW)`: below it they run their serial
    copy, on the calling thread, so nothing needs setting here."""
    yield numba.get_num_threads() if n >= SERIAL_BELOW else 1


# ---------------------------------------------------------------- bit casts
@intrinsic
def _f32_as_i32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _i32_as_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


# ---------------------------------------------------------------- Philox, unrolled
@numba.njit(inline="always", cache=True)
def philox_unrolled(k0, k1, s0, s1, counter):
    """rng.philox_block(seed, stream, counter) with k0/k1 = lo/hi(seed), s0/s1 = lo/hi(stream)."""
    return philox4x32_10(counter & MASK32, counter >> _S32, s0, s1, k0, k1)


@numba.njit(inline="always", cache=True)
def uniform_fast(w):
    """rng.uniform_from_word: ((w >> 9) + 0.5) * 2^-23 (w >> 9 < 2^23: int32 is exact)."""
    return (F(np.int32(w >> _S9)) + F(0.5)) * U_SCALE


# ---------------------------------------------------------------- Box-Muller, vectorisable
@numba.njit(inline="always", cache=True)
def _logf(x):
    """Natural log of a positive normal float32 (Cephes logf, about 1 ulp)."""
    b = _f32_as_i32(x)
    e = (b >> np.int32(23)) - np.int32(126)
    m = _i32_as_f32((b & np.int32(0x007FFFFF)) | np.int32(0x3F000000))  # [0.5, 1)
    small = m < F(0.70710678118654752440)
    e = e - np.int32(1) if small else e
    m = (m + m - F(1.0)) if small else (m - F(1.0))
    fe = F(e)
    z = m * m
    y = (((((((( F(7.0376836292e-2) * m - F(1.1514610310e-1)) * m + F(1.1676998740e-1)) * m
              - F(1.2420140846e-1)) * m + F(1.4249322787e-1)) * m - F(1.6668057665e-1)) * m
           + F(2.0000714765e-1)) * m - F(2.4999993993e-1)) * m + F(3.3333331174e-1)) * m * z
    y = y + F(-2.12194440e-4) * fe
    y = y - F(0.5) * z
    return m + y + F(0.693359375) * fe


@numba.njit(inline="always", cache=True)
def _sincosf(a):
    """(sin a, cos a) for float32 a in [0, 2*pi] (Cephes sinf/cosf, Cody-Waite reduction)."""
    q = np.int32(a * F(0.63661977236758134308) + F(0.5))
    fq = F(q)
    r = ((a - fq * F(1.5703125)) - fq * F(4.837512969970703125e-4)) - fq * F(7.54978995489188216e-8)
    z = r * r
    s = ((F(-1.9515295891e-4) * z + F(8.3321608736e-3)) * z - F(1.6666654611e-1)) * z * r + r
    c = ((F(2.443315711809948e-5) * z - F(1.388731625493765e-3)) * z
         + F(4.166664568298827e-2)) * z * z - F(0.5) * z + F(1.0)
    odd = (q & np.int32(1)) != 0
    sn = c if odd else s
    cs = s if odd else c
    return (sn * (F(1.0) - F(q & np.int32(2))),
            cs * (F(1.0) - F((q + np.int32(1)) & np.int32(2))))


@numba.njit(inline="always", cache=True)
def box_muller_fast(ua, ub):
    """rng.box_muller: rho = sqrt(-2 ln ua), (rho cos(2 pi ub), rho sin(2 pi ub))."""
    rho = math.sqrt(F(-2.0) * _logf(ua))
    sn, cs = _sincosf(TWO_PI * ub)
    return rho * cs, rho * sn


# ---------------------------------------------------------------- eps of one chunk
@numba.njit(cache=True)
def fill_eps(z, ua, ub, k0, k1, s0, s1, c_first, count, dist):
    """z[4j + lane] = eps(4 (c_first + j) + lane) for j < count (float32).

    ua, ub: scratch of 2 * BLOCK float32 each. Not inlined: one compiled body serves
    every kernel and dtype (compile time), and a call per 2048 elements costs nothing."""
    if dist == DIST_GAUSSIAN:
        for j in range(count):
            r0, r1, r2, r3 = philox_unrolled(k0, k1, s0, s1, c_first + np.uint64(j))
            ua[j] = uniform_fast(r0)
            ub[j] = uniform_fast(r1)
            ua[BLOCK + j] = uniform_fast(r2)
            ub[BLOCK + j] = uniform_fast(r3)
        for j in range(count):
            za, zb = box_muller_fast(ua[j], ub[j])
            zc, zd = box_muller_fast(ua[BLOCK + j], ub[BLOCK + j])
            z[4 * j] = za
            z[4 * j + 1] = zb
            z[4 * j + 2] = zc
            z[4 * j + 3] = zd
    else:
        for j in range(count):
            r0, r1, r2, r3 = philox_unrolled(k0, k1, s0, s1, c_first + np.uint64(j))
            z[4 * j] = SQRT3 * (F(2.0) * uniform_fast(r0) - F(1.0))
            z[4 * j + 1] = SQRT3 * (F(2.0) * uniform_fast(r1) - F(1.0))
            z[4 * j + 2] = SQRT3 * (F(2.0) * uniform_fast(r2) - F(1.0))
            z[4 * j + 3] = SQRT3 * (F(2.0) * uniform_fast(r3) - F(1.0))


@numba.njit(inline="always", cache=True)
def _keys(seed, stream):
    seed = np.uint64(seed)
    stream = np.uint64(stream)
    return seed & MASK32, seed >> _S32, stream & MASK32, stream >> _S32


@numba.njit(inline="always", cache=True)
def _walk(n, seed, stream, start, sizes, sstr):
    """Set-up of a chunk walk: Philox keys, first counter, the innermost run length and
    sigma stride, and the number of chunks."""
    k0, k1, s0, s1 = _keys(seed, stream)
    c0 = np.uint64(start) >> np.uint64(2)
    nch = (n + 4 * BLOCK - 1) // (4 * BLOCK)
    return k0, k1, s0, s1, c0, sizes[sizes.size - 1], sstr[sstr.size - 1], nch


@numba.njit(inline="always", cache=True)
def _scratch():
    """One partition's eps buffer and Box-Muller scratch (allocated once per partition)."""
    return (np.empty(4 * BLOCK, np.float32), np.empty(2 * BLOCK, np.float32),
            np.empty(2 * BLOCK, np.float32))


@numba.njit(inline="always", cache=True)
def _chunk_eps(z, ua, ub, k0, k1, s0, s1, c0, ch, n, dist):
    """Fills z with chunk ch's eps; returns the chunk's first element and length."""
    base = ch * 4 * BLOCK
    length = min(4 * BLOCK, n - base)
    fill_eps(z, ua, ub, k0, k1, s0, s1, c0 + np.uint64(ch * BLOCK), (length + 3) // 4, dist)
    return base, length


@by_size(SERIAL_BELOW)
def eps_fill(out, seed, stream, dist, start):
    """out[k] = eps(start + k) for k < out.size (float32; start % 4 == 0): the noise itself."""
    n = out.size
    k0, k1, s0, s1 = _keys(seed, stream)
    c0 = np.uint64(start) >> np.uint64(2)
    for ch in numba.prange((n + 4 * BLOCK - 1) // (4 * BLOCK)):
        z, ua, ub = _scratch()
        base, length = _chunk_eps(z, ua, ub, k0, k1, s0, s1, c0, ch, n, dist)
        for e in range(length):
            out[base + e] = z[e]


# ---------------------------------------------------------------- broadcast runs
@numba.njit(inline="always", cache=True)
def _locate(i, sizes, sstr):
    """(sigma offset of logical index i, position of i along the innermost dim)."""
    nd = sizes.size
    so = 0
    pos = 0
    rem = i
    for dd in range(nd):
        d = nd - 1 - dd
        q = rem // sizes[d]
        r = rem - q * sizes[d]
        so += r * sstr[d]
        if dd == 0:
            pos = r
        rem = q
    return so, pos


# Runs: loops over slices (indices provably >= 0, so LLVM vectorises them;
# `a[i + k]` with a signed i carries a wraparound check per access and does not).
@numba.njit(inline="always", cache=True)
def _mul_s(dst, src, z, s, one):
    for k in range(dst.size):
        dst[k] = src[k] * (one + s * z[k])


@numba.njit(inline="always", cache=True)
def _mul_v(dst, src, z, sv, one):
    for k in range(dst.size):
        dst[k] = src[k] * (one + sv[k] * z[k])


@numba.njit(inline="always", cache=True)
def _add_s(dst, src, z, s):
    for k in range(dst.size):
        dst[k] = src[k] + s * z[k]


@numba.njit(inline="always", cache=True)
def _add_v(dst, src, z, sv):
    for k in range(dst.size):
        dst[k] = src[k] + sv[k] * z[k]


@numba.njit(inline="always", cache=True)
def _prod2(dst, a, z):
    for k in range(dst.size):
        dst[k] = a[k] * z[k]


@numba.njit(inline="always", cache=True)
def _prod3(dst, a, b, z):
    for k in range(dst.size):
        dst[k] = a[k] * b[k] * z[k]


@numba.njit(inline="always", cache=True)
def _acc2(dst, a, z):
    for k in range(dst.size):
        dst[k] += a[k] * z[k]


@numba.njit(inline="always", cache=True)
def _acc3(dst, a, b, z):
    for k in range(dst.size):
        dst[k] += a[k] * b[k] * z[k]


@numba.njit(cache=True)
def _sum2(a, z):
    """sum a z in float64 (not inlined: one call per run)."""
    acc = 0.0
    for k in range(a.size):
        acc += a[k] * z[k]
    return acc


@numba.njit(cache=True)
def _sum3(a, b, z):
    acc = 0.0
    for k in range(a.size):
        acc += a[k] * b[k] * z[k]
    return acc


@by_size(SERIAL_BELOW)
def noise_fwd(x, sig, out, sizes, sstr, seed, stream, dist, additive, one, start, nthreads):
    """out = x * (1 + sigma * eps) (additive=False) or x + sigma * eps (additive=True).

    x, out: 1-D contiguous, float32 or float64 (the compute dtype); sig: sigma's
    values in the same dtype, contiguous. sizes/sstr (int64): x's shape collapsed
    so that sigma's offset of element i is sum(index_d * sstr[d]) (sstr 0 on
    broadcast dims). one: 1 in the compute dtype. Element k takes eps(start + k)
    (start % 4 == 0; the ops pass 0, tests reach indices past 2^32).
    Work is split in one contiguous range of chunks per thread (scratch allocated once);
    nthreads: numba.get_num_threads() (passed in: a call inside would disable caching).
    """
    n = x.size
    k0, k1, s0, s1, c0, inner, st, nch = _walk(n, seed, stream, start, sizes, sstr)
    nparts = max(1, min(nthreads, nch))
    for t in numba.prange(nparts):
        z, ua, ub = _scratch()
        for ch in range(nch * t // nparts, nch * (t + 1) // nparts):
            base, length = _chunk_eps(z, ua, ub, k0, k1, s0, s1, c0, ch, n, dist)
            e = 0
            while e < length:
                i = base + e
                so, pos = _locate(i, sizes, sstr)
                run = min(inner - pos, length - e)
                dst = out[i:i + run]
                src = x[i:i + run]
                zz = z[e:e + run]
                if st == 0:
                    if additive:
                        _add_s(dst, src, zz, sig[so])
                    else:
                        _mul_s(dst, src, zz, sig[so], one)
                else:
                    if additive:
                        _add_v(dst, src, zz, sig[so:so + run])
                    else:
                        _mul_v(dst, src, zz, sig[so:so + run], one)
                e += run


@by_size(SERIAL_BELOW)
def noise_bwd(g, x, sig, gx, gs, part, sizes, sstr, seed, stream, dist, additive, need_gx,
              gs_mode, one, start):
    """The backward of noise_fwd in one pass.

    need_gx (multiplicative only): gx = g * (1 + sigma * eps).
    gs_mode 0: no sigma gradient; 1: elementwise (sigma has x's shape): gs[i] = d(i);
    2: reduced: part[t, so] += d(i) over the elements of thread-partition t (float64),
    the caller sums part over t. d(i) = g x eps (multiplicative) or g eps (additive).
    x is read only when gs_mode != 0 and not additive.
    """
    n = g.size
    k0, k1, s0, s1, c0, inner, st, nch = _walk(n, seed, stream, start, sizes, sstr)
    nparts = part.shape[0]
    for t in numba.prange(nparts):
        z, ua, ub = _scratch()
        for ch in range(nch * t // nparts, nch * (t + 1) // nparts):
            base, length = _chunk_eps(z, ua, ub, k0, k1, s0, s1, c0, ch, n, dist)
            e = 0
            while e < length:
                i = base + e
                so, pos = _locate(i, sizes, sstr)
                run = min(inner - pos, length - e)
                gg = g[i:i + run]
                zz = z[e:e + run]
                if need_gx:
                    if st == 0:
                        _mul_s(gx[i:i + run], gg, zz, sig[so], one)
                    else:
                        _mul_v(gx[i:i + run], gg, zz, sig[so:so + run], one)
                if gs_mode == 1:
                    if additive:
                        _prod2(gs[i:i + run], gg, zz)
                    else:
                        _prod3(gs[i:i + run], gg, x[i:i + run], zz)
                elif gs_mode == 2:
                    if st == 0:
                        if additive:
                            part[t, so] += _sum2(gg, zz)
                        else:
                            part[t, so] += _sum3(gg, x[i:i + run], zz)
                    else:
                        if additive:
                            _acc2(part[t, so:so + run], gg, zz)
                        else:
                            _acc3(part[t, so:so + run], gg, x[i:i + run], zz)
                e += run


# ---------------------------------------------------------------- memory order (fastreg/_layout.py)
# A permuted dense input (channels_last) whose memory rows come in aligned fours of logical
# neighbours (tile4 of fastreg._layout.memory_dims: channels_last with H*W % 4 == 0) is walked
# in memory order: at each position of four such rows, one Philox counter gives the four
# elements' eps, as in the logical-order kernels; so the values are theirs, bit for bit.
# Scalar sigma only (a broadcast sigma takes the copy path).
@numba.njit(cache=True)
def fill_eps_step(z, ua, ub, k0, k1, s0, s1, c_first, step, count, dist):
    """fill_eps with counters c_first + j * step: z[4j + lane] = eps(4 (c_first + j step) +
    lane). The same arithmetic as fill_eps (so the same bits)."""
    if dist == DIST_GAUSSIAN:
        for j in range(count):
            r0, r1, r2, r3 = philox_unrolled(k0, k1, s0, s1, c_first + np.uint64(j) * step)
            ua[j] = uniform_fast(r0)
            ub[j] = uniform_fast(r1)
            ua[BLOCK + j] = uniform_fast(r2)
            ub[BLOCK + j] = uniform_fast(r3)
        for j in range(count):
            za, zb = box_muller_fast(ua[j], ub[j])
            zc, zd = box_muller_fast(ua[BLOCK + j], ub[BLOCK + j])
            z[4 * j] = za
            z[4 * j + 1] = zb
            z[4 * j + 2] = zc
            z[4 * j + 3] = zd
    else:
        for j in range(count):
            r0, r1, r2, r3 = philox_unrolled(k0, k1, s0, s1, c_first + np.uint64(j) * step)
            z[4 * j] = SQRT3 * (F(2.0) * uniform_fast(r0) - F(1.0))
            z[4 * j + 1] = SQRT3 * (F(2.0) * uniform_fast(r1) - F(1.0))
            z[4 * j + 2] = SQRT3 * (F(2.0) * uniform_fast(r2) - F(1.0))
            z[4 * j + 3] = SQRT3 * (F(2.0) * uniform_fast(r3) - F(1.0))


@numba.njit(inline="always", cache=True)
def _row_start(r, sizes, lstr):
    """Logical index of the first element of memory row r (the rows are the inner dim)."""
    i0 = 0
    q = np.int64(r)  # a new variable: parfors refuses an update of the prange index
    for d in range(sizes.size - 2, -1, -1):
        sz = sizes[d]
        i0 += (q % sz) * lstr[d]
        q = q // sz
    return i0


@by_size(SERIAL_BELOW)
def noise_fwd_tiled(x, out, s, sizes, lstr, seed, stream, dist, additive, one):
    """noise_fwd with a scalar sigma s over memory-order views x, out (out laid out as x;
    sizes, lstr: fastreg._layout.memory_dims, tile4 true)."""
    k0, k1, s0, s1 = _keys(seed, stream)
    inner = sizes[sizes.size - 1]
    step = np.uint64(lstr[lstr.size - 1]) >> np.uint64(2)
    groups = x.size // (4 * inner)
    per = max(1, BLOCK // inner)
    for ch in numba.prange((groups + per - 1) // per):
        z, ua, ub = _scratch()
        for g in range(ch * per, min(groups, (ch + 1) * per)):
            c_row = np.uint64(_row_start(4 * g, sizes, lstr)) >> np.uint64(2)
            j0 = 4 * g * inner
            for b0 in range(0, inner, BLOCK):
                count = min(BLOCK, inner - b0)
                fill_eps_step(z, ua, ub, k0, k1, s0, s1, c_row + np.uint64(b0) * step, step,
                              count, dist)
                for lane in range(4):
                    e = j0 + lane * inner + b0
                    dst = out[e:e + count]
                    src = x[e:e + count]
                    zz = z[lane:lane + 4 * count:4]
                    if additive:
                        _add_s(dst, src, zz, s)
                    else:
                        _mul_s(dst, src, zz, s, one)


# ---------------------------------------------------------------- by address (the lean eager path)
# The host path of a small call: a numpy view of a tensor costs about 1 us to make and as much
# again to unbox, so the lean eager paths (fastreg/ops/noise.py, locked.py) hand the serial
# driver the tensors' data addresses, which become arrays here. Same driver, same arguments:
# the same bits. The caller keeps the tensors alive and contiguous, of `like`'s dtype.
@intrinsic
def address_as_ptr(typingctx, addr, like):
    """A pointer to `like`'s type (a float32/float64 scalar) at the integer address addr."""
    sig = types.CPointer(like)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


_noise_fwd_serial = noise_fwd.serial


@numba.njit(cache=True)
def noise_fwd_at(xp, op, n, sig, sizes, sstr, seed, stream, dist, additive, one):
    """noise_fwd.serial on the n elements at addresses xp (input) and op (output)."""
    _noise_fwd_serial(numba.carray(address_as_ptr(xp, one), (n,)), sig,
                      numba.carray(address_as_ptr(op, one), (n,)), sizes, sstr, seed, stream,
                      dist, additive, one, 0, 1)
