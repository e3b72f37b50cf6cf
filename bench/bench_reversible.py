"""Reversible SGD benchmarks.

Groups:
  "reversible fwd step d=1e6"     ReversibleSGD.step vs torch.optim.SGD(momentum) step, and the
                                  copy floor of the bytes the exact step moves (gradient excluded)
  "reversible rev step d=1e6"     one reverse step, HVP excluded (rev_step of step t and the restore
                                  of step t-1 in one pass) vs the same SGD step
Each at 1 and 2 threads, and with the caches warm (steps back to back: SGD's 12 MB stay in the
32 MB L3) or flushed before every step (as the forward and backward passes between two steps
of real training do). The exact steps are timed in the coder's steady state (after
WARM_STEPS steps, when the heads have filled and words spill), not on a fresh buffer.
  "hypergrad digits MLP T=100"    exact reversal (T steps forward + reverse) vs unrolled autograd
  "hypergrad digits MLP T=1000"   the same at T = 1000 (one round: the unrolled graph is large)
extra_info: memory_bytes (optimizer state + buffer for fastreg, the tensors autograd saves
for the unrolled graph), and for T=100 the relative error between the two hypergradients.
"""

import os
import sys

import pytest
import torch

from _util import run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "experiments"))
from reversible_common import digits, mlp, train_loss, unrolled_hypergrad  # noqa: E402

from fastreg.ops import reversible as K  # noqa: E402
from fastreg.optim import ReversibleSGD  # noqa: E402

D = 1_000_000
GAMMA = 0.9
ROUNDS = 15
WARM_STEPS = 250  # gamma = 0.9 adds 0.15 bits a step: the first words spill after ~210 steps
_FLUSH = torch.zeros(8 << 20, dtype=torch.int64)  # 64 MB, twice the L3 cache


def _flush_caches():
    _FLUSH.add_(1)


@pytest.fixture(params=["warm", "flushed"], ids=["cache warm", "cache flushed"])
def cache(request):
    return None if request.param == "warm" else _flush_caches


def _param(device="cpu"):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(D, generator=g) * 0.1).to(device))
    p.grad = (torch.randn(D, generator=g) * 1e-2).to(device)
    return p


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """Run with torch and Numba limited to this many threads (1 is the stable measurement on a
    shared machine: a thread pool waiting for a time slice can cost more than the step)."""
    import numba

    before_t, before_n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(request.param)
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    torch.set_num_threads(before_t)
    numba.set_num_threads(before_n)


@pytest.mark.parametrize("provider", ["fastreg", "torch SGD(momentum)", "copy (floor)"])
def test_reversible_fwd_step(benchmark, provider, threads, cache):
    p = _param()
    if provider == "fastreg":
        opt = ReversibleSGD([p], lr=0.05, momentum=GAMMA)
        for _ in range(WARM_STEPS):
            opt.step()
        fn = opt.step
    elif provider == "torch SGD(momentum)":
        opt = torch.optim.SGD([p], lr=0.05, momentum=GAMMA)
        fn = opt.step
    else:  # reads w, v, head (8 B each), count, g (4 B); writes w, v, head, count, p: 32 B + 32 B
        src = torch.zeros(4 * D, dtype=torch.int64)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    run(benchmark, fn, "cpu", provider=provider, rounds=ROUNDS, setup=cache,
        group=f"reversible fwd step d=1e6 {threads}T, cache {'flushed' if cache else 'warm'}")


