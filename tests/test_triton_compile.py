"""tools/triton_static.py, the ahead-of-time compile and static check of the Triton kernels
(tests/test_zz_triton_compile.py runs it on every launch the suite recorded): its
variants, its reading of PTX and of ptxas's report, and, on small kernels with known
properties (tests/triton_probe_kernels.py), that it sees 128-bit and narrow accesses,
spills, and the compile failure of an int specialised to 1, with every Triton."""

import os
import sys

import pytest

from test_triton_stack import ROOT, makefile_var

sys.path.insert(0, os.path.join(ROOT, "tools"))
import triton_static  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _spec(name, types, constexprs, attrs=None, ptrs=(), free_ints=(), options=None):
    return {"module": "triton_probe_kernels", "name": name, "types": types,
            "constexprs": constexprs, "attrs": attrs or {}, "ptrs": list(ptrs),
            "free_ints": list(free_ints), "options": options}


COPY = _spec("probe_copy_kernel", {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                                   "BLOCK": "constexpr"}, {"BLOCK": 1024},
             ptrs=("x_ptr", "out_ptr"), free_ints=("n",))


def test_variants_add_aligned_wide_and_each_int_equal_to_one():
    spec = _spec("k", {"a_ptr": "*fp32", "n": "i32", "t": "constexpr", "s": "i32",
                       "B": "constexpr"}, {"t": 1, "B": 8}, ptrs=("a_ptr",), free_ints=("n", "t"))
    v = dict(triton_static.variants(spec))
    assert len(triton_static.variants(spec)) == len(v)
    assert set(v) == {"launched", "aligned", "aligned,i64", "n=1", "t=1"}
    assert v["aligned"]["types"] == {"a_ptr": "*fp32", "n": "i32", "t": "i32", "s": "i32",
                                     "B": "constexpr"}
    assert v["aligned"]["attrs"] == {"a_ptr": "D", "n": "D", "t": "D"}  # s: not specialisable
    assert v["aligned"]["constexprs"] == {"B": 8}
    assert v["aligned,i64"]["types"]["s"] == "i64" and v["aligned,i64"]["types"]["n"] == "i64"
    assert v["n=1"]["types"]["n"] == "constexpr" and v["n=1"]["constexprs"]["n"] == 1
    assert "n" not in v["n=1"]["attrs"] and v["n=1"]["attrs"]["t"] == "D"


def test_ptx_reader_measures_access_width():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b64 { %rd9 }, [ %rd2 + 0 ];
    @%p2 ld.global.L1::evict_last.b32 { %r5 }, [ %rd3 + 0 ];
    ld.global.nc.b32 	%r277, [%rd133];
    @%p1 st.global.v2.b32 [ %rd4 + 0 ], { %r1, %r2 };
    @%p1 st.global.v2.b64 [ %rd5 + 0 ], { %rd6, %rd7 };
    st.global.b8 [ %rd8 + 0 ], %rs1;
    ld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r9 + 0 ];
    """
    a = triton_static.access_summary(ptx)
    assert (a["ld128"], a["st128"], a["ld_narrow"], a["st_narrow"]) == (1, 1, 2, 2)
    assert (a["ld32_narrow"], a["st32_narrow"]) == (1, 1)
    assert a["narrow_kinds"] == ["ld.b32", "ld.b64", "st.b8", "st.v2.b32"]
    assert a["lib_ld"] == 1  # LLVM's own load of a libdevice table, not a tl.load


def test_ptxas_report_reader():
    log = ("ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n")
    assert triton_static.ptxas_report(log) == {"regs": 255, "spill_stores": 16, "spill_loads": 8,
                                               "stack": 24}
    with pytest.raises(RuntimeError, match="no ptxas -v report"):
        triton_static.ptxas_report("nothing")


def _stacks():
    out = [None]
    for which in ("TRITON_OLDEST", "TRITON_NEWEST"):
        folder = os.path.join(ROOT, ".venv", f"triton-{makefile_var(which)}")
        out.append(folder)
    return out


@pytest.mark.parametrize("stack", _stacks(), ids=lambda s: os.path.basename(s) if s else "venv")
def test_probe_kernels_compile_with_the_properties_they_have(stack):
    if stack is not None and not os.path.isdir(stack):
        pytest.fail(f"{stack} is missing: `make tritons` installs it")
    int_method = _spec("probe_int_method_kernel", {"out_ptr": "*i64", "k": "i64",
                                                   "BLOCK": "constexpr"}, {"BLOCK": 256},
                       ptrs=("out_ptr",), free_ints=("k",))
    spill = _spec("probe_spill_kernel", {"x_ptr": "*fp32", "out_ptr": "*fp32",
                                         "BLOCK": "constexpr"}, {"BLOCK": 16384},
                  ptrs=("x_ptr", "out_ptr"), options={"num_warps": 1})
    items = triton_static.variants(COPY) + triton_static.variants(int_method) + \
        [("launched", spill)]
    rows = triton_static.run_stack(items, stack, targets=(90,), extra_path=HERE)
    by = {(r["kernel"], r["variant"]): r for r in rows if r["target"] != "torch"}
    # torch's TTIR analysis of a wrap_triton launch works with this Triton
    assert {r["kernel"]: r["torch_ttir"] for r in rows if r["target"] == "torch"} == \
        {"probe_copy_kernel": "ok", "probe_int_method_kernel": "ok", "probe_spill_kernel": "ok"}
    # copy, aligned and n % 16 == 0: v4 loads and stores only
    a = by["probe_copy_kernel", "aligned"]
    assert a["ld128"] and a["st128"] and not a["ld32_narrow"] and not a["st32_narrow"], a
    assert a["spill_stores"] == a["spill_loads"] == 0 and 0 < a["regs"] <= 255
    # n not known divisible (the recorded launch, no attributes): 32-bit accesses
    n = by["probe_copy_kernel", "launched"]
    assert n["ld32_narrow"] and n["st32_narrow"] and not n["ld128"], n
    # an int equal to 1 becomes a constexpr, which has no .to(): only that variant fails
    assert "error" in by["probe_int_method_kernel", "k=1"]
    assert "error" not in by["probe_int_method_kernel", "aligned"]
    # more live values than registers: the report shows the spills
    s = by["probe_spill_kernel", "launched"]
    assert s["spill_stores"] > 0 and s["spill_loads"] > 0, s
