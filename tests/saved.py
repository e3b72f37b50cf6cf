"""Bytes an autograd graph saves for backward, as the tests measure them."""

import torch


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages that autograd packs while `fn()` runs (the output is
    dropped before returning)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
