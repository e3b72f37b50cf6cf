"""The counter-based RNG of docs/rng.md, exposed for tests and for every family.

`words`, `uniforms` and `normals` return the spec's values for logical indices
start .. start+n-1 on any backend. The pure-PyTorch versions here are the
oracle: slow, obviously right (int64 arithmetic masked to 32 bits).
"""

from __future__ import annotations

import math

import torch

from fastreg import _backend, _native
from fastreg._seed import SEED_LIMIT, check_stream

MASK32 = 0xFFFFFFFF
_KINDS = {"words": 0, "uniforms": 1, "normals": 2}


# ---------------------------------------------------------------- reference
def philox4x32_10_reference(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (any broadcastable shapes)."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        p0 = c0 * 0xD2511F53  # wraps mod 2^64 in int64; the bits we keep are exact
        p1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = (
            ((p1 >> 32) & MASK32) ^ c1 ^ k0,
            p1 & MASK32,
            ((p0 >> 32) & MASK32) ^ c3 ^ k1,
            p0 & MASK32,
        )
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def words_reference(index: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """word(i) as int64 tensor for an int64 tensor of logical indices."""
    c = index >> 2
    r = philox4x32_10_reference(c & MASK32, (c >> 32) & MASK32, stream & MASK32, stream >> 32,
                                seed & MASK32, seed >> 32)
    lane = index & 3
    return torch.stack(r, 0).gather(0, lane.unsqueeze(0)).squeeze(0)


def uniform_from_words_reference(w: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) from Philox words: ((w >> 9) + 0.5) * 2^-23, exact in float32."""
    return ((w >> 9).to(torch.float32) + 0.5) * 2.0**-23


def normals_reference(index: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Standard normals at the given logical indices (Box-Muller on each counter's pairs)."""
    c = index >> 2
    r = philox4x32_10_reference(c & MASK32, (c >> 32) & MASK32, stream & MASK32, stream >> 32,
                                seed & MASK32, seed >> 32)
    u = [uniform_from_words_reference(x) for x in r]
    first = (index & 3) < 2
    ua = torch.where(first, u[0], u[2])
    ub = torch.where(first, u[1], u[3])
    rho = torch.sqrt(-2.0 * torch.log(ua))
    ang = torch.tensor(2.0 * math.pi, dtype=torch.float32) * ub
    return torch.where((index & 1) == 0, rho * torch.cos(ang), rho * torch.sin(ang))


# ---------------------------------------------------------------- dispatch
def _check(n, seed, stream, start):
    for name, v, hi in (("n", n, 2**62), ("seed", seed, SEED_LIMIT), ("start", start, 2**64 - 2**62)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"fastreg.rng: {name} must be an int, got {v!r}")
        if not 0 <= v < hi:
            raise ValueError(f"fastreg.rng: {name} must be in [0, {hi}), got {v}")
    check_stream(stream, "rng")


def _generate(kind: str, n: int, seed: int, stream: int, start: int, device, backend):
    _check(n, seed, stream, start)
    device = torch.device(device)
    if backend is None:
        backend = _backend.select(device, ("numba", "triton", "cuda"), "rng")
    if backend == "torch":
        idx = torch.arange(n, dtype=torch.int64, device=device) + start
        if kind == "normals":
            return normals_reference(idx, seed, stream)
        w = words_reference(idx, seed, stream)
        return w if kind == "words" else uniform_from_words_reference(w)
    if backend == "numba":
        import numpy as np

        from fastreg.kernels.numba import rng as nb

        out = np.empty(n, dtype=np.uint32 if kind == "words" else np.float32)
        {"words": nb.philox_words, "uniforms": nb.philox_uniforms, "normals": nb.philox_normals}[
            kind](out, seed, stream, start)
        t = torch.from_numpy(out)
        return t.to(torch.int64) if kind == "words" else t
    if backend == "triton":
        import triton

        from fastreg.kernels.triton import rng as tr

        out = torch.empty(n, dtype=torch.int32 if kind == "words" else torch.float32, device=device)
        seed_t = torch.full((), seed, dtype=torch.int64, device=device)
        # two Philox counters (eight elements, two 128-bit stores) per thread at Triton's
        # default 4 warps; the kernel's blocks run over n + start % 4 counter-aligned
        # positions (kernels/triton/rng.py)
        block = 1024
        if n:
            tr.philox_fill_kernel[(triton.cdiv(n + start % 4, block),)](
                out, seed_t, stream, start, n, KIND=_KINDS[kind], BLOCK=block)
        return out.to(torch.int64) & MASK32 if kind == "words" else out
    if backend == "cuda":
        if kind != "words":
            raise RuntimeError("fastreg.rng: the cuda backend exposes words only")
        C = _native.native_cuda()
        out = torch.empty(n, dtype=torch.int32, device=device)
        C.philox_words_cuda(out.data_ptr(), n, seed, stream, start,
                            torch.cuda.current_stream(device).cuda_stream)
        return out.to(torch.int64) & MASK32
    if backend == "host":
        C = _native.native()
        out = torch.empty(n, dtype=torch.int32 if kind == "words" else torch.float32)
        if kind == "normals":
            raise RuntimeError("fastreg.rng: the C++ host build exposes words and uniforms")
        fn = C.philox_words_host if kind == "words" else C.philox_uniforms_host
        fn(out.data_ptr(), n, seed, stream, start)
        return out.to(torch.int64) & MASK32 if kind == "words" else out
    raise ValueError(f"fastreg.rng: unknown backend {backend!r}")


def words(n: int, seed: int, stream: int = 0, *, start: int = 0, device="cpu", backend=None):
    """word(start + k) for k < n, as an int64 tensor of uint32 values.

    backend: None (by device), "torch", "numba", "triton", "cuda", or "host"
    (the C++ build of csrc/include/fastreg/philox.h, for tests).
    """
    return _generate("words", n, seed, stream, start, device, backend)


def uniforms(n: int, seed: int, stream: int = 0, *, start: int = 0, device="cpu", backend=None):
    """u(start + k) = ((word >> 9) + 0.5) * 2^-23, float32 in (0, 1)."""
    return _generate("uniforms", n, seed, stream, start, device, backend)


def normals(n: int, seed: int, stream: int = 0, *, start: int = 0, device="cpu", backend=None):
    """Standard normals by Box-Muller on the lane pairs of each counter, float32."""
    return _generate("normals", n, seed, stream, start, device, backend)
