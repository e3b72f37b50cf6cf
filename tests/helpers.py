"""Helpers shared by the test files (tests/ is on sys.path: conftest.py)."""

import os
import subprocess
import sys

import pytest
import torch


def views(x):
    """x itself plus non-contiguous views holding the same logical values: the kernels must
    follow the logical row-major index, never memory order."""
    yield "contiguous", x
    if x.dim() >= 2:
        yield "transposed", x.transpose(0, -1).contiguous().transpose(0, -1)
    big = torch.empty(x.shape + (2,), dtype=x.dtype)
    big[..., 0] = x
    yield "strided", big[..., 0]


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


def run_without_interpreter(script: str, timeout: int = 300):
    """Runs `script` in a fresh Python without TRITON_INTERPRET, so that Triton compiles for
    real (the interpreter accepts code the compiler rejects)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)


def layout_of(t):
    """t's strides on its dims of size > 1: the memory layout. (A size-1 dim's stride is
    arbitrary; torch.empty_like copies it, a contiguous result of the same layout may differ.)"""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


def assert_layout_like(out, x):
    """out is laid out as torch.empty_like(x) (docs/layout.md)."""
    assert out.shape == x.shape
    assert layout_of(out) == layout_of(torch.empty_like(x)), (out.stride(), x.stride())


class Wrapper(torch.Tensor):
    """A minimal wrapper subclass (as DTensor is): no storage of its own, unwraps on dispatch."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.inner if isinstance(x, Wrapper) else x  # noqa: E731
        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        return func(*args, **kwargs)


def record_launches(monkeypatch) -> list:
    """The Triton kernels the ops hand to fastreg._backend.launcher from now on, in order
    (the launches still run)."""
    from fastreg import _backend

    launched = []
    real = _backend.launcher
    monkeypatch.setattr(_backend, "launcher",
                        lambda kernel, direct: launched.append(kernel) or real(kernel, direct))
    return launched


def assert_each_launches_its_kernel(launched: list, calls: dict, *label) -> None:
    """For each kernel -> call of `calls`: the call launches that kernel exactly once under the
    Triton backend and nothing under the torch backend (launched: record_launches' list)."""
    import fastreg

    for kernel, call in calls.items():
        for backend, want in (("triton", [kernel]), ("torch", [])):
            launched.clear()
            with fastreg.use_backend(backend):
                call()
            assert launched == want, (kernel, backend, *label)


def host_hot_path_on(monkeypatch, required=True) -> bool:
    """Switches penalty's C++ host hot path on for this test (it is off on CPUs without
    AVX-512, and the one-pass eager path of accumulate_/prox_ needs it). Without the native
    build: skips the test when `required`, else leaves the path off; returns whether it is on."""
    from fastreg import _native
    from fastreg.ops import penalty as ops

    if _native.native() is None:
        if required:
            pytest.skip("fastreg._C not built")
        return False
    monkeypatch.setattr(ops, "HOST_HOT_PATH", True)
    return True
