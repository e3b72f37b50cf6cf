"""Mutation testing of code that only spawned ranks reach (tests/test_distributed.py's checks).

mutmut learns which tests reach a mutated function by tracing the test process. The
distributed checks run in processes that the test spawns, so the DTensor/DDP/FSDP2 code reads as
"no tests" and is never run against its mutants. This runner does it: for each such mutant of a
`make mutate` scratch folder, it runs the chosen checks in two spawned gloo ranks with
MUTANT_UNDER_TEST set (the ranks inherit it, and the path to the folder's mutants/), and
records the mutant as killed (a check failed on some rank, a rank died, or the checks ran past
the deadline) or survived.

    python tests/mutate_spawned.py build/mutate/fastreg_penalty --checks penalty_ modules_ \\
        --sample 20 --seed 0

--sample N picks N of the folder's "no tests" mutants (those of functions that no test of the
in-process run reached) at random (seeded), or of those whose name matches --functions REGEX;
without --sample it runs them all. --mutants NAME ... runs those. The ranks are forked from this
process once it has imported torch, fastreg and the checks (and run nothing), so a mutant costs
only its checks; --start spawn starts them afresh instead. Before any mutant, the checks must
pass unmutated and fail with mutmut's "fail" mutant (every trampoline raises): otherwise the run
would prove nothing. Verdicts (JSON) go to <folder>/spawned-results.json, or --results FILE,
after every mutant (--resume skips those it has); survivors are printed with their diffs
(`mutmut show`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checks_of(prefixes):
    import test_distributed as td

    every = [(n, fn) for suite in td.SUITES.values() for n, fn in suite]
    return [(n, fn) for n, fn in every if any(n.startswith(p) for p in prefixes)]


def _worker(rank, world, port, prefixes, outdir):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("FASTREG_QUIET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=40))
    import traceback

    for name, fn in _checks_of(prefixes):
        try:
            fn(rank, world, "cpu")
        except Exception:  # noqa: BLE001 - the mutant is killed; the parent stops both ranks
            tmp = os.path.join(outdir, f"tmp-{rank}")
            with open(tmp, "w") as f:
                f.write(f"{name}\n{traceback.format_exc()}")
            os.replace(tmp, os.path.join(outdir, f"fail-{rank}"))  # whole when the parent sees it
            return
    open(os.path.join(outdir, f"ok-{rank}"), "w").close()
    dist.barrier()
    dist.destroy_process_group()


def _run_checks(prefixes, deadline_s, start_method):
    """'ok', or why the checks failed (first failure, a dead rank, or the deadline)."""
    import torch.multiprocessing as mp

    outdir = tempfile.mkdtemp(prefix="fastreg-mutate-")
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), prefixes, outdir),
                             nprocs=WORLD, join=False, start_method=start_method)
    end = time.monotonic() + deadline_s
    verdict = None
    try:
        while verdict is None:
            fails = [f for f in os.listdir(outdir) if f.startswith("fail-")]
            if fails:  # no need to wait for the other rank, stuck in a collective
                with open(os.path.join(outdir, fails[0])) as f:
                    verdict = "failed: " + f.readline().strip()
            elif all(os.path.exists(os.path.join(outdir, f"ok-{r}")) for r in range(WORLD)):
                verdict = "ok"
            elif time.monotonic() > end:
                verdict = f"ran past {deadline_s:.0f} s"
            elif any(p.exitcode not in (None, 0) for p in ctx.processes):
                verdict = "a rank died"
            else:
                time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)
        shutil.rmtree(outdir, ignore_errors=True)
    return verdict


def _pool(folder, functions):
    """Every mutant whose name matches the regex functions or, without it, the mutants of the
    functions that no test of the in-process run reached (mutants/mutmut-stats.json, written by
    mutmut's stats pass; read from there so that a run restricted with MUTANTS= still names them)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder,
                         capture_output=True, text=True, check=True).stdout
    names = [line.strip().rsplit(": ", 1)[0] for line in out.splitlines() if ": " in line]
    if functions:
        return [n for n in names if re.search(functions, n)]
    with open(os.path.join(folder, "mutants", "mutmut-stats.json")) as f:
        reached = {k for k, tests in json.load(f)["tests_by_mangled_function_name"].items() if tests}
    return [n for n in names if n.rsplit("__mutmut_", 1)[0] not in reached]


