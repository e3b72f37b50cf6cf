"""The Triton kernels beyond the op tests: whole blocks and partial last blocks under
the interpreter, and what a compile without a GPU shows of the GPU code (128-bit
access, no FMA where the CPU rounds twice, integer arguments equal to 1).

The op tests use small tensors, which fit in one partial block; the kernels take a
different (unmasked, vectorised) path for full blocks, so sizes here straddle BLOCK.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastreg
from fastreg.ops import dropout as D

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels under the interpreter")


def _block():
    from fastreg.kernels.triton import dropout as tk

    return tk.BLOCK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dropout_full_and_partial_blocks_match_reference(dtype, gen):
    B = _block()
    for n in (B - 3, B, 2 * B + 13):
        x = torch.randn(n, generator=gen).to(dtype)
        x[5] = float("inf")  # a dropped Inf must give NaN, as torch's x * 0
        r = torch.randn(n, generator=gen).to(dtype)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        for p in (0.37, 1.0):
            ref, keep = D.dropout_reference(x, seed, 5, p)
            with fastreg.use_backend("triton"):
                out, bits = torch.ops.fastreg.dropout_fwd(x, torch.tensor(seed), 5, p, True)
                got_add = fastreg.dropout_add(x, r, p, seed=seed, stream=5)
                got_apply = torch.ops.fastreg.dropout_bits_apply(r, bits, p)
            assert torch.equal(out, ref) or torch.equal(out.isnan(), ref.isnan()) and torch.equal(
                torch.nan_to_num(out), torch.nan_to_num(ref)), (n, p)
            assert torch.equal(bits, D.pack_bits_reference(keep.reshape(-1))), (n, p)
            with fastreg.use_backend("torch"):
                want_add = fastreg.dropout_add(x, r, p, seed=seed, stream=5)
                want_apply = torch.ops.fastreg.dropout_bits_apply(r, bits, p)
            torch.testing.assert_close(got_add, want_add, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(got_apply, want_apply), (n, p)


def test_dropout_keep_threshold_one_runs(gen):
    """p = 2e-10 gives the keep threshold 1: only a word equal to 0 drops."""
    assert D.keep_threshold(2e-10) == 1
    x = torch.randn(2 * _block() + 1, generator=gen)
    ref, _ = D.dropout_reference(x, 7, 0, 2e-10)
    with fastreg.use_backend("triton"):
        assert torch.equal(fastreg.dropout(x, 2e-10, seed=7), ref)


# ------------------------------------------------------------ compiled, no GPU
_COMPILE = r"""
import inspect, json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from fastreg.kernels.triton import dropout, locked, bias_act, noise, variational, adversarial, rng

def launch_types(kern, values):
    # the signature, constexprs and 16-byte attributes that a launch with these
    # values gets from Triton itself (do_not_specialize honoured)
    names = list(inspect.signature(kern.fn).parameters)
    dns = set(kern.do_not_specialize) | {names[i] for i in kern.do_not_specialize if isinstance(i, int)}
    sig, cx, attrs = {}, {}, {}
    for i, nm in enumerate(names):
        v = values[nm]
        if "constexpr" in str(inspect.signature(kern.fn).parameters[nm].annotation):
            sig[nm] = "constexpr"; cx[nm] = v
        elif isinstance(v, str):  # a pointer, 16-byte aligned as torch allocates
            sig[nm] = v; attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            ty = mangle_type(v, nm not in dns)
            sig[nm] = ty
            if ty == "constexpr":
                cx[nm] = v
            elif nm not in dns and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return names, sig, cx, attrs

def compile_(kern, values, cc):
    names, sig, cx, attrs = launch_types(kern, values)
    return triton.compile(ASTSource(fn=kern, signature=sig, constexprs=cx, attrs=attrs),
                          target=GPUTarget("cuda", cc, 32))

out = {}
for case in json.load(sys.stdin):
    mod, name, values, cc = case
    kern = getattr(globals()[mod], name)
    try:
        ptx = compile_(kern, values, cc).asm["ptx"]
        out[f"{mod}.{name} {values} sm_{cc}"] = {
            "ld": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
            "st": sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
            "fma": sorted(set(re.findall(r"\bfma\.rn\.f\d\d", ptx))),
            "mul": sorted(set(re.findall(r"\bmul\.rn\.f\d\d", ptx)))}
    except Exception as e:  # reported by the test, with the kernel named
        out[f"{mod}.{name} {values} sm_{cc}"] = {"error": str(e)[-600:]}
