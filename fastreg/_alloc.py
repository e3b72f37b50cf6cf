"""Output allocation for the CPU kernels.

A fresh 64 MiB output costs more in page faults (16384 of them at 4 KiB) than the
kernel that fills it costs in arithmetic. Large CPU outputs are therefore advised
to the kernel as transparent huge pages (madvise(MADV_HUGEPAGE)) before their first
touch: the same memory, 512x fewer faults. Where THP is off, or not Linux, the
advice is a no-op and this is plain torch.empty. (torch's own allocator does the same
for every tensor under THP_MEM_ALLOC_ENABLE=1.)

With the kernel's THP defrag policy at "madvise", the first large allocations of a
process may stall while the kernel compacts memory for huge pages (seen once in a
benchmark here: one 2^24 forward at several times its usual time). FASTREG_THP=0
turns the advice off.
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
if sys.platform.startswith("linux") and os.environ.get("FASTREG_THP", "1") != "0":
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
    nbytes = t.numel() * t.element_size()
    if _madvise is not None and nbytes >= ADVISE_FROM_BYTES:
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
