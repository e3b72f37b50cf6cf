"""Kernels of exact reversible SGD (docs/reversible.md): the PyTorch reference and dispatch.

State of one parameter tensor (all 1-D over its numel, plus the spill rows):
    w, v    int64   fixed point, value = int * 2^-F, |int| < 2^62
    head    int64   per-element coder state in [2^31, 2^63); 2^31 is empty
    count   int32   words of this element in the spill
    spill   int32   [capacity, numel] uint32 words (bit patterns), row j = j-th word pushed

The three steps (see kernels/numba/reversible.py for the list) exist as
  * `*_reference`: pure PyTorch on any device, exact integer division, the oracle;
  * Numba (CPU), the C++ host build of csrc/include/fastreg/reversible.h (CPU,
    for tests and as a choice), CUDA C++ (GPU).
All produce bit-identical states; the float reductions (d alpha, d gamma, d lambda)
agree to rounding.
"""

from __future__ import annotations

import torch

from fastreg import _backend, _native
from fastreg._boundary import check_plain, is_plain

L = 1 << 31
MASK31 = (1 << 31) - 1
MASK32 = (1 << 32) - 1
LIMIT = 1 << 62
DLIMIT = 2.0**61

BAD_NONFINITE = 1
BAD_V_RANGE = 2
BAD_W_RANGE = 4
BAD_CAPACITY = 8

_OP = "reversible_sgd"