print(json.dumps(out))
"""


def _compile(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(cases), env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    errors = {k: v["error"] for k, v in res.items() if "error" in v}
    assert not errors, errors
    return res


def _dropout_values(dt, n, threshold=429496730, **extra):
    from fastreg.kernels.triton import dropout as tk

    v = {"x_ptr": "*" + dt, "out_ptr": "*" + dt, "r_ptr": "*" + dt, "g_ptr": "*" + dt,
         "bits_ptr": "*u8", "seed_ptr": "*i64", "stream": 0, "threshold": threshold,
         "scale_bits": 4607682907841400000, "start": 0, "n": n, "WITH_BITS": False,
         "COMPUTE_F64": dt == "fp64", "VEC": 8 if dt in ("fp16", "bf16") else 4,
         "BLOCK": tk.BLOCK}
    v.update(extra)
    return v


def test_dropout_family_compiles_to_128_bit_access_for_sm80_and_sm90():
    cases = []
    for cc in (80, 90):
        for dt in ("fp32", "bf16", "fp16"):
            for n in (1 << 24, (1 << 24) + 5):  # n divisible by 16 or not: same code
                v = _dropout_values(dt, n)
                cases.append(["dropout", "dropout_fwd_kernel", v, cc])
                cases.append(["dropout", "dropout_add_fwd_kernel", v, cc])
            cases.append(["dropout", "dropout_bits_apply_kernel", _dropout_values(dt, 1 << 24), cc])
            cases.append(["dropout", "dropout_fwd_kernel", _dropout_values(dt, 1 << 24, WITH_BITS=True),
                          cc])
    for key, r in _compile(cases).items():
        assert "ld.global.v4.b32" in r["ld"] and "st.global.v4.b32" in r["st"], (key, r)


def test_products_are_rounded_before_the_add():
    """The CPU backends and torch round x * m (and vd_sample's s * z), then add: an FMA on
    the GPU would round once and differ in the last bit (test_gpu_bit_identical_to_cpu).
    Thresholds past 2^31 arrive as u32 and 2^32 as i64: each must keep the product apart."""
    cases = [["dropout", "dropout_add_fwd_kernel", _dropout_values(dt, 4096, threshold=t), 90]
             for dt in ("fp32", "fp64", "bf16") for t in (429496730, 3 << 30, 1 << 32)]
    cases += [["variational", "vd_sample_fwd_kernel",
               {"mu_ptr": "*" + dt, "var_ptr": "*" + dt, "out_ptr": "*" + dt, "seed_ptr": "*i64",
                "stream": 0, "eps_bits": 4472406533629990549, "n": 4096, "F64": dt == "fp64",
                "BLOCK": 1024}, cc] for dt in ("fp32", "fp64") for cc in (80, 90)]
    for key, r in _compile(cases).items():
        assert not r["fma"] and r["mul"], (key, r)


def _dns(k):
    """do_not_specialize of a jitted kernel, compiled (JITFunction) or interpreted."""
    names = list(__import__("inspect").signature(k.fn).parameters)
    raw = getattr(k, "do_not_specialize", None)
    if raw is None:
        raw = (getattr(k, "kwargs", None) or {}).get("do_not_specialize") or ()
    return {names[i] if isinstance(i, int) else i for i in raw}


def _runtime_int_params():
    """(module, kernel, parameter, do_not_specialize) of every integer argument a launch
    passes: the parameters that are neither pointers (*_ptr) nor constexprs."""
    import inspect

    from fastreg.kernels.triton import (adversarial, bias_act, dropout, locked, noise, rng,
                                        variational)

    out = []
    for mod in (dropout, locked, bias_act, noise, variational, adversarial, rng):
        for name, k in vars(mod).items():
            if name.endswith("_kernel") and hasattr(k, "fn"):
                for p, par in inspect.signature(k.fn).parameters.items():
                    if not p.endswith("_ptr") and "constexpr" not in str(par.annotation):
                        out.append((mod.__name__.rsplit(".", 1)[1], name, p, _dns(k)))
    assert len({(m, n) for m, n, _, _ in out}) >= 12, out  # every kernel was found
    return out


# Sizes stay specialised where a kernel wants their divisibility by 16 (vector access
# on row starts); test_kernels_compile_with_every_integer_argument_equal_to_one checks
# that they compile when equal to 1 (then a constexpr).
_SIZES = {"n", "R", "C", "DI", "I", "D", "nkb", "ndc"}


def test_every_runtime_value_integer_is_unspecialised():
    """An int argument equal to 1 becomes a constexpr unless listed in do_not_specialize
    (locked_fwd_kernel did not compile for threshold == 1), and each value class (1,
    multiples of 16, others) of a seed offset, stream or scalar would be a separate compile."""
    missing = [f"{mod}.{name}({p})" for mod, name, p, dns in _runtime_int_params()
               if p not in dns and p not in _SIZES]
    assert not missing, missing


def test_kernels_compile_with_every_integer_argument_equal_to_one():
    import importlib
    import inspect

    cases = []
    seen = set()
    for mod, name, _, _ in _runtime_int_params():
        if (mod, name) in seen:
            continue
        seen.add((mod, name))
        k = getattr(importlib.import_module(f"fastreg.kernels.triton.{mod}"), name)
        values = {}
        for p, par in inspect.signature(k.fn).parameters.items():
            if p.endswith("_ptr"):
                values[p] = "*i64" if p in ("seed_ptr", "sizes_ptr", "sstr_ptr") else (
                    "*u8" if p == "bits_ptr" else "*fp32")
            elif "constexpr" in str(par.annotation):
                values[p] = _CONSTEXPR_DEFAULTS.get(p, 0)
            else:
                values[p] = 1
        cases.append([mod, name, values, 90])
    assert len(_compile(cases)) == len(seen)


_CONSTEXPR_DEFAULTS = {"BLOCK": 1024, "BLOCK_K": 1024, "ROWS": 8, "BLOCK_R": 16, "BLOCK_C": 64, "VEC": 4, "NDIM": 1,
                       "SCALAR": True, "DIST": 0, "ADDITIVE": False, "COMPUTE_F64": False,
                       "F64": False, "WITH_BITS": True, "HAS_X0": True, "KIND": 0,
                       "NEED_GX": True, "GS_MODE": 1, "ACT": 2}


def test_locked_dropout_long_rows_and_fallback_match_reference(gen):
    """Long rows (I >= ROWS_MIN_I, I % 4 == 0) take the row kernel (words four per Philox
    call, reused over ROWS rows, full and partial k-blocks); other views the gather kernel."""
    from fastreg.kernels.triton import locked as tk
    from fastreg.ops import locked as L

    K = tk.ROWS_BLOCK_K
    cases = [((3, tk.ROWS + 3, K), 1), ((4, 2 * K + 52), 0), ((2, 3, 2, K + 4), 2),
             ((2, 7, K + 6), 1), ((2, 3, 5, 7), 1), ((5, 600), 1)]
    for shape, dim in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = torch.randn(shape, generator=gen).to(dtype)
            for p in (0.3, 1.0, 2e-10):
                ref = L.locked_dropout_reference(x, 11, 3, p, dim)
                with fastreg.use_backend("triton"):
                    out = fastreg.locked_dropout(x, p, dim=dim, seed=11, stream=3)
                assert torch.equal(out, ref), (shape, dim, dtype, p)


def test_bias_act_four_words_per_philox_call_match_reference(gen):
    """C % 4 == 0 takes one Philox call per four elements (ALIGNED), other C one per
    element; both give the spec's mask: the relu forward is compared bit for bit (the
    mask decides every zero), the backward's grad_x too."""
    from fastreg.ops import bias_act as BA

    for R, C in ((37, 64), (5, 100), (19, 7), (3, 132)):
        x = torch.randn(R, C, generator=gen)
        b = torch.randn(C, generator=gen)
        g = torch.randn(R, C, generator=gen)
        seed = torch.tensor(12345)
        for p in (0.3, 2e-10):
            ref = BA.bias_act_dropout_reference(x, b, 12345, 4, 1, p)
            with fastreg.use_backend("triton"):
                y = torch.ops.fastreg.bias_act_dropout_fwd(x, b, seed, 4, 1, p)
                gx, gb = torch.ops.fastreg.bias_act_dropout_bwd(g, y, b, seed, 4, 0, p)
            assert torch.equal(y, ref), (R, C, p)
            gref, _ = BA.bias_act_dropout_bwd_reference(g, y, b, 12345, 4, 0, p)
            assert torch.equal(gx, gref), (R, C, p)
