"""penalty.accumulate_ under FSDP2 (2 ranks, gloo, CPU) against the single-process call
(docs/distributed.md): collectives per call and time per call.

Parameters: 24 weights (384, 384) sharded on dim 0 as fully_shard shards them, and 24
biases (384,), float32 with gradients (3.5M weights). Cases: L1+L2 with the global value
(1 all-reduce), the same with global_value=False (0), and group lasso over "cols" (groups
spanning the shards: 1 all-reduce). Each rank holds half the weights; the single-process
call (rank 0 alone, rank 1 waiting) holds all of them. Medians of 30 calls after 5 warm-up
calls, 1 thread per process.

    python bench/bench_distributed.py            # prints the table, writes no file
    pytest bench/bench_distributed.py            # the same, inside the benchmark suite
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_LAYERS, D, ROUNDS, WARMUP = 24, 384, 30, 5
CASES = {
    "l1+l2, global value": dict(l1=1e-5, l2=1e-4),
    "l1+l2, global_value=False": dict(l1=1e-5, l2=1e-4, global_value=False),
    "group lasso cols (spans shards)": dict(l2=1e-4, group_lasso=1e-3, groups="cols"),
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_params():
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(N_LAYERS):
        ps.append(torch.randn(D, D, generator=g))
        ps.append(torch.randn(D, generator=g))
    return ps


def _time(fn):
    for _ in range(WARMUP):
        fn()
    ts = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    import fastreg
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full_params()
    res = {}
    for name, kw in CASES.items():
        kw = dict(kw)
        # single process: rank 0 alone, on the full tensors
        dist.barrier()
        if rank == 0:
            plain = [p.clone().requires_grad_() for p in full]
            for p in plain:
                p.grad = torch.zeros_like(p)
            single_kw = {k: v for k, v in kw.items() if k != "global_value"}
            res[name] = {"single_ms": _time(lambda: fastreg.penalty.accumulate_(plain,
                                                                                  **single_kw))}
        dist.barrier()
        # FSDP2-style shards on both ranks
        ds = []
        for p in full:
            d = torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)]))
            d.grad = distribute_tensor(torch.zeros_like(p), mesh, [Shard(0)])
            ds.append(d)
        calls = {"n": 0}
        real = dist.all_reduce

        def counting(*a, **k):
            calls["n"] += 1
            return real(*a, **k)
        dist.all_reduce = counting
        fastreg.penalty.accumulate_(ds, **kw)
        n = calls["n"]
        dist.all_reduce = real
        dist.barrier()
        ms = _time(lambda: fastreg.penalty.accumulate_(ds, **kw))
        t = torch.tensor([ms])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            res[name].update(fsdp2_ms=float(t), collectives=n)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def measure() -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="fastreg-bench-dist-"), "r.json")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True,
                       start_method="spawn")
    with open(out) as f:
        return json.load(f)


def table(res) -> str:
    lines = [f"accumulate_ on {N_LAYERS} x ({D},{D}) + {N_LAYERS} x ({D},) float32, CPU "
             f"({os.cpu_count()} cores), 1 thread per process; medians of {ROUNDS}",
             f"{'case':34} {'single ms':>10} {'FSDP2 2 ranks ms':>17} {'ratio':>6} "
             f"{'collectives':>12}"]
    for name, r in res.items():
        lines.append(f"{name:34} {r['single_ms']:10.3f} {r['fsdp2_ms']:17.3f} "
                     f"{r['fsdp2_ms'] / r['single_ms']:6.2f} {r['collectives']:12d}")
    return "\n".join(lines)


def test_accumulate_fsdp2_overhead(benchmark):
    res = measure()
    benchmark.extra_info.update(res)
    print("\n" + table(res))
    assert set(res) == set(CASES)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    print(table(measure()))
