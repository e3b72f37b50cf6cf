"""Helpers for the benchmark suites: timing on either device, saved-bytes accounting."""

from __future__ import annotations

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, device, *, provider: str, group: str, rounds: int = 20, warmup: int = 3,
        setup=None, **extra):
    """Time fn() with pytest-benchmark's pedantic mode, synchronising CUDA inside the timed call.
    setup(), when given, runs untimed before every call (e.g. to flush the caches)."""
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info.update(extra)

    def timed():
        fn()
        sync(device)

    for _ in range(warmup):
        if setup is not None:
            setup()
        timed()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, setup=setup)


def saved_bytes_per_elem(fn, numel: int) -> float:
    """Bytes autograd saves for backward while fn() builds its graph, per element.

    Counts every tensor packed through saved_tensors_hooks (distinct storages once).
    The graph is kept alive until counting is done.
    """
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / max(numel, 1)
