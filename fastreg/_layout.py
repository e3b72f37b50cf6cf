"""Output layout of the elementwise ops: the input's dense layout, as torch's own ops keep it.

An elementwise fastreg op returns (and its backward passes on) tensors laid out as
torch.empty_like(input) would be: the input's strides when it is non-overlapping and dense
(channels_last, any permutation), else what empty_like chooses (contiguous for most views).
The random numbers stay a function of the LOGICAL row-major index (docs/rng.md): a
channels_last input gives exactly the values of the op on x.contiguous(), stored in
channels_last. Packed masks saved for backward stay in logical order (internal).

Two ways to get there (docs/layout.md has the figures):
* the Numba kernels of dropout (both mask modes), dropout_add, scalar-sigma noise, vd_sample
  and the adversarial steps walk the memory in order and compute each element's logical
  index from `memory_dims` (no copy in, no copy out; noise and vd_sample only where the rows
  pair up, `tile4`);
* every other path computes in logical order and makes one copy into empty_like(input)
  (`like`).
The contiguous path pays one attribute test (`x.is_contiguous()`), nothing more.
"""

from __future__ import annotations

import functools

import torch


def empty_out(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised result for x: contiguous when x is, else laid out as empty_like(x).
    The fake (meta) kernels allocate with this, so their strides are the real ones."""
    if x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype if dtype is None else dtype, device=x.device)
    return torch.empty_like(x, dtype=x.dtype if dtype is None else dtype)


def like(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out, a contiguous result in x's logical order, laid out as empty_out(x): out itself when
    that layout is contiguous (x contiguous, or a view empty_like makes contiguous), else one
    copy into it."""
    if x.is_contiguous():
        return out
    dst = torch.empty_like(x, dtype=out.dtype)
    if dst.is_contiguous():
        return out
    return dst.copy_(out)


def permuted_dense(x: torch.Tensor) -> bool:
    """True when x is dense and non-overlapping but not contiguous (channels_last, a
    transpose, ...): the case the memory-order kernels serve. Call it after x.is_contiguous()
    has said False; O(ndim)."""
    return memory_dims(tuple(x.shape), tuple(x.stride())) is not None


@functools.lru_cache(maxsize=512)
def memory_dims(shape: tuple, strides: tuple):
    """(sizes, lstrides, tile4), the first two int64 numpy arrays, or None when (shape, strides) is not dense and
    non-overlapping. The dims are x's in memory order (outermost first), size-1 dims dropped and
    dims adjacent both in memory and in logical order merged; lstrides are their row-major
    logical strides. Memory element j (0 <= j < numel, j's digits in `sizes`) then has logical
    index sum_d digit_d(j) * lstrides[d]. Layers call with the same shapes every step: cached."""
    import numpy as np

    lstr = [1] * len(shape)
    acc = 1
    for d in reversed(range(len(shape))):
        lstr[d] = acc
        acc *= shape[d]
    dims = sorted(((strides[d], shape[d], lstr[d]) for d in range(len(shape)) if shape[d] != 1),
                  reverse=True)
    expect = 1
    for st, size, _ in reversed(dims):  # dense: each stride is the product of the sizes inside
        if st != expect:
            return None
        expect *= size
    sizes: list[int] = []
    lstrides: list[int] = []
    for st, size, ls in reversed(dims):  # innermost first; merge into the dim inside if adjacent
        if sizes and ls == lstrides[-1] * sizes[-1]:
            sizes[-1] *= size
        else:
            sizes.append(size)
            lstrides.append(ls)
    if not sizes:
        sizes, lstrides = [1], [1]
    sizes, lstrides = sizes[::-1], lstrides[::-1]
    # tile4: memory rows come in aligned fours that are logical neighbours (the dim outside the
    # rows has logical stride 1 and a size divisible by 4; every other logical stride is too):
    # channels_last with H*W % 4 == 0. The kernels then draw one Philox counter per 4 elements.
    k = len(sizes)
    tile4 = (k >= 2 and lstrides[k - 2] == 1 and sizes[k - 2] % 4 == 0
             and all(ls % 4 == 0 for d, ls in enumerate(lstrides) if d != k - 2))
    return (np.asarray(sizes, dtype=np.int64), np.asarray(lstrides, dtype=np.int64), tile4)


def memory_numpy(t: torch.Tensor):
    """1-D numpy view of a dense, non-overlapping CPU tensor's memory, in memory order."""
    return torch.as_strided(t.detach(), (t.numel(),), (1,)).numpy()
