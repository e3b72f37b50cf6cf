"""Output allocation for the CPU kernels.

A fresh 64 MiB output costs more in page faults (16384 of them at 4 KiB) than the
kernel that fills it costs in arithmetic. With FASTREG_THP=1, large CPU outputs are
advised to the kernel as transparent huge pages (madvise(MADV_HUGEPAGE)) before their
first touch: the same memory, 512x fewer faults (measured here: dropout forward at 2^24
float32 from about 30 ms to 16-19 ms). It is off by default: with the kernel's THP
defrag policy at "madvise" (as on the development machine), the first large allocations
of a process may stall while the kernel compacts memory, and a fresh process saw a
2^24 forward take 80-90 ms in two of four benchmark runs. (torch's own allocator offers
the same trade for every tensor under THP_MEM_ALLOC_ENABLE=1.) Off, or where THP is
unavailable, this is plain torch.empty.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
ADVISE_FROM_BYTES = 4 * HUGE_PAGE  # below this, faults are few and the call is not worth it

_madvise = None
if sys.platform.startswith("linux") and os.environ.get("FASTREG_THP", "0") == "1":
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on the CPU, with huge-page advice for large sizes (contents undefined)."""
    t = torch.empty(shape, dtype=dtype)
    if _madvise is None:  # the default: nothing more to do per call
        return t
    nbytes = t.numel() * t.element_size()
    if nbytes >= ADVISE_FROM_BYTES:
        addr = t.data_ptr()
        start = (addr + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)  # whole huge pages inside the buffer
        end = (addr + nbytes) & ~(HUGE_PAGE - 1)
        if end > start:
            _madvise(start, end - start, MADV_HUGEPAGE)  # advice only: failure changes nothing
    return t


def empty_like_numpy(a):
    """A numpy array shaped and typed like numpy array `a`, allocated by `empty`."""
    import numpy as np

    return empty_numpy(a.shape, a.dtype) if a.size else np.empty_like(a)


def empty_numpy(shape, np_dtype):
    """numpy view of an `empty` tensor of the given shape and numpy dtype."""
    import numpy as np

    dtype = torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
    return empty(shape, dtype).numpy()


# ---------------------------------------------------------------- tensors <-> Numba arrays
# The CPU ops hand Numba 1-D numpy views of torch tensors. At 2^12 elements the kernel takes
# about 3 us; each torch method call on the way (.to, .contiguous, .view, from_numpy, ...)
# costs 0.5-1 us, so these do the fewest: no conversion when the tensor is already contiguous
# in the compute dtype, and outputs allocated as tensors whose numpy view the kernel fills.
class _ArrayInterface:
    __slots__ = ("__array_interface__", )


_TYPESTR = {torch.float64: "<f8", torch.float32: "<f4", torch.float16: "<f2", torch.int64: "<i8",
            torch.int32: "<i4", torch.int16: "<i2", torch.int8: "|i1", torch.uint8: "|u1",
            torch.bool: "|b1"}


def np_view(t: torch.Tensor):
    """1-D numpy array over a contiguous CPU tensor's memory, which the caller keeps alive.

    Unlike Tensor.numpy(), it leaves the storage resizable: FSDP2 frees an unsharded
    parameter by resizing its storage to 0, which fails once .numpy() has seen it. It is
    also cheaper (about 0.7 us against 1.1 us for .detach().numpy())."""
    n = t.numel()
    if n == 0:
        return t.detach().numpy().reshape(-1)  # no memory to free; numpy refuses a NULL pointer
    a = _ArrayInterface()
    a.__array_interface__ = {"data": (t.data_ptr(), False), "shape": (n, ),
                             "typestr": _TYPESTR[t.dtype], "version": 3}
    import numpy as np

    return np.asarray(a)


def numpy_in(t: torch.Tensor, dtype: torch.dtype):
    """1-D numpy view of t's elements in logical row-major order, as `dtype` (a copy only when
    t is not contiguous or has another dtype). Shares t's memory otherwise: read-only use,
    while the caller holds t."""
    if t.dtype == dtype and t.is_contiguous():
        return np_view(t)
    return t.detach().to(dtype).contiguous().numpy().reshape(-1)  # a fresh copy: .numpy() is fine


def out_like(t: torch.Tensor, dtype: torch.dtype):
    """(tensor, its 1-D numpy view): a fresh contiguous output of t's shape in `dtype`."""
    out = empty(t.shape, dtype)
    return out, out.numpy().reshape(-1)


def as_dtype(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out in `dtype` (float16/bfloat16 results are computed in float32 and rounded once)."""
    return out if out.dtype == dtype else out.to(dtype)
