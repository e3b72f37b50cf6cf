"""Triton kernels of the fused bias + activation + dropout (docs/rng.md for the mask).

    z = x + bias[c],  y = act(z) * keep(i) / (1 - p)        (x viewed as R rows of C)

act: 0 none, 1 relu, 2 gelu (erf form). Programs take [BLOCK_R, BLOCK_C] tiles of
the (R, C) view; the keep word of element i = r * C + c is word(i) of the spec
(one Philox call per four elements when C % 4 == 0, ALIGNED; else one per element).
Backward writes grad_x = grad_z and one partial
bias-gradient row per row-block (part[pid_r, c]), summed by the caller: no
atomics, deterministic. Offsets are 64-bit; `scale` arrives as float64 bits.
"""

import triton
import triton.language as tl

from fastreg.kernels.triton.convert import to_output
from fastreg.kernels.triton.rng import philox_block, philox_word

BLOCK_R = 16
BLOCK_C = 64


@triton.jit
def _tile(R, C, start, seed_ptr, stream, threshold, scale_bits, COMPUTE_F64: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    inb = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    if ALIGNED:
        # C % 4 == 0 and start % 4 == 0: the four elements of a counter share a row and
        # sit side by side in a thread; one Philox call gives their four words
        c4 = tl.program_id(1).to(tl.int64) * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4).to(tl.int64)
        ctr = rows[:, None] * (C // 4) + c4[None, :] + start // 4
        r0, r1, r2, r3 = philox_block(tl.load(seed_ptr), stream, ctr)
        w = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_R, BLOCK_C))
    else:
        w = philox_word(tl.load(seed_ptr), stream, offs + start)
    keep = w.to(tl.uint64) >= threshold.to(tl.int64).to(tl.uint64)
    s = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if not COMPUTE_F64:
        s = s.to(tl.float32)
    m = tl.where(keep, s, s * 0)
    return offs, cols, inb, m, s


# Value integers are never specialised (an int equal to 1 would become a constexpr, and
# each value class a compile); the sizes R, C are, for their divisibility by 16.
_RUNTIME_INTS = ["stream", "threshold", "scale_bits", "start"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def bias_act_fwd_kernel(x_ptr, b_ptr, out_ptr, seed_ptr, stream, threshold, scale_bits, start, R,
                        C, ACT: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr = False):
    offs, cols, inb, m, s = _tile(R, C, start, seed_ptr, stream, threshold, scale_bits,
                                  COMPUTE_F64, BLOCK_R, BLOCK_C, ALIGNED)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(m.dtype)
    b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(m.dtype)
    z = x + b[None, :]
    if ACT == 1:
        a = tl.where(z <= 0, 0.0, z).to(m.dtype)
    elif ACT == 2:
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        a = z
    tl.store(out_ptr + offs, to_output(a * m, out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def bias_act_bwd_kernel(g_ptr, saved_ptr, b_ptr, gx_ptr, part_ptr, seed_ptr, stream, threshold,
                        scale_bits, start, R, C, ACT: tl.constexpr, COMPUTE_F64: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr = False):
    """gx = grad_z; part[pid_r, c] = sum over this tile's rows of grad_z.
    saved: the output y (relu), x (gelu), or unused (none)."""
    offs, cols, inb, m, s = _tile(R, C, start, seed_ptr, stream, threshold, scale_bits,
                                  COMPUTE_F64, BLOCK_R, BLOCK_C, ALIGNED)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(m.dtype)
    if ACT == 1:
        y = tl.load(saved_ptr + offs, mask=inb, other=0.0).to(m.dtype)
        gz = tl.where(y > 0, g * s, 0.0).to(m.dtype)
    elif ACT == 2:
        x = tl.load(saved_ptr + offs, mask=inb, other=0.0).to(m.dtype)
        b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(m.dtype)
        z = x + b[None, :]
        d = (0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
             + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
        gz = g * m * d
    else:
        gz = g * m
    gz = tl.where(inb, gz, 0.0).to(m.dtype)
    tl.store(gx_ptr + offs, to_output(gz, gx_ptr.dtype.element_ty), mask=inb)
    colsum = tl.sum(gz, axis=0)
    prow = part_ptr + tl.program_id(0).to(tl.int64) * C
    tl.store(prow + cols, colsum.to(part_ptr.dtype.element_ty), mask=cols < C)


def grid(R, C):
    return (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
