"""fastreg under torch.distributed: random streams per rank, DTensor helpers (docs/distributed.md).

Random streams across ranks. Ranks seeded alike (the usual `torch.manual_seed(s)` on every
rank) draw the same seed for `seed=None`, so they would draw the same dropout masks and
noise. Inside `fold_ranks(group, ...)` every fastreg random op folds a value derived from
this process's rank in each group into its stream:

    with fastreg.distributed.fold_ranks():              # data parallel (the default group)
        loss = model(x).sum()                           # masks independent across ranks

    with fold_ranks(dp_group):                          # a replicated activation under tensor
        y = fastreg.dropout(x, 0.1)                     # parallelism: same masks on the TP ranks
        with fold_ranks(tp_group):                      # a sharded activation:
            h = fastreg.dropout(h_shard, 0.1)           # independent across TP ranks too

What changes is only the stream an op uses: the effective stream is `stream XOR mask`, the
mask a 63-bit hash of the ranks (nested contexts chain the hashes, in order), so the bits
still follow docs/rng.md for that (seed, effective stream) on every device and backend
(`folded_stream(stream)` gives the effective stream; `fastreg.rng.words` reproduces the
masks). Nothing is communicated: each rank reads its own rank. torch's generator is not
touched. Backward passes regenerate masks from the stream saved in forward, so they need
no context; code that re-runs a forward later (activation checkpointing) must run it in
the same context (enter it inside the checkpointed function).
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from fastreg import _seed

__all__ = ["fold_ranks", "fold_key", "folded_stream", "stream_mask"]

_M64 = (1 << 64) - 1
_M63 = (1 << 63) - 1
_ROOT = 0x243F6A8885A308D3  # the chain's start (digits of pi): a nonzero constant


def _mix64(z: int) -> int:
    """SplitMix64's finaliser after its golden-ratio increment: a bijection of 64-bit ints
    whose outputs for nearby inputs (ranks 0, 1, 2, ...) look unrelated."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


# the 64-bit chain state of the active contexts (None outside all of them); the 63-bit mask
# the ops read lives in fastreg._seed.stream_fold
_chain: int | None = None


def _rank_in(group) -> int:
    """This process's rank in a ProcessGroup, a 1-D DeviceMesh or None (the default group)."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError("fastreg.distributed.fold_ranks: a DeviceMesh must be 1-D (take one "
                             f"dimension, mesh['dp']), got {group.ndim} dimensions")
        return group.get_local_rank()
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastreg.distributed.fold_ranks: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or use fold_key)")
    r = dist.get_rank(group)
    if r < 0:
        raise ValueError("fastreg.distributed.fold_ranks: this process is not a member of the "
                         "group it was given")
    return r


@contextlib.contextmanager
def fold_key(*keys: int):
    """Fold arbitrary non-negative ints into the stream of every fastreg random op inside the
    context (fold_ranks folds ranks this way). Nests: inner keys chain onto outer ones."""
    global _chain
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= int(k) <= _M64:
            raise ValueError(f"fastreg.distributed.fold_key: keys must be ints in [0, 2^64), got {k!r}")
    saved_chain, saved_fold = _chain, _seed.stream_fold
    h = _ROOT if _chain is None else _chain
    for k in keys:
        h = _mix64(h ^ _mix64(int(k)))
    try:
        _chain, _seed.stream_fold = h, h & _M63
        yield
    finally:
        _chain, _seed.stream_fold = saved_chain, saved_fold


def fold_ranks(*groups):
    """Context manager: inside it, every fastreg random op's stream depends on this process's
    rank in each of `groups` (ProcessGroups or 1-D DeviceMeshes; none means the default
    group). Ranks that differ in any of those ranks draw independent masks; ranks that agree
    in all of them (e.g. the tensor-parallel ranks of one data-parallel rank, with
    fold_ranks(dp_group)) draw identical ones. Usable as a decorator too."""
    ranks = [_rank_in(g) for g in (groups or (None,))]
    return fold_key(*ranks)


def stream_mask() -> int | None:
    """The 63-bit mask XORed into every stream now (None outside any fold context)."""
    return _seed.stream_fold


def folded_stream(stream: int = 0) -> int:
    """The stream a fastreg op given `stream` uses here and now (stream itself outside any
    fold context): with fastreg.rng.words(n, seed, folded_stream(s)) it reproduces a mask."""
    return _seed.check_stream(stream, "distributed.folded_stream")


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), a plain tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


class _SumAcrossRanks(torch.autograd.Function):
    """The sum over a group's ranks of a per-rank partial value; backward passes the gradient
    through unchanged, so each rank's local terms receive d(sum)/d(term) once: right for a
    global term (a KL, a penalty) that every rank adds to its loss, whose local shards' gradients
    bypass the data-parallel gradient averaging."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def sum_across_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of x over the ranks of `group` (one all-reduce), differentiable: see _SumAcrossRanks."""
    return _SumAcrossRanks.apply(x, group)


def dtensor_locals(*ts):
    """(local tensors, process group) for DTensors of one 1-D mesh and the same placements, or
    (ts, None) for plain tensors; a mix, or other meshes, raises."""
    if not any(_is_dtensor(t) for t in ts):
        return ts, None
    if not all(_is_dtensor(t) for t in ts):
        raise TypeError("fastreg: tensors mix DTensors and plain tensors")
    mesh, pl = ts[0].device_mesh, ts[0].placements
    if mesh.ndim != 1 or any(t.device_mesh != mesh or t.placements != pl for t in ts):
        raise ValueError("fastreg: DTensors must share one 1-D device mesh and their placements, "
                         f"got {[(t.device_mesh, t.placements) for t in ts]}")
    from torch.distributed.tensor import Replicate

    if type(pl[0]) is Replicate:  # every rank holds everything: nothing to sum
        return tuple(t.to_local() for t in ts), None
    return tuple(t.to_local() for t in ts), mesh.get_group()
