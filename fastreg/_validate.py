"""Argument checks shared by every family: run once at the Python boundary."""

from __future__ import annotations

import math
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
    if type(p) is float and 0.0 <= p <= 1.0:  # the common case, without the ABC checks below
        return p
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


# ---------------------------------------------------------------- ops called directly
# The public wrappers check their arguments, but torch.ops.fastreg.* can be called without
# them. By the time an op body runs, the dispatcher has converted each scalar to its schema type
# (int or float; a bool arrives as an int), so only the ranges the wrappers allow are checked
# here. All O(1): tensor metadata only, never tensor data (no device sync). Only the op bodies
# call these; the eager fast paths behind the wrappers do not (already checked there).
def check_op_seed(seed: torch.Tensor, ref: torch.Tensor, ref_name: str, op: str) -> None:
    """seed as fastreg._seed.seed_tensor builds it: 0-dim int64 on ref's device (the GPU kernels
    dereference it there). Its value is not range-checked, as for the wrappers' seed tensors."""
    if seed.dim() != 0 or seed.dtype != torch.int64:
        raise TypeError(f"fastreg::{op}: seed must be a 0-dim int64 tensor, got shape "
                        f"{tuple(seed.shape)} dtype {seed.dtype}")
    if seed.device != ref.device:
        raise ValueError(f"fastreg::{op}: seed must be on {ref_name}'s device ({ref.device}), "
                         f"got {seed.device}")


def check_op_devices(op: str, **tensors) -> None:
    """Every tensor given (None skipped) on the first one's device. Every fake kernel checks
    this: the dispatcher sends a call that mixes a meta tensor with real ones to the fake
    kernel, whose uninitialised result would come back as if computed (under torch.compile the
    tensors are FakeTensors on their real devices, where the op itself refuses a mix too)."""
    items = iter(tensors.items())
    ref_name, ref = next(items)
    for name, t in items:
        if t is not None and t.device != ref.device:
            raise ValueError(f"fastreg::{op}: {name} must be on {ref_name}'s device "
                             f"({ref.device}), got {t.device}")


def check_op_stream(stream: int, op: str) -> None:
    # the schema's int is an int64, so stream < 2^63 (fastreg._seed.SEED_LIMIT) already holds
    if stream < 0:
        raise ValueError(f"fastreg::{op}: stream must be in [0, 2^63), got {stream}")


def check_op_rng(seed: torch.Tensor, stream: int, ref: torch.Tensor, ref_name: str,
                 op: str) -> None:
    check_op_seed(seed, ref, ref_name, op)
    check_op_stream(stream, op)


def check_op_probability(p: float, name: str, op: str) -> None:
    """p in [0, 1], check_probability's rule."""
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"fastreg::{op}: {name} must be in [0, 1], got {p}")


def check_op_code(v: int, name: str, meanings: tuple, op: str) -> None:
    """An int that selects one of len(meanings) behaviours (0, 1, ...): a kernel given another
    value silently takes some default branch."""
    if not 0 <= v < len(meanings):
        codes = [f"{i} ({m})" for i, m in enumerate(meanings)]
        allowed = codes[0] if len(codes) == 1 else ", ".join(codes[:-1]) + " or " + codes[-1]
        raise ValueError(f"fastreg::{op}: {name} must be {allowed}, got {v}")


def check_op_nonneg(v: float, name: str, op: str) -> None:
    """A finite number >= 0 (eps, step sizes)."""
    if not 0.0 <= v < math.inf:  # also rejects NaN
        raise ValueError(f"fastreg::{op}: {name} must be a finite number >= 0, got {v}")
