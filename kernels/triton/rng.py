"""The fastreg RNG spec (docs/rng.md) in Triton.

Philox4x32-10 is written out here rather than taken from tl.philox: each round's
two 32x32 products are formed as one widening multiply (IMAD.WIDE.U32 on sm_80/90,
both halves at once) where tl.philox issues a mul-hi and a mul-lo, about 40 fewer
instructions per counter. The function is the same (Random123's known answers,
tests/test_rng.py).

Block helpers hand a kernel the words of BLOCK consecutive elements as a 1-D tile
whose per-thread layout matches a 128-bit load of the data: VEC elements per
thread (4 for 32-bit data, 8 for 16-bit), so no layout conversion (shared memory)
sits between the generator and the loads.
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors (c*) with uint32 keys (k*)."""
    for _ in tl.static_range(10):
        pa = c0.to(tl.uint64) * 0xD2511F53
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        n0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        n2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def philox_block(seed, stream, counter):
    """Four uint32 words per 64-bit counter (tensor), for 64-bit seed and stream."""
    counter = counter.to(tl.uint64, bitcast=True)  # callers pass (u)int64 tensors
    # seed and stream may arrive as i32, i64 or a constexpr; tl.cast takes all three on
    # every supported Triton (tl.to_tensor is missing from 3.6)
    stream = tl.cast(stream, tl.int64).to(tl.uint64, bitcast=True)
    seed = tl.cast(seed, tl.int64).to(tl.uint64, bitcast=True)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    s0 = (stream & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    s1 = (stream >> 32).to(tl.uint32) + tl.zeros_like(c0)
    return philox4x32_10(c0, c1, s0, s1, (seed & 0xFFFFFFFF).to(tl.uint32),
                         (seed >> 32).to(tl.uint32))


@triton.jit
def _lanes(r0, r1, r2, r3):
    """[..., 4] tile whose last axis is (r0, r1, r2, r3), built in registers."""
    return tl.join(tl.join(r0, r2), tl.join(r1, r3))


@triton.jit
def block_words(seed, stream, cbase, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """word(4 * cbase + k) for k < BLOCK, a 1-D tile (BLOCK % 32 == 0).

    VEC 8: a thread's 8 consecutive elements take counters 2j and 2j + 1; the two
    Philox calls run on 1-D tiles and are joined per word, so both stay in the
    thread's registers."""
    if VEC == 8:
        c = cbase + (tl.arange(0, BLOCK // 8) * 2).to(tl.int64)
        a0, a1, a2, a3 = philox_block(seed, stream, c)
        b0, b1, b2, b3 = philox_block(seed, stream, c + 1)
        w = _lanes(tl.join(a0, b0), tl.join(a1, b1), tl.join(a2, b2), tl.join(a3, b3))
    else:
        r0, r1, r2, r3 = philox_block(seed, stream, cbase + tl.arange(0, BLOCK // 4).to(tl.int64))
        w = _lanes(r0, r1, r2, r3)
    return tl.reshape(w, (BLOCK, ))


@triton.jit
def philox_word(seed, stream, index):
    """word(i) for a tensor of int64 indices (one Philox call per element: for
    gathers only; consecutive elements should use block_words)."""
    idx = index.to(tl.uint64, bitcast=True)
    r0, r1, r2, r3 = philox_block(seed, stream, idx >> 2)
    lane = idx & 3
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def uniform_from_word(w):
    return ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def box_muller(ua, ub):
    rho = tl.sqrt(-2.0 * tl.log(ua))
    ang = 6.2831854820251465 * ub  # float32(2*pi), as the other backends use
    return rho * tl.cos(ang), rho * tl.sin(ang)


@triton.jit
def _log_fast(x):
    """Natural log of a positive normal float32: Cephes logf, about 1 ulp (the polynomial
    of kernels/numba/noise.py). libm's logf compiles to about 40 instructions with its
    range and special-case handling, none of which a uniform in (0, 1) needs."""
    b = x.to(tl.int32, bitcast=True)
    e = (b >> 23) - 126
    m = ((b & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # [0.5, 1)
    small = m < 0.70710678118654752440
    e = tl.where(small, e - 1, e)
    m = tl.where(small, m + m - 1.0, m - 1.0)
    fe = e.to(tl.float32)
    z = m * m
    y = ((((((((7.0376836292e-2 * m - 1.1514610310e-1) * m + 1.1676998740e-1) * m
               - 1.2420140846e-1) * m + 1.4249322787e-1) * m - 1.6668057665e-1) * m
            + 2.0000714765e-1) * m - 2.4999993993e-1) * m + 3.3333331174e-1) * m * z
    y = y + -2.12194440e-4 * fe
    y = y - 0.5 * z
    return m + y + 0.693359375 * fe


@triton.jit
def _sincos_fast(a):
    """(sin a, cos a) for float32 a in [0, 2 pi]: Cephes sinf/cosf with a Cody-Waite
    reduction by pi/2, about 1 ulp, one shared reduction for both."""
    q = (a * 0.63661977236758134308 + 0.5).to(tl.int32)
    fq = q.to(tl.float32)
    r = ((a - fq * 1.5703125) - fq * 4.837512969970703125e-4) - fq * 7.54978995489188216e-8
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = (((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z
         - 0.5 * z + 1.0)
    odd = (q & 1) != 0
    sn = tl.where(odd, c, s)
    cs = tl.where(odd, s, c)
    return sn * (1.0 - (q & 2).to(tl.float32)), cs * (1.0 - ((q + 1) & 2).to(tl.float32))


@triton.jit
def box_muller_fast(ua, ub):
    """box_muller with the polynomial log, sin and cos above: the normals agree with the
    libm form to a few ulp (docs/rng.md), as the Numba noise kernels' do."""
    rho = tl.sqrt(-2.0 * _log_fast(ua))
    sn, cs = _sincos_fast(6.2831854820251465 * ub)
    return rho * cs, rho * sn


@triton.jit
def philox_normal(seed, stream, index):
    """z(i) for a tensor of int64 indices (Box-Muller on the lane pairs of one counter)."""
    idx = index.to(tl.uint64, bitcast=True)
    r0, r1, r2, r3 = philox_block(seed, stream, idx >> 2)
    lane = idx & 3
    first = lane < 2
    ua = uniform_from_word(tl.where(first, r0, r2))
    ub = uniform_from_word(tl.where(first, r1, r3))
    za, zb = box_muller(ua, ub)
    return tl.where((lane & 1) == 0, za, zb)


@triton.jit
def _fill_values(seed, stream, cbase, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """The values of words 4 * cbase .. 4 * cbase + BLOCK - 1 as a 1-D tile in which each
    thread holds the four lanes of its counters (rng.block_words' layout, VEC 4): one
    Philox call per four elements, and for normals one Box-Muller per lane pair, whose
    two outputs are the pair's two elements (philox_normal's values, lane by lane)."""
    r0, r1, r2, r3 = philox_block(seed, stream, cbase + tl.arange(0, BLOCK // 4).to(tl.int64))
    if KIND == 0:
        v = _lanes(r0.to(tl.int32, bitcast=True), r1.to(tl.int32, bitcast=True),
                   r2.to(tl.int32, bitcast=True), r3.to(tl.int32, bitcast=True))
    elif KIND == 1:
        v = _lanes(uniform_from_word(r0), uniform_from_word(r1), uniform_from_word(r2),
                   uniform_from_word(r3))
    else:
        z0, z1 = box_muller(uniform_from_word(r0), uniform_from_word(r1))
        z2, z3 = box_muller(uniform_from_word(r2), uniform_from_word(r3))
        v = _lanes(z0, z1, z2, z3)
    return tl.reshape(v, (BLOCK, ))


@triton.jit
def _fill_block(out_ptr, seed_ptr, stream, cbase, base, a, n, KIND: tl.constexpr,
                BLOCK: tl.constexpr, FULL: tl.constexpr):
    """One instance of philox_fill_kernel's body, Philox included, so that each instance
    keeps one register layout: FULL stores the tile as computed (128 bits per thread),
    the masked instance lets the compiler re-lay it out for its 32-bit stores."""
    v = _fill_values(tl.load(seed_ptr), stream, cbase, KIND, BLOCK)
    offs = tl.arange(0, BLOCK)
    if FULL:
        tl.store(out_ptr + base + offs, v)
    else:
        k = base - a + offs
        tl.store(out_ptr + k, v, mask=(k >= 0) & (k < n))


@triton.jit(do_not_specialize=["stream", "start", "n"])
def philox_fill_kernel(out_ptr, seed_ptr, stream, start, n, KIND: tl.constexpr,
                       BLOCK: tl.constexpr):
    """KIND 0: words (uint32 stored as int32 bits), 1: uniforms, 2: normals.

    Output k holds the value of logical index start + k. A program takes BLOCK
    consecutive positions p of the counter-aligned range (p = k + start % 4, so that
    position 4c .. 4c + 3 holds the four lanes of counter start // 4 + c): grid
    cdiv(n + start % 4, BLOCK). With start % 4 == 0 a full block stores unmasked and
    each thread's four lanes go out as one 128-bit store; otherwise (shifted output, the
    last block) every store is masked."""
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK
    a = (start & 3).to(tl.int64)
    # start // 4, not start >> 2: the interpreters shift an i64 scalar in [2^31, 2^32) as
    # if it were 32-bit (2^32 - 7 >> 2 gives -2 with Triton 3.6 through 3.9)
    cbase = (start // 4).to(tl.int64) + pid * (BLOCK // 4)
    if (a == 0) & (base + BLOCK <= n):
        _fill_block(out_ptr, seed_ptr, stream, cbase, base, a, n, KIND, BLOCK, True)
    else:
        _fill_block(out_ptr, seed_ptr, stream, cbase, base, a, n, KIND, BLOCK, False)
