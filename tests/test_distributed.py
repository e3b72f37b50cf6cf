"""fastreg under torch.distributed: 2-process gloo runs on the CPU (docs/distributed.md).

Starting processes is the expensive part, so each suite of checks runs in ONE launch of two
spawned processes (free port chosen at run time, bounded by a deadline); every check reports
per rank and each pytest test asserts one check. NCCL variants (marked gpu) need 2 GPUs.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
DEADLINE_S = 150  # one launch; the whole file stays well inside CI's 3 minutes

# ---------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, suite, outdir, backend):
    os.environ.setdefault("FASTREG_QUIET", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=40))
    results = {}
    for name, fn in SUITES[suite]:
        try:
            fn(rank, world, "cuda" if backend == "nccl" else "cpu")
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
            results[name] = traceback.format_exc()
        with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def _launch(suite, backend="gloo"):
    outdir = tempfile.mkdtemp(prefix="fastreg-dist-")
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), suite, outdir, backend),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    error = None
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                error = f"suite {suite!r} ran past {DEADLINE_S} s"
                break
    except Exception as e:  # a worker died: its checks report what they got
        error = f"a worker failed: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = {}
    for r in range(WORLD):
        path = os.path.join(outdir, f"{r}.json")
        res = json.load(open(path)) if os.path.exists(path) else {}
        for name, _ in SUITES[suite]:
            out.setdefault(name, []).append(res.get(name, error or "no result"))
    return out


_CACHE: dict = {}


def _result(suite, name, backend="gloo"):
    key = (suite, backend)
    if key not in _CACHE:
        _CACHE[key] = _launch(suite, backend)
    rs = _CACHE[key][name]
    bad = [f"rank {r}: {m}" for r, m in enumerate(rs) if m != "ok"]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- helpers used in workers


class CountCollectives:
    """Counts calls of torch.distributed's collectives while active (they still run)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter",
             "all_gather_object", "broadcast_object_list")

    def __enter__(self):
        self.count, self.saved = 0, {}
        for n in self.NAMES:
            f = getattr(dist, n)
            self.saved[n] = f

            def wrapped(*a, _f=f, **k):
                self.count += 1
                return _f(*a, **k)
            setattr(dist, n, wrapped)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


def _gather(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _mesh(device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, (dist.get_world_size(),))


# ---------------------------------------------------------------- random streams

def check_rng_default_same(rank, world, device):
    """Without a context, ranks seeded alike draw the same mask (the problem being solved)."""
    import fastreg

    torch.manual_seed(0)
    y = fastreg.dropout(torch.ones(1000, device=device), 0.5)
    a, b = _gather(y)
    assert torch.equal(a, b)


def check_rng_data_parallel(rank, world, device):
    import fastreg
    from fastreg import distributed as fd

    x = torch.ones(4096, device=device)
    torch.manual_seed(0)
    with fd.fold_ranks():
        assert fd.stream_mask() is not None
        s = fd.folded_stream(3)
        y = fastreg.dropout(x, 0.5, stream=3)
    assert fd.stream_mask() is None  # restored on exit
    a, b = _gather(y)
    assert not torch.equal(a, b), "data-parallel ranks drew the same mask"
    frac = float(((a == 0) == (b == 0)).float().mean())
    assert 0.45 < frac < 0.55, f"masks not independent: agreement {frac}"
    # the bits are docs/rng.md's for (seed, folded stream): the seed torch drew, replayed
    torch.manual_seed(0)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device))
    keep = fastreg.rng.words(4096, seed, s, device="cpu").to(torch.int64) >= 2**31
    assert torch.equal(keep, (y != 0).cpu())
    # and an explicit (seed, stream) outside the context gives the same mask
    z = fastreg.dropout(x, 0.5, seed=seed, stream=s)
    assert torch.equal(z, y)


def check_rng_tensor_parallel(rank, world, device):
    """A 1 (dp) x 2 (tp) mesh: folding the dp rank keeps tp ranks identical (a replicated
    activation); folding dp and tp ranks makes them independent (a sharded activation)."""
    import fastreg
    from torch.distributed.device_mesh import init_device_mesh
    from fastreg import distributed as fd

    mesh = init_device_mesh(device, (1, world), mesh_dim_names=("dp", "tp"))
    x = torch.ones(2048, device=device)
    torch.manual_seed(1)
    with fd.fold_ranks(mesh["dp"]):
        rep = fastreg.dropout(x, 0.3)
        with fd.fold_ranks(mesh["tp"]):
            shd = fastreg.dropout(x, 0.3)
        rep2 = fastreg.dropout(x, 0.3)
    a, b = _gather(rep)
    assert torch.equal(a, b), "tp ranks of one dp rank drew different masks for a replicated activation"
    a, b = _gather(rep2)
    assert torch.equal(a, b), "the inner context was not undone"
    a, b = _gather(shd)
    assert not torch.equal(a, b), "tp ranks drew the same mask for a sharded activation"
    # process groups work as well as meshes: dp groups of one rank each
    groups = [dist.new_group([r]) for r in range(world)]
    torch.manual_seed(1)
    with fd.fold_ranks(groups[rank]):
        rep3 = fastreg.dropout(x, 0.3)
    assert torch.equal(rep3, rep)


def check_rng_backward_outside(rank, world, device):
    """Backward regenerates the mask from the stream saved in forward: no context needed."""
    import fastreg
    from fastreg import distributed as fd

    x = torch.randn(999, device=device, requires_grad=True)
    torch.manual_seed(2)
    with fd.fold_ranks():
        y = fastreg.dropout(x, 0.4)
        z = fastreg.nn.GaussianDropout(0.3)(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(y != 0, g / 0.6, torch.zeros_like(g)),
                               rtol=1e-6, atol=0)
    x.grad = None
    z.sum().backward()
    assert torch.allclose(x.grad * x, z, rtol=1e-5, atol=1e-6)
    a, b = _gather(z)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- penalties on DTensors

