"""Backend selection by device, with a forced override for tests and debugging.

Default: CPU tensors -> "numba"; CUDA tensors -> the family's GPU backend
("triton" for elementwise ops, "cuda" for multi-tensor and integer-state ops).
FASTREG_BACKEND=numba|triton|cuda|torch, or `fastreg.set_backend(...)` /
`with fastreg.use_backend(...)`, forces one. "torch" is the pure-PyTorch
reference and runs everywhere. "triton" on CPU tensors needs TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import struct
import threading

import torch

from fastreg import _launch, _native

BACKENDS = ("numba", "triton", "cuda", "torch")
class _State(threading.local):
    forced: str | None = None  # per thread; a class default makes the read a plain attribute


_state = _State()


def _check_name(name: str | None, arg: str) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS} or None, got {name!r}")


def set_backend(name: str | None) -> None:
    """Force a backend for every op in this thread (None: choose by device)."""
    _check_name(name, "backend")
    _state.forced = name


# FASTREG_BACKEND is read per call (tests and users may set it at run time), and every op calls
# select() once or twice. os.environ.get encodes the key and decodes the value (0.6 us); the
# mapping os.environ keeps in step with the process environment (os.environ._data, a dict of
# encoded keys and values in CPython) answers the common "not set" in a dict lookup.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey("FASTREG_BACKEND")
except AttributeError:  # another os.environ: read it the public way
    _ENV_DATA = None


def _env_backend() -> str | None:
    if _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA:
        return None
    return os.environ.get("FASTREG_BACKEND")


def forced_backend() -> str | None:
    """The backend forced by use_backend/set_backend or FASTREG_BACKEND, or None."""
    name = _state.forced
    if name is not None:
        return name
    env = _env_backend()
    if not env:
        return None
    env = env.strip() or None
    _check_name(env, "FASTREG_BACKEND")
    return env


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of set_backend."""
    _check_name(name, "backend")
    prev = _state.forced
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = prev


def _usable(name: str, device: torch.device) -> str | None:
    """None if `name` can run on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "numba":
        if device.type != "cpu":
            return "numba runs on CPU tensors only"
        return None if _native.numba_available() else "numba is not installed"
    if name == "triton":
        if not _native.triton_available():
            return "triton is not installed"
        if device.type == "cuda" or _native.triton_interpreted():
            return None
        return "triton needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
    if name == "cuda":
        if device.type != "cuda":
            return "the cuda backend needs CUDA tensors"
        return None if _native.native_cuda() is not None else "fastreg._C was built without CUDA"
    return f"unknown backend {name!r}"


def select(device: torch.device, supported: tuple[str, ...], op: str) -> str:
    """The backend that runs `op` on `device`.

    `supported` lists the backends the op implements, in order of preference
    for that device (the first usable wins); "torch" is always implied last.
    """
    forced = forced_backend()
    if forced is None:
        # unforced, the answer depends only on the device type and the op's list (what is
        # installed is probed once per process): cached, as select runs on every call
        key = (device.type, supported)
        name = _SELECTED.get(key)
        if name is None:
            name = _SELECTED[key] = _select_by_device(device, supported)
        return name
    if forced != "torch" and forced not in supported:
        raise RuntimeError(f"fastreg.{op}: backend {forced!r} is not implemented for this op")
    why = _usable(forced, device)
    if why is not None:
        raise RuntimeError(f"fastreg.{op}: forced backend {forced!r} cannot run here: {why}")
    return forced


_SELECTED: dict[tuple[str, tuple[str, ...]], str] = {}


def _select_by_device(device: torch.device, supported: tuple[str, ...]) -> str:
    for name in supported:
        if name == "numba" and device.type != "cpu":
            continue
        if name in ("cuda",) and device.type != "cuda":
            continue
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests: only when forced
        if _usable(name, device) is None:
            return name
    return "torch"


# exact types: an nn.Parameter of a plain tensor is a Parameter, of a DTensor a DTensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def eager_fast_path(*tensors) -> bool:
    """True in plain eager mode: no torch.compile/export tracing, no dispatch mode (fake
    tensors, opcheck), no functorch transform, and only plain tensors (or Parameters). The
    public functions then run the kernels through one autograd.Function, skipping the
    torch.library dispatch layers (tens of microseconds per call, more than a small kernel);
    anything else goes through the ops, which torch.compile traces."""
    if _is_compiling() or _dispatch_stack_len() or _functorch_active():
        return False
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    return True


_NUMBA_MODULES: dict = {}


def numba_module(family: str):
    """fastreg.kernels.numba.<family>, imported on first use (Numba loads only when a CPU op
    runs) and then looked up in a dict: an import statement in a hot function costs about a
    microsecond per call."""
    mod = _NUMBA_MODULES.get(family)
    if mod is None:
        mod = _NUMBA_MODULES[family] = importlib.import_module("fastreg.kernels.numba." + family)
    return mod


def launch_kernel(t: torch.Tensor) -> bool:
    """False when a Triton launch must be skipped: under the interpreter (CPU tests)
    the kernel cannot run on fake tensors, so fake-mode tracing only allocates the
    outputs. On a GPU the launch is always traced (wrap_triton records it)."""
    if not _native.triton_interpreted() or t.device.type == "cuda":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t) and t.device.type != "meta"


def launcher(kernel, direct: bool):
    """The Triton kernel itself in the eager fast path (or, with FASTREG_FAST_LAUNCH=1 on a
    GPU, fastreg._launch's direct launcher of its compiled forms); wrap_triton(kernel) inside
    a triton_op, so that torch.compile records the launch."""
    if direct:
        if _launch.ENABLED and not _native.triton_interpreted():
            return _launch.fast(kernel)
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def f64_bits(v: float) -> int:
    """The bits of a float64 as an int64: Triton would round a Python float argument to
    float32, so kernels take float64 scalars as bits and bitcast them back."""
    return struct.unpack("<q", struct.pack("<d", v))[0]
