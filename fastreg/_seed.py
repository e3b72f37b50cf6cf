"""Seeds for the counter-based RNG (docs/rng.md).

A seed travels as a 0-dim int64 tensor on the input's device, so a fresh seed per
call does not force torch.compile to recompile, and the GPU kernels read it
without a host sync. `seed=None` draws one from torch's default generator for
that device, so torch.manual_seed makes runs reproducible.
"""

from __future__ import annotations

import numbers
import struct

import torch

SEED_LIMIT = 2**63  # seeds live in [0, 2^63): a non-negative int64

# None, or a 63-bit mask XORed into every op's stream (set only by fastreg.distributed's
# fold contexts, so that ranks draw different masks from one seed); reading it is the whole
# cost when no context is active
stream_fold: int | None = None


def check_seed(seed, op: str) -> None:
    """Validate a seed argument without drawing anything."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64:
            raise TypeError(f"fastreg.{op}: seed tensor must be a 0-dim int64 tensor, got "
                            f"shape {tuple(seed.shape)} dtype {seed.dtype}")
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"fastreg.{op}: seed must be an int in [0, 2^63) or None, got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"fastreg.{op}: seed must be in [0, 2^63), got {int(seed)}")


def seed_tensor(seed, device: torch.device, op: str) -> torch.Tensor:
    """The seed as a 0-dim int64 tensor on `device` (a fresh draw for None).

    A seed tensor is used as given (moved to `device`); its value is not range-checked,
    as that would need a device sync."""
    check_seed(seed, op)
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        return seed.to(device)
    return torch.full((), int(seed), dtype=torch.int64, device=device)


def check_stream(stream, op: str) -> int:
    # the common case first: isinstance against numbers.Integral (an ABC) costs more than
    # the rest of this function
    if type(stream) is int and 0 <= stream < SEED_LIMIT:
        pass
    elif isinstance(stream, bool) or not isinstance(stream, numbers.Integral):
        raise TypeError(f"fastreg.{op}: stream must be an int in [0, 2^63), got {stream!r}")
    else:
        stream = int(stream)
        if not 0 <= stream < SEED_LIMIT:
            raise ValueError(f"fastreg.{op}: stream must be in [0, 2^63), got {stream}")
    if stream_fold is not None:  # a fastreg.distributed.fold_ranks context is active
        return stream ^ stream_fold
    return stream


def keep_threshold(p: float) -> int:
    """Keep iff word >= t, t = min(round(p * 2^32), 2^32 - 1) for p < 1 (round half to
    even), and t = 2^32 for p = 1 so that nothing is kept. Kernels compare in 64 bits."""
    if p >= 1.0:
        return 2**32
    return min(int(round(p * 2.0**32)), 2**32 - 1)


def dropout_scale(p: float) -> float:
    """1 / (1 - p) in float64; 0 for p = 1 (output = input * 0, as torch does)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_scale_bits(p: float) -> int:
    """dropout_scale(p) as float64 bits, the form the Triton kernels take."""
    return struct.unpack("<q", struct.pack("<d", dropout_scale(p)))[0]
