"""Every Triton kernel specialisation the suite launched under the interpreter, compiled
ahead of time (no GPU) for sm_80 and sm_90 with every Triton `make test` tests: the
venv's and the oldest and newest supported (Makefile: TRITON_OLDEST, TRITON_NEWEST).
tools/triton_static.py (`plan`) compiles each specialisation in the form a launch at
n = 2^24 on aligned tensors takes, adds per kernel the launches a GPU makes that the
tests do not (ints past 2^31, each specialisable int equal to 1), and reads registers,
spills and the width of each global access.

Named test_zz_* so that it runs after the other test files have recorded their launches
(tests/triton_launches.py). The table goes to build/triton-static.txt, the records to
build/triton-launches.json (`python tools/triton_static.py build/triton-launches.json
--stack env --stack .venv/triton-3.6.0` prints it again).
"""

import importlib
import json
import os
import pkgutil
import sys

import pytest

import triton_launches
from test_triton_stack import ROOT, makefile_var

sys.path.insert(0, os.path.join(ROOT, "tools"))
import triton_static  # noqa: E402

OUT = os.path.join(ROOT, "build")


def stacks() -> dict[str, str | None]:
    """label -> folder put first on the path (None: the venv's own Triton)."""
    out = {"venv": None}
    for which in ("TRITON_OLDEST", "TRITON_NEWEST"):
        v = makefile_var(which)
        out[v] = os.path.join(ROOT, ".venv", f"triton-{v}")
    return out


# Kernels held to 128-bit global access with fp32 (or int32) data, aligned tensors and
# n % 16 == 0: each thread streams consecutive elements, so every 32-bit load and store can
# be a v4 one. Value: which accesses are held ("ld", "st"), or why the kernel is not held.
def elementwise_rule(name: str, cx: dict) -> tuple[str, ...] | str:
    if name in ("dropout_fwd_kernel", "dropout_add_fwd_kernel", "dropout_bits_apply_kernel",
                "locked_fwd_kernel", "locked_rows_kernel", "bias_act_fwd_kernel",
                "vd_sample_fwd_kernel", "vd_sample_grad_var_kernel", "pgd_kernel"):
        # the packed mask bytes of dropout (1 byte per 8 elements) are not 32-bit accesses;
        # locked_rows streams rows of I consecutive elements (I % 16 == 0 when aligned)
        return ("ld", "st")
    if name == "philox_fill_kernel":
        return ("st",)  # it loads only the seed (one 64-bit word)
    if name == "bias_act_bwd_kernel":
        # its stores include one partial column-sum row per program (a reduction's output)
        return ("ld",)
    if name in ("noise_fwd_kernel", "noise_bwd_kernel"):
        if not cx.get("SCALAR"):
            return "a sigma of more than one element is read through its broadcast index (a gather)"
        if name == "noise_bwd_kernel" and cx.get("GS_MODE") == 3:
            return ("ld",)  # its stores include one partial sum per program (a reduction)
        if name == "noise_bwd_kernel" and cx.get("GS_MODE") == 2:
            return "the sigma gradient is added atomically at sigma's offset (a scatter)"
        return ("ld", "st")
    return f"{name} is not classified: add it to elementwise_rule"


@pytest.fixture(scope="module")
def static_rows():
    specs = list(triton_launches.SPECS.values())
    if not specs:
        pytest.skip("no Triton kernel was launched under the interpreter in this session "
                    "(run the whole suite: this file compiles what the others launched)")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "triton-launches.json"), "w") as f:
        json.dump(specs, f, indent=1)
    for label, folder in stacks().items():
        if folder is not None and not os.path.isdir(folder):
            pytest.fail(f"Triton {label} is not installed in {folder}: `make tritons` installs it")
    rows = triton_static.run_stacks(triton_static.plan(specs), stacks())
    everything = [r for rs in rows.values() for r in rs]
    with open(os.path.join(OUT, "triton-static.txt"), "w") as f:
        f.write(triton_static.table(everything) + "\n")
    with open(os.path.join(OUT, "triton-static.json"), "w") as f:
        json.dump(everything, f)
    with open(os.path.join(OUT, "triton-static-summary.txt"), "w") as f:
        f.write(triton_static.summary(everything) + "\n")
    return rows


def _compiles(rows):
    return [r for r in rows if r["target"] != "torch"]


@pytest.mark.parametrize("stack", list(stacks()))
def test_every_launched_specialisation_compiles(static_rows, stack):
    rows = _compiles(static_rows[stack])
    failures = [f"{r['kernel']} [{r['variant']}] {r['target']} {r['spec']['types']} "
                f"{r['spec']['constexprs']}:\n  {r['error']}" for r in rows if "error" in r]
    assert not failures, f"{len(failures)} of {len(rows)} compiles failed with Triton " \
                         f"{rows[0]['triton']}:\n" + "\n".join(failures[:30])
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    if stack != "venv":
        assert {r["triton"] for r in rows} == {stack}


