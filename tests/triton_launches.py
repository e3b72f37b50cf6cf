"""Records every Triton kernel launch the suite makes under the interpreter, so that
tests/test_zz_triton_compile.py can compile each launched signature for sm_90.

The interpreter accepts code the compiler rejects (mismatched return types, ints
equal to 1 that Triton specialises into constexprs, ...); compiling what the tests
really launched checks the GPU path as far as a machine without a GPU can.
"""

from __future__ import annotations

import inspect

SPECS: dict[tuple, dict] = {}


def _encode(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value of type {type(value).__name__}")


def _record(kernel, args, kwargs):
    from triton.runtime.jit import mangle_type

    fn = kernel.fn
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    no_spec = set(kernel.kwargs.get("do_not_specialize") or ())
    types, constexprs = {}, {}
    for name, value in bound.arguments.items():
        ann = str(sig.parameters[name].annotation)
        if "constexpr" in ann:
            constexprs[name] = _encode(value)
            continue
        ty = mangle_type(value, name not in no_spec)
        if ty == "constexpr":
            constexprs[name] = _encode(value)
        types[name] = ty
    spec = {"module": fn.__module__, "name": fn.__name__, "types": types, "constexprs": constexprs}
    key = (spec["module"], spec["name"], tuple(types.items()), repr(sorted(constexprs.items())))
    SPECS.setdefault(key, spec)


def install() -> None:
    """Wrap the interpreter's launch to record (kernel, signature, constexprs)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    if getattr(InterpretedFunction.run, "_fastreg_recording", False):
        return
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            _record(self, args, kwargs)
        except Exception:  # noqa: BLE001 - recording must never change what a test sees
            pass
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._fastreg_recording = True
    InterpretedFunction.run = run