def _params(device, placements_of):
    """Full tensors (same on every rank) and their DTensors: uneven shards, an empty shard, a
    replicated tensor, a conv weight, a vector."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(5)
    shapes = {"w1": (7, 5), "w2": (5, 6), "b": (7,), "tiny": (1, 4), "rep": (3, 3),
              "conv": (4, 3, 2, 2)}
    place = {"w1": Shard(0), "w2": Shard(1), "b": Shard(0), "tiny": Shard(0),
             "rep": Replicate(), "conv": Shard(0)}
    place.update(placements_of)
    full = {k: torch.randn(s, generator=g, dtype=torch.float64).to(torch.float32)
            for k, s in shapes.items()}
    # zero groups (sparsity, subgradients at 0): on one rank (w1's row 2, w2's column 1) and
    # spanning the ranks (w1's column 0, w2's row 0: first, where an offset error shows)
    full["w1"][2] = 0.0
    full["w1"][:, 0] = 0.0
    full["w2"][:, 1] = 0.0
    full["w2"][0] = 0.0
    grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    mesh = _mesh(device)
    dts, dgs = {}, {}
    for k in shapes:
        dts[k] = torch.nn.Parameter(distribute_tensor(full[k].to(device), mesh, [place[k]]))
        dgs[k] = distribute_tensor(grads[k].to(device), mesh, [place[k]])
    return full, grads, dts, dgs


def _index_groups(shape, k=3):
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n) % k


def check_penalty_accumulate(rank, world, device):
    import fastreg

    cases = []
    for groups in (None, "rows", "cols"):
        cases.append((groups, {}))
    cases.append(("index", {}))
    for groups, extra in cases:
        for gv in (True, False):
            full, grads, dts, dgs = _params(device, extra)
            names = list(full)
            if groups == "index":
                gspec = [_index_groups(full[k].shape).to(device) for k in names]
            else:
                gspec = groups
            kw = dict(l1=1e-2, l2=3e-2, group_lasso=0.0 if groups is None else 5e-2)
            # the single-process reference on the full tensors
            ref_p = [full[k].clone().requires_grad_() for k in names]
            for p, k in zip(ref_p, names):
                p.grad = grads[k].clone()
            ref_gspec = [t.cpu() for t in gspec] if groups == "index" else gspec
            ref = fastreg.penalty.accumulate_(ref_p, groups=ref_gspec, **kw)
            ps = [dts[k] for k in names]
            for p, k in zip(ps, names):
                p.grad = dgs[k]
            with CountCollectives() as cc:
                v = fastreg.penalty.accumulate_(ps, groups=gspec, global_value=gv, **kw)
            spans = groups is not None  # w2 Shard(1) rows, w1 Shard(0) cols, index: all span
            assert cc.count == (1 if (gv or spans) else 0), (groups, gv, cc.count)
            if not gv:
                shares = v.to(torch.float64).reshape(1).to(device)
                dist.all_reduce(shares)
                v = shares[0].to(torch.float32).cpu()
            torch.testing.assert_close(v.cpu(), ref, rtol=2e-6, atol=1e-6,
                                       msg=lambda m: f"value {groups} {gv}: {m}")
            for p, rp, k in zip(ps, ref_p, names):
                torch.testing.assert_close(p.grad.full_tensor().cpu(), rp.grad, rtol=1e-5,
                                           atol=1e-6, msg=lambda m, k=k: f"grad {k} {groups}: {m}")
            if groups is not None and not gv:  # groups named but no group term: no collective
                with CountCollectives() as cc:
                    fastreg.penalty.accumulate_(ps, groups=gspec, global_value=False,
                                                **dict(kw, group_lasso=0.0))
                assert cc.count == 0, (groups, cc.count)


def check_penalty_mixed_strengths_and_dtypes(rank, world, device):
    """Shards that the one-pass launch must not take together, and bf16 shards, which it does
    not take at all: param groups with their own strengths, float32 mixed with float64 in one
    call, and bfloat16; accumulate_ and prox_ equal the single-process calls."""
    import fastreg
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh(device)
    g = torch.Generator().manual_seed(11)

    def make(shapes_dtypes, dims=(0, 0)):
        full = [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in shapes_dtypes]
        grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in shapes_dtypes]
        dts = [torch.nn.Parameter(distribute_tensor(f.to(device), mesh, [Shard(d)]))
               for f, d in zip(full, dims)]
        for d, gr, dim in zip(dts, grads, dims):
            d.grad = distribute_tensor(gr.to(device), mesh, [Shard(dim)])
        refs = [f.clone().requires_grad_() for f in full]
        for r, gr in zip(refs, grads):
            r.grad = gr.clone()
        return dts, refs

    def groups_of(ps):  # two param groups with their own strengths
        return [{"params": ps[:1], "l1": 0.3, "l2": 0.0}, {"params": ps[1:], "l1": 0.0, "l2": 0.4}]

    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    gl = {"l1": 0.1, "group_lasso": 0.2, "groups": ["rows", "cols"]}
    cases = [("strengths", [((7, 5), f32), ((5, 3), f32)], groups_of, {}, (0, 0)),
             ("f32+f64", [((7, 5), f32), ((4, 3), f64)], list, {"l1": 0.1, "l2": 0.2}, (0, 0)),
             ("bf16", [((7, 5), bf16), ((6,), bf16)], list, {"l1": 0.1, "l2": 0.2}, (0, 0)),
             # rows of a Shard(0) weight and cols of a Shard(1) one: both whole on each rank,
             # one strength triple, two groupings
             ("rows+cols", [((7, 5), f32), ((3, 6), f32)], list, gl, (0, 1))]
    for name, spec, wrap, kw, dims in cases:
        tol = dict(rtol=2e-2, atol=2e-2) if name == "bf16" else dict(rtol=1e-6, atol=1e-7)
        dts, refs = make(spec, dims)
        v = fastreg.penalty.accumulate_(wrap(dts), **kw)
        rv = fastreg.penalty.accumulate_(wrap(refs), **kw)
        torch.testing.assert_close(v.cpu(), rv, **tol, msg=lambda m: f"value {name}: {m}")
        for d, r in zip(dts, refs):
            torch.testing.assert_close(d.grad.full_tensor().cpu(), r.grad, **tol,
                                       msg=lambda m: f"grad {name}: {m}")
        fastreg.penalty.prox_(wrap(dts), 0.5, **kw)
        fastreg.penalty.prox_(wrap(refs), 0.5, **kw)
        for d, r in zip(dts, refs):
            torch.testing.assert_close(d.full_tensor().detach().cpu(), r.detach(), **tol,
                                       msg=lambda m: f"prox {name}: {m}")
    # sparsity: zero columns of a Shard(0) weight are groups spanning the shards
    w = torch.randn(7, 5, generator=g)
    w[:, 1] = 0.0
    w[:, 3] = 0.0
    w[4, 0] = 0.0
    dw = distribute_tensor(w.to(device), mesh, [Shard(0)])
    got = fastreg.penalty.sparsity([dw], groups="cols")
    assert got == fastreg.penalty.sparsity([w], groups="cols") == {
        "weights": 15 / 35, "groups": 2 / 5, "zero_groups": 2, "num_groups": 5}, got
    share = fastreg.penalty.sparsity([dw], groups="cols", global_value=False)  # shares sum up
    counts = torch.tensor([share["zero_groups"], share["num_groups"]], dtype=torch.int64)
    dist.all_reduce(counts)
    assert counts.tolist() == [2, 5], (share, counts)


def check_penalty_rows_local(rank, world, device):
    """Rows of Shard(0) weights are whole on each rank: no collective unless the value is
    wanted."""
    import fastreg

    full, grads, dts, dgs = _params(device, {})
    ps = [dts["w1"], dts["conv"], dts["b"]]
    for p, k in zip(ps, ("w1", "conv", "b")):
        p.grad = dgs[k]
    with CountCollectives() as cc:
        fastreg.penalty.accumulate_(ps, l2=1e-2, group_lasso=1e-2, groups="rows",
                                    global_value=False)
        fastreg.penalty.prox_(ps, 0.1, l1=1e-2, group_lasso=1e-2, groups="rows")
    assert cc.count == 0, cc.count
    with CountCollectives() as cc:
        fastreg.penalty.accumulate_(ps, l2=1e-2, group_lasso=1e-2, groups="rows")
    assert cc.count == 1, cc.count
    # a .grad of None gets the penalty gradient alone, as a DTensor like its parameter
    p = dts["w2"]
    p.grad = None
    fastreg.penalty.accumulate_([p], l2=0.5)
    torch.testing.assert_close(p.grad.full_tensor().cpu(), full["w2"], rtol=1e-6, atol=0)
    assert p.grad.placements == p.placements


def check_penalty_prox(rank, world, device):
    import fastreg

    for groups in (None, "rows", "cols", "index"):
        full, grads, dts, dgs = _params(device, {})
        names = list(full)
        gspec = [_index_groups(full[k].shape).to(device) for k in names] if groups == "index" \
            else groups
        ref_gspec = [t.cpu() for t in gspec] if groups == "index" else gspec
        kw = dict(l1=0.05, l2=0.1, group_lasso=0.0 if groups is None else 0.8)
        ref_p = [full[k].clone() for k in names]
        fastreg.penalty.prox_(ref_p, 0.5, groups=ref_gspec, **kw)
        ps = [dts[k] for k in names]
        with CountCollectives() as cc:
            fastreg.penalty.prox_(ps, 0.5, groups=gspec, **kw)
        assert cc.count == (0 if groups is None else 1), (groups, cc.count)
        for p, rp, k in zip(ps, ref_p, names):
            torch.testing.assert_close(p.full_tensor().cpu(), rp, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, k=k: f"prox {k} {groups}: {m}")
        assert sum(int((rp == 0).sum()) for rp in ref_p) > 0  # exact zeros were made


def check_penalty_sparsity(rank, world, device):
    import fastreg

    for groups in (None, "rows", "cols", "index"):
        full, grads, dts, dgs = _params(device, {})
        names = list(full)
        gspec = [_index_groups(full[k].shape).to(device) for k in names] if groups == "index" \
            else groups
        ref_gspec = [t.cpu() for t in gspec] if groups == "index" else gspec
        ref = fastreg.penalty.sparsity([full[k] for k in names], groups=ref_gspec)
        with CountCollectives() as cc:
            got = fastreg.penalty.sparsity([dts[k] for k in names], groups=gspec)
        assert cc.count == 1
        assert got == ref, (groups, got, ref)
        with CountCollectives() as cc:
            share = fastreg.penalty.sparsity([dts[k] for k in names], groups=gspec,
                                             global_value=False)
        t = torch.tensor([share["zero_groups"], share["num_groups"]], dtype=torch.float64)
        dist.all_reduce(t)
        assert (int(t[0]), int(t[1])) == (ref["zero_groups"], ref["num_groups"]), (groups, t, ref)
        # replicated tensors only: no collective, every rank counts them
        rep_groups = None if groups == "index" else groups
        with CountCollectives() as cc:
            got = fastreg.penalty.sparsity([dts["rep"]], groups=rep_groups)
        assert cc.count == 0
        assert got == fastreg.penalty.sparsity([full["rep"]], groups=rep_groups)


def check_penalty_errors(rank, world, device):
    import fastreg
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    full, grads, dts, dgs = _params(device, {})
    plain = torch.zeros(3, device=device, requires_grad=True)
    with pytest.raises(TypeError, match="mix DTensors and plain"):
        fastreg.penalty.accumulate_([dts["w1"], plain], l2=1.0)
    with pytest.raises(TypeError, match="mix DTensors and plain"):
        fastreg.penalty.prox_([dts["w1"], plain], 0.1, l2=1.0)
    with pytest.raises(TypeError, match="mix DTensors and plain"):
        fastreg.penalty.sparsity([plain, dts["w1"]])
    mesh2 = init_device_mesh(device, (world, 1))
    w = distribute_tensor(full["w1"].to(device), mesh2, [Shard(0), Shard(1)])
    with pytest.raises(ValueError, match="2-D device mesh"):
        fastreg.penalty.accumulate_([w], l2=1.0)
    from torch.distributed.tensor import DTensor

    part = DTensor.from_local(torch.ones(2, 2, device=device), _mesh(device), [Partial()])
    with pytest.raises(ValueError, match="Partial"):
        fastreg.penalty.accumulate_([part], l2=1.0, group_lasso=1.0, groups="cols")
    bad_idx = distribute_tensor(_index_groups((7, 5)).to(device), _mesh(device), [Shard(0)])
    with pytest.raises(TypeError, match="index tensor .* DTensor"):
        fastreg.penalty.accumulate_([dts["w1"]], group_lasso=1.0, groups=[bad_idx])
    # a .grad laid out otherwise than its parameter: its shards are other elements
    dts["w1"].grad = distribute_tensor(grads["w1"].to(device), _mesh(device), [Replicate()])
    before = dts["w1"].grad.to_local().clone()
    with pytest.raises(TypeError, match=r"accumulate_: tensor 1 is a DTensor with placements "
                                        r"\(Shard\(dim=0\),\), but its \.grad is \(Replicate\(\),\)"):
        fastreg.penalty.accumulate_([dts["b"], dts["w1"]], l2=1.0)
    assert torch.equal(dts["w1"].grad.to_local(), before)
    # nothing reached a native kernel as a plain tensor, and nothing was half written
    assert plain.grad is None


def check_penalty_fsdp2(rank, world, device):
    """A real fully_shard model: the penalty gradient added to the reduce-scattered grads is the
    single-process penalty gradient of the full parameters."""
    import fastreg
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model.to(device)
    full = [p.detach().clone().cpu() for p in model.parameters()]
    fully_shard(model[0])
    fully_shard(model)
    x = torch.randn(8, 6, device=device)
    model(x).square().sum().backward()
    before = [p.grad.full_tensor().cpu() for p in model.parameters()]
    with CountCollectives() as cc:
        v = fastreg.penalty.accumulate_(model.parameters(), l2=1e-2, group_lasso=3e-2,
                                        groups="cols")
    assert cc.count == 1
    ref_p = [f.clone().requires_grad_() for f in full]
    for p in ref_p:
        p.grad = torch.zeros_like(p)
    ref = fastreg.penalty.accumulate_(ref_p, l2=1e-2, group_lasso=3e-2, groups="cols")
    torch.testing.assert_close(v.cpu(), ref, rtol=2e-6, atol=1e-7)
    for p, b, rp in zip(model.parameters(), before, ref_p):
        torch.testing.assert_close(p.grad.full_tensor().cpu() - b, rp.grad, rtol=1e-5, atol=1e-6)


def check_penalty_ddp(rank, world, device):
    """DDP: plain replicated parameters; after backward (grads averaged) one call per rank, no
    communication, identical on every rank."""
    import fastreg
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).to(device)
    ddp = DDP(model)
    torch.manual_seed(10 + rank)
    ddp(torch.randn(5, 6, device=device)).sum().backward()
    with CountCollectives() as cc:
        v = fastreg.penalty.accumulate_(model.parameters(), l1=1e-3, group_lasso=1e-2,
                                        groups="cols")
    assert cc.count == 0
    a, b = _gather(model.weight.grad)
    assert torch.equal(a, b)
    va, vb = _gather(v.reshape(1).to(device))
    assert torch.equal(va, vb)


# ---------------------------------------------------------------- ReversibleSGD

def _mlp(seed, device):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(device)


def _batches(T, device):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(T + 1, 8, 5, generator=g).to(device)  # the last one: validation
    Y = torch.randn(T + 1, 8, 3, generator=g).to(device)
    return X, Y


def _reversible_run(model, fwd, X, Y, rows, T, ddp=None):
    from fastreg.optim import ReversibleSGD

    lr = torch.full((T,), 0.05, dtype=torch.float64, requires_grad=True)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.9)
    w0 = [p.detach().clone() for p in model.parameters()]

    def loss(t):
        return torch.nn.functional.mse_loss(fwd(X[t, rows]), Y[t, rows])
    for t in range(T):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
    return opt, lr, w0, loss


def check_reversible_ddp(rank, world, device):
    """DDP: step after the gradient all-reduce; reverse(..., ddp=) restores w_0 bit for bit on
    every rank, and the hypergradients equal a single-process run on the global batches."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    T = 6
    X, Y = _batches(T, device)
    rows = slice(4 * rank, 4 * rank + 4)
    model = _mlp(0, device)
    ddp = DDP(model)
    opt, lr, w0, loss = _reversible_run(model, ddp, X, Y, rows, T)
    wT = [p.detach().clone() for p in model.parameters()]
    obj = opt.reverse(lambda: loss(T), loss, ddp=ddp)
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w), "w_0 not restored bit for bit"
    for p in model.parameters():
        a, b = _gather(p.detach())
        assert torch.equal(a, b)
    # the single-process run on the global batches (each rank runs it: same result)
    ref = _mlp(0, device)
    ropt, rlr, rw0, rloss = _reversible_run(ref, ref, X, Y, slice(0, 8), T)
    for p, q in zip(model.parameters(), rw0):
        assert torch.equal(p.detach(), q)
    for p, w in zip(ref.parameters(), wT):
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)
    robj = ropt.reverse(lambda: rloss(T), rloss)
    torch.testing.assert_close(obj, robj, rtol=1e-6, atol=0)
    torch.testing.assert_close(lr.grad, rlr.grad, rtol=1e-6, atol=1e-12)
    for p, q in zip(model.parameters(), ref.parameters()):  # d objective / d w_0
        rel = float((p.grad - q.grad).norm() / q.grad.norm())
        assert rel <= 1e-6, rel
    assert lr.grad.abs().min() > 0