def test_the_tritons_compiled_with_are_the_intended_ones(static_rows):
    import triton

    assert {r["triton"] for r in static_rows["venv"]} == {triton.__version__}
    assert len({rs[0]["triton"] for rs in static_rows.values()}) == len(static_rows)


def test_no_register_spills(static_rows):
    spills = [f"Triton {r['triton']} {r['target']} {r['kernel']} [{r['variant']}] "
              f"{triton_static._constexprs(r['spec'])}: {r['spill_stores']} B stored, "
              f"{r['spill_loads']} B loaded, {r['regs']} registers"
              for rs in static_rows.values() for r in _compiles(rs)
              if "error" not in r and r["spill_stores"] + r["spill_loads"]]
    assert not spills, "\n".join(spills)


def _data_ptr_types(spec):
    return {t for t in spec["types"].values() if t.startswith("*")} - {"*i64", "*u8"}


def test_elementwise_kernels_move_128_bits_per_access(static_rows):
    """fp32, aligned, n % 16 == 0 (variant "aligned"): the kernels elementwise_rule holds
    load and store their tensors 128 bits (v4) at a time. The PTX of a kernel holds every
    path, so narrow accesses are allowed beside the v4 ones: a masked tail after an unmasked
    body (n in do_not_specialize is never known divisible), a scalar parameter read from
    memory (a one-element sigma). build/triton-static.txt lists them per kernel."""
    narrow, checked = [], 0
    for rs in static_rows.values():
        for r in _compiles(rs):
            data = _data_ptr_types(r["spec"])
            if "error" in r or r["variant"] != "aligned" or not data or \
                    not data <= {"*fp32", "*i32"}:
                continue
            rule = elementwise_rule(r["kernel"], r["spec"]["constexprs"])
            if isinstance(rule, str):
                continue
            checked += 1
            bad = []
            if "ld" in rule and not r["ld128"]:
                bad.append(f"no v4 load ({r['ld32_narrow']} narrow 32-bit loads)")
            if "st" in rule and not r["st128"]:
                bad.append(f"no v4 store ({r['st32_narrow']} narrow 32-bit stores)")
            if bad:
                narrow.append(f"Triton {r['triton']} {r['target']} {r['kernel']} "
                              f"{triton_static._constexprs(r['spec'])}: " + "; ".join(bad))
    assert checked, "no fp32 aligned specialisation of an elementwise kernel was compiled"
    kernels = sorted({n.split()[3] for n in narrow})
    assert not narrow, f"kernels without 128-bit access: {kernels}\n" + "\n".join(narrow)


@pytest.mark.parametrize("stack", list(stacks()))
def test_torch_analyses_every_kernel_with_this_triton(static_rows, stack):
    """torch.compile lowers each wrap_triton kernel to TTIR with the installed Triton's
    internals; a failure there is silent in torch (every tensor is then taken as written),
    so it is checked here for one launch of every kernel."""
    rows = [r for r in static_rows[stack] if r["target"] == "torch"]
    assert rows
    bad = [f"{r['kernel']}: {r['torch_ttir']}" for r in rows if r["torch_ttir"] != "ok"]
    assert not bad, "\n".join(bad)


def test_every_launched_kernel_is_classified():
    unknown = sorted({s["name"] for s in triton_launches.SPECS.values()
                      if "not classified" in str(elementwise_rule(s["name"], s["constexprs"]))})
    assert not unknown, f"add these kernels to elementwise_rule: {unknown}"


def _kernels_in_package() -> set[str]:
    import triton

    import fastreg.kernels.triton as pkg

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        InterpretedFunction = triton.runtime.jit.JITFunction
    names = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{m.name}")
        for name, obj in vars(mod).items():
            # kernels (launched with a grid), not the @triton.jit helpers they call
            if isinstance(obj, (triton.runtime.jit.JITFunction, InterpretedFunction)) \
                    and obj.fn.__module__ == mod.__name__ and name.endswith("_kernel"):
                names.add(name)
    return names


def test_every_kernel_of_the_package_was_launched_and_compiled(static_rows):
    launched = {s["name"] for s in triton_launches.SPECS.values()}
    missing = _kernels_in_package() - launched
    assert not missing, f"no test launched these kernels, so nothing compiled them: {missing}"


def test_every_test_that_launches_triton_is_rerun_with_other_tritons():
    """The tests that launched a kernel in this run carry the triton_backend marker, which
    `make test` reruns with the oldest and the newest Triton (conftest.py)."""
    if not triton_launches.LAUNCHED_BY:
        pytest.skip("no Triton kernel was launched under the interpreter in this session")
    unmarked = sorted(set(triton_launches.LAUNCHED_BY) - triton_launches.MARKED)
    assert not unmarked, "\n".join(unmarked)