@pytest.mark.parametrize("provider", ["fastreg", "torch SGD(momentum)"])
def test_reversible_rev_step(benchmark, provider, threads, cache):
    p = _param()
    group = f"reversible rev step d=1e6 {threads}T, cache {'flushed' if cache else 'warm'}"
    if provider == "torch SGD(momentum)":
        opt = torch.optim.SGD([p], lr=0.05, momentum=GAMMA)
        run(benchmark, opt.step, "cpu", provider=provider, group=group, rounds=ROUNDS, setup=cache)
        return
    opt = ReversibleSGD([p], lr=0.05, momentum=GAMMA)
    steps = WARM_STEPS + ROUNDS + 3 + 2
    for _ in range(steps):
        opt.step()
    st = opt.state[p]
    g = p.grad.reshape(-1)
    hvp = torch.randn(D) * 1e-3
    dw = torch.randn(D, dtype=torch.float64)
    dv = torch.zeros(D, dtype=torch.float64)
    u = torch.empty(D)
    alpha, n, gamma, omg, c1s, lam = opt._step_consts(opt.param_groups[0], 0)
    backend = K.backend_for(p.device)

    # one reverse step as ReversibleSGD.reverse runs it (the HVP is the model's own cost): v_t and
    # the buffer, then the restore of w_{t-1}, fused into one pass (after one restore alone)
    K.rev_restore(backend, st["w"], st["v"], dw, dv, u, p.data.view(-1), alpha, omg, opt.inv_scale)

    def reverse_step():
        code, _, _, _ = K.rev_step_restore(backend, st["w"], st["v"], st["head"], st["count"], st["spill"],
                                           g, hvp, dw, dv, u, p.data.view(-1), opt.momentum_bits, n, gamma,
                                           c1s, lam, omg, alpha, omg, opt.inv_scale)
        assert code == 0

    run(benchmark, reverse_step, "cpu", provider=provider, group=group, rounds=ROUNDS, setup=cache)


def _digits_case(T):
    (X, y), (Xv, yv), _ = digits()
    model = mlp()
    lr = torch.full((T,), 0.1, dtype=torch.float64, requires_grad=True)
    # gamma on the n / 2^16 grid the exact run uses, so both compute the same derivative
    mom = torch.full((T,), round(GAMMA * 2**16) / 2**16, dtype=torch.float64, requires_grad=True)
    wd = torch.full((T,), 1e-4, dtype=torch.float64, requires_grad=True)
    return model, X, y, Xv, yv, lr, mom, wd


def _exact(T):
    model, X, y, Xv, yv, lr, mom, wd = _digits_case(T)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    for t in range(T):
        opt.zero_grad()
        train_loss(model, X, y, t).backward()
        opt.step()
    b = opt.buffer_bits()
    nel = b["numel"]
    # w, v (int64) + head (int64, inside allocated_bits) + count (int32) + dw, dv (float64) in reverse
    mem = b["allocated_bits"] // 8 + nel * (8 + 8 + 4 + 8 + 8)
    opt.reverse(lambda: torch.nn.functional.cross_entropy(model(Xv), yv),
                lambda t: train_loss(model, X, y, t))
    return mem, lr.grad.clone(), [p.grad.clone() for p in model.parameters()], nel


def _unrolled(T):
    model, X, y, Xv, yv, lr, mom, wd = _digits_case(T)
    w0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    obj = unrolled_hypergrad(model, w0, X, y, Xv, yv, T, lr, mom, wd)
    obj.backward()
    return lr.grad.clone(), [w.grad.clone() for w in w0]


def _unrolled_counted(T, out):
    """Unrolled run under saved_tensors_hooks: records the bytes the graph saves (distinct storages)."""
    seen = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    model, X, y, Xv, yv, lr, mom, wd = _digits_case(T)
    w0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        obj = unrolled_hypergrad(model, w0, X, y, Xv, yv, T, lr, mom, wd)
    obj.backward()
    out["memory_bytes"] = sum(seen.values())
    out["grads"] = (lr.grad.clone(), [w.grad.clone() for w in w0])