def _import_all(package):
    """Import every module of the package here, so that forked ranks inherit them: importing
    fastreg's mutated files (every mutant of a file is in it) costs seconds a mutant otherwise.
    Importing runs no kernel, so no thread pool exists yet to be broken by the fork."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for m in pkgutil.walk_packages(pkg.__path__, package + "."):
        importlib.import_module(m.name)


def _set_mutant(name):
    if name is None:
        os.environ.pop("MUTANT_UNDER_TEST", None)
    else:
        os.environ["MUTANT_UNDER_TEST"] = name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a `make mutate` scratch folder, e.g. build/mutate/fastreg_penalty")
    ap.add_argument("--checks", nargs="+", required=True,
                    help="name prefixes of tests/test_distributed.py's checks to run")
    ap.add_argument("--sample", type=int, default=None, help="how many 'no tests' mutants to pick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--functions", default=None,
                    help="a regex: pick among every mutant whose name matches it (whatever mutmut "
                         "recorded), instead of the 'no tests' ones")
    ap.add_argument("--mutants", nargs="+", default=None, help="mutant names to run instead")
    ap.add_argument("--start", choices=("fork", "spawn"), default="fork",
                    help="how the ranks start: fork (default) from this process, which has "
                         "imported torch, fastreg and the checks but run nothing, so that a "
                         "mutant costs only its checks; spawn re-imports everything per mutant")
    ap.add_argument("--results", default=None,
                    help="the JSON file of verdicts, written after every mutant (default "
                         "<folder>/spawned-results.json); give each of several runs at once its own")
    ap.add_argument("--resume", action="store_true",
                    help="skip the mutants that the results file already has a verdict for")
    args = ap.parse_args()

    folder = os.path.abspath(args.folder)
    out_path = os.path.abspath(args.results or os.path.join(folder, "spawned-results.json"))
    mutants = os.path.join(folder, "mutants")
    if not os.path.isdir(mutants):
        raise SystemExit(f"folder: {folder} has no mutants/ (run `make mutate` first)")
    # the ranks import fastreg (mutated) and the checks from the scratch copy
    os.chdir(folder)
    os.environ["PYTHONPATH"] = os.pathsep.join([mutants, os.path.join(folder, "tests")])
    sys.path[:0] = [mutants, os.path.join(folder, "tests")]
    checks = [n for n, _ in _checks_of(args.checks)]
    if not checks:
        raise SystemExit(f"--checks: no check of tests/test_distributed.py starts with {args.checks}")
    if args.start == "fork":
        _import_all("fastreg")

    if args.mutants:
        names = args.mutants
    else:
        pool = _pool(folder, args.functions)
        names = random.Random(args.seed).sample(pool, min(args.sample or len(pool), len(pool)))
    results = {}
    if args.resume and os.path.exists(out_path):
        with open(out_path) as f:
            results = json.load(f)["results"]
        names = [n for n in names if n not in results]
    print(f"checks: {' '.join(checks)}\nmutants: {len(names)}", flush=True)

    t0 = time.monotonic()
    _set_mutant(None)
    base = _run_checks(args.checks, 300, args.start)
    base_s = time.monotonic() - t0
    if base != "ok":
        raise SystemExit(f"the checks fail without a mutant ({base}): fix them first")
    _set_mutant("fail")
    if _run_checks(args.checks, 300, args.start) == "ok":
        raise SystemExit("the checks pass with every trampoline raising: the mutants are not "
                         "reached (is mutants/ first on the ranks' path?)")
    deadline = 3 * base_s + 30
    print(f"unmutated: {base_s:.1f} s; deadline per mutant {deadline:.0f} s", flush=True)

    for i, name in enumerate(names):
        t = time.monotonic()
        _set_mutant(name)
        verdict = _run_checks(args.checks, deadline, args.start)
        results[name] = "survived" if verdict == "ok" else verdict
        print(f"[{i + 1}/{len(names)}] {name}: {results[name]} ({time.monotonic() - t:.0f} s)",
              flush=True)
        with open(out_path + ".tmp", "w") as f:  # after every mutant: a stopped run loses nothing
            json.dump({"checks": checks, "results": results}, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    _set_mutant(None)

    survivors = [n for n, v in results.items() if v == "survived"]
    print(f"\nkilled {len(results) - len(survivors)}, survived {len(survivors)} of {len(results)}")
    for n in survivors:
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", n], cwd=folder,
                              capture_output=True, text=True).stdout
        print(f"\n--- {n}\n{diff}")


if __name__ == "__main__":
    main()
