"""Exact reversible SGD: kernels against the reference, bit-exact reversal, errors, checkpoints,
hypergradients against float64 unrolled autograd and finite differences."""

import copy
import io
import math

import pytest
import torch

from fastreg import _native
from fastreg.ops import reversible as K
from fastreg.optim import ReversibleOverflowError, ReversibleSGD

BACKENDS = ["numba", "torch"] + (["cpp"] if _native.native() is not None and
                                 hasattr(_native.native(), "reversible_fwd_host") else [])


# ---------------------------------------------------------------- kernel level
def _random_state(n_el, cap, gen, k):
    w = torch.randint(-(2**50), 2**50, (n_el,), generator=gen, dtype=torch.int64)
    v = torch.randint(-(2**46), 2**46, (n_el,), generator=gen, dtype=torch.int64)
    # heads anywhere in [2^31, 2^63), spill partly filled (nonzero bottom words: canonical)
    top = torch.randint(0, 2**62, (n_el,), generator=gen, dtype=torch.int64) | (1 << 62)
    head = top >> torch.randint(0, 32, (n_el,), generator=gen)  # in [2^31, 2^63), all magnitudes
    count = torch.randint(0, cap - 2, (n_el,), generator=gen, dtype=torch.int32)
    spill = torch.randint(-(2**31), 2**31 - 1, (cap, n_el), generator=gen, dtype=torch.int32)
    spill[0][spill[0] == 0] = 7
    return w, v, head, count, spill


def _clone(state):
    return [s.clone() for s in state]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("k,gamma", [(16, 0.9), (16, 0.5), (16, 0.98), (12, 1.0), (20, 0.3),
                                     (16, 2.0**-15)])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_el", [1037, 40_001])  # the serial and the threaded Numba kernels
def test_kernels_match_reference_and_invert(backend, k, gamma, fdtype, n_el, gen):
    cap = 6
    n = max(2, int(round(gamma * 2**k)))
    F = 44
    inv_scale, omg = 2.0**-F, 1.0 - n / 2**k
    alpha, lam = 0.37 * float(torch.rand(1, generator=gen)) + 0.01, 0.013
    state = _random_state(n_el, cap, gen, k)
    g = (torch.randn(n_el, generator=gen, dtype=torch.float64) * 3).to(fdtype)
    ref, fast = _clone(state), _clone(state)
    p_ref = torch.empty(n_el, dtype=fdtype)
    p_fast = torch.empty(n_el, dtype=fdtype)
    c_ref = K.fwd_step("torch", *ref, g, p_ref, k, n, alpha, omg * 2.0**F, lam, inv_scale)
    c_fast = K.fwd_step(backend, *fast, g, p_fast, k, n, alpha, omg * 2.0**F, lam, inv_scale)
    assert c_ref == c_fast == 0
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)
    assert torch.equal(p_ref, p_fast)
    assert not torch.equal(ref[1], state[1])  # v really changed
    # reverse: restore then step, both backends, back to the original state bit for bit
    dw0 = torch.randn(n_el, generator=gen, dtype=torch.float64)
    dv0 = torch.randn(n_el, generator=gen, dtype=torch.float64)
    hvp = torch.randn(n_el, generator=gen, dtype=torch.float64).to(fdtype)
    outs = {}
    for name, st in (("torch", ref), (backend, fast)):
        dw, dv = dw0.clone(), dv0.clone()
        u = torch.empty(n_el, dtype=fdtype)
        p = torch.empty(n_el, dtype=fdtype)
        da = K.rev_restore(name, st[0], st[1], dw, dv, u, p, alpha, omg, inv_scale)
        code, dg, dl = K.rev_step(name, *st, g, hvp, dw, dv, k, n, n / 2**k, omg * 2.0**F, lam, omg,
                                  inv_scale)
        assert code == 0
        outs[name] = (da, dg, dl, dw, dv, u, p)
    for a, b in zip(ref[:4], state[:4]):
        assert torch.equal(a, b)
    live = torch.arange(cap).unsqueeze(1) < state[3].unsqueeze(0)
    assert torch.equal(ref[4][live], state[4][live])
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    r, f = outs["torch"], outs[backend]
    for x, y in zip(r[:3], f[:3]):
        assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-9)
    for x, y in zip(r[3:], f[3:]):
        assert torch.equal(x, y)


