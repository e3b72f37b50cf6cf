"""Ahead-of-time compiles of the Triton kernels, with no GPU: registers, spills and the
width of every global load and store, per kernel specialisation, target and Triton.

    python tools/triton_static.py build/triton-launches.json [--stack DIR|env ...]
                                  [--targets 80,90] [--json OUT]

The JSON holds launch records (tests/triton_launches.py; the test suite records every
launch it makes under the interpreter and tests/test_zz_triton_compile.py writes them
to build/). `plan` picks what to compile: every specialisation the records reach, in
the form a GPU launch at n = 2^24 on aligned tensors takes, and per kernel the launches
a GPU makes that the tests do not (ints past 2^31; each specialisable int equal to 1,
which Triton turns into a constexpr). Each Triton (`--stack DIR`, a `pip install
--target` folder put first on the path; `env`, the default: the environment's own)
compiles in subprocesses without the interpreter, for each target (sm_80 and sm_90 by
default), with a fresh cache so that ptxas really runs and its `-v` report (registers,
spill bytes) can be read.

Width: a global access of v4 x 32 bits (or v2 x 64) moves 128 bits per thread, the
most one instruction can; fp32 elementwise kernels should only have those.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

TARGETS = (80, 90)

# --------------------------------------------------------------------------- variants


def _copy(spec: dict) -> dict:
    return json.loads(json.dumps(spec))


def aligned(spec: dict, wide: bool = False) -> dict:
    """The launch at n = 2^24 with 16-byte-aligned tensors: every pointer and every int the
    JIT may specialise divisible by 16 (the ints i64 with `wide`: values past 2^31)."""
    s = _copy(spec)
    free = s.get("free_ints", [])
    for p in s.get("ptrs", []):
        s["attrs"][p] = "D"
    for name, ty in s["types"].items():
        was_one = name in free and ty == "constexpr"
        if ty in ("i32", "i64", "u64") or was_one:
            s["types"][name] = "i64" if wide else "i32"
            if was_one:
                del s["constexprs"][name]
            if name in free:
                s["attrs"][name] = "D"
    return s


def variants(spec: dict) -> list[tuple[str, dict]]:
    """(label, spec) pairs: the recorded launch and the launches a GPU adds (module doc)."""
    base = aligned(spec)
    out = [("launched", spec), ("aligned", base), ("aligned,i64", aligned(spec, wide=True))]
    for name in spec.get("free_ints", []):
        s = _copy(base)
        s["types"][name] = "constexpr"
        s["constexprs"][name] = 1
        s["attrs"].pop(name, None)
        out.append((f"{name}=1", s))
    return _unique(out)


def _unique(pairs):
    seen, unique = set(), []
    for label, s in pairs:
        key = json.dumps([s["name"], s["types"], s["constexprs"], s["attrs"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append((label, s))
    return unique


def _declared(spec: dict) -> dict:
    return {k: v for k, v in spec["constexprs"].items() if k not in spec.get("free_ints", [])}


def plan(records: list[dict]) -> list[tuple[str, dict]]:
    """What to compile for a list of launch records, within a CI machine's minutes:

    - every specialisation the records reach, i.e. each kernel with each combination of its
      declared constexprs and pointer dtypes, in the form a GPU launch at n = 2^24 on aligned
      tensors takes ("aligned", the form the width check reads);
    - for each kernel, one record (float32 where there is one) in all its variants: as
      launched (odd sizes), with the ints past 2^31, and each specialisable int equal to 1
      (these change how the runtime ints are typed, which the dtypes and declared constexprs
      do not touch)."""
    groups, per_kernel = {}, {}
    for r in records:
        ptrs = {k: v for k, v in r["types"].items() if v.startswith("*")}
        key = json.dumps([r["module"], r["name"], _declared(r), ptrs], sort_keys=True)
        groups.setdefault(key, r)
        rep = per_kernel.get(r["name"])
        if rep is None or ("*fp32" in ptrs.values() and "*fp32" not in rep["types"].values()):
            per_kernel[r["name"]] = r
    out = [("aligned", aligned(r)) for r in groups.values()]
    for r in per_kernel.values():
        out += variants(r)
    return _unique(out)


# --------------------------------------------------------------------------- PTX reading

_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)\s*(\{?)")
_ELEM = re.compile(r"^[bfsu](8|16|32|64)$")


def global_accesses(ptx: str) -> list[tuple[str, int, int]]:
    """(kind 'ld'/'st', vector length, element bits) of every global load and store that
    Triton emits for tl.load / tl.store (inline asm with braced operands). The loads LLVM
    emits itself, without braces, read libdevice's constant tables (the argument reduction
    of sin/cos): `library_loads` counts them."""
    found = []
    for kind, mods, brace in _ACCESS.findall(ptx):
        if kind == "ld" and not brace:
            continue
        vec, bits = 1, None
        for m in mods.split(".")[1:]:
            if m in ("v2", "v4", "v8"):
                vec = int(m[1:])
            elif _ELEM.match(m):
                bits = int(_ELEM.match(m).group(1))
        if bits is not None:
            found.append((kind, vec, bits))
    return found


def library_loads(ptx: str) -> int:
    return sum(kind == "ld" and not brace for kind, _, brace in _ACCESS.findall(ptx))


def access_summary(ptx: str) -> dict:
    acc = global_accesses(ptx)
    wide = [a for a in acc if a[1] * a[2] >= 128]
    narrow = [a for a in acc if a[1] * a[2] < 128]
    return {
        "ld128": sum(a[0] == "ld" for a in wide), "st128": sum(a[0] == "st" for a in wide),
        "ld_narrow": sum(a[0] == "ld" for a in narrow), "st_narrow": sum(a[0] == "st" for a in narrow),
        # 32-bit elements (fp32/int32 data) moved less than 128 bits at a time
        "ld32_narrow": sum(a[0] == "ld" and a[2] == 32 for a in narrow),
        "st32_narrow": sum(a[0] == "st" and a[2] == 32 for a in narrow),
        "lib_ld": library_loads(ptx),
        "narrow_kinds": sorted({f"{k}.{'v%d.' % v if v > 1 else ''}b{b}" for k, v, b in narrow}),
    }


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_report(log: str) -> dict:
    regs, spills, stack = _REGS.search(log), _SPILLS.search(log), _STACK.search(log)
    if not regs or not spills:
        raise RuntimeError("no ptxas -v report in the compile's output:\n" + log[-2000:])
    return {"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "stack": int(stack.group(1)) if stack else 0}


# --------------------------------------------------------------------------- compiling


def _attrs_for(triton, fn, spec: dict):
    """The attributes ASTSource takes, in the form this Triton expects."""
    names = list(spec["types"])
    marked = [names.index(n) for n, a in spec["attrs"].items() if "D" in a]
    from triton.backends import compiler as bc

    if hasattr(bc, "AttrsDescriptor"):  # Triton <= 3.2: a descriptor of index lists
        return bc.AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": marked},
                                             "cls": "AttrsDescriptor"})
    # Triton >= 3.3 (3.6 through 3.9 alike): {(index,): [["tt.divisibility", 16]]}
    return {(i,): [["tt.divisibility", 16]] for i in marked}


def _decode(tl, v):
    return getattr(tl, v["dtype"]) if isinstance(v, dict) else v


def compile_one(spec: dict, target: int) -> dict:
    """Compile one record for sm_<target>; registers, spills and accesses, or the error."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = getattr(importlib.import_module(spec["module"]), spec["name"])
    while not isinstance(kern, triton.runtime.jit.JITFunction):
        kern = kern.fn
    src = ASTSource(fn=kern, signature=spec["types"],
                    constexprs={n: _decode(tl, v) for n, v in spec["constexprs"].items()},
                    attrs=_attrs_for(triton, kern, spec))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v goes to stdout with dump_ptxas_log
        k = triton.compile(src, target=GPUTarget("cuda", target, 32),
                           options=spec.get("options") or None)
    row = {"cubin": "cubin" in k.asm}
    row.update(ptxas_report(log.getvalue()))
    row.update(access_summary(k.asm["ptx"]))
    return row


