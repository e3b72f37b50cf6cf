"""The penalty as a differentiable loss term (fastreg.penalty.loss; docs/penalty.md).

    P = sum_i  l1_i |w_i|_1 + l2_i |w_i|^2 + gl_i sum_{g in G_i} sqrt(|g|) ||w_{i,g}||

Two autograd functions:

* PenaltyLoss: forward computes the three per-tensor sums (|w|_1, |w|^2, the group term),
  which are also the strengths' gradients; backward gives dP/dw through the fused
  penalty kernels (one pass over all tensors, the strengths scaled by the incoming
  gradient), or, when a graph of the backward is wanted (create_graph, as in
  ReversibleSGD.reverse's Hessian-vector products), through PenaltyGrad.
* PenaltyGrad: forward is the same fused kernel call; backward is the Hessian-vector
  product of P in closed form.

Second derivatives: the L1 term is piecewise linear, so its Hessian is 0 wherever it exists
(w != 0); at w = 0 the forward uses the subgradient sign(0) = 0 and the Hessian is taken as 0.
The group term's Hessian is sqrt(|g|) (I - u u^T) / ||w_g|| with u = w_g / ||w_g||, which
blows up as ||w_g|| -> 0; at ||w_g|| = 0 the gradient uses the subgradient 0 and the
Hessian is taken as 0. So double backward is exact away from w = 0 (L1) and from all-zero
groups (group lasso); at those points it returns these conventions, not a derivative.
"""

from __future__ import annotations

import math

import torch

from fastreg.ops import penalty as _ops
from fastreg.ops.penalty import MODE_EXPLICIT, MODE_NONE


class Spec:
    """What the autograd functions need besides tensors: per tensor, its group mode (MODE_NONE
    when it has no group term), explicit group index, number of groups, and the output dtype."""

    def __init__(self, ws, modes, explicit, out_dtype):
        self.n = len(ws)
        self.modes = modes
        self.explicit = explicit
        self.out_dtype = out_dtype
        self.geometry = []
        for w, mode, idx in zip(ws, modes, explicit):
            if mode == MODE_NONE or w.numel() == 0:
                self.geometry.append(None)
            elif mode == MODE_EXPLICIT:
                gi, ng = _ops.group_index(tuple(w.shape), mode, idx, w.device)
                cnt = torch.bincount(gi, minlength=ng).to(torch.float64)
                self.geometry.append(("index", gi, ng, cnt.sqrt()))
            else:
                a, b, c = _ops.block_shape(tuple(w.shape), mode)
                self.geometry.append(("block", (a, b, c), b, math.sqrt(a * c)))


def _group_sum(geo, x):
    """Per-group sums of a flat float64 tensor x."""
    if geo[0] == "block":
        return x.reshape(geo[1]).sum((0, 2))
    return torch.zeros(geo[2], dtype=x.dtype, device=x.device).index_add(0, geo[1], x)


def _to_elements(geo, g):
    """A per-group tensor spread back over the elements (flat)."""
    if geo[0] == "block":
        a, b, c = geo[1]
        return g.view(1, b, 1).expand(a, b, c).reshape(-1)
    return g[geo[1]]


def _scale(geo, device):
    """sqrt(|g|) per group (a number for blocks, whose groups are all the same size)."""
    return geo[3].to(device) if geo[0] == "index" else geo[3]


def terms(spec, ws):
    """(n, 3) float64: |w_i|_1, |w_i|^2 and the group term of each tensor (differentiable)."""
    if not torch.is_grad_enabled():
        return _terms_nograd(spec, ws)
    rows = []
    for w, geo in zip(ws, spec.geometry):
        w64 = w.reshape(-1).to(torch.float64)
        a1 = w64.abs().sum()
        a2 = (w64 * w64).sum()
        if geo is None:
            ag = torch.zeros((), dtype=torch.float64, device=w.device)
        else:
            ag = (_scale(geo, w.device) * _group_sum(geo, w64 * w64).sqrt()).sum()
        rows.append(torch.stack([a1, a2, ag]))
    return torch.stack(rows)


def _terms_nograd(spec, ws):
    """terms() for the forward: norms that accumulate in float64 without a float64 copy of w
    (the copy made the forward cost more than the plain-torch penalty's forward and backward)."""
    norm = torch.linalg.vector_norm
    rows = []
    for w, geo in zip(ws, spec.geometry):
        w = w.detach()
        a1 = norm(w, 1, dtype=torch.float64)
        a2 = norm(w, 2, dtype=torch.float64).square()
        if geo is None:
            ag = torch.zeros((), dtype=torch.float64, device=w.device)
        elif geo[0] == "block":
            ag = geo[3] * norm(w.reshape(geo[1]), 2, dim=(0, 2), dtype=torch.float64).sum()
        else:
            w64 = w.reshape(-1).to(torch.float64)
            ag = (_scale(geo, w.device) * _group_sum(geo, w64 * w64).sqrt()).sum()
        rows.append(torch.stack([a1, a2, ag]))
    return torch.stack(rows)


