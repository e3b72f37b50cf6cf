"""Every Triton kernel signature the suite launched under the interpreter compiles to
PTX and a cubin for sm_90 (no GPU needed). Named test_zz_* so that it runs after the
other test files have recorded their launches (tests/triton_launches.py)."""

import json
import os
import subprocess
import sys

import pytest

import triton_launches

_COMPILER = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def decode(v):
    return getattr(tl, v["dtype"]) if isinstance(v, dict) else v

failures = []
specs = json.load(sys.stdin)
for s in specs:
    kern = getattr(importlib.import_module(s["module"]), s["name"])
    while not isinstance(kern, triton.runtime.jit.JITFunction):
        kern = kern.fn
    try:
        k = triton.compile(ASTSource(fn=kern, signature=s["types"],
                                     constexprs={n: decode(v) for n, v in s["constexprs"].items()}),
                           target=GPUTarget("cuda", 90, 32))
        assert "cubin" in k.asm
    except Exception as e:
        failures.append(f"{s['module']}.{s['name']} {s['types']} {s['constexprs']}: {str(e)[-400:]}")
print(json.dumps({"compiled": len(specs) - len(failures), "failures": failures}))
"""


def test_every_launched_triton_kernel_compiles_for_sm90():
    specs = list(triton_launches.SPECS.values())
    if not specs:
        pytest.skip("no Triton kernel was launched under the interpreter in this session")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILER], input=json.dumps(specs), env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["compiled"] == len(specs)
