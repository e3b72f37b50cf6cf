"""The fastreg RNG spec (docs/rng.md) in Triton: tl.philox is Random123's
Philox4x32-10 when given 32-bit counters, so only the counter layout is ours."""

import triton
import triton.language as tl


@triton.jit
def philox_block(seed, stream, counter):
    """Four uint32 words per 64-bit counter (tensor), for 64-bit seed and stream."""
    counter = counter.to(tl.uint64, bitcast=True)  # callers pass (u)int64 tensors
    # stream may arrive as i32 (small), i64, or a constexpr (Triton specialises an int
    # argument equal to 1 unless the kernel lists it in do_not_specialize); tl.cast takes
    # all three on every supported Triton (tl.to_tensor is missing from 3.6)
    stream = tl.cast(stream, tl.int64).to(tl.uint64, bitcast=True)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    s0 = (stream & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    s1 = (stream >> 32).to(tl.uint32) + tl.zeros_like(c0)
    return tl.philox(seed, c0, c1, s0, s1)


@triton.jit
def philox_word(seed, stream, index):
    """word(i) for a tensor of int64 indices."""
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


@triton.jit(do_not_specialize=["stream", "start", "n"])
def philox_fill_kernel(out_ptr, seed_ptr, stream, start, n, KIND: tl.constexpr,
                       BLOCK: tl.constexpr):
    """KIND 0: words (uint32 stored as int32 bits), 1: uniforms, 2: normals."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    seed = tl.load(seed_ptr)
    idx = start + offs
    if KIND == 0:
        w = philox_word(seed, stream, idx)
        tl.store(out_ptr + offs, w.to(tl.int32, bitcast=True), mask=m)
    elif KIND == 1:
        tl.store(out_ptr + offs, uniform_from_word(philox_word(seed, stream, idx)), mask=m)
    else:
        tl.store(out_ptr + offs, philox_normal(seed, stream, idx), mask=m)
