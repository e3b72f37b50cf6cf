"""Small kernels with known compiled properties, for the tests of tools/triton_static.py
(tests/test_triton_compile.py): a copy (128-bit access when aligned and n % 16 == 0,
32-bit when n is not known divisible), a kernel that calls .to() on an int argument
(fails to compile once Triton specialises the int to a constexpr 1), and one that keeps
more values live per thread than there are registers (spills)."""

import triton
import triton.language as tl


@triton.jit
def probe_copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)


@triton.jit
def probe_int_method_kernel(out_ptr, k, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, offs.to(tl.int64) + k.to(tl.int64))


@triton.jit
def probe_spill_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # every element stays live across the reduction: BLOCK / 32 values per thread (1 warp)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * tl.sum(x * x, axis=0) + tl.sqrt(x))