def _example_args(spec: dict) -> dict:
    """Arguments of the record's types: small CPU tensors, ints of the right width."""
    import torch
    import triton.language as tl

    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
              "bf16": torch.bfloat16, "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8,
              "i8": torch.int8, "i16": torch.int16, "u1": torch.bool}
    args = {}
    for name, ty in spec["types"].items():
        if ty.startswith("*"):
            args[name] = torch.zeros(64, dtype=dtypes[ty[1:]])
        elif ty == "constexpr":
            args[name] = _decode(tl, spec["constexprs"][name])
        elif ty == "u1":
            args[name] = True
        elif ty in ("fp32", "fp64"):
            args[name] = 0.5
        else:
            args[name] = 2**40 + 16 if ty in ("i64", "u64") else 48
    return args


def torch_access_analysis(spec: dict) -> dict:
    """torch.compile's view of a wrap_triton launch: torch lowers the kernel to TTIR with
    this Triton's internals to find the tensors it writes. torch swallows a failure there
    (it then assumes every tensor is written: extra copies in every compiled graph), so it
    is run here without the safety net. Without a GPU, Triton's driver is a stub that only
    names the target."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    class _NoGPU:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_NoGPU())
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    kern = getattr(importlib.import_module(spec["module"]), spec["name"])
    try:
        module, _ = tkw.generate_ttir(kern, _example_args(spec), {})
        functions = tkw.ttir_to_functions(module)
        assert functions, "torch found no function in the TTIR"
    except Exception as e:  # noqa: BLE001 - reported, the caller judges
        return {"torch_ttir": f"{type(e).__name__}: {str(e)[-400:]}"}
    return {"torch_ttir": "ok"}


def worker(items: list[tuple[str, dict]], targets) -> list[dict]:
    """Compile each (label, spec) for every target in this process's Triton; for the first
    item of each kernel, also torch's analysis of the kernel (torch_access_analysis)."""
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    rows = []
    for label, s in items:
        for target in targets:
            row = {"triton": triton.__version__, "kernel": s["name"], "variant": label,
                   "target": f"sm_{target}", "spec": s}
            try:
                row.update(compile_one(s, target))
            except Exception as e:  # noqa: BLE001 - reported per row, the caller judges
                row["error"] = f"{type(e).__name__}: {str(e)[-600:]}"
            rows.append(row)
    first = {}
    for label, s in items:
        first.setdefault(s["name"], (label, s))
    for label, s in first.values():
        rows.append({"triton": triton.__version__, "kernel": s["name"], "variant": label,
                     "target": "torch", "spec": s, **torch_access_analysis(s)})
    return rows