def traced_loss(spec, l1, l2, gl, ws):
    """P as torch ops, for torch.compile: subgradient 0 at w = 0 (torch's sign) and for an
    all-zero group (a guarded square root), as on the eager path."""
    total = torch.zeros((), dtype=torch.float64, device=l1.device)
    for i, (w, geo) in enumerate(zip(ws, spec.geometry)):
        w64 = w.reshape(-1).to(torch.float64)
        sq = w64 * w64
        total = total + l1[i] * w64.abs().sum() + l2[i] * sq.sum()
        if geo is not None:
            gs = _group_sum(geo, sq)
            pos = gs > 0
            nrm = torch.where(pos, torch.where(pos, gs, 1.0).sqrt(), 0.0)
            total = total + gl[i] * (_scale(geo, w.device) * nrm).sum()
    return total.to(spec.out_dtype)


def fused_grads(spec, ws, c1, c2, cg):
    """dP/dw for strengths c1, c2, cg (Python float lists) through the fused penalty kernels:
    one pass over all tensors, each gradient written into a fresh buffer (init=1)."""
    ws = [w.detach() for w in ws]
    gs = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws]
    coefs, modes, gidx = [], [], []
    for i in range(spec.n):
        coefs += [c1[i], c2[i], cg[i]]
        mode = spec.modes[i] if cg[i] != 0.0 else MODE_NONE
        modes.append(mode)
        if mode == MODE_EXPLICIT:
            gidx.append(spec.explicit[i])
    with torch.no_grad():
        # the op's eager implementation (as fastreg.penalty.accumulate_ calls it); the kernels
        # read w and write g through raw pointers, both plain tensors checked by the caller
        _ops._run_accumulate(ws, gs, coefs, modes, gidx, [1] * spec.n)
    return gs


class PenaltyLoss(torch.autograd.Function):
    """P(ws; l1, l2, gl). Inputs: spec, the strength vectors (n-long float64, differentiable
    or not), then the tensors."""

    @staticmethod
    def forward(ctx, spec, l1, l2, gl, *ws):
        t = terms(spec, ws)
        ctx.spec = spec
        ctx.save_for_backward(l1, l2, gl, t, *ws)
        return (l1 * t[:, 0] + l2 * t[:, 1] + gl * t[:, 2]).sum().to(spec.out_dtype)

    @staticmethod
    def backward(ctx, gout):
        spec = ctx.spec
        l1, l2, gl, t, *ws = ctx.saved_tensors
        g64 = gout.to(torch.float64)
        need_w = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled():
            # a graph of this backward is wanted (double backward): PenaltyGrad's forward is
            # the same fused kernel call, and its backward is P's Hessian-vector product
            gws = PenaltyGrad.apply(spec, g64, l1, l2, gl, *ws) if any(need_w) else [None] * spec.n
            if any(ctx.needs_input_grad[1:4]):
                t = terms(spec, ws)  # differentiable in w this time
        else:
            if any(need_w):
                g = float(g64)
                gws = fused_grads(spec, ws, (g * l1).tolist(), (g * l2).tolist(), (g * gl).tolist())
            else:
                gws = [None] * spec.n
        d1, d2, dg = (g64 * t[:, k] if ctx.needs_input_grad[1 + k] else None for k in range(3))
        return (None, d1, d2, dg, *(gw if need else None for gw, need in zip(gws, need_w)))


class PenaltyGrad(torch.autograd.Function):
    """dP/dw_i scaled by gout, for every tensor; backward: the Hessian-vector product."""

    @staticmethod
    def forward(ctx, spec, gout, l1, l2, gl, *ws):
        g = float(gout)
        ctx.spec = spec
        ctx.save_for_backward(gout, l1, l2, gl, *ws)
        return tuple(fused_grads(spec, ws, (g * l1).tolist(), (g * l2).tolist(), (g * gl).tolist()))

    @staticmethod
    def backward(ctx, *us):
        spec = ctx.spec
        gout, l1, l2, gl, *ws = ctx.saved_tensors
        dev = gout.device
        s1, s2, sg, dws = [], [], [], []  # per tensor: sum u sign(w), sum u w, group sum
        for i, (w, u) in enumerate(zip(ws, us)):
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            if u is None or w.numel() == 0:
                s1.append(zero), s2.append(zero), sg.append(zero), dws.append(None)
                continue
            w64 = w.reshape(-1).to(torch.float64)
            u64 = u.reshape(-1).to(torch.float64)
            s1.append((u64 * torch.sign(w64)).sum())
            s2.append((u64 * w64).sum())
            hv = 2.0 * l2[i] * u64
            geo = spec.geometry[i]
            if geo is None:
                sg.append(zero)
            else:
                nrm = _group_sum(geo, w64 * w64).sqrt()
                ok = nrm > 0
                inv = torch.where(ok, 1.0 / torch.where(ok, nrm, 1.0), 0.0)  # subgradient 0 at 0
                sc = _scale(geo, dev)
                wu = _group_sum(geo, w64 * u64)
                sg.append((sc * wu * inv).sum())
                # sqrt|g| (u_g / ||w_g|| - w_g (w_g . u_g) / ||w_g||^3)
                hv = hv + gl[i] * _to_elements(geo, sc * inv) * (
                    u64 - w64 * _to_elements(geo, wu * inv * inv))
            dws.append((gout * hv).reshape(w.shape).to(w.dtype))
        s1, s2, sg = torch.stack(s1), torch.stack(s2), torch.stack(sg)
        d_gout = (l1 * s1 + 2.0 * l2 * s2 + gl * sg).sum()
        return (None, d_gout, gout * s1, 2.0 * gout * s2, gout * sg, *dws)
