"""Records every Triton kernel launch the suite makes under the interpreter, so that
tests/test_zz_triton_compile.py can compile each launched specialisation ahead of time
(tools/triton_static.py) with every supported Triton, for sm_80 and sm_90.

The interpreter accepts code the compiler rejects (mismatched return types, ints
equal to 1 that Triton specialises into constexprs, ...); compiling what the tests
really launched checks the GPU path as far as a machine without a GPU can.

A record holds what the JIT would key a real launch on: each argument's type, the
constexprs (declared ones, and ints equal to 1 the JIT specialises), and the
divisibility-by-16 attribute of each pointer and specialisable int as this launch
saw it. It also names the pointers and the ints the JIT may specialise, so that
the compile step can add the launches a GPU sees and the tests do not make
(2^24 elements, 16-byte-aligned tensors, an int equal to 1, an int past 2^31).
"""

from __future__ import annotations

import inspect

SPECS: dict[tuple, dict] = {}
# nodeid of the test now running (set by conftest), and launches counted per test
CURRENT_TEST: str | None = None
LAUNCHED_BY: dict[str, int] = {}
# nodeids carrying the triton_backend marker (the subset rerun with other Tritons)
MARKED: set[str] = set()


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
    no_align = set(kernel.kwargs.get("do_not_specialize_on_alignment") or ())
    types, constexprs, attrs, ptrs, free_ints = {}, {}, {}, [], []
    for name, value in bound.arguments.items():
        ann = str(sig.parameters[name].annotation)
        if "constexpr" in ann:
            constexprs[name] = _encode(value)
            types[name] = "constexpr"
            continue
        ty = mangle_type(value, name not in no_spec)
        types[name] = ty
        if ty == "constexpr":  # an int equal to 1, specialised by the JIT
            constexprs[name] = _encode(value)
        if hasattr(value, "data_ptr"):
            ptrs.append(name)
            if value.data_ptr() % 16 == 0 and name not in no_align:
                attrs[name] = "D"
        elif isinstance(value, int) and not isinstance(value, bool) and name not in no_spec:
            free_ints.append(name)
            if ty != "constexpr" and value % 16 == 0 and name not in no_align:
                attrs[name] = "D"
    spec = {"module": fn.__module__, "name": fn.__name__, "types": types,
            "constexprs": constexprs, "attrs": attrs, "ptrs": ptrs, "free_ints": free_ints}
    key = (spec["module"], spec["name"], tuple(types.items()), repr(sorted(constexprs.items())),
           tuple(sorted(attrs.items())))
    SPECS.setdefault(key, spec)


def install() -> None:
    """Wrap the interpreter's launch to record (kernel, signature, constexprs, attributes)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    if getattr(InterpretedFunction.run, "_fastreg_recording", False):
        return
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if CURRENT_TEST is not None:
            LAUNCHED_BY[CURRENT_TEST] = LAUNCHED_BY.get(CURRENT_TEST, 0) + 1
        try:
            _record(self, args, kwargs)
        except Exception:  # noqa: BLE001 - recording must never change what a test sees
            pass
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._fastreg_recording = True
    InterpretedFunction.run = run