# ---------------------------------------------------------------- helpers
def _to_i32_bits(word: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> int32 with the same 32 bits."""
    return (word - ((word >> 31) << 32)).to(torch.int32)


def _from_i32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & MASK32


def _code_params(n: int):
    q = L // n
    rr = L - q * n
    return q, rr, rr * (q + 1)


def _emit(x, c, spill, idx, cond, status):
    """Renormalise before a push: where cond, move the low 32 bits of x to the spill."""
    word = x & MASK32
    real = cond & ((c > 0) | (word != 0))
    cap = spill.shape[0]
    over = real & (c >= cap)
    if bool(over.any()):
        status[0] |= BAD_CAPACITY
        real = real & ~over
    if bool(real.any()):
        spill[c[real], idx[real]] = _to_i32_bits(word[real])
    c = c + real.to(torch.int64)
    x = torch.where(cond, x >> 32, x)
    return x, c


def _refill(x, c, spill, idx, need):
    """Renormalise before a pop: where need, shift in the top word of the spill (0 if empty)."""
    has = need & (c > 0)
    c = c - has.to(torch.int64)
    word = torch.zeros_like(x)
    if bool(has.any()):
        word[has] = _from_i32_bits(spill[c[has], idx[has]])
    x = torch.where(need, (x << 32) | word, x)
    return x, c


def _increment(g, w, c1s, lam, inv_scale):
    """rint((1-gamma) 2^F (g + lam w)), the exact float sequence of the kernels."""
    wf = w.to(torch.float64) * inv_scale
    t = wf * lam
    t = g.to(torch.float64) + t
    t = t * c1s
    return torch.round(t)


# ---------------------------------------------------------------- reference
def fwd_step_reference(w, v, head, count, spill, g, p_out, k, n, alpha, c1s, lam, inv_scale):
    status = [0]
    idx = torch.arange(w.numel(), device=w.device)
    x, c, vi, wi = head.clone(), count.to(torch.int64), v.clone(), w.clone()
    lo = vi & ((1 << k) - 1)
    vh = vi >> k
    # pop s mod n, then push lo (k bits), spilling a word first where x << k would reach 2^63
    q, rr, thr = _code_params(n)
    slot = x & MASK31
    low = slot < thr
    s = torch.where(low, torch.div(slot, q + 1, rounding_mode="floor"),
                    rr + torch.div(slot - thr, q, rounding_mode="floor"))
    f = torch.where(low, torch.full_like(s, q + 1), torch.full_like(s, q))
    cum = torch.where(low, s * (q + 1), thr + (s - rr) * q)
    x = f * (x >> 31) + slot - cum
    x, c = _emit(x, c, spill, idx, x >= (1 << (63 - k)), status)
    x = (x << k) | lo
    vi = vh * n + s
    dv = _increment(g, wi, c1s, lam, inv_scale)
    bad = ~(dv.abs() < DLIMIT)
    if bool(bad.any()):
        status[0] |= BAD_NONFINITE
        dv = torch.where(bad, torch.zeros_like(dv), dv)
    vi = vi - dv.to(torch.int64)
    bad = ~(vi.abs() < LIMIT)
    if bool(bad.any()):
        status[0] |= BAD_V_RANGE
        vi = torch.where(bad, torch.zeros_like(vi), vi)
    dw = torch.round(alpha * vi.to(torch.float64))
    bad = ~(dw.abs() < DLIMIT)
    if bool(bad.any()):
        status[0] |= BAD_W_RANGE
        dw = torch.where(bad, torch.zeros_like(dw), dw)
    wi = wi + dw.to(torch.int64)
    bad = ~(wi.abs() < LIMIT)
    if bool(bad.any()):
        status[0] |= BAD_W_RANGE
        wi = torch.where(bad, torch.zeros_like(wi), wi)
    head.copy_(x)
    count.copy_(c.to(torch.int32))
    v.copy_(vi)
    w.copy_(wi)
    p_out.copy_(wi.to(torch.float64) * inv_scale)
    return status[0]


def rev_restore_reference(w, v, dw, dv, u, p_out, alpha, omg, inv_scale):
    vf = v.to(torch.float64)
    da = float((dw * (vf * inv_scale)).sum())
    w.sub_(torch.round(alpha * vf).to(torch.int64))
    p_out.copy_(w.to(torch.float64) * inv_scale)
    dv.add_(dw * alpha)
    u.copy_(dv * omg)
    return da


def rev_step_reference(w, v, head, count, spill, g, hvp, dw, dv, k, n, gamma, c1s, lam, omg,
                       inv_scale):
    status = [0]
    idx = torch.arange(w.numel(), device=w.device)
    x, c = head.clone(), count.to(torch.int64)
    inc = _increment(g, w, c1s, lam, inv_scale)
    bad = ~(inc.abs() < DLIMIT)
    if bool(bad.any()):
        status[0] |= BAD_NONFINITE
        inc = torch.where(bad, torch.zeros_like(inc), inc)
    vi = v + inc.to(torch.int64)
    bad = ~(vi.abs() < LIMIT)
    if bool(bad.any()):
        status[0] |= BAD_V_RANGE
        vi = torch.where(bad, torch.zeros_like(vi), vi)
    vh = torch.div(vi, n, rounding_mode="floor")
    s = vi - vh * n
    q, rr, thr = _code_params(n)
    low = s < rr
    f = torch.where(low, torch.full_like(s, q + 1), torch.full_like(s, q))
    cum = torch.where(low, s * (q + 1), thr + (s - rr) * q)
    # pop lo (k bits), refill the word the forward step spilled (where x < f), push s
    lo = x & ((1 << k) - 1)
    x = x >> k
    x, c = _refill(x, c, spill, idx, x < f)
    xq = torch.div(x, f, rounding_mode="floor")
    x = (xq << 31) + cum + (x - xq * f)
    vi = vh * (1 << k) + lo
    head.copy_(x)
    count.copy_(c.to(torch.int32))
    v.copy_(vi)
    wf = w.to(torch.float64) * inv_scale
    gd = g.to(torch.float64)
    dg = float((dv * (vi.to(torch.float64) * inv_scale + (gd + lam * wf))).sum())
    dl = float((dv * wf).sum())
    dw.sub_(hvp.to(torch.float64) + (omg * lam) * dv)
    dv.mul_(gamma)
    return status[0], dg, dl


# ---------------------------------------------------------------- dispatch
def backend_for(device: torch.device, prefer_cpp: bool = False) -> str:
    """'numba' | 'cpp' | 'cuda' | 'torch' for a tensor on `device`."""
    forced = _backend.forced_backend()
    if forced is None and prefer_cpp and device.type == "cpu" and _native.native() is not None:
        return "cpp"
    return _backend.select(device, ("numba", "cuda"), _OP)


def _np(t: torch.Tensor):
    return (t.detach() if t.requires_grad else t).numpy()  # detach costs ~0.4 us per call


def _u32(t: torch.Tensor):
    import numpy as np

    return t.numpy().view(np.uint32)


def _check_args(op: str, **ts) -> None:
    """The buffers that come from outside the optimizer's state (the gradient, the HVP, the
    output view of the parameter, ...) are plain dense tensors (fastreg._boundary): every
    backend below hands them to a kernel as raw memory."""
    for name, t in ts.items():
        if not is_plain(t):
            check_plain(t, name, f"ReversibleSGD ({op})")


def _fkind(t: torch.Tensor) -> int:
    if t.dtype == torch.float32:
        return 0
    if t.dtype == torch.float64:
        return 1
    raise TypeError(f"reversible kernels take float32 or float64 buffers, got {t.dtype}")


def fwd_step(backend, w, v, head, count, spill, g, p_out, k, n, alpha, c1s, lam, inv_scale):
    _check_args("forward step", gradient=g, parameter=p_out)
    if backend == "numba":
        from fastreg.kernels.numba import reversible as K

        fn = K.fwd_step  # its serial copy below K.SERIAL_BELOW elements
        return int(fn(_np(w), _np(v), _np(head), _np(count), _u32(spill), _np(g),
                              _np(p_out), k, n, alpha, c1s, lam, inv_scale))
    if backend in ("cpp", "cuda"):
        C = _native.native()
        args = (w.data_ptr(), v.data_ptr(), head.data_ptr(), count.data_ptr(), spill.data_ptr(),
                spill.shape[0], g.data_ptr(), p_out.data_ptr(), _fkind(g), w.numel(), k, n,
                alpha, c1s, lam, inv_scale)
        if backend == "cpp":
            return int(C.reversible_fwd_host(*args))
        flag = torch.zeros(1, dtype=torch.int32, device=w.device)
        C.reversible_fwd_cuda(*args, flag.data_ptr(), torch.cuda.current_stream(w.device).cuda_stream)
        return int(flag.item())
    return fwd_step_reference(w, v, head, count, spill, g, p_out, k, n, alpha, c1s, lam, inv_scale)


def rev_restore(backend, w, v, dw, dv, u, p_out, alpha, omg, inv_scale):
    _check_args("reverse restore", dw=dw, dv=dv, u=u, parameter=p_out)
    if backend == "numba":
        from fastreg.kernels.numba import reversible as K

        fn = K.rev_restore  # its serial copy below K.SERIAL_BELOW elements
        return float(fn(_np(w), _np(v), _np(dw), _np(dv), _np(u), _np(p_out), alpha,
                                   omg, inv_scale))
    if backend in ("cpp", "cuda"):
        C = _native.native()
        args = (w.data_ptr(), v.data_ptr(), dw.data_ptr(), dv.data_ptr(), u.data_ptr(),
                p_out.data_ptr(), _fkind(u), w.numel(), alpha, omg, inv_scale)
        if backend == "cpp":
            return float(C.reversible_restore_host(*args))
        part = torch.zeros(_partials(w.numel()), dtype=torch.float64, device=w.device)
        C.reversible_restore_cuda(*args, part.data_ptr(), part.numel(),
                                  torch.cuda.current_stream(w.device).cuda_stream)
        return float(part.sum())
    return rev_restore_reference(w, v, dw, dv, u, p_out, alpha, omg, inv_scale)


def rev_step(backend, w, v, head, count, spill, g, hvp, dw, dv, k, n, gamma, c1s, lam, omg,
             inv_scale):
    _check_args("reverse step", gradient=g, hvp=hvp, dw=dw, dv=dv)
    if backend == "numba":
        from fastreg.kernels.numba import reversible as K

        fn = K.rev_step  # its serial copy below K.SERIAL_BELOW elements
        st, dg, dl = fn(_np(w), _np(v), _np(head), _np(count), _u32(spill), _np(g),
                                _np(hvp), _np(dw), _np(dv), k, n, gamma, c1s, lam, omg, inv_scale)
        return int(st), float(dg), float(dl)
    if backend in ("cpp", "cuda"):
        C = _native.native()
        args = (w.data_ptr(), v.data_ptr(), head.data_ptr(), count.data_ptr(), spill.data_ptr(),
                spill.shape[0], g.data_ptr(), hvp.data_ptr(), _fkind(g), dw.data_ptr(),
                dv.data_ptr(), w.numel(), k, n, gamma, c1s, lam, omg, inv_scale)
        if backend == "cpp":
            st, dg, dl = C.reversible_rev_host(*args)
            return int(st), float(dg), float(dl)
        flag = torch.zeros(1, dtype=torch.int32, device=w.device)
        part = torch.zeros(2 * _partials(w.numel()), dtype=torch.float64, device=w.device)
        C.reversible_rev_cuda(*args, flag.data_ptr(), part.data_ptr(), part.numel() // 2,
                              torch.cuda.current_stream(w.device).cuda_stream)
        sums = part.view(2, -1).sum(1).tolist()
        return int(flag.item()), float(sums[0]), float(sums[1])
    return rev_step_reference(w, v, head, count, spill, g, hvp, dw, dv, k, n, gamma, c1s, lam, omg,
                              inv_scale)


def rev_step_restore(backend, w, v, head, count, spill, g, hvp, dw, dv, u, p_out, k, n, gamma,
                     c1s, lam, omg, alpha2, omg2, inv_scale):
    """rev_step of step t, then rev_restore of step t - 1 (its alpha2, omg2). Numba fuses the
    two into one pass; the other backends run them one after the other. The states are
    bit-identical either way. Returns (status, d_gamma_t, sum dv.w, d_alpha_{t-1}); after a
    nonzero status the state is not to be used (the optimizer raises and refuses to go on)."""
    if backend == "numba":
        from fastreg.kernels.numba import reversible as K

        _check_args("reverse step", gradient=g, hvp=hvp, dw=dw, dv=dv, u=u, parameter=p_out)
        st, dg, dl, da = K.rev_step_restore(_np(w), _np(v), _np(head), _np(count), _u32(spill),
                                            _np(g), _np(hvp), _np(dw), _np(dv), _np(u), _np(p_out),
                                            k, n, gamma, c1s, lam, omg, alpha2, omg2, inv_scale)
        return int(st), float(dg), float(dl), float(da)
    st, dg, dl = rev_step(backend, w, v, head, count, spill, g, hvp, dw, dv, k, n, gamma, c1s, lam,
                          omg, inv_scale)
    if st:
        return st, dg, dl, 0.0
    return st, dg, dl, rev_restore(backend, w, v, dw, dv, u, p_out, alpha2, omg2, inv_scale)


def _partials(numel: int) -> int:
    """Blocks of the CUDA reductions (one partial sum each, summed by torch: deterministic)."""
    threads = 256
    return max(1, min((numel + threads - 1) // threads, 1024))
