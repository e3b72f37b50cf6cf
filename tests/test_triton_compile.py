"""The compiled (not interpreted) Triton path of the dropout and RNG kernels.

The interpreter accepts code that the compiler rejects (return types, constexpr
specialisation), so every kernel is also compiled to PTX and a cubin for sm_90 here,
with no GPU, in a subprocess without TRITON_INTERPRET.
"""

import os
import subprocess
import sys

_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastreg.kernels.triton import dropout as tk, rng as tr

def comp(kern, types, constexprs):
    names = list(inspect.signature(kern.fn).parameters)
    k = triton.compile(ASTSource(fn=kern, signature=dict(zip(names, types)), constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32))
    assert "ptx" in k.asm and "cubin" in k.asm, kern

for dt in ("fp32", "fp64", "fp16", "bf16"):
    f64 = dt == "fp64"
    for wb in (False, True):
        # small ints arrive as i32, large ones as i64: both must compile
        for small in (("i32", "i32", "i32"), ("i64", "i64", "i64")):
            stream, threshold, n = small
            comp(tk.dropout_fwd_kernel,
                 ["*" + dt, "*" + dt, "*u8", "*i64", stream, threshold, "i64", "i32", n,
                  "constexpr", "constexpr", "constexpr"],
                 {"WITH_BITS": wb, "COMPUTE_F64": f64, "BLOCK": tk.BLOCK})
    comp(tk.dropout_add_fwd_kernel, ["*" + dt] * 3 + ["*i64", "i32", "i64", "i64", "i32", "i64",
                                                      "constexpr", "constexpr"],
         {"COMPUTE_F64": f64, "BLOCK": tk.BLOCK})
    comp(tk.dropout_bits_apply_kernel, ["*" + dt, "*u8", "*" + dt, "i64", "i32", "constexpr",
                                        "constexpr"], {"COMPUTE_F64": f64, "BLOCK": tk.BLOCK})
for kind, out in ((0, "*i32"), (1, "*fp32"), (2, "*fp32")):
    comp(tr.philox_fill_kernel, [out, "*i64", "i32", "i64", "i32", "constexpr", "constexpr"],
         {"KIND": kind, "BLOCK": 1024})
print("compiled")
"""


def test_dropout_and_rng_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
