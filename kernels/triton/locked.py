"""Triton kernel of locked (variational) dropout (docs/rng.md for the mask).

The input is viewed as (O, D, I) (D the locked dim); element i = (o, d, k) takes
mask index j = o * I + k and is kept iff word(j) >= t. Each program takes BLOCK
consecutive elements and computes word(j) per element (the D elements sharing a
j recompute it; Philox is cheap next to the memory traffic on a GPU). Offsets are
64-bit. `scale` arrives as the bits of a float64, as in kernels/triton/dropout.py.
"""

import torch
import triton
import triton.language as tl

from fastreg.kernels.triton.convert import to_output
from fastreg.kernels.triton.rng import block_words, philox_word

BLOCK = 1024


@triton.jit(do_not_specialize=["stream", "threshold", "scale_bits", "start"])
def locked_fwd_kernel(x_ptr, out_ptr, seed_ptr, stream, threshold, scale_bits, start, DI, I, n,
                      COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """out = x * keep(start + o * I + k) * scale, DI = D * I."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    j = (offs // DI) * I + offs % I + start
    w = philox_word(tl.load(seed_ptr), stream, j)
    keep = w.to(tl.uint64) >= threshold.to(tl.int64).to(tl.uint64)
    s = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    if COMPUTE_F64:
        y = x.to(tl.float64) * tl.where(keep, s, s * 0)
    else:
        s32 = s.to(tl.float32)
        y = x.to(tl.float32) * tl.where(keep, s32, s32 * 0)
    tl.store(out_ptr + offs, to_output(y, out_ptr.dtype.element_ty), mask=inb)


def grid(n):
    return (triton.cdiv(n, BLOCK),)


# ---------------------------------------------------------------- long rows
# When the rows are long (I >= ROWS_MIN_I, I % 4 == 0), a program takes BLOCK_K
# consecutive k of one o and ROWS consecutive d: the keep words of its BLOCK_K mask
# indices come four per Philox call (rng.block_words), once for all ROWS rows, and the
# index arithmetic is per program (no per-element 64-bit division). Full k-blocks load
# and store unmasked (128-bit when I is a multiple of 16, as Triton specialises it).

ROWS_BLOCK_K = 1024
# float64: half the k per program (4 elements per thread at 4 warps, two 128-bit accesses
# per row). With 1024, ptxas spilled the row loop on sm_80 (Triton 3.8/3.9: 4 bytes at
# 48 registers); 512 compiles to 30-38 registers with no spill.
ROWS_BLOCK_K_F64 = 512
ROWS = 8
ROWS_MIN_I = 512


@triton.jit
def _rows_body(x_ptr, out_ptr, m, o, d0, D, I, k0, rem, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
               FULL: tl.constexpr):
    offs = tl.arange(0, BLOCK_K)
    # constant trip count with a guard: Triton 3.6's interpreter rejects tensor loop bounds
    for dd in range(0, ROWS):
        d = d0 + dd
        if d < D:
            rb = (o * D + d) * I + k0
            if FULL:
                x = tl.load(x_ptr + rb + offs)
                tl.store(out_ptr + rb + offs,
                         to_output(x.to(m.dtype) * m, out_ptr.dtype.element_ty))
            else:
                inb = offs < rem
                x = tl.load(x_ptr + rb + offs, mask=inb, other=0.0)
                tl.store(out_ptr + rb + offs,
                         to_output(x.to(m.dtype) * m, out_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["stream", "threshold", "scale_bits", "start"])
def locked_rows_kernel(x_ptr, out_ptr, seed_ptr, stream, threshold, scale_bits, start, D, I, nkb,
                       ndc, COMPUTE_F64: tl.constexpr, VEC: tl.constexpr, BLOCK_K: tl.constexpr,
                       ROWS: tl.constexpr):
    """out = x * keep(start + o * I + k) * scale for rows d of a (O, D, I) view; program
    (o, d-chunk, k-block) = divmod of the program id by (ndc, nkb). start % 4 == 0."""
    pid = tl.program_id(0)
    kb = pid % nkb
    rest = pid // nkb
    o = (rest // ndc).to(tl.int64)
    d0 = (rest % ndc) * ROWS
    k0 = kb.to(tl.int64) * BLOCK_K
    t = tl.cast(threshold, tl.int64)
    w = block_words(tl.load(seed_ptr), stream, (start + o * I + k0) // 4, BLOCK_K, VEC)
    keep = (w >= tl.minimum(t, 0xFFFFFFFF).to(tl.uint32)) & (t <= 0xFFFFFFFF)
    s = tl.cast(scale_bits, tl.int64).to(tl.float64, bitcast=True)
    if not COMPUTE_F64:
        s = s.to(tl.float32)
    m = tl.where(keep, s, s * 0)
    if k0 + BLOCK_K <= I:
        _rows_body(x_ptr, out_ptr, m, o, d0, D, I, k0, BLOCK_K, BLOCK_K, ROWS, True)
    else:
        _rows_body(x_ptr, out_ptr, m, o, d0, D, I, k0, I - k0, BLOCK_K, ROWS, False)


def launch(wrap, x, out, seed, stream, threshold, scale_bits, O, D, I):
    """Launch the kernel that suits the (O, D, I) view; wrap(kernel) gives the callable
    (the kernel itself, or wrap_triton(kernel) under torch.compile)."""
    f64 = x.dtype == torch.float64
    if I >= ROWS_MIN_I and I % 4 == 0:
        block_k = ROWS_BLOCK_K_F64 if f64 else ROWS_BLOCK_K
        nkb = triton.cdiv(I, block_k)
        ndc = triton.cdiv(D, ROWS)
        wrap(locked_rows_kernel)[(O * ndc * nkb,)](
            x, out, seed, stream, threshold, scale_bits, 0, D, I, nkb, ndc, COMPUTE_F64=f64,
            VEC=8 if x.element_size() == 2 else 4, BLOCK_K=block_k, ROWS=ROWS)
    else:
        n = O * D * I
        wrap(locked_fwd_kernel)[grid(n)](x, out, seed, stream, threshold, scale_bits, 0, D * I, I, n,
                                         COMPUTE_F64=f64, BLOCK=BLOCK)
