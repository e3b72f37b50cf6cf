"""Adversarial perturbation steps (FGSM, PGD) as one fused Triton pass.

    v = x + step * sign(grad)                      (sign(0) = sign(NaN) = 0)
    v = maximum(minimum(v, x0 + eps), x0 - eps)    (HAS_X0 only; NaN-propagating)
    out = clamp(v, lo, hi)                         (NaN in v survives)

Arithmetic in float64 for float64 tensors (F64), else float32. The scalars arrive
as the bits of float64s in int64 arguments (Triton would type a Python float as
float32) and are rounded once to the compute type, as the other backends do.
Inputs are contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, v, mask):
    """Store v (float32/float64) into ptr's dtype, rounding to nearest even.

    bfloat16 is rounded with integer arithmetic (torch's rule, NaN -> 0x7FC0), so
    compiled and interpreted kernels give torch's bits.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scalar(bits, F64: tl.constexpr):
    # one return: compiled Triton rejects returns of different types even under a
    # constexpr `if` (the interpreter does not), so the branches assign instead
    v = bits.to(tl.int64).to(tl.float64, bitcast=True)
    if not F64:
        v = v.to(tl.float32)
    return v


@triton.jit(do_not_specialize=["step_bits", "eps_bits", "lo_bits", "hi_bits"])
def pgd_kernel(x_ptr, x0_ptr, g_ptr, out_ptr, n, step_bits, eps_bits, lo_bits, hi_bits,
               HAS_X0: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    s = _scalar(step_bits, F64)
    lo = _scalar(lo_bits, F64)
    hi = _scalar(hi_bits, F64)
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    if g.dtype.primitive_bitwidth == 16:
        # exact widening; some interpreters compare 16-bit floats by their raw bits
        g = g.to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(s.dtype)
    d = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(s.dtype)
    v = x + s * d
    if HAS_X0:
        e = _scalar(eps_bits, F64)
        x0 = tl.load(x0_ptr + offs, mask=m, other=0.0).to(s.dtype)
        v = tl.maximum(v, x0 - e, propagate_nan=tl.PropagateNan.ALL)
        v = tl.minimum(v, x0 + e, propagate_nan=tl.PropagateNan.ALL)
    v = tl.where(v < lo, lo, v)
    v = tl.where(v > hi, hi, v)
    store_rounded(out_ptr + offs, v, m)