@pytest.mark.parametrize("T", [100, 1000])
@pytest.mark.parametrize("provider", ["fastreg", "unrolled autograd"])
def test_reversible_hypergrad_digits(benchmark, provider, T):
    """One round at T=1000 (the unrolled graph is ~70 KB per parameter there), three at T=100."""
    rounds = 3 if T == 100 else 1
    nel = sum(p.numel() for p in mlp().parameters())
    out = {}
    if provider == "fastreg":
        def fn():
            out["memory_bytes"], lr_g, w_g, _ = _exact(T)
            out["grads"] = (lr_g, w_g)
    else:
        def fn():
            _unrolled_counted(T, out)
    # one intra-op thread for both providers: a 6,310-parameter MLP gains nothing from two, and on
    # a shared 2-core machine a thread pool waiting for a time slice dominates the timings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(benchmark, fn, "cpu", provider=provider, group=f"hypergrad digits MLP T={T}", rounds=rounds,
            warmup=0, threads=1)
    finally:
        torch.set_num_threads(threads)
    mem = out["memory_bytes"]
    benchmark.extra_info.update(memory_bytes=mem, saved_bytes_per_elem=mem / nel, params=nel)
    if T == 100 and provider == "fastreg":
        lr_u, w_u = _unrolled(T)
        lr_e, w_e = out["grads"]
        benchmark.extra_info["rel_err_lr"] = float((lr_e - lr_u).norm() / lr_u.norm())
        benchmark.extra_info["rel_err_w0"] = float(
            torch.cat([(a - b).reshape(-1) for a, b in zip(w_e, w_u)]).norm()
            / torch.cat([b.reshape(-1) for b in w_u]).norm())


# ---------------------------------------------------------------- GPU (make gpu-check)
D_GPU = 1 << 24


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["fastreg fwd", "fastreg rev", "torch SGD(momentum)", "copy (floor)"])
def test_reversible_step_gpu(benchmark, provider):
    """The fused steps on CUDA against the copy of the bytes they must move (64 B per element:
    read w, v, head, count, g; write w, v, head, count, p), d = 2^24."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(D_GPU, generator=g) * 0.1).cuda())
    p.grad = (torch.randn(D_GPU, generator=g) * 1e-2).cuda()
    if provider == "copy (floor)":
        src = torch.zeros(4 * D_GPU, dtype=torch.int64, device="cuda")
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    elif provider == "torch SGD(momentum)":
        fn = torch.optim.SGD([p], lr=0.05, momentum=GAMMA).step
    else:
        opt = ReversibleSGD([p], lr=0.05, momentum=GAMMA)
        for _ in range(WARM_STEPS):  # the coder's steady state
            opt.step()
        if provider == "fastreg fwd":
            fn = opt.step
        else:
            st = opt.state[p]
            hvp = torch.zeros(D_GPU, device="cuda")
            dw = torch.zeros(D_GPU, dtype=torch.float64, device="cuda")
            dv = torch.zeros(D_GPU, dtype=torch.float64, device="cuda")
            u = torch.empty(D_GPU, device="cuda")
            alpha, n, gamma, omg, c1s, lam = opt._step_consts(opt.param_groups[0], 0)
            gr = p.grad.reshape(-1)

            def fn():
                K.rev_restore("cuda", st["w"], st["v"], dw, dv, u, p.data.view(-1), alpha, omg, opt.inv_scale)
                K.rev_step("cuda", st["w"], st["v"], st["head"], st["count"], st["spill"], gr, hvp, dw, dv,
                           opt.momentum_bits, n, gamma, c1s, lam, omg, opt.inv_scale)
    run(benchmark, fn, "cuda", provider=provider, group="reversible step 2^24 cuda", rounds=40)


@pytest.mark.parametrize("provider", ["fastreg", "torch SGD(momentum)", "copy (floor)"])
def test_reversible_fwd_step_large(benchmark, provider):
    """d = 2^24 with one thread: the SGD step no longer runs from the cache."""
    import numba

    d = 1 << 24
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(d, generator=g) * 0.1)
    p.grad = torch.randn(d, generator=g) * 1e-2
    if provider == "fastreg":
        opt = ReversibleSGD([p], lr=0.05, momentum=GAMMA)
        for _ in range(WARM_STEPS):  # the coder's steady state (all threads: ~10 s)
            opt.step()
        fn = opt.step
    elif provider == "torch SGD(momentum)":
        fn = torch.optim.SGD([p], lr=0.05, momentum=GAMMA).step
    else:
        src = torch.zeros(4 * d, dtype=torch.int64)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    before_t, before_n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        run(benchmark, fn, "cpu", provider=provider, group="reversible fwd step d=2^24 1T", rounds=5,
            warmup=1)
    finally:
        torch.set_num_threads(before_t)
        numba.set_num_threads(before_n)
