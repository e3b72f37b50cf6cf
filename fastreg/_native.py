"""Loads the optional native parts once, with one clear warning for each missing part.

`import fastreg` never fails because a native part is missing (DESIGN.md): the
dispatcher then takes the next backend.
"""

from __future__ import annotations

import importlib
import os
import warnings

_CACHE: dict[str, object] = {}


def _warn_missing(what: str, err: BaseException, fallback: str) -> None:
    warnings.warn(
        f"fastreg: {what} is not available ({type(err).__name__}: {err}); {fallback}",
        RuntimeWarning,
        stacklevel=3,
    )


def native():
    """fastreg._C, or None (warned once) when the extension was not built."""
    if "_C" not in _CACHE:
        try:
            _CACHE["_C"] = importlib.import_module("fastreg._C")
        except ImportError as err:
            _CACHE["_C"] = None
            _warn_missing(
                "the native extension fastreg._C",
                err,
                "C++ host kernels and CUDA C++ kernels are disabled; Numba/Triton/torch "
                "backends are used instead (build it with `pip install --no-build-isolation -e .`)",
            )
    return _CACHE["_C"]


def native_cuda():
    """fastreg._C when it was built with CUDA kernels, else None."""
    mod = native()
    return mod if mod is not None and getattr(mod, "with_cuda", False) else None


def _importable(name: str, consequence: str) -> bool:
    """Whether module `name` imports (tried once; a failure warns once, saying `consequence`)."""
    if name not in _CACHE:
        try:
            importlib.import_module(name)
            _CACHE[name] = True
        except ImportError as err:
            _CACHE[name] = False
            _warn_missing(name, err, consequence)
    return bool(_CACHE[name])


def numba_available() -> bool:
    return _importable("numba", "CPU ops fall back to the pure-PyTorch reference")


def triton_available() -> bool:
    return _importable("triton", "GPU ops use CUDA C++ kernels or the PyTorch reference")


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