def run_stack(items: list[tuple[str, dict]], stack: str | None, targets=TARGETS,
              timeout=1800, extra_path: str | None = None) -> list[dict]:
    """Compile (label, spec) items in a subprocess whose first path entry is `stack` (None:
    the environment's Triton), without the interpreter and with a fresh Triton cache.
    `extra_path`: a folder the records' modules are imported from, after the environment's."""
    with tempfile.TemporaryDirectory(prefix="fastreg-aot-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(([stack] if stack else []) + path +
                                            ([extra_path] if extra_path else []))
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                            "--targets", ",".join(map(str, targets))],
                           input=json.dumps(items), env=env, capture_output=True, text=True,
                           timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"compile worker ({stack or 'environment'}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_stacks(items: list[tuple[str, dict]], stacks: dict[str, str | None], targets=TARGETS,
               jobs: int | None = None, **kw) -> dict[str, list[dict]]:
    """run_stack for each labelled stack, the work split over `jobs` processes (default: the
    CPUs this process may use)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = jobs or len(os.sched_getaffinity(0))
    chunks = max(1, min(jobs, len(items)))
    work = [(label, folder, items[i::chunks]) for label, folder in stacks.items()
            for i in range(chunks)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(lambda w: (w[0], run_stack(w[2], w[1], targets, **kw)), work))
    out = {label: [] for label in stacks}
    for label, rows in done:
        out[label] += rows
    return out


# --------------------------------------------------------------------------- report


def _dtypes(spec: dict) -> str:
    ds = sorted({t[1:] for t in spec["types"].values() if t.startswith("*") and t[1:] not in
                 ("i64", "u8", "i32")})
    return "/".join(ds) or "-"


def _constexprs(spec: dict) -> str:
    return ",".join(f"{k}={v['dtype'] if isinstance(v, dict) else v}"
                    for k, v in spec["constexprs"].items() if not k.startswith("BLOCK"))


def table(rows: list[dict]) -> str:
    head = ("triton", "target", "kernel", "dtype", "constexprs", "variant", "regs", "spill",
            "ld128", "st128", "ld<128", "st<128", "narrow kinds", "lib ld")
    lines = []
    torch_rows = [r for r in rows if r["target"] == "torch"]
    for r in rows:
        if r["target"] == "torch":
            continue
        if "error" in r:
            lines.append((r["triton"], r["target"], r["kernel"], _dtypes(r["spec"]),
                          _constexprs(r["spec"]), r["variant"], "ERROR", "", "", "", "", "",
                          r["error"].splitlines()[-1][:60] if r["error"] else "", ""))
            continue
        lines.append((r["triton"], r["target"], r["kernel"], _dtypes(r["spec"]),
                      _constexprs(r["spec"]), r["variant"], str(r["regs"]),
                      str(r["spill_stores"] + r["spill_loads"]), str(r["ld128"]), str(r["st128"]),
                      str(r["ld_narrow"]), str(r["st_narrow"]), " ".join(r["narrow_kinds"]),
                      str(r["lib_ld"])))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head)] + [fmt.format(*l) for l in lines]
    if torch_rows:
        out += ["", "torch's TTIR analysis of wrap_triton launches (torch_access_analysis):"]
        out += [f"  triton {r['triton']}  {r['kernel']}: {r['torch_ttir'].splitlines()[-1][:100]}"
                for r in torch_rows]
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Per Triton, target and kernel: compiles, failures, most registers, spill bytes, and
    for fp32 on aligned tensors with n % 16 == 0 the 128-bit (v4) and narrower 32-bit
    global accesses in the PTX."""
    acc = {}
    for r in rows:
        if r["target"] == "torch":
            continue
        a = acc.setdefault((r["triton"], r["target"], r["kernel"]),
                           {"n": 0, "err": 0, "regs": 0, "spill": 0, "v4": set()})
        a["n"] += 1
        if "error" in r:
            a["err"] += 1
            continue
        a["regs"] = max(a["regs"], r["regs"])
        a["spill"] += r["spill_stores"] + r["spill_loads"]
        data = {t for t in r["spec"]["types"].values() if t.startswith("*")} - {"*i64", "*u8"}
        if r["variant"] == "aligned" and data and data <= {"*fp32", "*i32"}:
            a["v4"].add((r["ld128"], r["st128"], r["ld32_narrow"] + r["st32_narrow"]))
    lines = [f"{'triton':<7} {'target':<6} {'kernel':<27} {'compiled':>8} {'failed':>6} "
             f"{'max regs':>8} {'spill B':>7}  fp32, aligned, n % 16 == 0"]
    for (tv, tg, k), a in sorted(acc.items()):
        v4 = (f"{min(x[0] for x in a['v4'])}/{min(x[1] for x in a['v4'])} v4 ld/st (fewest), "
              f"{max(x[2] for x in a['v4'])} narrow 32-bit (most)") if a["v4"] else "-"
        lines.append(f"{tv:<7} {tg:<6} {k:<27} {a['n'] - a['err']:>8} {a['err']:>6} "
                     f"{a['regs']:>8} {a['spill']:>7}  {v4}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="?", help="launch records (JSON list); stdin with --worker")
    ap.add_argument("--stack", action="append", default=[],
                    help="a folder holding another Triton (pip install --target); repeatable; "
                         "'env' for the environment's own (the default when none is given)")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--json", help="write the rows here as well")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    if args.worker:
        rows = worker(json.load(sys.stdin), targets)
        print(json.dumps(rows))
        return 0
    with open(args.specs) as f:
        items = plan(json.load(f))
    stacks = {s: (None if s == "env" else s) for s in args.stack or ["env"]}
    rows = [r for rs in run_stacks(items, stacks, targets).values() for r in rs]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    print()
    print(summary(rows))
    return 1 if any("error" in r or r.get("torch_ttir", "ok") != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
