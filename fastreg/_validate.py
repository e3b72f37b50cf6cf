"""Argument checks shared by every family: run once at the Python boundary."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastreg.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastreg.{op}: {name} must have a floating dtype (float32, float64, float16, "
            f"bfloat16), got {x.dtype}"
        )


def check_probability(p, name: str, op: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"fastreg.{op}: {name} must be a real number in [0, 1], got {p!r}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"fastreg.{op}: {name} must be in [0, 1], got {p}")
    return p


def check_same(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], op: str) -> None:
    """Shape, dtype and device of b must equal a's."""
    for attr in ("shape", "dtype", "device"):
        va, vb = getattr(a, attr), getattr(b, attr)
        if va != vb:
            raise ValueError(
                f"fastreg.{op}: {names[1]} must have the same {attr} as {names[0]}: "
                f"{names[0]}.{attr}={va}, {names[1]}.{attr}={vb}"
            )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_op_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, op: str) -> None:
    """For a torch.ops.fastreg op called directly (the public wrappers check first): t must
    have ref's shape and device, since the kernels index t by ref's elements. O(1)."""
    if t.shape != ref.shape or t.device != ref.device:
        raise ValueError(f"fastreg::{op}: {name} has shape {tuple(t.shape)} on {t.device}, needs "
                         f"{ref_name}'s shape {tuple(ref.shape)} on {ref.device}")