def test_division_by_multiply_is_exact(gen):
    """The forward kernel divides slot offsets (< 2^31) by q or q + 1 with _magic_31's multiply
    and shift: exact, and the product stays below 2^63, for the divisors of every n."""
    from fastreg.kernels.numba.reversible import _magic_31

    divisors = {1, 2, 3, 7, (1 << 31) - 1, (1 << 30) + 1, 1 << 30}
    for n in [2, 3, 5, 1000, 46341, 58982, 65535, 65536, (1 << 20) - 3, 1 << 24]:
        q = (1 << 31) // n
        divisors.update((q, q + 1))
    a = torch.randint(0, 1 << 31, (2000,), generator=gen).tolist() + [0, 1, (1 << 31) - 1, (1 << 31) - 2]
    for d in sorted(divisors):
        m, sh = _magic_31(d)
        assert m * ((1 << 31) - 1) < 1 << 63
        edges = [d - 1, d, d + 1, (((1 << 31) - 1) // d) * d, (((1 << 31) - 1) // d) * d - 1]
        for x in a + [e for e in edges if 0 <= e < 1 << 31]:
            assert (x * m) >> sh == x // d, (d, x)


def test_reverse_fast_path_divisions_are_exact(gen):
    """The reverse kernels' vectorised path computes v mod n and the head's divmod by f with
    double divisions; checked against Python's integer arithmetic at the extremes: |v| near
    2^62, heads near 2^(52+k) and exact multiples of f."""
    from fastreg.kernels.numba.reversible import _code_params, _rev_coder_fast

    k = 16
    for n in (2, 3, 58982, 65535, 65536):
        q, rr, thr = (int(a) for a in _code_params(n))
        vs = [(1 << 62) - 1, -(1 << 62) + 1, (1 << 61) + 12345, -(1 << 53) - 1, 0, -1, n, -n]
        vs += torch.randint(-(1 << 62), 1 << 62, (300,), generator=gen).tolist()
        for vi in vs:
            s = vi % n
            f = q + 1 if s < rr else q
            cum = s * (q + 1) if s < rr else thr + (s - rr) * q
            for x1 in (f, f + 1, 7 * f, (((1 << 52) - 1) // f) * f, (1 << 52) - 1, f * 12345 + f - 1):
                for lo in (0, (1 << k) - 1):
                    x = (x1 << k) | lo
                    if x >= 1 << 63:
                        continue
                    x2, vn, ok = _rev_coder_fast(x, vi, n, float(n), q, rr, thr, float(q), float(q + 1),
                                                 k, (1 << k) - 1)
                    assert ok
                    # (vi // n) 2^k overflows for |vi| near 2^62 and a small n (no valid state
                    # has such a v): compare modulo 2^64, as the kernel's int64 arithmetic wraps
                    want = (vi // n) * (1 << k) + lo
                    assert vn == ((want + (1 << 63)) % (1 << 64)) - (1 << 63)
                    assert x2 == (x1 // f) * (1 << 31) + cum + x1 % f


@pytest.mark.parametrize("k,gamma", [(16, 0.9), (16, 0.5), (20, 0.3), (16, 2.0**-15)])
@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_el", [1037, 40_001])
def test_fused_reverse_matches_the_two_kernels(k, gamma, fdtype, n_el, gen):
    """rev_step_restore (step t's rev_step, then step t-1's restore, in one Numba pass) gives
    the states, outputs and sums of rev_step followed by rev_restore, bit for bit, and the
    reference's to rounding; elements on the vectorised and the scalar path both."""
    cap, F = 6, 44
    n = max(2, int(round(gamma * 2**k)))
    inv, omg = 2.0**-F, 1.0 - n / 2**k
    lam, alpha2, omg2 = 0.013, 0.21, 0.37
    state = _random_state(n_el, cap, gen, k)
    state[2][::3] = K.L + torch.arange(0, n_el, 3) * 977  # fresh heads: the vectorised path
    state[2][1::3] = K.L + 12345  # heads a reverse step must refill: the scalar path
    state[3][1::3] = 2
    g = (torch.randn(n_el, generator=gen, dtype=torch.float64) * 3).to(fdtype)
    hvp = torch.randn(n_el, generator=gen, dtype=torch.float64).to(fdtype)
    dw0 = torch.randn(n_el, generator=gen, dtype=torch.float64)
    dv0 = torch.randn(n_el, generator=gen, dtype=torch.float64)
    runs = {}
    for name in ("fused", "two", "torch"):
        st, dw, dv = _clone(state), dw0.clone(), dv0.clone()
        u, p = torch.empty(n_el, dtype=fdtype), torch.empty(n_el, dtype=fdtype)
        if name == "fused":
            code, dg, dl, da = K.rev_step_restore("numba", *st, g, hvp, dw, dv, u, p, k, n, n / 2**k,
                                                  omg * 2.0**F, lam, omg, alpha2, omg2, inv)
        else:
            b = "numba" if name == "two" else "torch"
            code, dg, dl = K.rev_step(b, *st, g, hvp, dw, dv, k, n, n / 2**k, omg * 2.0**F, lam, omg, inv)
            da = K.rev_restore(b, st[0], st[1], dw, dv, u, p, alpha2, omg2, inv)
        assert code == 0
        runs[name] = (st, (dw, dv, u, p), (dg, dl, da))
    fused, two, ref = runs["fused"], runs["two"], runs["torch"]
    for a, b, c in zip(fused[0] + list(fused[1]), two[0] + list(two[1]), ref[0] + list(ref[1])):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert fused[2] == two[2]  # the same chunked sums, in the same order
    for a, c in zip(fused[2], ref[2]):
        assert math.isclose(a, c, rel_tol=1e-12, abs_tol=1e-9)
    assert not torch.equal(fused[0][2], state[2]) and not torch.equal(fused[0][0], state[0])
    assert bool((fused[0][3][1::3] == 1).all())  # those did refill a word


def test_numba_sums_do_not_depend_on_threads_or_driver(gen):
    """The Numba kernels' reductions (d alpha, d gamma, d lambda) and states are the same,
    bit for bit, with 1 or 2 threads and from the serial driver; the elements mostly take
    the vectorised fast path (gamma = 0.9, a fresh coder), a few the scalar one."""
    import numba
    import numpy as np

    from fastreg.kernels.numba import reversible as NK

    n_el, k, F = 70_001, 16, 44
    n = round(0.9 * 2**k)
    omg, inv = 1.0 - n / 2**k, 2.0**-F
    w0 = (torch.randn(n_el, generator=gen, dtype=torch.float64) * 2.0**F).to(torch.int64)
    v0 = (torch.randn(n_el, generator=gen, dtype=torch.float64) * 2.0**40).to(torch.int64)
    head0 = torch.full((n_el,), K.L, dtype=torch.int64)
    head0[::97] = 0x7FFFFFF000003039  # these spill a word (and keep it): the scalar path
    g = torch.randn(n_el, generator=gen, dtype=torch.float64).to(torch.float32).numpy()
    hvp = torch.randn(n_el, generator=gen).numpy()
    dw0 = torch.randn(n_el, generator=gen, dtype=torch.float64).numpy()
    dv0 = torch.randn(n_el, generator=gen, dtype=torch.float64).numpy()
    results = []
    before = numba.get_num_threads()
    try:
        for threads, serial in ((1, False), (2, False), (1, True)):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            w, v, head = w0.numpy().copy(), v0.numpy().copy(), head0.numpy().copy()
            count = np.zeros(n_el, np.int32)
            spill = np.zeros((4, n_el), np.uint32)
            p = np.empty(n_el, np.float32)
            u = np.empty(n_el, np.float32)
            dw, dv = dw0.copy(), dv0.copy()
            copy = "serial" if serial else "parallel"
            fwd, rst, rev, fused = (getattr(f, copy) for f in (NK.fwd_step, NK.rev_restore, NK.rev_step,
                                                               NK.rev_step_restore))
            # two steps (lr 0.05, then 0.07), reversed: restore 1, rev_step 1 fused with restore 0,
            # rev_step 0
            assert fwd(w, v, head, count, spill, g, p, k, n, 0.05, omg * 2.0**F, 1e-3, inv) == 0
            assert int(count.sum()) > 0  # some elements did spill
            assert fwd(w, v, head, count, spill, g, p, k, n, 0.07, omg * 2.0**F, 1e-3, inv) == 0
            da1 = rst(w, v, dw, dv, u, p, 0.07, omg, inv)
            code, dg1, dl1, da0 = fused(w, v, head, count, spill, g, hvp, dw, dv, u, p, k, n, n / 2**k,
                                        omg * 2.0**F, 1e-3, omg, 0.05, omg, inv)
            assert code == 0
            code, dg0, dl0 = rev(w, v, head, count, spill, g, hvp, dw, dv, k, n, n / 2**k,
                                 omg * 2.0**F, 1e-3, omg, inv)
            assert code == 0
            assert np.array_equal(w, w0.numpy()) and np.array_equal(v, v0.numpy())
            assert np.array_equal(head, head0.numpy()) and not count.any()
            results.append((da1, dg1, dl1, da0, dg0, dl0, dw, dv, u))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        assert other[:6] == results[0][:6]
        for a, b in zip(other[6:], results[0][6:]):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_flags_nonfinite_and_range(backend):
    n_el = 64
    w = torch.zeros(n_el, dtype=torch.int64)
    v = torch.zeros(n_el, dtype=torch.int64)
    head = torch.full((n_el,), K.L, dtype=torch.int64)
    count = torch.zeros(n_el, dtype=torch.int32)
    spill = torch.zeros((4, n_el), dtype=torch.int32)
    g = torch.zeros(n_el)
    g[5] = float("nan")
    p = torch.empty(n_el)
    code = K.fwd_step(backend, w, v, head, count, spill, g, p, 16, 58982, 0.1, 0.1 * 2.0**44, 0.0,
                      2.0**-44)
    assert code & K.BAD_NONFINITE and not code & K.BAD_V_RANGE
    g[5] = 0.0
    g[7] = 2.0**19  # times (1 - gamma) 2^44: past 2^61 -> increment too large
    code = K.fwd_step(backend, w, v, head, count, spill, g, p, 16, 58982, 0.1, 0.9 * 2.0**44, 0.0,
                      2.0**-44)
    assert code & K.BAD_NONFINITE
    g[7] = 2.0**16  # increment fits, velocity too (< 2^62), then w += 10 v leaves the range
    code = K.fwd_step(backend, w, v, head, count, spill, g, p, 16, 58982, 10.0, 0.9 * 2.0**44, 0.0,
                      2.0**-44)
    assert code == K.BAD_W_RANGE


def test_bits_back_coder_cost(gen):
    """The buffer grows by log2(1/gamma) bits per element-step (the coder is near-optimal)."""
    n_el, T, k, F = 2000, 300, 16, 44
    for gamma in (0.5, 0.9):
        n = round(gamma * 2**k)
        state = [torch.zeros(n_el, dtype=torch.int64), torch.zeros(n_el, dtype=torch.int64),
                 torch.full((n_el,), K.L, dtype=torch.int64), torch.zeros(n_el, dtype=torch.int32),
                 torch.zeros((40, n_el), dtype=torch.int32)]
        p = torch.empty(n_el, dtype=torch.float64)
        omg = 1 - n / 2**k
        for _ in range(T):
            g = torch.randn(n_el, generator=gen, dtype=torch.float64)
            assert K.fwd_step("numba", *state, g, p, k, n, 0.05, omg * 2.0**F, 0.0, 2.0**-F) == 0
        bits = (32 * state[3].to(torch.float64) + torch.log2(state[2].to(torch.float64)) - 31).mean()
        ideal = T * math.log2(2**k / n)
        assert abs(float(bits) - ideal) < 1.0 + 1e-3 * ideal, (gamma, float(bits), ideal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coder_renormalises_rarely(backend, gen):
    """The forward step spills a word only when the head has filled its 32-bit window, about
    once per 32 / log2(1/gamma) steps, and never reads one back; the reverse step only reads.
    A spill-and-refill within one step (the churn an encode-then-decode order falls into once
    the head passes 2^(63-k), sending every element down the scalar path) would overwrite the
    sentinel above the live words."""
    n_el, T, k, F = 3001, 400, 16, 44
    n = round(0.9 * 2**k)
    omg = 1 - n / 2**k
    sentinel = 0x5A5A5A5A
    state = [torch.zeros(n_el, dtype=torch.int64), torch.zeros(n_el, dtype=torch.int64),
             torch.full((n_el,), K.L, dtype=torch.int64), torch.zeros(n_el, dtype=torch.int32),
             torch.full((4, n_el), sentinel, dtype=torch.int32)]
    rows = torch.arange(4).unsqueeze(1)
    p = torch.empty(n_el, dtype=torch.float64)
    gs = [torch.randn(n_el, generator=gen, dtype=torch.float64) for _ in range(T)]
    prev = state[3].clone()
    for t in range(T):
        assert K.fwd_step(backend, *state, gs[t], p, k, n, 0.05, omg * 2.0**F, 0.0, 2.0**-F) == 0
        c = state[3]
        assert bool((c >= prev).all()) and bool((c - prev <= 1).all())  # no refill, <= 1 spill
        assert bool((state[4][rows >= c.unsqueeze(0)] == sentinel).all())  # no word written and read back
        prev = c.clone()
    spills = int(state[3].sum())
    per_elem = T * math.log2(2**k / n) / 32  # ~1.9 for gamma = 0.9
    assert n_el * (per_elem - 1) <= spills <= n_el * (per_elem + 1)
    hvp = torch.zeros(n_el, dtype=torch.float64)
    dw = torch.zeros(n_el, dtype=torch.float64)
    dv = torch.zeros(n_el, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        K.rev_restore(backend, state[0], state[1], dw, dv, p.clone(), p, 0.05, omg, 2.0**-F)
        code, _, _ = K.rev_step(backend, *state, gs[t], hvp, dw, dv, k, n, n / 2**k, omg * 2.0**F, 0.0,
                                omg, 2.0**-F)
        assert code == 0
        c = state[3]
        assert bool((c <= prev).all()) and bool((prev - c <= 1).all())  # no spill, <= 1 refill
        prev = c.clone()
    assert bool((state[2] == K.L).all()) and not bool(state[3].any())
    assert not bool(state[0].any()) and not bool(state[1].any())


# ---------------------------------------------------------------- optimizer: exactness
def _mlp(dtype, seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    return m.to(dtype)


def _data(seed, n=48):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, 7, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(model, X, y, t, bs=16):
    idx = (torch.arange(bs) + 5 * t) % X.shape[0]
    out = model(X[idx].to(next(model.parameters()).dtype))
    return torch.nn.functional.cross_entropy(out.to(torch.float64 if out.dtype == torch.float64
                                                    else torch.float32), y[idx])


def _train(model, opt, X, y, T, start=0):
    _steps(opt, lambda t: _loss(model, X, y, t), range(start, T))


def _steps(opt, loss, steps):
    """One optimizer step per t in `steps`, on the gradients of loss(t)."""
    for t in steps:
        opt.zero_grad()
        loss(t).backward()
        opt.step()


def _quadratic(n, seed):
    """A float64 parameter of n weights and the loss 0.5 |w - c|^2 towards a random c."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    c = torch.randn(n, dtype=torch.float64)
    return w, lambda t: 0.5 * ((w - c) ** 2).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_restores_w0_bit_exact(dtype, seed):
    T = 25
    model = _mlp(dtype, seed)
    X, y = _data(seed)
    g = torch.Generator().manual_seed(seed)
    mom = (0.5 + 0.49 * torch.rand(T, generator=g, dtype=torch.float64))  # a gamma schedule
    opt = ReversibleSGD([{"params": model[0].parameters(), "lr": 0.2, "momentum": mom},
                         {"params": model[2].parameters(), "lr": torch.linspace(0.05, 0.3, T),
                          "momentum": 0.9, "weight_decay": 1e-2}], lr=0.1, momentum=0.9)
    w0 = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, X, y, T)
    assert any(not torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
    for a, p in zip(w0, model.parameters()):
        assert torch.equal(a, p.detach())
    assert opt.steps == 0
    for p in model.parameters():
        st = opt.state[p]
        assert bool((st["v"] == 0).all()) and bool((st["head"] == K.L).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_whole_run(backend):
    T = 12
    res = {}
    for b in ("torch", backend):
        model = _mlp(torch.float32, 3)
        X, y = _data(3)
        lr = torch.full((T,), 0.1, requires_grad=True)
        opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.8, weight_decay=1e-3, backend=b)
        _train(model, opt, X, y, T)
        wT = [opt.state[p]["w"].clone() for p in model.parameters()]
        opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
        res[b] = (wT, lr.grad.clone(), [p.grad.clone() for p in model.parameters()])
    for a, b in zip(res["torch"][0], res[backend][0]):
        assert torch.equal(a, b)
    torch.testing.assert_close(res["torch"][1], res[backend][1], rtol=1e-5, atol=1e-8)
    for a, b in zip(res["torch"][2], res[backend][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("explicit", [True, False])
def test_noncontiguous_params_and_explicit_inputs(explicit):
    """Meta-parameters passed with inputs= get the hypergradient of float64 unrolled autograd
    (as do those found in the graphs when inputs is not given)."""
    T = 15
    g = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(torch.randn(7, 5, generator=g).t())  # a non-contiguous view
    q = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    meta = torch.rand(5, 7, generator=g, requires_grad=True)
    meta2 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)  # a second one, for q
    A = torch.randn(5, 7, generator=g)
    opt = ReversibleSGD([{"params": [p]}, {"params": [q], "lr": 0.05}], lr=0.1, momentum=0.8)
    p0, q0 = p.detach().clone(), q.detach().clone()

    def loss(t):
        return ((p - A * (t + 1)) ** 2 * meta).sum() + (q ** 4).sum() * meta2

    for t in range(T):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
    assert not p.is_contiguous()
    meta.grad = meta2.grad = None
    opt.reverse(lambda: (p**2).sum() + q.sum(), loss, inputs=[meta, meta2] if explicit else None)
    assert torch.equal(p.detach(), p0) and torch.equal(q.detach(), q0)
    # float64 unrolled autograd of the same update (meta only touches p: q's group is separate)
    gamma = opt.quantized_momentum(0)
    m = meta.detach().double().requires_grad_()
    w, v = p0.double(), torch.zeros(7, 5, dtype=torch.float64).t()
    for t in range(T):
        gw = 2 * (w - A.double() * (t + 1)) * m
        v = gamma * v - (1 - gamma) * gw
        w = w + 0.1 * v
    want, = torch.autograd.grad((w**2).sum(), m)
    torch.testing.assert_close(meta.grad.double(), want, rtol=1e-4, atol=1e-6)
    m2 = meta2.detach().clone().requires_grad_()
    w, v = q0.clone(), torch.zeros(5, dtype=torch.float64)
    for t in range(T):
        v = gamma * v - (1 - gamma) * 4 * w**3 * m2
        w = w + 0.05 * v
    want2, = torch.autograd.grad(w.sum(), m2)
    torch.testing.assert_close(meta2.grad, want2, rtol=1e-6, atol=1e-9)


def test_params_are_on_the_grid_and_training_works():
    model = _mlp(torch.float32, 4)
    X, y = _data(4)
    opt = ReversibleSGD(model.parameters(), lr=0.3, momentum=0.9, frac_bits=30)
    for p in model.parameters():
        assert torch.equal(p.detach().double(), opt.state[p]["w"].double().view_as(p) * 2.0**-30)
    before = float(_loss(model, X, y, 0, bs=48).detach())
    for t in range(60):
        opt.zero_grad()
        _loss(model, X, y, t % 3, bs=48).backward()
        opt.step()
    assert float(_loss(model, X, y, 0, bs=48).detach()) < 0.8 * before


def test_nondeterministic_closure_is_reported():
    model = _mlp(torch.float64, 5)
    X, y = _data(5)
    opt = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, X, y, 6)
    with pytest.raises(RuntimeError, match="nondeterministic"):
        opt.reverse(lambda: _loss(model, X, y, 0), lambda t: _loss(model, X, y, t + 1))


def test_closure_error_names_the_step_and_whether_it_repeats():
    """The error's step is the first step met from the last one back whose gradients differ
    from the forward run's; ranks is [0] when closure(step) does not repeat itself (unseeded
    noise) and [] when it repeats (a deterministic difference: another batch)."""
    from fastreg.optim.reversible import NondeterministicClosureError

    def run(closure):
        model = _mlp(torch.float64, 5)
        X, y = _data(5)
        opt = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9)
        _train(model, opt, X, y, 6)
        with pytest.raises(NondeterministicClosureError) as err:
            opt.reverse(lambda: _loss(model, X, y, 0), lambda t: closure(model, X, y, t))
        return err.value

    noisy = run(lambda m, X, y, t: _loss(m, X, y, t) * (1 + 1e-3 * torch.rand(()) if t == 2 else 1))
    assert noisy.step == 2 and noisy.ranks == [0]
    assert str(noisy).endswith(
        "were not bit-identical to those of the forward run (a nondeterministic closure: different "
        "batches, random seeds, or nondeterministic kernels; under DistributedDataParallel, pass "
        "reverse(..., ddp=model)). Reversing from the last step, the recomputed gradients first "
        "differed at step 2; closure gave other gradients when closure(2) was called twice at the "
        "same parameters: a nondeterministic closure (unseeded random numbers, nondeterministic "
        "kernels)")
    # the parameters that missed are named once, after "for", and the reason follows them
    assert "(here" not in str(noisy) and "): the gradients recomputed by closure(t) were not" in str(noisy)
    other = run(lambda m, X, y, t: _loss(m, X, y, t + (t == 3)))  # step 3 reads batch 4
    assert other.step == 3 and other.ranks == []
    assert str(other).endswith(
        "first differed at step 3, but closure(3) repeated itself: it differs from the forward run "
        "deterministically (another batch, seed or model)")
    assert "nondeterministic closure (unseeded" not in str(other)


def test_spill_grows_over_a_long_run_and_reverses_exactly():
    """Low momentum discards about 5.6 bits per element per step, so 250 steps spill over 40
    words per element: the spill buffer grows from 0 rows (8 at a time, then by a quarter
    past 32) while the optimizer runs, and reverse() still recovers w_0 bit for bit (it
    raises otherwise)."""
    w, loss = _quadratic(16, 0)
    opt = ReversibleSGD([w], lr=0.3, momentum=0.02)
    for t in range(250):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
        st = opt.state[w]
        assert st["spill"].shape[0] >= int(st["count"].max())  # room for every spilled word
        # grown only when full, by a quarter (8 rows at least): no more rows than that
        assert st["spill"].shape[0] <= 1.25 * int(st["count"].max()) + 8
    assert int(st["count"].max()) > 40 and st["spill"].shape[0] >= 50  # grown by 8s, then by 10
    opt.reverse(lambda: (w ** 2).sum(), loss)
    assert int(opt.state[w]["count"].max()) == 0


def test_buffer_bits_counts_every_parameter():
    """used/allocated bits, information held and numel summed over two parameters in two groups,
    from the state: 64 bits per head plus 32 per spill word in use (allocated: the spill's
    capacity); information 32 per word + log2(head) - 31 per element. Before any step the
    buffer holds nothing."""
    a = torch.nn.Parameter(torch.randn(300, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(7, 11))
    opt = ReversibleSGD([{"params": [a]}, {"params": [b], "momentum": 0.6}], lr=0.01, momentum=0.5)
    fresh = opt.buffer_bits()
    assert fresh == dict(used_bits=64 * 377, allocated_bits=64 * 377 + 32 * sum(
        opt.state[p]["spill"].numel() for p in (a, b)), info_bits=0.0, numel=377)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        a.grad = torch.randn(300, generator=g, dtype=torch.float64)
        b.grad = torch.randn(7, 11, generator=g)
        opt.step()
    st = [opt.state[a], opt.state[b]]
    got = opt.buffer_bits()
    assert got["numel"] == 377
    assert got["used_bits"] == sum(64 * s["head"].numel() + 32 * int(s["count"].sum()) for s in st)
    assert got["allocated_bits"] == sum(64 * s["head"].numel() + 32 * s["spill"].numel() for s in st)
    info = sum(float((32.0 * s["count"].double() + torch.log2(s["head"].double()) - 31).sum())
               for s in st)
    assert got["info_bits"] == pytest.approx(info, rel=1e-12)
    # 40 steps at gamma 0.5 / 0.6 store about 40 log2(1/gamma) bits per element
    assert 40 * (300 + 77 * math.log2(1 / 0.6)) <= got["info_bits"] <= 1.1 * 40 * (300 + 77 * 0.74)
    assert got["used_bits"] > got["info_bits"] and got["allocated_bits"] >= got["used_bits"]


# ---------------------------------------------------------------- errors
def test_overflow_names_parameter_and_step():
    model = _mlp(torch.float32, 6)
    X, y = _data(6)
    opt = ReversibleSGD(model.parameters(), lr=1e3, momentum=0.5, frac_bits=56)  # range 64
    with pytest.raises(ReversibleOverflowError, match=r"step \d+: parameter .*param_groups\[0\]\['params'\]\[\d\]"
                       r".*outside the fixed-point range") as err:
        _train(model, opt, X, y, 50)
    assert "non-finite" not in str(err.value) and "buffer" not in str(err.value)
    assert "range 2^6;" in str(err.value)
    with pytest.raises(RuntimeError, match="invalid after an earlier error"):
        opt.step()


def test_nonfinite_gradient_raises():
    p = torch.nn.Parameter(torch.randn(10))
    opt = ReversibleSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(10)
    opt.step()
    p.grad = torch.full((10,), float("inf"))
    with pytest.raises(ReversibleOverflowError, match="step 1: parameter .*non-finite") as err:
        opt.step()
    # only the reason met, and the fixed-point format's figures (default frac_bits 44: range 2^18)
    assert "range |v|" not in str(err.value) and "range |w|" not in str(err.value)
    assert "buffer" not in str(err.value)
    assert "(frac_bits=44: resolution 2^-44, range 2^18;" in str(err.value)


def test_validation_errors():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="momentum"):
        ReversibleSGD([p], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        ReversibleSGD([p], lr=0.1, momentum=0.0)
    with pytest.raises(TypeError, match="lr"):
        ReversibleSGD([p], lr="0.1", momentum=0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        ReversibleSGD([p], lr=0.1, momentum=0.9, weight_decay=torch.ones(2, 2))
    with pytest.raises(ValueError, match="frac_bits"):
        ReversibleSGD([p], lr=0.1, momentum=0.9, frac_bits=70)
    with pytest.raises(ReversibleOverflowError, match="range"):
        ReversibleSGD([torch.nn.Parameter(torch.tensor([1e9]))], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="closure"):
        ReversibleSGD([p], lr=0.1, momentum=0.9).reverse(torch.zeros(()), None)
    opt = ReversibleSGD([p], lr=torch.full((2,), 0.1), momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    opt.step()
    with pytest.raises(ValueError, match="lr schedule has 2 steps"):
        opt.step()


def test_resized_parameter_or_gradient_refused(gen):
    """The kernels write the parameter and read its gradient through raw pointers sized by the
    state: `.data` replaced by another size, or a gradient of another size, is an error naming
    the parameter, raised before any kernel runs (the state stays usable)."""
    p = torch.nn.Parameter(torch.randn(1000, generator=gen) * 0.1)
    grads = [torch.randn(1000, generator=gen) * 1e-3 for _ in range(2)]
    opt = ReversibleSGD([p], lr=0.1, momentum=0.9)
    w0 = p.detach().clone()
    p.grad = grads[0].clone()
    opt.step()
    w1 = p.detach().clone()
    p.grad.data = torch.randn(10)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*gradient of 10 elements for 1000"):
        opt.step()
    assert torch.equal(p.detach(), w1)
    keep = p.data
    p.data = torch.randn(10)
    p.grad = torch.randn(10)
    with pytest.raises(ValueError, match=r"has 10 elements, but its state was made for 1000"):
        opt.step()
    with pytest.raises(ValueError, match=r"has 10 elements, but its state was made for 1000"):
        opt.reverse(torch.zeros(()), lambda t: (p * grads[t]).sum())
    p.data = keep  # the original tensor back: training and the exact reversal carry on
    p.grad = grads[1].clone()
    opt.step()
    opt.reverse(p.sum(), lambda t: (p * grads[t]).sum())
    assert torch.equal(p.detach(), w0)


# ---------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_then_reverse():
    T1, T2 = 30, 20
    X, y = _data(7)
    # uninterrupted run
    model = _mlp(torch.float64, 7)
    w0 = [p.detach().clone() for p in model.parameters()]
    lr = torch.full((T1 + T2,), 0.1, dtype=torch.float64, requires_grad=True)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.6)
    _train(model, opt, X, y, T1 + T2)
    wT = [opt.state[p]["w"].clone() for p in model.parameters()]
    opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
    ref_lr, ref_w = lr.grad.clone(), [p.grad.clone() for p in model.parameters()]
    # checkpointed run: T1 steps, save, new model + optimizer, load, T2 more steps, reverse all
    model = _mlp(torch.float64, 7)
    lr1 = torch.full((T1 + T2,), 0.1, dtype=torch.float64, requires_grad=True)
    opt = ReversibleSGD(model.parameters(), lr=lr1, momentum=0.6)
    _train(model, opt, X, y, T1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2 = _mlp(torch.float64, 99)
    model2.load_state_dict(ck["model"])
    lr2 = torch.full((T1 + T2,), 0.1, dtype=torch.float64, requires_grad=True)
    opt2 = ReversibleSGD(model2.parameters(), lr=lr2, momentum=0.6)
    opt2.load_state_dict(ck["opt"])
    opt2.param_groups[0]["lr"] = lr2  # the hyperparameter tensor to differentiate
    for p, q in zip(model.parameters(), model2.parameters()):
        for key in ("w", "v", "head", "count"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
    assert opt2.steps == T1
    for t in range(T1, T1 + T2):
        opt2.zero_grad()
        _loss(model2, X, y, t).backward()
        opt2.step()
    for a, q in zip(wT, model2.parameters()):
        assert torch.equal(a, opt2.state[q]["w"])
    opt2.reverse(lambda: _loss(model2, X, y, 0, bs=48), lambda t: _loss(model2, X, y, t))
    for a, q in zip(w0, model2.parameters()):
        assert torch.equal(a, q.detach())
    assert torch.equal(lr2.grad, ref_lr)
    for a, q in zip(ref_w, model2.parameters()):
        assert torch.equal(a, q.grad)


def test_load_state_dict_refuses_malformed_state(gen):
    """A state that does not fit its parameter, or breaks the coder's invariants (a count
    beyond the spill's rows would make the kernels read past it), is refused by name."""
    p = torch.nn.Parameter(torch.randn(50, generator=gen) * 0.1)
    opt = ReversibleSGD([p], lr=0.1, momentum=0.5)
    for _ in range(40):
        p.grad = torch.randn(50, generator=gen) * 1e-2
        opt.step()
    live = opt.state[p]["spill"]
    good = opt.state_dict()
    rows = good["state"][0]["spill"].shape[0]
    # the saved spill keeps the rows in use only
    assert 0 < rows == int(good["state"][0]["count"].max()) < 50 and live.shape[0] > rows
    assert opt.state[p]["spill"] is live  # saving does not touch the optimizer's own state

    def damaged(key, fn):
        sd = copy.deepcopy(good)
        sd["state"][0][key] = fn(sd["state"][0][key])
        return sd

    cases = [(damaged("w", lambda t: t[:10]),
              r"'w' of parameter .*1-D torch.int64 tensor of 50 elements, got torch.int64 \(10,\)$"),
             (damaged("head", lambda t: t.to(torch.int32)), r"'head' of parameter"),
             (damaged("spill", lambda t: t[:, :10]), r"'spill' of parameter"),
             (damaged("spill", lambda t: t.to(torch.int64)), r"'spill' of parameter .*int32"),
             (damaged("count", lambda t: t + 1000), "inconsistent"),
             # one count past the spill's rows (fewer rows than elements: rows, not columns)
             (damaged("count", lambda t: t.index_fill(0, torch.tensor([3]), rows + 1)),
              "inconsistent"),
             (damaged("head", lambda t: t * 0), "inconsistent"),
             (damaged("w", lambda t: t.tolist()), r"'w' of parameter .* of 50 elements, got list$"),
             (damaged("count", lambda t: t + 1000), rf"inconsistent \(counts outside \[0, {rows}\] or "
              r"heads below 2\^31\): not a checkpoint of this optimizer, or a damaged one$")]
    old = copy.deepcopy(good)
    del old["reversible"]["coder"]  # a checkpoint of the version-1 coder (before 2026-11-28)
    cases.append((old, "coder version 1"))
    later = copy.deepcopy(good)
    later["reversible"]["coder"] = 7
    cases.append((later, r"written by coder version 7 \(an earlier fastreg\); this version reads version 2 "))
    for sd, msg in cases:
        fresh = ReversibleSGD([p], lr=0.2, momentum=0.5)
        with pytest.raises(ValueError, match=msg):
            fresh.load_state_dict(sd)
        assert fresh.param_groups[0]["lr"] == 0.2 and fresh.steps == 0  # nothing half-loaded
    for key, value in (("frac_bits", 40), ("momentum_bits", 20)):  # either format figure
        other = copy.deepcopy(good)
        other["reversible"][key] = value
        with pytest.raises(ValueError, match=f"saved with frac_bits={other['reversible']['frac_bits']}"):
            ReversibleSGD([p], lr=0.1, momentum=0.5).load_state_dict(other)
    fresh = ReversibleSGD([p], lr=0.1, momentum=0.5)
    fresh.load_state_dict(good)  # the undamaged one still loads
    q = torch.nn.Parameter(torch.randn(50, generator=gen))
    unused = ReversibleSGD([q], lr=0.1, momentum=0.5).state_dict()  # heads at their start value
    ReversibleSGD([q], lr=0.1, momentum=0.5).load_state_dict(unused)


def test_state_dict_keeps_the_gradient_fingerprints():
    """A run checkpointed after 3 steps, loaded into a new optimizer and continued for 3 more,
    still names the step whose closure differs (the fingerprints of the saved steps travel in
    the state dict); without them (a state dict of an older fastreg) the step is unknown."""
    from fastreg.optim.reversible import NondeterministicClosureError

    def run(keep):
        model = _mlp(torch.float64, 5)
        X, y = _data(5)
        opt = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9)
        _train(model, opt, X, y, 3)
        sd = copy.deepcopy(opt.state_dict())
        if not keep:
            del sd["reversible"]["grad_fingerprints"]
        opt2 = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(sd)
        _train(model, opt2, X, y, 6, start=3)
        with pytest.raises(NondeterministicClosureError) as err:
            opt2.reverse(lambda: _loss(model, X, y, 0),
                         lambda t: _loss(model, X, y, t + (t == 1)))  # step 1 reads batch 2
        return err.value

    assert run(True).step == 1 and run(True).ranks == []
    assert run(False).step is None and "unknown" in str(run(False))


@pytest.mark.parametrize("spilled", [True, False])
def test_dcp_round_trip_in_one_process(tmp_path, spilled):
    """torch.distributed.checkpoint in one process, without a process group (plain parameters):
    a run saved after T1 steps and loaded into a fresh model and optimizer goes on bit for bit,
    keeps its gradient fingerprints and reverses to w_0 with the uninterrupted run's
    hypergradients. The hyperparameters come back whatever the new optimizer was built with: a
    saved float replaces a tensor, a saved schedule replaces a 0-dim tensor, a saved 0-dim tensor
    is copied into one in place. spilled=False: no step spilled a word (a spill of 0 rows)."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    assert not (dist.is_available() and dist.is_initialized())
    X, y = _data(3)
    T1, T = (20, 26) if spilled else (3, 5)
    mom = 0.2 if spilled else 0.9

    def make(seed, lr, wd):
        model = _mlp(torch.float64, seed)
        return model, ReversibleSGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd,
                                    frac_bits=40)

    def run(model, opt, ts):
        for t in ts:
            opt.zero_grad()
            _loss(model, X, y, t).backward()
            opt.step()

    def rev(model, opt):
        opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))

    lr = torch.full((T,), 0.05, dtype=torch.float64, requires_grad=True)
    wd = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    model, opt = make(5, lr, wd)
    w0 = [p.detach().clone() for p in model.parameters()]
    run(model, opt, range(T))
    wT = [p.detach().clone() for p in model.parameters()]
    rev(model, opt)
    ref = [lr.grad.clone(), wd.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    lr1, wd1 = lr.detach().clone().requires_grad_(), wd.detach().clone().requires_grad_()
    model1, opt1 = make(5, lr1, wd1)
    run(model1, opt1, range(T1))
    used = max(int(opt1.state[p]["count"].max()) for p in model1.parameters())
    assert (used > 0) == spilled
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore")
        dcp.save({"model": model1.state_dict(), "optim": opt1.dcp_state_dict()}, checkpoint_id=tmp_path)
        lr2 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # 0-dim: replaced
        wd2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)  # same shape: in place
        model2, opt2 = make(6, lr2, wd2)
        sd = {"model": model2.state_dict(), "optim": opt2.dcp_state_dict(tmp_path)}
        dcp.load(sd, checkpoint_id=tmp_path)
    model2.load_state_dict(sd["model"])
    opt2.load_dcp_state_dict(sd["optim"])
    g = opt2.param_groups[0]
    assert g["weight_decay"] is wd2 and float(wd2.detach()) == 1e-3 and wd2.requires_grad
    assert g["lr"] is not lr2 and torch.equal(g["lr"], lr1.detach())
    assert g["momentum"] == mom and opt2.steps == T1
    fa, fb = opt1._gfp_table(), opt2._gfp_table()
    assert fb is not None and fa["first"] == fb["first"] and torch.equal(fa["table"], fb["table"])
    for p, q in zip(model1.parameters(), model2.parameters()):
        for key in ("w", "v", "head", "count"):
            assert torch.equal(opt1.state[p][key], opt2.state[q][key]), key
        u = int(opt1.state[p]["count"].max())
        assert torch.equal(opt1.state[p]["spill"][:u], opt2.state[q]["spill"][:u])
    g["lr"].requires_grad_()  # the loaded schedule, to receive d objective / d lr
    run(model2, opt2, range(T1, T))
    for a, q in zip(wT, model2.parameters()):
        assert torch.equal(a, q.detach())
    rev(model2, opt2)
    for a, q in zip(w0, model2.parameters()):
        assert torch.equal(a, q.detach())
    got = [g["lr"].grad, wd2.grad] + [p.grad for p in model2.parameters()]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)

    # a float hyperparameter saved replaces a tensor
    model3, opt3 = make(5, 0.05, 0.0)
    run(model3, opt3, range(T1))
    path = tmp_path / "floats"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optim": opt3.dcp_state_dict()}, checkpoint_id=path)
        model4, opt4 = make(5, torch.full((T,), 0.3, dtype=torch.float64), wd2)
        sd = {"optim": opt4.dcp_state_dict(path)}
        dcp.load(sd, checkpoint_id=path)
    opt4.load_dcp_state_dict(sd["optim"])
    assert opt4.param_groups[0]["lr"] == 0.05 and opt4.param_groups[0]["weight_decay"] == 0.0


def test_dcp_refuses_other_checkpoints(tmp_path):
    """A DCP checkpoint of another model is refused by name before anything loads: another
    shape, another parameter count (odd, so that counting by twos would miss it), no optimizer
    state under the prefix; load_dcp_state_dict refuses a dict that dcp_state_dict did not make,
    one of another parameter count, and a w_0 checksum that is not 3 int64 words."""
    import warnings

    import torch.distributed.checkpoint as dcp

    def make(*sizes):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in sizes]
        opt = ReversibleSGD(ps, lr=0.1, momentum=0.9)
        for _ in range(2):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        return ps, opt

    ps, opt = make(4, 3, 2)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore")
        dcp.save({"optim": opt.dcp_state_dict()}, checkpoint_id=tmp_path)
        with pytest.raises(ValueError, match=r"params'\]\[1\] \(shape \(5,\)\) was saved with "
                                             r"shape \(3,\); a checkpoint of another model"):
            make(4, 5, 2)[1].dcp_state_dict(tmp_path)
        with pytest.raises(ValueError, match="the checkpoint holds 3 parameters, this optimizer 2"):
            make(4, 3)[1].dcp_state_dict(tmp_path)
        with pytest.raises(ValueError, match="the checkpoint holds 3 parameters, this optimizer 4"):
            make(4, 3, 2, 1)[1].dcp_state_dict(tmp_path)
        with pytest.raises(ValueError, match="holds no ReversibleSGD state under 'opt'"):
            make(4, 3, 2)[1].dcp_state_dict(tmp_path, prefix="opt")
        make(4, 3, 2)[1].dcp_state_dict(tmp_path)  # the same layout: accepted
        top = tmp_path / "top"  # saved at the top level: prefix=""
        dcp.save(opt.dcp_state_dict(), checkpoint_id=top)
        sd = make(4, 3, 2)[1].dcp_state_dict(top, prefix="")
        assert sorted(sd) == ["param_groups", "reversible", "state"]
        reader = dcp.FileSystemReader(str(tmp_path))  # the checkpoint as a reader or its Metadata
        for where in (reader, reader.read_metadata()):
            assert sorted(make(4, 3, 2)[1].dcp_state_dict(where)) == sorted(sd)
        with pytest.raises(TypeError, match="checkpoint must be a path, a StorageReader or a "
                                            "Metadata, got int"):
            make(4, 3, 2)[1].dcp_state_dict(3)
    good = opt.dcp_state_dict()
    _, fresh = make(4, 3, 2)
    with pytest.raises(ValueError, match="not a dict made by ReversibleSGD.dcp_state_dict"):
        fresh.load_dcp_state_dict({"reversible": {}})
    with pytest.raises(ValueError, match="it holds 3 parameters, this optimizer 2"):
        make(4, 3)[1].load_dcp_state_dict(good)
    fewer = copy.copy(good)
    fewer["state"] = {k: v for k, v in good["state"].items() if k != "2"}
    with pytest.raises(ValueError, match="it holds 3 parameters, this optimizer 3"):
        fresh.load_dcp_state_dict(fewer)
    bad = copy.deepcopy(good)
    bad["state"]["1"]["w0_hash"] = bad["state"]["1"]["w0_hash"].to(torch.int32)
    with pytest.raises(ValueError, match=r"'w0_hash' of parameter .*\]\[1\] \(shape \(3,\)\) must "
                                         "be 3 int64 words"):
        fresh.load_dcp_state_dict(bad)
    assert fresh.steps == 2 and torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["w"],
                                            opt.state[ps[0]]["w"])  # nothing loaded, same run


# ---------------------------------------------------------------- hypergradients
def _unrolled(model, w0, X, y, T, lr, mom, wd, traj=None, meta=None):
    """float64 unrolled autograd through T steps of the same update (what higher/TorchOpt do).

    traj: the exact run's (w_t, v_t) per step; when given, each step's values are snapped to
    it (a straight-through correction: same derivatives, the fixed-point run's values)."""
    names = [n for n, _ in model.named_parameters()]
    ws = list(w0)
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(T):
        out = torch.func.functional_call(model, dict(zip(names, ws)), (X[(torch.arange(16) + 5 * t) % 48],))
        loss = torch.nn.functional.cross_entropy(out, y[(torch.arange(16) + 5 * t) % 48])
        if meta is not None:
            loss = loss + (meta * ws[0] ** 2).sum()
        gs = torch.autograd.grad(loss, ws, create_graph=True)
        vs = [mom[t] * v - (1 - mom[t]) * (g + wd[t] * w) for v, g, w in zip(vs, gs, ws)]
        if traj is not None:
            vs = [v + (e - v).detach() for v, e in zip(vs, traj[t][1])]
        ws = [w + lr[t] * v for w, v in zip(ws, vs)]
        if traj is not None:
            ws = [w + (e - w).detach() for w, e in zip(ws, traj[t][0])]
    out = torch.func.functional_call(model, dict(zip(names, ws)), (X,))
    return torch.nn.functional.cross_entropy(out, y)


def _hyper_case(seed, T):
    model = _mlp(torch.float64, seed)
    X, y = _data(seed)
    X = X.double()
    g = torch.Generator().manual_seed(seed)
    lr = (0.05 + 0.2 * torch.rand(T, generator=g, dtype=torch.float64)).requires_grad_()
    mom = (0.6 + 0.35 * torch.rand(T, generator=g, dtype=torch.float64)).requires_grad_()
    wd = torch.full((T,), 1e-2, dtype=torch.float64, requires_grad=True)
    meta = torch.full((13, 7), 1e-3, dtype=torch.float64, requires_grad=True)
    return model, X, y, lr, mom, wd, meta


@pytest.mark.parametrize("seed", [0, 1])
def test_hypergradients_match_unrolled_autograd(seed):
    T = 20
    model, X, y, lr, mom, wd, meta = _hyper_case(seed, T)
    opt = ReversibleSGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    mom_q = torch.tensor([opt.quantized_momentum(0, t) for t in range(T)], dtype=torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]

    def train_loss(t):
        return _loss(model, X, y, t) + (meta * model[0].weight ** 2).sum()

    traj = []
    for t in range(T):
        opt.zero_grad()
        train_loss(t).backward()
        opt.step()
        traj.append(([opt.state[p]["w"].double().view_as(p) * 2.0**-44 for p in model.parameters()],
                     [opt.state[p]["v"].double().view_as(p) * 2.0**-44 for p in model.parameters()]))
    meta.grad = None  # the forward run's backward() calls accumulated into it
    opt.reverse(lambda: _loss(model, X, y, 0, bs=48), train_loss)
    got = [lr.grad, mom.grad, wd.grad, meta.grad] + [p.grad for p in model.parameters()]

    for snap, tol in ((True, 1e-9), (False, 1e-6)):
        lr_r, mom_r, wd_r = (x.detach().clone().requires_grad_() for x in (lr, mom_q, wd))
        meta_r = meta.detach().clone().requires_grad_()
        w0_r = [w.clone().requires_grad_() for w in w0]
        obj = _unrolled(model, w0_r, X, y, T, lr_r, mom_r, wd_r, traj if snap else None, meta_r)
        want = torch.autograd.grad(obj, [lr_r, mom_r, wd_r, meta_r] + w0_r)
        errs = []
        for a, b in zip(got, want):
            err = float((a - b).norm() / b.norm())
            errs.append(err)
        assert max(errs) <= tol, (snap, errs)


def _quadratic_run(T, inputs_of=None, objective=None, grads_before=None):
    """T steps on L_t(w) = 0.5 |w - c|^2 + c2 |w|^2 (c, c2 meta-parameters), then reverse of
    objective (default |w|^2 + 3 c . 1 + c2: the metas also enter it directly). Returns
    (w parameter, c, c2, lr, the optimizer, (reverse's value, the objective before reverse))."""
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    c = torch.randn(5, dtype=torch.float64).requires_grad_()
    c2 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    lr = torch.full((max(T, 1),), 0.2, dtype=torch.float64, requires_grad=True)
    opt = ReversibleSGD([w], lr=lr, momentum=0.8, frac_bits=52)

    def loss(t):
        return 0.5 * ((w - c) ** 2).sum() + c2 * (w ** 2).sum()

    for t in range(T):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
    c.grad = c2.grad = lr.grad = None
    if grads_before is not None:  # gradients already there: reverse adds to them
        c.grad, c2.grad, lr.grad = (g.clone() for g in grads_before)
    obj = objective(w, c, c2) if objective else lambda: (w ** 2).sum() + 3 * c.sum() + c2
    with torch.no_grad():
        before = obj() if callable(obj) else obj  # at the final weights
    val = opt.reverse(obj, loss, inputs=None if inputs_of is None else inputs_of(w, c, c2))
    return w, c, c2, lr, opt, (val, before)


def _quadratic_unrolled(T, gamma):
    torch.manual_seed(3)
    w0 = torch.randn(5, dtype=torch.float64).requires_grad_()
    c = torch.randn(5, dtype=torch.float64).requires_grad_()
    c2 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    w, v = w0, torch.zeros(5, dtype=torch.float64)
    for t in range(T):
        g = (w - c) + 2 * c2 * w
        v = gamma * v - (1 - gamma) * g
        w = w + 0.2 * v
    obj = (w ** 2).sum() + 3 * c.sum() + c2
    return torch.autograd.grad(obj, (w0, c, c2))


@pytest.mark.parametrize("T", [0, 1, 12])
def test_metas_in_the_objective_and_edge_cases(T):
    """Meta-parameters that enter the objective directly (as well as the training loss) get
    both terms, against unrolled float64 autograd (1e-9: frac_bits 52); T = 0 (no step) gives
    d objective / d w_0 and the direct terms; inputs= listing a parameter ignores it, and
    listing only c leaves c2 untouched."""
    w, c, c2, lr, opt, val = _quadratic_run(T)
    gw, gc, gc2 = _quadratic_unrolled(T, opt.quantized_momentum(0, 0))
    for got, want in ((w.grad, gw), (c.grad, gc), (c2.grad, gc2)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.equal(val[0], val[1])  # the objective's value at the final weights
    w2, c_, c2_, _, _, _ = _quadratic_run(T, inputs_of=lambda w, c, c2: [w, c])
    assert torch.equal(w2.grad, w.grad) and torch.equal(c_.grad, c.grad) and c2_.grad is None


def test_reverse_adds_to_existing_meta_and_hyper_gradients():
    """Like backward(), reverse adds to a meta-parameter's or a hyperparameter's .grad that is
    already there (a hyperparameter shared by several objectives) instead of replacing it."""
    _, c, c2, lr, _, _ = _quadratic_run(3)
    before = (torch.full((5,), 1.5, dtype=torch.float64), torch.tensor(-0.25, dtype=torch.float64),
              torch.arange(3, dtype=torch.float64))
    _, c_, c2_, lr_, _, _ = _quadratic_run(3, grads_before=before)
    for got, fresh, pre in ((c_.grad, c.grad, before[0]), (c2_.grad, c2.grad, before[1]),
                            (lr_.grad, lr.grad, before[2])):
        assert torch.equal(got, pre + fresh)


def test_reverse_objective_without_parameters_and_bad_objective():
    """An objective that does not depend on the weights (a constant) gives zero hypergradients
    (the weights' and lr's), and one that is not a scalar is refused by name."""
    w, c, c2, lr, opt, _ = _quadratic_run(4, objective=lambda w, c, c2: torch.tensor(2.0,
                                                                                   dtype=torch.float64))
    assert torch.equal(w.grad, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(lr.grad, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="objective must be a scalar"):
        _quadratic_run(2, objective=lambda w, c, c2: lambda: w * 2)


def test_hypergradients_match_finite_differences():
    T = 15
    X, y = _data(2)
    X = X.double()

    def run(lr_scale, init_scale, with_grad):
        model = _mlp(torch.float64, 2)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(init_scale)
        lr = torch.full((T,), 0.1 * lr_scale, dtype=torch.float64, requires_grad=with_grad)
        # frac_bits=52: the rounding of the fixed-point run (~2^(16-52) per step) stays far
        # below what the central differences resolve
        opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.9, frac_bits=52)
        base = [p.detach().clone() / init_scale for p in model.parameters()]
        _train(model, opt, X, y, T)
        obj = float(_loss(model, X, y, 0, bs=48).detach())
        if with_grad:
            opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
            d_lr = float(lr.grad.sum()) * 0.1  # d/d lr_scale
            d_init = sum(float((p.grad * b).sum()) for p, b in zip(model.parameters(), base))
            return obj, d_lr, d_init
        return obj

    _, d_lr, d_init = run(1.0, 1.0, True)
    h = 1e-3
    fd_lr = (run(1 + h, 1.0, False) - run(1 - h, 1.0, False)) / (2 * h)
    fd_init = (run(1.0, 1 + h, False) - run(1.0, 1 - h, False)) / (2 * h)
    assert math.isclose(d_lr, fd_lr, rel_tol=1e-5), (d_lr, fd_lr)
    assert math.isclose(d_init, fd_init, rel_tol=1e-5), (d_init, fd_init)


def test_buffer_size_bound():
    """used bits <= 1.1 T d log2(1/gamma) + 64 d."""
    T, gamma = 200, 0.5
    p = torch.nn.Parameter(torch.randn(3000, dtype=torch.float64))
    opt = ReversibleSGD([p], lr=0.01, momentum=gamma)
    g = torch.Generator().manual_seed(0)
    for _ in range(T):
        p.grad = torch.randn(3000, generator=g, dtype=torch.float64)
        opt.step()
    b = opt.buffer_bits()
    bound = 1.1 * T * 3000 * math.log2(1 / gamma) + 64 * 3000
    assert b["used_bits"] <= bound
    assert b["used_bits"] >= T * 3000 * math.log2(1 / gamma)  # and it holds the information


# ---------------------------------------------------------------- native build and GPU
def test_cuda_kernels_compiled_when_the_build_has_cuda():
    C = _native.native()
    if C is None:
        pytest.skip("fastreg._C was not built")
    assert hasattr(C, "reversible_fwd_host") and hasattr(C, "reversible_rev_host")
    if C.with_cuda:
        for name in ("reversible_fwd_cuda", "reversible_restore_cuda", "reversible_rev_cuda"):
            assert hasattr(C, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_run_reverses_exactly(dtype):
    T = 40
    res = {}
    for dev in ("cpu", "cuda"):
        model = _mlp(dtype, 11).to(dev)
        X, y = _data(11)
        X, y = X.to(dev), y.to(dev)
        lr = torch.full((T,), 0.1, dtype=torch.float64, device=dev, requires_grad=True)
        opt = ReversibleSGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
        w0 = [p.detach().clone() for p in model.parameters()]
        # matmuls may round differently on the two devices, so each device is checked for
        # its own bit-exact reversal; the kernels themselves are compared bit for bit below
        _train(model, opt, X, y, T)
        wT = [opt.state[p]["w"].clone().cpu() for p in model.parameters()]
        opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
        for a, p in zip(w0, model.parameters()):
            assert torch.equal(a, p.detach())
        res[dev] = wT
    # the two runs differ only by the matmuls' rounding: the same weights to that rounding
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(res["cpu"], res["cuda"]):
        assert a.shape == b.shape
        wa, wb = a.double() * 2.0**-44, b.double() * 2.0**-44
        assert float(((wa - wb).abs() / wa.abs().clamp(min=1.0)).max()) <= tol


@pytest.mark.gpu
def test_gpu_kernels_match_reference(gen):
    n_el, cap, k, n, F = 100_003, 6, 16, 58982, 44
    state = [s.cuda() for s in _random_state(n_el, cap, gen, k)]
    g = torch.randn(n_el, generator=gen, dtype=torch.float64).cuda()
    ref, fast = _clone(state), _clone(state)
    p1, p2 = torch.empty_like(g), torch.empty_like(g)
    omg = 1 - n / 2**k
    assert K.fwd_step("torch", *ref, g, p1, k, n, 0.1, omg * 2.0**F, 0.01, 2.0**-F) == 0
    assert K.fwd_step("cuda", *fast, g, p2, k, n, 0.1, omg * 2.0**F, 0.01, 2.0**-F) == 0
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)
    assert torch.equal(p1, p2)
    dw, dv = torch.randn_like(g), torch.randn_like(g)
    outs = []
    for name, st in (("torch", ref), ("cuda", fast)):
        a, b, u, p = dw.clone(), dv.clone(), torch.empty_like(g), torch.empty_like(g)
        da = K.rev_restore(name, st[0], st[1], a, b, u, p, 0.1, omg, 2.0**-F)
        code, dg, dl = K.rev_step(name, *st, g, g, a, b, k, n, n / 2**k, omg * 2.0**F, 0.01, omg, 2.0**-F)
        assert code == 0
        outs.append((da, dg, dl, a, b))
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)
    for x, y in zip(outs[0][:3], outs[1][:3]):
        assert math.isclose(x, y, rel_tol=1e-10, abs_tol=1e-9)
    for x, y in zip(outs[0][3:], outs[1][3:]):
        assert torch.equal(x, y)


def test_failed_reverse_is_caught_and_leaves_the_optimizer_refusing():
    """One fixed-point weight corrupted after training (one ulp) under a loss linear in the
    weights (gradients that do not depend on them): reverse pops the same words, so the
    information buffers end empty, and only the w_0 checksum sees the miss. The optimizer then
    refuses to step until a checkpoint is loaded."""
    from fastreg.optim.reversible import NondeterministicClosureError

    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    c = torch.randn(5, generator=g, dtype=torch.float64)

    def loss(t):
        return (p * c).sum() * (t + 1)
    opt = ReversibleSGD([p], lr=0.1, momentum=0.9)
    for t in range(3):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.state[p]["w"][0] += 1
    with pytest.raises(NondeterministicClosureError, match=r"w_0 was not recovered bit for bit for "
                                                          r"parameter param_groups\[0\]\['params'\]\[0\]"):
        opt.reverse(lambda: (p * p).sum(), loss)
    st = opt.state[p]
    assert bool((st["head"] == K.L).all()) and not bool(st["count"].any())  # buffers clean
    with pytest.raises(RuntimeError, match=r"the state is invalid after an earlier error \(w_0 was not "
                                           r"recovered\); load a checkpoint"):
        opt.step()
    opt.load_state_dict(sd)
    opt.step()


def test_train_reverse_train_again_and_missing_grads():
    """After reverse the optimizer is at step 0 with an empty buffer: it can run (spilling words
    into the buffer again) and reverse again; a parameter without .grad is stepped with a zero
    gradient (the decay still applies)."""
    model = _mlp(torch.float32, 12)
    extra = torch.nn.Parameter(torch.randn(4))  # never receives a gradient
    X, y = _data(12)
    opt = ReversibleSGD(list(model.parameters()) + [extra], lr=0.1, momentum=0.2, weight_decay=0.1,
                        frac_bits=40)
    w0 = [p.detach().clone() for p in model.parameters()] + [extra.detach().clone()]
    grads = []
    for _ in range(2):
        _train(model, opt, X, y, 20)
        assert max(int(opt.state[p]["count"].max()) for p in model.parameters()) > 0, "nothing spilled"
        assert opt.state[extra]["spill"].dtype == torch.int32
        assert not torch.equal(extra.detach(), w0[-1])  # weight decay moved it
        opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
        for a, p in zip(w0, list(model.parameters()) + [extra]):
            assert torch.equal(a, p.detach())
        assert opt.state[extra]["spill"].shape[0] == 0
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- hyperparameter forms and API
def _hyper_grads(kind, T=8, seed=3):
    """Hypergradients of one small float64 run whose lr, momentum and weight_decay are constant,
    given as schedules of length T ("schedule"), as 0-dim tensors ("scalar"), or as schedules
    longer than the T steps taken ("long")."""
    X, y = _data(seed)
    model = _mlp(torch.float64, seed)
    vals = {"lr": 0.15, "momentum": 0.8, "weight_decay": 0.02}
    shape = {"schedule": (T,), "scalar": (), "long": (T + 3,)}[kind]
    hyp = {k: torch.full(shape, v, dtype=torch.float64, requires_grad=True) for k, v in vals.items()}
    opt = ReversibleSGD(model.parameters(), **hyp)
    _train(model, opt, X, y, T)
    opt.reverse(lambda: _loss(model, X, y, 0, bs=48), lambda t: _loss(model, X, y, t))
    return [hyp[k].grad for k in vals], [p.grad for p in model.parameters()]


def test_scalar_hyperparameters_and_long_schedules():
    """A 0-dim hyperparameter's gradient is the sum over the steps of the schedule's (not the last
    step's); a schedule longer than the steps taken gets its steps' gradients first, zeros after."""
    T = 8
    ref, ref_w = _hyper_grads("schedule", T)
    for g in ref:
        assert g.shape == (T,) and bool((g != 0).all())  # every step contributes
    got, got_w = _hyper_grads("scalar", T)
    for name, a, b in zip(("lr", "momentum", "weight_decay"), ref, got):
        assert b.shape == ()
        torch.testing.assert_close(b, a.sum(), rtol=1e-12, atol=0, msg=name)
    long, long_w = _hyper_grads("long", T)
    for name, a, b in zip(("lr", "momentum", "weight_decay"), ref, long):
        assert b.shape == (T + 3,)
        assert torch.equal(b[:T], a), name
        assert torch.equal(b[T:], torch.zeros(3, dtype=torch.float64)), name
    for a, b, c in zip(ref_w, got_w, long_w):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_step_closure_range_and_resolution():
    """step(closure) evaluates the closure (loss and gradients) and steps with its gradients;
    range and resolution are the fixed-point grid's: 2^(62 - F) and 2^-F."""
    X, y = _data(4)
    opt_ref = ReversibleSGD((ref := _mlp(torch.float64, 4)).parameters(), lr=0.1, momentum=0.9,
                            frac_bits=40)
    model = _mlp(torch.float64, 4)
    opt = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9, frac_bits=40)
    assert opt.range == 2.0**22 and opt.resolution == 2.0**-40
    for t in range(3):
        _train_step = _loss(ref, X, y, t)
        opt_ref.zero_grad()
        _train_step.backward()
        opt_ref.step()

        def closure():
            opt.zero_grad()
            loss = _loss(model, X, y, t)
            loss.backward()
            return loss

        before = float(_loss(model, X, y, t).detach())
        loss = opt.step(closure)
        assert float(loss.detach()) == before
        for a, b in zip(ref.parameters(), model.parameters()):
            assert torch.equal(a, b)
    assert opt.step() is None and opt.steps == 4
    # the range: |w| < 2^(62 - F) joins the grid, |w| = 2^(62 - F) is refused
    ReversibleSGD([torch.nn.Parameter(torch.tensor([0.999 * 2.0**22], dtype=torch.float64))],
                  lr=0.1, momentum=0.9, frac_bits=40)
    with pytest.raises(ReversibleOverflowError, match="range"):
        ReversibleSGD([torch.nn.Parameter(torch.tensor([2.0**22], dtype=torch.float64))],
                      lr=0.1, momentum=0.9, frac_bits=40)
    w = torch.nn.Parameter(torch.tensor([1.0 + 2.0**-45, 3.0 * 2.0**-41], dtype=torch.float64))
    ReversibleSGD([w], lr=0.1, momentum=0.9, frac_bits=40)
    assert w.tolist() == [1.0, 2.0**-39]  # rounded to the 2^-40 grid (ties to even)


def test_add_param_group_after_construction():
    """A group added after construction (before the first step) is rounded to the grid, trained
    with its own hyperparameters, reversed, and gets its hypergradients: the same run as an
    optimizer built with both groups. After the first step adding a group is refused."""
    T = 10
    g = torch.Generator().manual_seed(5)
    A = torch.randn(T, 20, generator=g, dtype=torch.float64)
    p0 = torch.randn(20, generator=g, dtype=torch.float64)
    q0 = torch.randn(7, generator=g, dtype=torch.float64) * 0.5

    def run(late):
        p, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
        lr_q = torch.full((T,), 0.05, dtype=torch.float64, requires_grad=True)
        group = {"params": [q], "lr": lr_q, "weight_decay": 0.01}
        if late:
            opt = ReversibleSGD([p], lr=0.1, momentum=0.9)
            opt.add_param_group(group)
            assert torch.equal(q.detach(), opt.state[q]["w"].double() * 2.0**-44)
        else:
            opt = ReversibleSGD([{"params": [p]}, group], lr=0.1, momentum=0.9)

        def loss(t):
            return ((p - A[t]) ** 2).sum() + (q ** 4).sum() + (p[:7] * q).sum()

        w0 = [p.detach().clone(), q.detach().clone()]
        for t in range(T):
            opt.zero_grad()
            loss(t).backward()
            opt.step()
        wT = [p.detach().clone(), q.detach().clone()]
        opt.reverse(lambda: (p ** 2).sum() + q.sum(), loss)
        assert torch.equal(p.detach(), w0[0]) and torch.equal(q.detach(), w0[1])
        return wT, lr_q.grad, p.grad, q.grad

    late, early = run(True), run(False)
    assert not torch.equal(late[0][1], q0)  # q was trained
    for a, b in zip(late[0] + list(late[1:]), early[0] + list(early[1:])):
        assert torch.equal(a, b)
    assert bool((late[1] != 0).all())


def test_add_param_group_after_a_step_is_refused_cleanly():
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = ReversibleSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    with pytest.raises(RuntimeError, match="^ReversibleSGD: parameter groups can only be added "
                                           "before the first step$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert len(opt.param_groups) == 1  # nothing half-added: the optimizer carries on
    opt.step()


def test_a_refused_group_leaves_the_optimizer_as_it_was():
    """A group refused part-way (its second parameter is bad) leaves no group and no state
    behind: the first parameter is not trained by a group without hyperparameter checks."""
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = ReversibleSGD([p], lr=0.1, momentum=0.9)
    good = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[1\].*dtype"):
        opt.add_param_group({"params": [good, torch.nn.Parameter(torch.ones(2, dtype=torch.int64),
                                                                 requires_grad=False)]})
    assert len(opt.param_groups) == 1 and good not in opt.state
    p.grad = torch.ones(5, dtype=torch.float64)
    opt.step()


def test_meta_parameter_is_refused_by_name():
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*meta"):
        ReversibleSGD([torch.nn.Parameter(torch.empty(4, device="meta"))], lr=0.1, momentum=0.9)


def test_bit_width_ranges_and_momentum_default():
    """frac_bits in [8, 60], momentum_bits in [2, 24] and momentum in (0, 1] with at least two
    quanta, both ends included, each refused one past its range by its message; momentum is
    quantized to 16 bits by default; the backend names are checked at construction."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    for fb in (8, 60):
        ReversibleSGD([p], lr=0.1, momentum=0.9, frac_bits=fb)
    for mb in (2, 24):
        ReversibleSGD([p], lr=0.1, momentum=0.9, momentum_bits=mb)
    for fb in (7, 61, 16.0):
        with pytest.raises(ValueError, match=r"^frac_bits must be an int in \[8, 60\], got "):
            ReversibleSGD([p], lr=0.1, momentum=0.9, frac_bits=fb)
    for mb in (1, 25, 16.0):
        with pytest.raises(ValueError, match=r"^momentum_bits must be an int in \[2, 24\], got "):
            ReversibleSGD([p], lr=0.1, momentum=0.9, momentum_bits=mb)
    opt = ReversibleSGD([p], lr=0.1, momentum=0.9)  # 2^17 * 0.9 rounds to an odd number
    assert opt.quantized_momentum() == round(0.9 * 2**16) / 2**16
    ReversibleSGD([p], lr=0.1, momentum=0.9, backend="cuda")  # a valid name (its kernels run at step())
    with pytest.raises(ValueError, match="^backend must be None, 'numba', 'cpp', 'cuda' or 'torch', "
                                         "got 'gpu'$"):
        ReversibleSGD([p], lr=0.1, momentum=0.9, backend="gpu")
    ReversibleSGD([p], lr=0.1, momentum=1.0)  # (0, 1]: 1 included
    ReversibleSGD([p], lr=0.1, momentum=2.0**-15)  # the smallest: 2 / 2^momentum_bits
    for m in (1.4 * 2.0**-16, 1.0 + 2.0**-20):
        with pytest.raises(ValueError, match=r"^momentum must lie in \(0, 1\] and be at least 2\^-15 "):
            ReversibleSGD([p], lr=0.1, momentum=m)


# ---------------------------------------------------------------- gaps found by mutation testing
@pytest.mark.parametrize("backend", [None, "numba", "torch"])
def test_the_chosen_backend_is_the_one_that_steps(monkeypatch, backend):
    """backend= picks the kernels step() calls, for every parameter; None picks by device
    (Numba on CPU). The backends give the same bits, so only the call shows which one ran."""
    seen = []
    real = K.fwd_step

    def spy(name, *args):
        seen.append(name)
        return real(name, *args)
    monkeypatch.setattr(K, "fwd_step", spy)
    ps = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = ReversibleSGD(ps, lr=0.1, momentum=0.5, backend=backend)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert seen == [backend or "numba"] * 2


def test_quantized_momentum_reads_step_0_by_default():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ReversibleSGD([p], lr=0.1, momentum=torch.tensor([0.5, 0.9], dtype=torch.float64))
    assert opt.quantized_momentum() == 0.5
    assert opt.quantized_momentum(0, 1) == round(0.9 * 2**16) / 2**16


@pytest.mark.parametrize("bad", ["vector", "float"])
def test_reverse_refuses_a_closure_that_returns_no_scalar(bad):
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = ReversibleSGD([p], lr=0.1, momentum=0.5)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()

    def closure(t):
        return p * p if bad == "vector" else 1.0
    with pytest.raises(ValueError, match=r"^closure\(1\) must return the scalar training loss of step 1$"):
        opt.reverse(torch.zeros(()), closure)


@pytest.mark.parametrize("which", ["velocity", "weight"])
def test_overflow_names_the_velocity_or_the_weight(which):
    """frac_bits 56: |w|, |v| < 64. A gradient of 300 at momentum 0.9 (increments of 30, below
    the 32 a gradient may add) takes v to -30, -57, then -81 (the weight moves by lr * v,
    tiny); a gradient of -10 at momentum 0.5 with lr 2 moves a weight of 60 by 10 at once."""
    w0, g, lr, mom, t = (0.0, 300.0, 1e-4, 0.9, 2) if which == "velocity" else (60.0, -10.0, 2.0, 0.5, 0)
    p = torch.nn.Parameter(torch.full((3,), w0, dtype=torch.float64))
    opt = ReversibleSGD([p], lr=lr, momentum=mom, frac_bits=56)
    p.grad = torch.full((3,), g, dtype=torch.float64)
    for _ in range(t):
        opt.step()
    sym = "v" if which == "velocity" else "w"
    with pytest.raises(ReversibleOverflowError, match=rf"forward step {t}: parameter param_groups\[0\]\['params'\]"
                       rf"\[0\] \(shape \(3,\)\) got a {which} outside the fixed-point range \|{sym}\| < 64 "):
        opt.step()


def test_load_state_dict_names_what_is_missing():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = ReversibleSGD([p, q], lr=0.1, momentum=0.5)
    p.grad, q.grad = torch.ones(4), torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match=r"^state_dict: not a ReversibleSGD state dict \(no 'reversible' entry\)$"):
        opt.load_state_dict(torch.optim.SGD([p, q], lr=0.1).state_dict())
    with pytest.raises(ValueError, match=r"^state_dict: it holds 2 parameters, this optimizer 1$"):
        ReversibleSGD([p], lr=0.1, momentum=0.5).load_state_dict(opt.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]
    with pytest.raises(ValueError, match=r"^state_dict: no state for parameter param_groups\[0\]\['params'\]\[1\] "
                                         r"\(shape \(3,\)\)$"):
        opt.load_state_dict(sd)


def test_a_loaded_spill_keeps_its_words_and_grows():
    """At momentum 2^-15 a step discards 15 bits per weight: three weights spill over 40 words
    each in 100 steps. Loaded into a new optimizer, the spill is int32 with those words and 8
    free rows, and its room is checked from the loaded words (not from the number of weights,
    3): 30 more steps spill past the 8 rows, and reverse() still recovers w_0 bit for bit."""
    w, loss = _quadratic(3, 0)
    opt = ReversibleSGD([w], lr=0.3, momentum=2.0**-15)
    w0 = w.detach().clone()  # on the grid
    _steps(opt, loss, range(100))
    sd = copy.deepcopy(opt.state_dict())
    opt = ReversibleSGD([w], lr=0.3, momentum=2.0**-15)
    opt.load_state_dict(sd)
    st = opt.state[w]
    used = int(st["count"].max())
    assert used > 40 and st["spill"].dtype == torch.int32 and st["spill"].shape == (used + 8, 3)
    assert torch.equal(st["spill"][:used], sd["state"][0]["spill"]) and not st["spill"][used:].any()
    _steps(opt, loss, range(100, 130))
    assert int(opt.state[w]["count"].max()) > used + 8
    opt.reverse(lambda: (w ** 2).sum(), loss)
    assert torch.equal(w.detach(), w0)


def _culprit(dtype, change, s, save_at=None, T=6, strip=False, resave=False):
    """A run of T steps (optionally saved after `save_at` steps and loaded into a new optimizer,
    `strip`: without its fingerprints, `resave`: then saved and loaded once more at the end),
    reversed with a closure that differs from the forward run only at step s: `sign` flips the
    sign of one gradient element, `nudge` moves it by 1e-10 (a change of a few million in its
    bit pattern: invisible to a fingerprint rounded to float32, large enough to move the
    weight on the 2^-44 grid). Returns the NondeterministicClosureError."""
    from fastreg.optim.reversible import NondeterministicClosureError

    model = _mlp(dtype, 5)
    X, y = _data(5)
    opt = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9)

    def reload(sd):
        new = ReversibleSGD(model.parameters(), lr=0.1, momentum=0.9)
        new.load_state_dict(sd)
        return new
    _train(model, opt, X, y, save_at or T)
    if save_at is not None:
        sd = copy.deepcopy(opt.state_dict())
        if strip:
            del sd["reversible"]["grad_fingerprints"]
        opt = reload(sd)
        _train(model, opt, X, y, T, start=save_at)
    if resave:
        opt = reload(copy.deepcopy(opt.state_dict()))
    first = next(model.parameters())

    def closure(t):
        loss = _loss(model, X, y, t)
        if t != s:
            return loss
        if change == "sign":
            g0 = torch.autograd.grad(loss, first, retain_graph=True)[0].reshape(-1)[0]
            return loss - 2 * g0.detach() * first.reshape(-1)[0]
        return loss + 1e-10 * first.reshape(-1)[0]
    with pytest.raises(NondeterministicClosureError) as err:
        opt.reverse(lambda: _loss(model, X, y, 0), closure)
    return err.value


@pytest.mark.parametrize("dtype,change,save_at", [
    (torch.float64, "sign", None), (torch.float32, "sign", None), (torch.float64, "sign", 3),
    (torch.float64, "nudge", None), (torch.float64, "nudge", 3), (torch.float64, "nudge", 1)])
def test_fingerprints_see_a_sign_or_a_low_bit_at_their_step(dtype, change, save_at):
    """The fingerprint of a step sees one gradient element's sign (the top bit of its pattern)
    and a change in its low bits, before and after a checkpoint (save_at=1: a table of one
    step)."""
    err = _culprit(dtype, change, s=0 if save_at == 1 else 1, save_at=save_at)
    assert err.step == (0 if save_at == 1 else 1) and err.ranks == []


def test_fingerprints_known_from_a_later_step_survive_a_checkpoint():
    """Saved without fingerprints after 3 steps, loaded, 3 more steps, saved and loaded again:
    the checkpoint holds the fingerprints of steps 3-5 only. A change at step 4 is named; one
    at step 1 (unknown) is not blamed on any step."""
    assert _culprit(torch.float64, "nudge", s=4, save_at=3, strip=True, resave=True).step == 4
    err = _culprit(torch.float64, "nudge", s=1, save_at=3, strip=True, resave=True)
    assert err.step is None and str(err).endswith(
        "No step's recomputed gradients differed from the forward run's fingerprints (unknown: "
        "steps loaded from a checkpoint without them)")


def test_a_noisy_closure_is_named_with_a_parameter_it_does_not_use():
    """A parameter outside the loss (no gradient: stepped with zeros) does not stop reverse()
    from asking the noisy step's closure again and naming it."""
    model = _mlp(torch.float64, 5)
    extra = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    X, y = _data(5)
    opt = ReversibleSGD(list(model.parameters()) + [extra], lr=0.1, momentum=0.9)
    _train(model, opt, X, y, 4)
    from fastreg.optim.reversible import NondeterministicClosureError

    with pytest.raises(NondeterministicClosureError) as err:
        opt.reverse(lambda: _loss(model, X, y, 0),
                    lambda t: _loss(model, X, y, t) * (1 + 1e-3 * torch.rand(()) if t == 2 else 1))
    assert err.value.step == 2 and err.value.ranks == [0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_noncontiguous_parameter_steps_as_its_contiguous_twin(dtype):
    """A transposed float64 parameter is written through a float64 buffer (no float32 on the
    way) and a float16 one through float32, as their contiguous twins are: the same bits."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(7, 5, generator=g, dtype=torch.float64).to(dtype)
    p = torch.nn.Parameter(base.clone().t())
    q = torch.nn.Parameter(base.t().contiguous())
    assert not p.is_contiguous()
    opts = [ReversibleSGD([x], lr=0.1, momentum=0.8) for x in (p, q)]
    for t in range(5):
        grad = torch.randn(5, 7, generator=g, dtype=torch.float64).to(dtype)
        for x, opt in zip((p, q), opts):
            x.grad = grad.clone()
            opt.step()
        assert torch.equal(p.detach(), q.detach())


def test_a_parameter_without_elements():
    """A zero-element parameter next to another one steps, checkpoints (an empty spill) and
    reverses with it."""
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    e = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))
    opt = ReversibleSGD([a, e], lr=0.1, momentum=0.5)
    a0 = a.detach().clone()

    def loss(t):
        return (a * a).sum() * (t + 1) + e.sum()
    _steps(opt, loss, range(3))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][1]["spill"].shape == (0, 0)
    opt = ReversibleSGD([a, e], lr=0.1, momentum=0.5)
    opt.load_state_dict(sd)
    opt.reverse(lambda: (a ** 3).sum(), loss)
    assert torch.equal(a.detach(), a0) and e.grad.shape == (0,)


def test_spill_at_the_lowest_momentum_has_room_every_step():
    """momentum_bits 24 and momentum 2^-23: 23 bits leave each weight every step, a word on
    most steps, so the spill fills as fast as it can; every step still finds room (the kernels
    raise 'an information buffer without room' otherwise) and reverse() gets w_0 back."""
    w, loss = _quadratic(64, 1)
    opt = ReversibleSGD([w], lr=0.3, momentum=2.0**-23, momentum_bits=24)
    w0 = w.detach().clone()
    _steps(opt, loss, range(300))
    assert int(opt.state[w]["count"].max()) > 150
    opt.reverse(lambda: (w ** 2).sum(), loss)
    assert torch.equal(w.detach(), w0)


def test_errors_name_a_named_parameter():
    """Given named_parameters(), the errors name the parameter by its name."""
    model = torch.nn.Linear(3, 2).double()
    opt = ReversibleSGD(model.named_parameters(), lr=0.1, momentum=0.5)
    model.weight.grad = torch.full((2, 3), float("inf"), dtype=torch.float64)
    model.bias.grad = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ReversibleOverflowError, match=r"^ReversibleSGD forward step 0: parameter 'weight' = "
                       r"param_groups\[0\]\['params'\]\[0\] \(shape \(2, 3\)\) got a non-finite \(or huge\) "
                       r"gradient \(frac_bits=44: resolution 2\^-44, range 2\^18; lower frac_bits for more range\)$"):
        opt.step()


def test_overflow_names_every_reason_met():
    """One step with a non-finite gradient element and a weight pushed out of range names both."""
    p = torch.nn.Parameter(torch.tensor([60.0, 0.0], dtype=torch.float64))
    opt = ReversibleSGD([p], lr=2.0, momentum=0.5, frac_bits=56)
    p.grad = torch.tensor([-10.0, float("nan")], dtype=torch.float64)
    with pytest.raises(ReversibleOverflowError, match=r"got a non-finite \(or huge\) gradient and a weight "
                                                      r"outside the fixed-point range \|w\| < 64 \(frac_bits=56"):
        opt.step()


def test_hyperparameter_and_parameter_refusals_name_the_argument():
    """Each refusal names the hyperparameter (lr may be negative: gradient ascent; momentum and
    weight decay may not) or the parameter, with the value or type that was refused."""
    p = torch.nn.Parameter(torch.randn(3))
    ReversibleSGD([p], lr=-0.1, momentum=0.5)
    cases = [(dict(weight_decay=-0.1), ValueError, r"^weight_decay must be >= 0, got -0.1$"),
             (dict(lr=True), TypeError, r"^lr must be a float or a tensor, got True$"),
             (dict(lr=float("inf")), ValueError, r"^lr must be finite, got inf$"),
             (dict(lr=torch.tensor([float("nan")])), ValueError, r"^lr must be finite$"),
             (dict(lr=torch.ones(2, dtype=torch.int64)), ValueError,
              r"^lr must be a float, a 0-dim float tensor or a 1-D float tensor \(a schedule\), got a "
              r"tensor of shape \(2,\) and dtype torch.int64$"),
             (dict(lr="0.1"), TypeError, r"^lr must be a float or a tensor, got str$")]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ReversibleSGD([p], **{"lr": 0.1, "momentum": 0.5, **kw})
    where = r"^params: parameter param_groups\[0\]\['params'\]\[0\] \(shape \(4,\)\) "
    for q, msg in ((torch.empty(4, device="meta"), "is a meta tensor \\(no data\\); ReversibleSGD needs "
                    "parameters with values$"),
                   (torch.zeros(4).to_sparse(), "has layout torch.sparse_coo; ReversibleSGD takes dense "
                    "\\(strided\\) parameters$"),
                   (torch.zeros(4, dtype=torch.complex64), "has dtype torch.complex64; ReversibleSGD takes "
                    "float16, bfloat16, float32 or float64 parameters$")):
        with pytest.raises(TypeError, match=where + msg):
            ReversibleSGD([torch.nn.Parameter(q)], lr=0.1, momentum=0.5)