def check_reversible_ddp_divergence(rank, world, device):
    """A rank whose state differs is named; a closure nondeterministic on one rank is caught on
    every rank (no rank hangs)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    T = 4
    X, Y = _batches(T, device)
    rows = slice(4 * rank, 4 * rank + 4)
    model = _mlp(1, device)
    ddp = DDP(model)
    opt, lr, w0, loss = _reversible_run(model, ddp, X, Y, rows, T)
    sd = copy.deepcopy(opt.state_dict())  # torch's state dicts hold the live tensors
    if rank == 1:
        st = opt.state[next(iter(model.parameters()))]
        st["v"][0] += 1
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differs from the majority's \(of 2 ranks; on a "
                                           r"tie, from rank 0's\)"):
        opt.reverse(lambda: loss(T), loss, ddp=ddp)
    opt.load_state_dict(sd)  # per-rank state dicts restore a usable optimizer
    opt.check_ranks(ddp)
    # the gradient fingerprints are part of the state compared (DDP gives every rank the same
    # gradients, so only a corrupted state differs: made by hand here)
    saved = opt._gfp[1].clone()
    if rank == 1:
        opt._gfp[1][0] += 1
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differs from the majority's"):
        opt.check_ranks(ddp)
    opt._gfp[1] = saved
    opt.check_ranks(ddp)

    def noisy(t):
        out = loss(t)
        return out * (1 + 1e-3) if (rank == 1 and t == 1) else out
    with pytest.raises(RuntimeError, match=r"w_0 was not recovered bit for bit on rank\(s\)"):
        opt.reverse(lambda: loss(T), noisy, ddp=ddp)
    with pytest.raises(RuntimeError, match=r"state is invalid after an earlier error \(w_0 was not"):
        opt.step()  # every rank refuses to go on


def check_reversible_fsdp2(rank, world, device):
    """FSDP2: step() on the local shards (uneven: 7 and 3 rows over 2 ranks) follows the
    single-process run; per-rank state dicts round-trip; reverse refuses DTensor parameters
    without fsdp=, an fsdp= that is no FSDPModule, and ddp= with fsdp=."""
    from torch.distributed.fsdp import fully_shard
    from fastreg.optim import ReversibleSGD

    T = 4
    X, Y = _batches(T, device)
    rows = slice(4 * rank, 4 * rank + 4)
    model = _mlp(2, device)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt, lr, w0, loss = _reversible_run(model, model, X, Y, rows, T)
    ref = _mlp(2, device)
    _reversible_run(ref, ref, X, Y, slice(0, 8), T)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)
    sd = opt.state_dict()
    opt2 = ReversibleSGD(model.parameters(), lr=lr, momentum=0.9)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for k in ("w", "v", "head", "count"):
            assert torch.equal(opt.state[p][k], opt2.state[p][k])
    with pytest.raises(ValueError, match=r"DTensors .*pass reverse\(\.\.\., fsdp=model\)"):
        opt.reverse(lambda: loss(T), loss)
    with pytest.raises(TypeError, match="fsdp must be the fully_shard-ed module"):
        opt.reverse(lambda: loss(T), loss, fsdp=model[1])
    with pytest.raises(ValueError, match="pass ddp= or fsdp=, not both"):
        opt.reverse(lambda: loss(T), loss, fsdp=model, ddp=model)
    with pytest.raises(ValueError, match=r"^objective must be a scalar tensor \(or a callable"):
        opt.reverse(lambda: torch.ones(2), loss, fsdp=model)
    with pytest.raises(ValueError, match=r"fsdp: parameter param_groups\[0\]\['params'\]\[2\] "
                                         r"\(shape \(3, 7\)\) is not a parameter of the fsdp module"):
        opt.reverse(lambda: loss(T), loss, fsdp=model[0])  # the first layer's module only
    assert opt.steps == T
    # a layer sharded on dim 1 (FSDP2's shard_placement_fn): refused by name, nothing changed
    from torch.distributed.tensor import Shard

    torch.manual_seed(2)
    cols = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(device)
    fully_shard(cols[2], shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)  # 6 columns
    fully_shard(cols)
    copt, _, _, closs = _reversible_run(cols, cols, X, Y, rows, T)
    before = [p.to_local().clone() for p in cols.parameters()]
    with pytest.raises(NotImplementedError, match=r"params'\]\[2\] \(shape \(3, 6\)\) is placed "
                                                  r"\(Shard\(dim=1\),\) on a 1-D mesh; reverse "
                                                  r"takes FSDP2's Shard\(0\)"):
        copt.reverse(lambda: closs(T), closs, fsdp=cols)
    assert copt.steps == T and all(torch.equal(p.to_local(), b) for p, b in zip(cols.parameters(), before))


def check_reversible_fsdp2_reverse(rank, world, device, parent_only=False, dtype=torch.float32):
    """FSDP2: reverse(..., fsdp=model) restores every rank's shards of w_0 bit for bit (shards of
    4+3, 2+1 and 1+0 rows: uneven and empty), and the hypergradients (an lr schedule, momentum,
    weight decay, a meta-parameter scaling the inputs, d objective / d w_0) and the objective
    equal the single-process run's on the global batches to 1e-6 relative. FSDP2's settings
    are put back: training goes on resharding after forward and syncing gradients. An objective
    given as a tensor gives the same; a closure differing on one rank raises on every rank.
    parent_only: only the whole model is sharded (the root, which FSDP2 leaves unsharded after
    forward): the first part, then a closure raising inside reverse leaves FSDP2 usable.
    dtype=float64: the first part only, to 1e-10 relative (what reverse sums and gathers across
    the ranks stays in float64)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from fastreg.optim import ReversibleSGD

    T = 5
    X, Y = _batches(T, device)
    X, Y = X.to(dtype), Y[..., :1].to(dtype)
    mse = torch.nn.functional.mse_loss
    tol = 1e-6 if dtype == torch.float32 else 1e-10

    def run(model, rows):
        lr = torch.linspace(0.05, 0.1, T, dtype=torch.float64).requires_grad_()
        mom = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
        wd = torch.tensor(1e-2, dtype=torch.float64, requires_grad=True)
        s = torch.linspace(0.5, 1.5, 5, device=device, dtype=dtype).requires_grad_()  # a meta-parameter
        opt = ReversibleSGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd)
        w0 = [(p.to_local() if isinstance(p, DTensor) else p).detach().clone()
              for p in model.parameters()]

        def loss(t):
            return mse(model(X[t, rows] * s), Y[t, rows])
        for t in range(T):
            opt.zero_grad()
            loss(t).backward()
            opt.step()
        s.grad = torch.full_like(s, 0.25)  # reverse adds to a meta-parameter's gradient
        if sharded := isinstance(next(model.parameters()), DTensor):
            model.zero_grad()  # none yet: reverse makes DTensor gradients laid out as the shards
        # reverse's own collectives (FSDP2's are not counted): per step one all-gather and one
        # all-reduce; one each for the objective, the w_0 check and the lr/momentum/decay sums
        with CountCollectives() as c:
            obj = opt.reverse(lambda: loss(T), loss, fsdp=model if sharded else None)
        assert c.count == (2 * T + 3 if sharded else 0), c.count
        return opt, w0, obj, (lr, mom, wd, s)

    model = _fsdp_mlp(4, device).to(dtype)
    for i in () if parent_only else (0, 2, 4):
        fully_shard(model[i])
    fully_shard(model)
    opt, w0, obj, hyp = run(model, slice(4 * rank, 4 * rank + 4))
    for p, w in zip(model.parameters(), w0):
        assert isinstance(p, DTensor) and torch.equal(p.to_local(), w), "w_0 not restored bit for bit"
    assert opt.steps == 0
    ref = _fsdp_mlp(4, device).to(dtype)
    ropt, rw0, robj, rhyp = run(ref, slice(0, 8))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.full_tensor(), q.detach())
    torch.testing.assert_close(obj, robj, rtol=tol, atol=0)
    for name, h, r in zip(("lr", "momentum", "weight_decay", "meta"), hyp, rhyp):
        rel = float((h.grad - r.grad).norm() / r.grad.norm())
        assert rel <= tol, (name, rel, h.grad, r.grad)
        assert (r.grad != 0).all(), name
    for p, q in zip(model.parameters(), ref.parameters()):  # d objective / d w_0
        assert isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape
        rel = float((p.grad.full_tensor() - q.grad).norm() / q.grad.norm())
        assert rel <= tol, rel
    if dtype != torch.float32:
        return
    s = hyp[3]  # the meta-parameter
    rows = slice(4 * rank, 4 * rank + 4)

    def loss(t):
        return mse(model(X[t, rows] * s), Y[t, rows])
    if parent_only:
        # a closure raising in reverse's unsharded pass, after its forward: FSDP2's settings and
        # state are put back (gradients synced, parameters resharded after backward)
        for t in range(2):
            opt.zero_grad()
            loss(t).backward()
            opt.step()
        calls = []

        def failing(t):
            out = loss(t)
            calls.append(t)
            if len(calls) == 2:
                raise KeyError("closure failed")
            return out
        with pytest.raises(KeyError, match="closure failed"):
            opt.reverse(loss(2), failing, fsdp=model)
        for p in model.parameters():
            p.grad = None
        loss(0).backward()
        assert all(isinstance(p, DTensor) and isinstance(p.grad, DTensor) for p in model.parameters())
        return
    grads = [h.grad.clone() for h in hyp] + [p.grad.to_local().clone() for p in model.parameters()]
    # FSDP2's settings are back: a non-root module reshards after forward, gradients are synced
    out = mse(model(X[0, :4]), Y[0, :4])
    assert isinstance(model[0].weight, DTensor)
    for p in model.parameters():
        p.grad = None
    out.backward()
    assert all(isinstance(p.grad, DTensor) for p in model.parameters())
    # ... and they are this batch's gradients: nothing reverse computed was left behind where
    # FSDP2's backward accumulates (every rank has the same batch; the mean is the batch's)
    ref.zero_grad()
    mse(ref(X[0, :4]), Y[0, :4]).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)
    # the same run again, the objective given as a tensor computed under FSDP2 before reverse
    # (its graph ends at the unsharded parameters): the same hypergradients
    for h in hyp:
        h.grad = None
    for t in range(T):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
    s.grad = torch.full_like(s, 0.25)
    assert torch.equal(opt.reverse(loss(T), loss, fsdp=model), obj)
    again = [h.grad for h in hyp] + [p.grad.to_local() for p in model.parameters()]
    for a, b in zip(again, grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # a closure that differs on rank 1 only: the reduce-scatter spreads its gradients over every
    # rank's shards, so every rank misses w_0 and raises
    for t in range(2):
        opt.zero_grad()
        loss(t).backward()
        opt.step()

    def noisy(t):
        return loss(t) * (1 + 1e-3) if rank == 1 else loss(t)
    with pytest.raises(RuntimeError,
                       match=r"w_0 was not recovered bit for bit on rank\(s\) \[0, 1\] of 2"):
        opt.reverse(loss(2), noisy, fsdp=model)
    with pytest.raises(RuntimeError, match=r"state is invalid after an earlier error \(w_0 was not"):
        opt.step()  # every rank refuses to go on


def _shared_tmpdir():
    """A directory made by rank 0, its path sent to every rank (a checkpoint's home)."""
    box = [tempfile.mkdtemp(prefix="fastreg-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _remove_tmpdir(path):
    import shutil

    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _assert_same_state(opt_a, params_a, opt_b, params_b, what, fingerprints=True):
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        sa, sb = opt_a.state[p], opt_b.state[q]
        for k in ("w", "v", "head", "count"):
            assert torch.equal(sa[k], sb[k]), f"{what}: {k} of parameter {i}"
        u = int(sa["count"].max()) if sa["count"].numel() else 0
        assert torch.equal(sa["spill"][:u], sb["spill"][:u]), f"{what}: spill of parameter {i}"
    assert opt_a.steps == opt_b.steps
    # the gradient fingerprints travel too (reverse names the step of an unrepeatable closure
    # with them); there are none of DTensor parameters, whose gradient shards differ by rank
    fa, fb = opt_a._gfp_table(), opt_b._gfp_table()
    if not fingerprints:
        assert fa is None and fb is None, f"{what}: gradient fingerprints of DTensor parameters"
    else:
        assert fa is not None and fb is not None, f"{what}: gradient fingerprints lost"
        assert fa["first"] == fb["first"] and torch.equal(fa["table"], fb["table"]), \
            f"{what}: gradient fingerprints differ"


def check_reversible_dcp_ddp(rank, world, device):
    """DDP: a torch.distributed.checkpoint round trip (model + optimizer) in the middle of a run,
    into a fresh model and optimizer; the resumed run reverses to w_0 bit for bit with the
    hypergradients of the run without the checkpoint. A rank whose state differs is refused at
    saving, named on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastreg.optim import ReversibleSGD

    T1, T2 = 20, 6  # the information buffer has spilled words by step 20 (tested below)
    T = T1 + T2
    X, Y = _batches(T, device)
    rows = slice(4 * rank, 4 * rank + 4)

    def run(model, fwd, opt, ts):
        for t in ts:
            opt.zero_grad()
            torch.nn.functional.mse_loss(fwd(X[t, rows]), Y[t, rows]).backward()
            opt.step()

    def make(seed, lr_value):
        model = _mlp(seed, device)
        ddp = DDP(model)
        lr = torch.full((T,), lr_value, dtype=torch.float64, requires_grad=True)
        return model, ddp, lr, ReversibleSGD(model.parameters(), lr=lr, momentum=0.2, frac_bits=40)

    def closure_of(ddp):
        return lambda t: torch.nn.functional.mse_loss(ddp(X[t, rows]), Y[t, rows])

    # the run without a checkpoint
    model, ddp, lr, opt = make(5, 0.05)
    w0 = [p.detach().clone() for p in model.parameters()]
    run(model, ddp, opt, range(T))
    wT = [p.detach().clone() for p in model.parameters()]
    opt.reverse(lambda: closure_of(ddp)(T), closure_of(ddp), ddp=ddp)
    ref_lr, ref_dw = lr.grad.clone(), [p.grad.clone() for p in model.parameters()]
    # the checkpointed run: T1 steps, dcp.save, a fresh model (other init) and optimizer, dcp.load
    model, ddp, lr, opt = make(5, 0.05)
    run(model, ddp, opt, range(T1))
    assert max(int(opt.state[p]["count"].max()) for p in model.parameters()) > 0, "nothing spilled"
    path = _shared_tmpdir()
    try:
        dcp.save({"model": model.state_dict(), "optim": opt.dcp_state_dict()}, checkpoint_id=path)
        model2, ddp2, lr2, opt2 = make(6, 0.3)
        sd = {"model": model2.state_dict(), "optim": opt2.dcp_state_dict(path)}
        dcp.load(sd, checkpoint_id=path)
        model2.load_state_dict(sd["model"])
        opt2.load_dcp_state_dict(sd["optim"])
        assert torch.equal(lr2.detach(), lr.detach()) and lr2.requires_grad  # loaded in place
        _assert_same_state(opt, list(model.parameters()), opt2, list(model2.parameters()), "after load")
        opt2.check_ranks(ddp2)
        run(model2, ddp2, opt2, range(T1, T))
        for p, w in zip(model2.parameters(), wT):
            assert torch.equal(p.detach(), w), "the resumed run left the uninterrupted one"
        opt2.reverse(lambda: closure_of(ddp2)(T), closure_of(ddp2), ddp=ddp2)
        for p, w in zip(model2.parameters(), w0):
            assert torch.equal(p.detach(), w), "w_0 not restored bit for bit after the checkpoint"
        assert torch.equal(lr2.grad, ref_lr)
        for p, g in zip(model2.parameters(), ref_dw):
            assert torch.equal(p.grad, g)
        # a rank whose (replicated) state differs: refused at saving, on every rank, naming it
        if rank == 1:
            opt.state[next(iter(model.parameters()))]["v"][0] += 1
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] differ from the majority"):
            opt.dcp_state_dict()
    finally:
        _remove_tmpdir(path)


def _fsdp_mlp(seed, device):
    """Uneven shards over 2 ranks: 7 rows (4 + 3), 3 rows (2 + 1), and 1 row (1 + an empty shard)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(device)


def check_reversible_dcp_fsdp2(rank, world, device):
    """FSDP2: each rank saves and loads its own shards of the optimizer state through DCP
    (DTensors on the parameters' mesh; uneven and empty shards); the resumed run's per-rank state
    equals the uninterrupted run's bit for bit. A checkpoint whose layout differs (loaded
    without sharding, or into another model) is refused naming the parameter, on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from fastreg.optim import ReversibleSGD

    T1, T2 = 20, 4
    T = T1 + T2
    X, Y = _batches(T, device)
    Y = Y[..., :1]
    rows = slice(4 * rank, 4 * rank + 4)

    def make(seed, lr_value, shard=True):
        model = _fsdp_mlp(seed, device)
        if shard:
            for i in (0, 2, 4):
                fully_shard(model[i])
            fully_shard(model)
        lr = torch.full((T,), lr_value, dtype=torch.float64)
        return model, ReversibleSGD(model.parameters(), lr=lr, momentum=0.2, frac_bits=40)

    def run(model, opt, ts):
        for t in ts:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X[t, rows]), Y[t, rows]).backward()
            opt.step()

    model, opt = make(7, 0.05)
    assert any(p.to_local().numel() == 0 for p in model.parameters()) == (rank == 1)
    run(model, opt, range(T))
    model1, opt1 = make(7, 0.05)
    run(model1, opt1, range(T1))
    assert max(int(opt1.state[p]["count"].max()) for p in model1.parameters()
               if p.to_local().numel()) > 0, "nothing spilled"
    path = _shared_tmpdir()
    try:
        osd = opt1.dcp_state_dict()
        assert all(isinstance(v, DTensor) for s in osd["state"].values() for v in s.values())
        # laid out as contiguous global tensors (DCP and full_tensor() read the strides)
        assert all(v.stride() == torch.empty(v.shape).stride() for s in osd["state"].values()
                   for v in s.values())
        dcp.save({"model": model1.state_dict(), "optim": osd}, checkpoint_id=path)
        md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        for i in range(6):  # the ranks agreed on the spill's words: one global shape
            m = md[f"optim.state.{i}.spill"]
            assert len(m.chunks) == 2 and all(c.sizes[0] == m.size[0] for c in m.chunks), (i, m)
        model2, opt2 = make(8, 0.2)
        sd = {"model": model2.state_dict(), "optim": opt2.dcp_state_dict(path)}
        dcp.load(sd, checkpoint_id=path)
        model2.load_state_dict(sd["model"])
        opt2.load_dcp_state_dict(sd["optim"])
        assert float(opt2.param_groups[0]["lr"][0]) == 0.05
        _assert_same_state(opt1, list(model1.parameters()), opt2, list(model2.parameters()), "after load",
                           fingerprints=False)
        for p, q in zip(model1.parameters(), model2.parameters()):
            assert torch.equal(p.to_local(), q.to_local())
            # each rank's own w_0 checksum (of its shard) came back
            assert opt2._checksums[id(q)] == opt1._checksums[id(p)] is not None
        run(model2, opt2, range(T1, T))
        _assert_same_state(opt, list(model.parameters()), opt2, list(model2.parameters()), "resumed run",
                           fingerprints=False)
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p.to_local(), q.to_local())
        # another layout: the same model unsharded on every rank (DDP-like), refused by name
        plain, popt = make(8, 0.2, shard=False)
        with pytest.raises(ValueError, match=r"parameter param_groups\[0\]\['params'\]\[0\] .*was saved as "
                                             r"2 piece\(s\).*same world size and sharding"):
            popt.dcp_state_dict(path)
        # another model: a shape differs
        other = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3),
                                    torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(device)
        oopt = ReversibleSGD(other.parameters(), lr=0.1, momentum=0.9, frac_bits=40)
        with pytest.raises(ValueError, match=r"params'\]\[0\] \(shape \(6, 5\)\) was saved with "
                                             r"shape \(7, 5\)"):
            oopt.dcp_state_dict(path)
        with pytest.raises(ValueError, match="holds 6 parameters, this optimizer 2"):
            ReversibleSGD(model[0].parameters(), lr=0.1, momentum=0.9, frac_bits=40).dcp_state_dict(path)
    finally:
        _remove_tmpdir(path)


def check_reversible_ddp_unrepeatable(rank, world, device):
    """A closure adding noise from an unseeded generator on rank 1 only: reverse() raises on every
    rank, naming rank 1 and the step; a closure that differs from the forward run
    deterministically on rank 1 is caught with the step, and reported as not nameable."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastreg.optim.reversible import NondeterministicClosureError

    T = 5
    X, Y = _batches(T, device)
    rows = slice(4 * rank, 4 * rank + 4)
    model = _mlp(3, device)
    ddp = DDP(model)
    opt, lr, w0, loss = _reversible_run(model, ddp, X, Y, rows, T)
    sd = copy.deepcopy(opt.state_dict())
    unseeded = torch.Generator()
    unseeded.seed()  # a seed from the OS: other noise at every call

    def noisy(t):
        out = loss(t)
        if rank == 1 and t == 2:
            out = out + 1e-4 * (ddp.module[0].weight * torch.randn(
                ddp.module[0].weight.shape, generator=unseeded)).sum()
        return out
    with pytest.raises(NondeterministicClosureError,
                       match=r"first differed at step 2; the closure of rank\(s\) \[1\] gave other") as e:
        opt.reverse(lambda: loss(T), noisy, ddp=ddp)
    assert e.value.ranks == [1] and e.value.step == 2
    opt.load_state_dict(sd)  # the per-rank state dicts carry the gradient fingerprints too
    assert len(opt._gfp) == T and all(f is not None for f in opt._gfp)

    def shifted(t):
        return loss(t) * (1 + 1e-3) if (rank == 1 and t == 3) else loss(t)
    with pytest.raises(NondeterministicClosureError, match=r"first differed at step 3, but closure\(3\) "
                                                           r"repeated itself on every rank") as e:
        opt.reverse(lambda: loss(T), shifted, ddp=ddp)
    assert e.value.ranks == [] and e.value.step == 3


# ---------------------------------------------------------------- modules under FSDP2

class _NoisyNet(torch.nn.Module):
    def __init__(self, sigma_shape):
        super().__init__()
        from fastreg import nn as fnn

        torch.manual_seed(4)
        self.vd = fnn.VariationalDropoutLinear(6, 5, init_log_sigma2=-3.0)
        self.dc = fnn.DropConnectLinear(5, 5, p=0.3, seed=12)
        self.mn = fnn.MultiplicativeNoise(sigma_shape, init=0.2, seed=13)
        self.out = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.mn(torch.tanh(self.dc(self.vd(x, seed=11)))))


def check_modules_fsdp2(rank, world, device, parent_only=False):
    """VariationalDropoutLinear, DropConnectLinear and MultiplicativeNoise (learned sigma) train
    under fully_shard like the single-process run (per-rank batches, same seeds); kl() and
    sparsity() are the global values. parent_only: only the whole model is sharded, so FSDP2
    frees the layers' unsharded parameters (by resizing their storage) after the CPU kernels
    have read them."""
    from torch.distributed.fsdp import fully_shard
    from fastreg.nn.variational import total_kl, total_sparsity

    g = torch.Generator().manual_seed(6)
    X = torch.randn(3, 2, 4, 6, generator=g).to(device)  # step, rank, rows, features
    Y = torch.randn(3, 2, 4, 2, generator=g).to(device)
    beta = 1e-3
    model = _NoisyNet((5,)).to(device)
    ref = _NoisyNet((5,)).to(device)
    for m in (model, ) if parent_only else (model.vd, model.dc, model.mn, model.out, model):
        fully_shard(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for t in range(3):
        opt.zero_grad()
        data = torch.nn.functional.mse_loss(model(X[t, rank]), Y[t, rank])
        kl = model.vd.kl()
        assert type(kl) is torch.Tensor
        (data + beta * kl).backward()
        opt.step()
        ropt.zero_grad()
        rdata = sum(torch.nn.functional.mse_loss(ref(X[t, r]), Y[t, r]) for r in range(world))
        rkl = ref.vd.kl()
        (rdata / world + beta * rkl).backward()
        ropt.step()
        torch.testing.assert_close(kl.detach(), rkl.detach(), rtol=1e-6, atol=0)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")
    with torch.no_grad():  # prune some weights, unevenly across the shards
        ls = model.vd.log_sigma2.to_local()
        ls[: ls.shape[0] - rank].fill_(4.0)
        ref.vd.log_sigma2.copy_(model.vd.log_sigma2.full_tensor())
    assert model.vd.sparsity() == ref.vd.sparsity() > 0
    assert total_sparsity(model) == total_sparsity(ref)
    torch.testing.assert_close(total_kl(model).detach(), total_kl(ref).detach(), rtol=1e-6, atol=0)


SUITES = {
    "rng_penalty": [
        ("rng_default_same", check_rng_default_same),
        ("rng_data_parallel", check_rng_data_parallel),
        ("rng_tensor_parallel", check_rng_tensor_parallel),
        ("rng_backward_outside", check_rng_backward_outside),
        ("penalty_accumulate", check_penalty_accumulate),
        ("penalty_mixed_strengths_and_dtypes", check_penalty_mixed_strengths_and_dtypes),
        ("penalty_rows_local", check_penalty_rows_local),
        ("penalty_prox", check_penalty_prox),
        ("penalty_sparsity", check_penalty_sparsity),
        ("penalty_errors", check_penalty_errors),
        ("penalty_fsdp2", check_penalty_fsdp2),
        ("penalty_ddp", check_penalty_ddp),
        ("reversible_ddp", check_reversible_ddp),
        ("reversible_ddp_divergence", check_reversible_ddp_divergence),
        ("reversible_fsdp2", check_reversible_fsdp2),
        ("reversible_fsdp2_reverse", check_reversible_fsdp2_reverse),
        ("reversible_fsdp2_reverse_parent_only",
         lambda r, w, d: check_reversible_fsdp2_reverse(r, w, d, parent_only=True)),
        ("reversible_fsdp2_reverse_float64",
         lambda r, w, d: check_reversible_fsdp2_reverse(r, w, d, dtype=torch.float64)),
        ("reversible_dcp_ddp", check_reversible_dcp_ddp),
        ("reversible_dcp_fsdp2", check_reversible_dcp_fsdp2),
        ("reversible_ddp_unrepeatable", check_reversible_ddp_unrepeatable),
        ("modules_fsdp2", check_modules_fsdp2),
        ("modules_fsdp2_parent_only", lambda r, w, d: check_modules_fsdp2(r, w, d, parent_only=True)),
    ],
}


@pytest.mark.parametrize("name", [n for n, _ in SUITES["rng_penalty"]])
def test_gloo(name):
    _result("rng_penalty", name)


def _two_gpus():
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", [n for n, _ in SUITES["rng_penalty"]])
def test_nccl(name):
    _result("rng_penalty", name, backend="nccl")


def test_reversible_refuses_sparse_gradients():
    """nn.Embedding(sparse=True): a clear TypeError naming the parameter, before any parameter
    is stepped."""
    from fastreg.optim import ReversibleSGD

    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    opt = ReversibleSGD(list(lin.parameters()) + list(emb.parameters()), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(emb(torch.tensor([1, 2, 3]))).sum().backward()
    with pytest.raises(TypeError, match="sparse_coo gradient.*sparse=False"):
        opt.step()
    for p, b in zip(lin.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_odd_ones_majority():
    """The ranks named as differing: against the majority's value; on a tie, the value of the
    lowest rank among the largest groups."""
    from fastreg.optim.reversible import _odd_ones

    assert _odd_ones([5, 5]) == []
    assert _odd_ones([5, 6]) == [1]
    assert _odd_ones([6, 5, 5]) == [0]
    assert _odd_ones([5, 6, 5, 7]) == [1, 3]
    assert _odd_ones([5, 6, 6, 5]) == [1, 2]
    assert _odd_ones([]) == []


# ---------------------------------------------------------------- ReversibleSGD, one process

def _small_run(T, lr_value=0.05, seed=0, dtype=torch.float32):
    from fastreg.optim import ReversibleSGD

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(T + 1, 8, 5, generator=g, dtype=dtype)
    Y = torch.randn(T + 1, 8, 3, generator=g, dtype=dtype)
    lr = torch.full((T,), lr_value, dtype=torch.float64, requires_grad=True)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.2, frac_bits=40)

    def loss(t):
        return torch.nn.functional.mse_loss(model(X[t]), Y[t])
    return model, opt, lr, loss


def _train_steps(opt, loss, ts):
    for t in ts:
        opt.zero_grad()
        loss(t).backward()
        opt.step()


def test_reversible_unrepeatable_closure_one_process():
    """Without DDP: an unseeded closure is named (ranks [0]) with the first step reversed whose
    gradients differ; a difference the fixed-point update absorbs (float64 gradients changed in
    their last bit) still reverses without error."""
    from fastreg.optim.reversible import NondeterministicClosureError

    T = 5
    model, opt, lr, loss = _small_run(T)
    _train_steps(opt, loss, range(T))
    unseeded = torch.Generator()
    unseeded.seed()

    def noisy(t):
        noise = torch.randn(model[0].weight.shape, generator=unseeded)
        return loss(t) + (1e-4 * model[0].weight * noise).sum() if t == 3 else loss(t)
    with pytest.raises(NondeterministicClosureError, match=r"first differed at step 3; closure gave other "
                                                           r"gradients when closure\(3\) was called twice") as e:
        opt.reverse(lambda: loss(T), noisy)
    assert e.value.step == 3 and e.value.ranks == [0]

    model, opt, lr, loss = _small_run(T, dtype=torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    _train_steps(opt, loss, range(T))
    seen = []
    real = opt._gradients_differ

    def spy(t, gs, params):
        seen.append(real(t, gs, params))
        return seen[-1]
    opt._gradients_differ = spy
    opt.reverse(lambda: loss(T), lambda t: loss(t) * (1 + 2.0**-52) if t == 2 else loss(t))
    assert seen == [False, False, True]  # steps 4, 3: the same bits; step 2: other bits ...
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)  # ... and w_0 was still recovered: no error


def test_reversible_dcp_one_process(tmp_path):
    """dcp.save / dcp.load without a process group: the resumed run reverses to w_0 bit for bit
    with the hypergradients of the run without a checkpoint; malformed destinations are refused
    before anything changes."""
    import torch.distributed.checkpoint as dcp
    from fastreg.optim import ReversibleSGD

    T1, T2 = 20, 5
    T = T1 + T2
    model, opt, lr, loss = _small_run(T)
    w0 = [p.detach().clone() for p in model.parameters()]
    _train_steps(opt, loss, range(T))
    opt.reverse(lambda: loss(T), loss)
    ref_lr = lr.grad.clone()

    model, opt, lr, loss = _small_run(T)
    _train_steps(opt, loss, range(T1))
    assert max(int(opt.state[p]["count"].max()) for p in model.parameters()) > 0
    path = str(tmp_path / "ck")
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model.state_dict(), "optim": opt.dcp_state_dict()}, checkpoint_id=path)
    model2, opt2, lr2, loss2 = _small_run(T, lr_value=0.3, seed=1)
    with pytest.raises(ValueError, match="no ReversibleSGD state under 'opt'"):
        opt2.dcp_state_dict(path, prefix="opt")
    sd = {"model": model2.state_dict(), "optim": opt2.dcp_state_dict(path)}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(sd, checkpoint_id=path)
    model2.load_state_dict(sd["model"])
    bad = dict(sd["optim"], state=dict(sd["optim"]["state"]))
    bad["state"]["2"] = dict(bad["state"]["2"], count=bad["state"]["2"]["count"] + 1000)
    with pytest.raises(ValueError, match=r"information buffer of parameter param_groups\[0\]\['params'\]\[2\] "
                                         r".*inconsistent"):
        opt2.load_dcp_state_dict(bad)
    assert opt2.steps == 0 and float(lr2.detach()[0]) == 0.3  # nothing half-loaded
    opt2.load_dcp_state_dict(sd["optim"])
    assert opt2.steps == T1 and float(lr2.detach()[0]) == 0.05 and lr2.requires_grad
    _train_steps(opt2, loss2, range(T1, T))
    opt2.reverse(lambda: loss2(T), loss2)
    for p, w in zip(model2.parameters(), w0):
        assert torch.equal(p.detach(), w)
    assert torch.equal(lr2.grad, ref_lr)
    # a model of another size
    other = torch.nn.Linear(5, 7)
    with pytest.raises(ValueError, match="holds 4 parameters, this optimizer 2"):
        ReversibleSGD(other.parameters(), lr=0.1, momentum=0.5, frac_bits=40).dcp_state_dict(path)
    # torch's get_optimizer_state_dict keeps only 'state' and 'param_groups': not enough here
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    assert "reversible" not in get_optimizer_state_dict(model2, opt2)
