"""What may reach a native kernel (Numba, C++, CUDA): plain dense strided tensors only.

The native kernels read and write tensors through raw data pointers. A tensor subclass (a
DTensor from FSDP2, any wrapper subclass made with torch.Tensor._make_wrapper_subclass, or a
plain Python subclass), a sparse or otherwise non-strided tensor, or a meta tensor has no such
memory, or memory that does not mean what the kernel assumes: handing one over reads or writes
out of bounds. The entry points call these checks before any kernel runs and refuse what they
cannot handle with a TypeError naming the argument. Support for a kind of tensor (DTensor,
say) is added in front of the check, by unwrapping it into plain tensors first.
"""

from __future__ import annotations

import operator

import torch

# exact types: torch.nn.Parameter of a plain tensor is a Parameter; of a DTensor it is a DTensor
PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_LAYOUT = operator.attrgetter("layout")
_IS_META = operator.attrgetter("is_meta")


def _what(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    kind = type(t).__name__ if type(t) not in PLAIN_TYPES else "tensor"
    return f"a {kind} with layout {t.layout} on device {t.device}"


def is_plain(t) -> bool:
    """True when check_plain would pass; for hot loops that build the argument's name only
    when it fails."""
    return type(t) in PLAIN_TYPES and t.layout is torch.strided and not t.is_meta


def check_plain(t, name: str, op: str) -> None:
    """TypeError unless t is a plain dense strided torch.Tensor (or nn.Parameter) off the meta
    device. O(1): metadata only."""
    if type(t) not in PLAIN_TYPES:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastreg.{op}: {name} must be a torch.Tensor, got {_what(t)}")
        raise TypeError(
            f"fastreg.{op}: {name} is a tensor subclass ({type(t).__module__}."
            f"{type(t).__qualname__}); the native kernels take plain dense tensors only "
            "(pass the local tensor, e.g. DTensor.to_local(), or use the 'torch' backend)")
    if t.layout is not torch.strided:
        raise TypeError(f"fastreg.{op}: {name} must be a dense (strided) tensor, got layout "
                        f"{t.layout}; sparse tensors are not supported (convert with .to_dense())")
    if t.is_meta:
        raise TypeError(f"fastreg.{op}: {name} is a meta tensor (no data); the native kernels need "
                        "tensors with memory")


def check_plain_list(ts, name: str, op: str) -> None:
    """check_plain for every tensor of a list or tuple, named name[i]. The common all-plain case
    costs three C-level passes over the list, not a Python loop."""
    if (set(map(type, ts)) <= PLAIN_TYPES and set(map(_LAYOUT, ts)) <= {torch.strided}
            and not any(map(_IS_META, ts))):
        return
    for i, t in enumerate(ts):
        check_plain(t, f"{name}[{i}]", op)


def is_plain_list(ts) -> bool:
    """True when check_plain_list would pass (for fast paths that decline instead of raising)."""
    try:
        return (set(map(type, ts)) <= PLAIN_TYPES and set(map(_LAYOUT, ts)) <= {torch.strided}
                and not any(map(_IS_META, ts)))
    except AttributeError:  # not tensors
        return False
