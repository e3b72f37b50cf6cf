"""Seeds for the counter-based RNG (docs/rng.md).

A seed travels as a 0-dim int64 tensor on the input's device, so a fresh seed per
call does not force torch.compile to recompile, and the GPU kernels read it
without a host sync. `seed=None` draws one from torch's default generator for
that device, so torch.manual_seed makes runs reproducible.
"""

from __future__ import annotations

import numbers

import torch

SEED_LIMIT = 2**63  # seeds live in [0, 2^63): a non-negative int64


def seed_tensor(seed, device: torch.device, op: str) -> torch.Tensor:
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64:
            raise TypeError(f"fastreg.{op}: seed tensor must be a 0-dim int64 tensor, got "
                            f"shape {tuple(seed.shape)} dtype {seed.dtype}")
        return seed.to(device)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"fastreg.{op}: seed must be an int in [0, 2^63) or None, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"fastreg.{op}: seed must be in [0, 2^63), got {seed}")
    return torch.full((), seed, dtype=torch.int64, device=device)


def check_stream(stream, op: str) -> int:
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral):
        raise TypeError(f"fastreg.{op}: stream must be an int in [0, 2^63), got {stream!r}")
    stream = int(stream)
    if not 0 <= stream < SEED_LIMIT:
        raise ValueError(f"fastreg.{op}: stream must be in [0, 2^63), got {stream}")
    return stream


def keep_threshold(p: float) -> int:
    """t = min(round(p * 2^32), 2^32 - 1): keep iff word >= t (p = 1 handled by callers)."""
    return min(int(round(p * 2.0**32)), 2**32 - 1)
