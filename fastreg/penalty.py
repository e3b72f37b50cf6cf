"""Penalties over all parameters at once: gradients, proximal steps, sparsity (docs/penalty.md).

    loss.backward()
    value = fastreg.penalty.accumulate_(model.parameters(), l1=1e-5, l2=1e-4)
    optimizer.step()

or, with exact zeros,

    optimizer.step()
    fastreg.penalty.prox_(model.parameters(), lr, group_lasso=1e-3, groups="cols")

The penalty of one tensor w with strengths (l1, l2, group_lasso) and groups G is

    P(w) = l1 sum|w| + l2 sum w^2 + group_lasso sum_{g in G} sqrt(|g|) ||w_g||_2

Its gradient is l1 sign(w) + 2 l2 w + group_lasso sqrt(|g|) w_g / ||w_g|| with the
subgradient 0 for a group whose norm is 0 (and sign(0) = 0).

`params` is an iterable of tensors or of dicts like optimizer param groups
({"params": [...], "l1": ..., "l2": ..., "group_lasso": ..., "groups": ...});
a dict's entries override the keyword arguments for its tensors.

Groups: "rows" / "filters" (the slices along dim 0: a Linear layer's output units,
a convolution's filters), "cols" / "channels" (the slices along dim 1: a Linear
layer's input features, a convolution's input channels), an int64 index tensor with
one entry per element (any shape with the same numel), or a list/tuple with one of
those (or None) per tensor. A vector is treated as a column (n, 1): "rows" makes
each element a group, "cols" makes the vector one group; a 0-dim tensor is one group.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from fastreg._boundary import PLAIN_TYPES, check_plain, check_plain_list
from fastreg._validate import FLOAT_DTYPES
from fastreg.ops import penalty as _ops
from fastreg.ops.penalty import GROUP_NAMES, MODE_EXPLICIT, MODE_NONE

__all__ = ["accumulate_", "prox_", "sparsity", "value", "activity_penalty", "loss"]


def _real(v, name, op):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fastreg.{op}: {name} must be a real number >= 0, got {v!r}")
    v = float(v)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"fastreg.{op}: {name} must be a finite number >= 0, got {v}")
    return v


def _group_spec(spec, p, op, name):
    """(mode, explicit index or None) for one tensor."""
    if spec is None:
        return MODE_NONE, None
    if isinstance(spec, str):
        if spec not in GROUP_NAMES:
            raise ValueError(f"fastreg.penalty.{op}: {name} must be one of {sorted(GROUP_NAMES)}, "
                             f"an int64 index tensor, a list of those, or None; got {spec!r}")
        return GROUP_NAMES[spec], None
    if isinstance(spec, torch.Tensor):
        if spec.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"fastreg.penalty.{op}: {name} index tensor must have an integer "
                            f"dtype, got {spec.dtype}")
        if spec.numel() != p.numel():
            raise ValueError(f"fastreg.penalty.{op}: {name} index tensor must have one entry per "
                             f"element: numel {spec.numel()} != parameter numel {p.numel()} "
                             f"(shape {tuple(p.shape)})")
        if spec.device != p.device:
            raise ValueError(f"fastreg.penalty.{op}: {name} index tensor is on {spec.device} "
                             f"but its parameter is on {p.device}")
        if spec.numel() and int(spec.min()) < 0:
            raise ValueError(f"fastreg.penalty.{op}: {name} index tensor must be >= 0")
        return MODE_EXPLICIT, spec.reshape(-1).to(torch.int64)
    raise TypeError(f"fastreg.penalty.{op}: {name} must be a str, an index tensor, a list of "
                    f"those, or None; got {type(spec).__name__}")


def _flatten(params, op, l1, l2, group_lasso, groups):
    """[(tensor, l1, l2, gl, mode, explicit)], validated (strengths once per group)."""
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        entries = list(params)
    except TypeError:
        raise TypeError(f"fastreg.penalty.{op}: params must be an iterable of tensors or of dicts "
                        f"(param groups), got {type(params).__name__}") from None
    if isinstance(groups, (list, tuple)) and not any(isinstance(e, dict) for e in entries):
        if len(groups) != len(entries):
            raise ValueError(f"fastreg.penalty.{op}: groups has {len(groups)} entries but params "
                             f"has {len(entries)}")
    # (tensors, (l1, l2, gl), group spec or per-tensor list, where)
    blocks = []
    plain = [e for e in entries if not isinstance(e, dict)]
    if plain:
        blocks.append((plain, (l1, l2, group_lasso), groups, "params"))
    for gi, e in enumerate(entries):
        if isinstance(e, dict):  # other optimizer keys (lr, momentum, ...) are ignored
            plist = e.get("params")
            if plist is None:
                raise ValueError(f"fastreg.penalty.{op}: params[{gi}] (a dict) needs a 'params' "
                                 "entry")
            plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
            blocks.append((plist, (e.get("l1", l1), e.get("l2", l2),
                                   e.get("group_lasso", group_lasso)),
                           e.get("groups", groups), f"params[{gi}]"))
    out = []
    dev = None
    for plist, c, gspec, where in blocks:
        cl1 = _real(c[0], f"{where} l1", f"penalty.{op}")
        cl2 = _real(c[1], f"{where} l2", f"penalty.{op}")
        cgl = _real(c[2], f"{where} group_lasso", f"penalty.{op}")
        per_tensor = isinstance(gspec, (list, tuple))
        if per_tensor and len(gspec) != len(plist):
            raise ValueError(f"fastreg.penalty.{op}: {where}: groups has {len(gspec)} entries "
                             f"but there are {len(plist)} tensors")
        shared = None if per_tensor else _group_spec_cached(gspec, op)
        for j, p in enumerate(plist):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"fastreg.penalty.{op}: {where} must hold tensors, got "
                                f"{type(p).__name__}")
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"fastreg.penalty.{op}: {where} tensors must be float32, float64, "
                                f"float16 or bfloat16, got {p.dtype}")
            if dev is None:
                dev = p.device
            elif p.device != dev:
                raise ValueError(f"fastreg.penalty.{op}: params must all be on one device, got "
                                 f"{dev} and {p.device}; call once per device")
            if shared is not None:
                mode, idx = shared
            elif per_tensor:
                mode, idx = _group_spec(gspec[j], p, op, f"groups[{j}]")
            else:  # one index tensor for every tensor of the block
                mode, idx = _group_spec(gspec, p, op, "groups")
            if cgl > 0.0 and mode == MODE_NONE:
                raise ValueError(f"fastreg.penalty.{op}: group_lasso={cgl} needs groups ('rows', "
                                 f"'cols', 'filters', 'channels' or an index tensor) for {where}")
            out.append((p, cl1, cl2, cgl, mode, idx))
    return out


def _group_spec_cached(spec, op):
    """(mode, None) for a group name or None, shared by all tensors; None for index tensors."""
    if spec is None or isinstance(spec, str):
        return _group_spec(spec, None, op, "groups")
    return None


def _encode(recs):
    coefs, modes, gidx = [], [], []
    for _, l1, l2, gl, mode, idx in recs:
        coefs += [l1, l2, gl]
        modes.append(mode if gl > 0.0 else MODE_NONE)
        if mode == MODE_EXPLICIT and gl > 0.0:
            gidx.append(idx)
    return coefs, modes, gidx


def _as_list(params):
    """A tensor or an iterable as a list or tuple (a generator such as model.parameters() is
    walked once); anything else is returned as it is, for _flatten to name the error."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (list, tuple)):
        return params
    try:
        return list(params)
    except TypeError:
        return params


def accumulate_(params, *, l1=0.0, l2=0.0, group_lasso=0.0, groups=None,
                global_value=True) -> torch.Tensor:
    """Adds the penalty's gradient into every parameter's .grad; returns the penalty's value
    (0-dim float32).

    A parameter whose .grad is None gets one (the penalty gradient alone). Call after
    loss.backward() and before optimizer.step(). One kernel pass per (device, dtype) over
    all parameters; half-precision parameters accumulate in float32.

    DTensor parameters (FSDP2) are penalised on their local shards; the call issues one
    all-reduce when a group spans shards or when global_value (the default) asks for the
    global value, none otherwise. global_value=False returns this rank's share (the shares
    sum to the global value). Plain tensors (DDP) need no communication. docs/distributed.md.
    """
    params = _as_list(params)
    if not torch.compiler.is_compiling() and _has_dtensor(params):
        return _dtensor_accumulate(params, l1, l2, group_lasso, groups, global_value)
    if not torch.compiler.is_compiling():
        done, out = _onepass(params, "accumulate_", l1, l2, group_lasso, groups)
        if done:
            return out
    recs = _flatten(params, "accumulate_", l1, l2, group_lasso, groups)
    if not recs:
        return torch.zeros((), dtype=torch.float32)
    ws = [r[0] for r in recs]  # read through data_ptr under no_grad: no detach needed
    if not torch.compiler.is_compiling():  # before a .grad is created: nothing half done
        check_plain_list(ws, "params", "penalty.accumulate_")
        check_plain_list([p.grad for p in ws if p.grad is not None], "params' .grad",
                         "penalty.accumulate_")
    gs, init = [], []
    for i, p in enumerate(ws):
        g = p.grad
        if g is None:
            g = torch.empty_like(p, memory_format=torch.contiguous_format)
            p.grad = g
            init.append(1)
        else:
            if g.layout is not torch.strided:
                raise TypeError("fastreg.penalty.accumulate_: only dense (strided) gradients are "
                                f"supported, got {g.layout}")
            _ops.check_grad(p, g, f"tensor {i} of params", "its .grad",
                            "fastreg.penalty.accumulate_")
            init.append(0)
        gs.append(g)
    coefs, modes, gidx = _encode(recs)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            return torch.ops.fastreg.penalty_accumulate(ws, gs, coefs, modes, gidx, init)
        # eager: the op's implementation without the dispatcher's per-list-element overhead
        # (about 3 ms for 260 tensors); the kernels write through raw pointers, so bump the
        # version counters as the op's ADInplaceOrView kernel would
        out = _ops._run_accumulate(ws, gs, coefs, modes, gidx, init)
        torch._C._increment_version(gs)
        return out


_FLOAT_PAIR = (torch.float32, torch.float64)
# C-level getters: the one-pass path checks 260 tensors in about ten map() passes of ~15 us each,
# where a Python loop with the same checks took ~0.35 ms
_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_SHAPE = operator.attrgetter("shape")
_LAYOUT = operator.attrgetter("layout")
_IS_CPU = operator.attrgetter("is_cpu")
_IS_CUDA = operator.attrgetter("is_cuda")
_GET_DEVICE = torch.Tensor.get_device
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_NUMEL = torch.Tensor.numel
_DATA_PTR = torch.Tensor.data_ptr


def _plain_on(ts, device) -> bool:
    """Plain dense tensors (fastreg._boundary's check) all on `device`, CPU or CUDA (which
    also rules out meta tensors), in C-level passes: the one-pass path's share of the boundary
    check (about half the cost of is_plain_list plus a device set for 260 tensors)."""
    if not set(map(type, ts)) <= PLAIN_TYPES or set(map(_LAYOUT, ts)) != {torch.strided}:
        return False
    if device.type == "cpu":
        return all(map(_IS_CPU, ts))
    return (device.type == "cuda" and all(map(_IS_CUDA, ts))
            and set(map(_GET_DEVICE, ts)) == {device.index})


def _plain_cpu_list(params, groups, op, with_grads):
    """The one-pass eager paths' check: (dtype, sizes, shapes or None, grads) when `params` is
    a list of plain (fastreg._boundary), non-empty, contiguous float32 or float64 tensors of one
    dtype on one device (each with a contiguous .grad when with_grads; shapes are gathered
    then) whose op would take the C++ host hot path or the CUDA kernels, with a group name or
    no groups; None otherwise (the general path then runs, with its checks and error
    messages)."""
    if not isinstance(params, (list, tuple)) or not params or not (
            groups is None or isinstance(groups, str)):
        return None
    gs = None
    try:
        device = params[0].device
        # the general path names what it refuses (plain tensors only: fastreg._boundary)
        if not _plain_on(params, device):
            return None
        # Tensor.is_contiguous raises TypeError for anything that is not a tensor (None
        # included); sparse grads report False
        if not all(map(_IS_CONTIGUOUS, params)):
            return None
        if with_grads:
            gs = list(map(_GRAD, params))
            if not all(map(_IS_CONTIGUOUS, gs)) or not _plain_on(gs, device):
                return None
    except (TypeError, AttributeError):
        return None
    dtypes = set(map(_DTYPE, params))
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    numels = tuple(map(_NUMEL, params))
    if dtype not in _FLOAT_PAIR or 0 in numels or not _ops.host_onepass_ok(device, op):
        return None
    shapes = None
    if with_grads:
        # a grad that no longer matches its tensor (see ops.check_grad): the general path says so
        shapes = tuple(map(_SHAPE, params))
        if set(map(_DTYPE, gs)) != {dtype} or tuple(map(_SHAPE, gs)) != shapes:
            return None
    return dtype, numels, shapes, gs


def _onepass(params, op, l1, l2, group_lasso, groups, lr=None):
    """accumulate_ (lr None) or prox_ for the common eager call, without the general path's
    per-tensor passes; the launch is the one the general path makes (tested bit for bit).
    Returns (True, value) where it applies, (False, None) where not."""
    plain = _plain_cpu_list(params, groups, op, lr is None)
    if plain is None:
        return False, None
    dtype, numels, shapes, gs = plain
    cl1 = _real(l1, "params l1", "penalty." + op)
    cl2 = _real(l2, "params l2", "penalty." + op)
    cgl = _real(group_lasso, "params group_lasso", "penalty." + op)
    mode, _ = _group_spec(groups, None, op, "groups")
    if cgl > 0.0 and mode == MODE_NONE:
        return False, None  # the general path raises the error
    # ungrouped tensors are planned by their sizes alone: a cheaper cache key than shapes
    if cgl == 0.0:
        shapes = numels
    elif shapes is None:
        shapes = tuple(map(_SHAPE, params))
    with torch.no_grad():
        if lr is None:
            out = _ops.host_onepass("accumulate", shapes, map(_DATA_PTR, params),
                                    map(_DATA_PTR, gs), dtype, cl1, cl2, cgl, mode,
                                    device=params[0].device)
            torch._C._increment_version(gs)  # written through raw pointers, as in the general path
        else:
            out = _ops.host_onepass("prox", shapes, map(_DATA_PTR, params), None, dtype,
                                    cl1, cl2, cgl, mode, lr, device=params[0].device)
            torch._C._increment_version(list(params))
    return True, out


def value(params, *, l1=0.0, l2=0.0, group_lasso=0.0, groups=None) -> torch.Tensor:
    """The penalty's value (0-dim float32, float64 arithmetic), without touching .grad."""
    recs = _flatten(params, "value", l1, l2, group_lasso, groups)
    total = torch.zeros((), dtype=torch.float64, device=recs[0][0].device if recs else "cpu")
    for p, l1_, l2_, gl, mode, idx in recs:
        v, _ = _ops.accumulate_reference_one(p, l1_, l2_, gl, mode if gl > 0 else MODE_NONE, idx)
        total = total + v
    return total.to(torch.float32)


def prox_(params, lr, *, l1=0.0, l2=0.0, group_lasso=0.0, groups=None) -> None:
    """Proximal step of the penalty with step size lr, in place (after optimizer.step()).

    w <- GS(soft(w, lr l1), lr group_lasso sqrt(|g|)) / (1 + 2 lr l2), where soft is
    soft-thresholding and GS(z, t) = max(0, 1 - t / ||z_g||) z_g is group shrinkage: the
    exact proximal operator of elastic net + sparse group lasso. Makes exact zeros.
    """
    lr = _real(lr, "lr", "penalty.prox_")
    params = _as_list(params)
    # DTensor shards: one all-reduce iff a group spans shards
    if not torch.compiler.is_compiling() and _has_dtensor(params):
        return _dtensor_prox(params, lr, l1, l2, group_lasso, groups)
    if not torch.compiler.is_compiling():
        done, _ = _onepass(params, "prox_", l1, l2, group_lasso, groups, lr)
        if done:
            return
    recs = _flatten(params, "prox_", l1, l2, group_lasso, groups)
    if not recs:
        return
    coefs, modes, gidx = _encode(recs)
    ws = [r[0] for r in recs]
    if not torch.compiler.is_compiling():
        check_plain_list(ws, "params", "penalty.prox_")
    with torch.no_grad():
        if torch.compiler.is_compiling():
            torch.ops.fastreg.penalty_prox(ws, lr, coefs, modes, gidx)
        else:  # eager: as in accumulate_
            _ops._run_prox(ws, lr, coefs, modes, gidx)
            torch._C._increment_version(ws)


def sparsity(params, groups=None, *, global_value=True) -> dict:
    """{"weights": fraction of exactly-zero weights, "groups": fraction of all-zero groups,
    "zero_groups": count, "num_groups": count} over all tensors (groups as in accumulate_;
    with groups=None, "groups" counts each tensor as one group).

    DTensor parameters (FSDP2): counts over the full tensors, in one all-reduce
    (global_value=False: this rank's share of the counts, with an all-reduce only for
    groups that span shards)."""
    params = _as_list(params)
    if not torch.compiler.is_compiling() and _has_dtensor(params):
        return _dtensor_sparsity(params, groups, global_value)
    recs = _flatten(params, "sparsity", 0.0, 0.0, 0.0, groups)
    check_plain_list([r[0] for r in recs], "params", "penalty.sparsity")
    nz = n = zg = ng = 0
    for p, _, _, _, mode, idx in recs:
        w = p.detach()
        n += w.numel()
        nz += int((w == 0).sum())
        if w.numel() == 0:
            continue
        gi, k = _ops.group_index(tuple(w.shape), mode, idx, w.device)
        nonzero = torch.zeros(k, dtype=torch.int64, device=w.device).index_add_(
            0, gi, (w.reshape(-1) != 0).to(torch.int64))
        ng += k
        zg += int((nonzero == 0).sum())
    return {"weights": nz / n if n else 0.0, "groups": zg / ng if ng else 0.0,
            "zero_groups": zg, "num_groups": ng}


def activity_penalty(x, *, l1=0.0, l2=0.0, return_value=False):
    """Penalty on activations (neurons), not weights: returns x unchanged.

    Its backward adds l1 sign(x) + 2 l2 x to the incoming gradient in the same pass, as if
    l1 |x|_1 + l2 |x|^2 had been added to the loss. The forward computes that value in the
    same pass that produces its output, so logging it costs nothing extra:
    `y, value = activity_penalty(x, l1=..., return_value=True)` gives it as a detached 0-dim
    tensor (float32; float64 for float64 x; do not add it to the loss too: the gradient is
    already there), and
    fastreg.nn.ActivityPenalty keeps the last one in `.last_value`.

    It is the torch.library op fastreg::activity_penalty (outputs (y, value), differentiable
    in both: gx = gy + gv (l1 sign(x) + 2 l2 x)) followed by an identity whose backward feeds
    gv = 1. Saved for backward: x only.
    """
    from fastreg._validate import check_float_tensor

    check_float_tensor(x, "x", "activity_penalty")
    if not torch.compiler.is_compiling() and not x.is_meta:  # meta: the op's fake kernel
        check_plain(x, "x", "activity_penalty")
    l1 = _real(l1, "l1", "activity_penalty")
    l2 = _real(l2, "l2", "activity_penalty")
    y, v = torch.ops.fastreg.activity_penalty(x, l1, l2)
    if torch.is_grad_enabled() and x.requires_grad:
        y = _ops._ImplicitPenalty.apply(y, v)
    if return_value:
        return y, v.detach()
    return y


# ================================================================ DTensor parameters (FSDP2)
# FSDP2 (torch.distributed.fsdp.fully_shard) holds parameters and gradients as DTensors whose
# local shards are slices of the full tensor. The penalty is computed on the local shards with
# the same kernels; what needs other ranks' data goes into ONE all-reduce per call: the
# partial sums of squares (or nonzero counts) of the groups that span shards, whose norms need
# every shard, and, unless global_value=False, the partial value. Replicated DTensors are
# counted once (on mesh coordinate 0) wherever shares are summed. docs/distributed.md.

_PLAIN_PARAM_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


def _has_dtensor(params) -> bool:
    """True when a tensor in params (a list, possibly of param-group dicts) is a DTensor. A
    list of plain tensors costs one C-level pass."""
    if not isinstance(params, (list, tuple)) or set(map(type, params)) <= _PLAIN_PARAM_TYPES:
        return False
    from torch.distributed.tensor import DTensor

    for e in params:
        if isinstance(e, dict):
            ps = e.get("params")
            ps = [ps] if isinstance(ps, torch.Tensor) else (list(ps) if ps is not None else [])
            if any(isinstance(p, DTensor) for p in ps):
                return True
        elif isinstance(e, DTensor):
            return True
    return False


class _Local:
    """One DTensor parameter on this rank: p, its local shard w, strengths, grouping, whether
    it is replicated, and for groups that span shards (span) the local elements' global
    group index gi, the number of groups ng and the global group sizes cnt."""

    __slots__ = ("p", "w", "l1", "l2", "gl", "mode", "idx", "replicated", "span", "gi", "ng",
                 "cnt", "block")


def _dtensor_records(params, op, l1, l2, group_lasso, groups, *, all_groups=False):
    """(mesh, [_Local]) for DTensor parameters, validated. all_groups: keep the grouping even
    where group_lasso is 0 (sparsity counts groups). Raises for plain tensors mixed in,
    several meshes, meshes of more than one dimension, placements other than Shard and
    Replicate, and index groups given as DTensors."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    recs = _flatten(params, op, l1, l2, group_lasso, groups)
    where = f"fastreg.penalty.{op}"
    mesh, out = None, []
    for i, (p, cl1, cl2, cgl, mode, idx) in enumerate(recs):
        if not isinstance(p, DTensor):
            raise TypeError(f"{where}: params mix DTensors and plain tensors (tensor {i} is a "
                            f"plain {type(p).__name__} of shape {tuple(p.shape)}); pass the "
                            "DTensor (FSDP2) parameters and the plain ones in separate calls")
        if mesh is None:
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise ValueError(f"{where}: DTensor parameters on a {mesh.ndim}-D device mesh "
                                 "are not supported (only 1-D meshes, as fully_shard builds by "
                                 "default)")
        elif p.device_mesh != mesh:
            raise ValueError(f"{where}: the DTensor parameters live on different device meshes "
                             f"(tensor {i}); call once per mesh")
        if isinstance(idx, DTensor):
            raise TypeError(f"{where}: the groups index tensor of tensor {i} is a DTensor; pass "
                            "it as a plain tensor with one entry per element of the full "
                            "parameter")
        pl = p.placements[0]
        r = _Local()
        r.p, r.w, r.l1, r.l2, r.gl, r.idx = p, p.to_local(), cl1, cl2, cgl, idx
        r.block = None
        r.mode = mode if (cgl > 0.0 or all_groups) else MODE_NONE
        if type(pl) is Replicate:
            r.replicated, r.span = True, False
        elif type(pl) is Shard:
            r.replicated = False
            d = pl.dim % max(p.dim(), 1)
            if r.mode == MODE_NONE:
                r.span = False
            elif r.mode == MODE_EXPLICIT:
                r.span = True
            elif r.mode == GROUP_NAMES["rows"]:
                r.span = p.dim() >= 2 and d != 0  # a vector's "rows" are its elements
            else:  # "cols": a vector is one group
                r.span = p.dim() < 2 or d != 1
        else:
            raise ValueError(f"{where}: tensor {i} has placement {pl}; only Shard(dim) and "
                             "Replicate() placements can be reduced (a Partial tensor has no "
                             "values to penalise until it is reduced)")
        if r.span:
            if r.mode == MODE_EXPLICIT:
                shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
                full = idx.reshape(p.shape)
                r.gi = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))].reshape(-1)
                r.ng = int(idx.max()) + 1 if idx.numel() else 0
                r.cnt = torch.bincount(idx, minlength=r.ng).to(torch.float64)
            else:
                r.ng = p.shape[0] if r.mode == GROUP_NAMES["rows"] else (
                    p.shape[1] if p.dim() >= 2 else 1)
                r.cnt = torch.full((r.ng,), p.numel() // max(r.ng, 1), dtype=torch.float64,
                                   device=r.w.device)
                # the local shard is (A, B, C) row-major with the groups its B slices: sums by
                # reshaping, much faster than an index_add over a per-element index
                r.block = _ops.block_shape(tuple(r.w.shape), r.mode)
                r.gi = None
        out.append(r)
    return mesh, out


_MESH_INFO: dict = {}  # mesh -> (process group, local rank): resolving them costs ~0.5 ms


def _mesh_info(mesh):
    """(group, local rank) of a mesh object (by identity: a re-initialised process group comes
    with new mesh objects)."""
    info = _MESH_INFO.get(id(mesh))
    if info is None or info[0] is not mesh:
        if len(_MESH_INFO) > 16:
            _MESH_INFO.clear()
        info = _MESH_INFO[id(mesh)] = (mesh, mesh.get_group(), mesh.get_local_rank())
    return info[1:]


def _all_reduce(buf, mesh):
    import torch.distributed as dist

    dist.all_reduce(buf, group=_mesh_info(mesh)[0])


def _group_sums(r, x):
    """float64 per-group sums of x (one value per local element) over r's local elements."""
    if r.block is not None:
        a, b, c = r.block
        if x.numel():
            return x.reshape(a, b, c).sum((0, 2), dtype=torch.float64)
        return torch.zeros(r.ng, dtype=torch.float64, device=x.device)
    s = torch.zeros(r.ng, dtype=torch.float64, device=x.device)
    return s.index_add_(0, r.gi, x) if x.numel() else s


def _per_element(r, v, x):
    """x (one value per local element) times its group's entry of v."""
    if r.block is not None:
        a, b, c = r.block
        return (x.reshape(a, b, c) * v.reshape(1, b, 1)).reshape(-1)
    return v[r.gi] * x


def _local_kernels(rs, grads=None, lr=None):
    """accumulate_ (grads given; returns the float64 value) or prox_ on local shards, with the
    kernels; a group spanning shards is switched off here and added after the collective."""
    pairs = [(r, g) for r, g in zip(rs, grads if grads is not None else [None] * len(rs))
             if r.w.numel()]
    if not pairs:
        return torch.zeros((), dtype=torch.float64)
    coefs, modes, gidx = [], [], []
    for r, _ in pairs:
        local_groups = r.mode != MODE_NONE and not r.span
        coefs += [r.l1, r.l2, r.gl if local_groups else 0.0]
        modes.append(r.mode if local_groups else MODE_NONE)
        if local_groups and r.mode == MODE_EXPLICIT:  # a replicated tensor: the full index
            gidx.append(r.idx)
    ws = [r.w for r, _ in pairs]
    gs = [g for _, g in pairs] if grads is not None else None
    with torch.no_grad():
        done, out = _local_onepass(ws, gs, coefs, modes, lr)
        if done:
            return out.to(torch.float64).cpu() if gs is not None else None
        if gs is not None:
            out = _ops._run_accumulate(ws, gs, coefs, modes, gidx, [0] * len(ws))
            torch._C._increment_version(gs)
            return out.to(torch.float64).cpu()
        _ops._run_prox(ws, lr, coefs, modes, gidx)
        torch._C._increment_version(ws)
    return None


def _local_onepass(ws, gs, coefs, modes, lr):
    """The one-pass host/CUDA launch of the plain eager path for local shards with one strength
    triple and a named or no grouping (FSDP2's usual call), where it applies: (True, value or
    None); (False, None) otherwise."""
    if len(set(zip(coefs[0::3], coefs[1::3], coefs[2::3]))) != 1 or len(set(modes)) != 1 \
            or modes[0] == MODE_EXPLICIT:
        return False, None
    tensors = ws + (gs or [])
    if (len(set(map(_DTYPE, tensors))) != 1 or ws[0].dtype not in _FLOAT_PAIR
            or len(set(map(_DEVICE, tensors))) != 1 or not all(map(_IS_CONTIGUOUS, tensors))
            or not _ops.host_onepass_ok(ws[0].device, "accumulate_" if lr is None else "prox_")):
        return False, None
    l1, l2, gl = coefs[:3]
    shapes = tuple(map(_SHAPE, ws)) if gl > 0.0 else tuple(map(_NUMEL, ws))
    if gs is not None:
        out = _ops.host_onepass("accumulate", shapes, map(_DATA_PTR, ws), map(_DATA_PTR, gs),
                                ws[0].dtype, l1, l2, gl, modes[0], device=ws[0].device)
        torch._C._increment_version(gs)
        return True, out
    _ops.host_onepass("prox", shapes, map(_DATA_PTR, ws), None, ws[0].dtype, l1, l2, gl,
                      modes[0], lr, device=ws[0].device)
    torch._C._increment_version(ws)
    return True, None


def _local_grads(rs):
    """Each DTensor parameter's local gradient shard (a zero DTensor .grad is made for None)."""
    grads = []
    for i, r in enumerate(rs):
        if r.p.grad is None:
            r.p.grad = torch.zeros_like(r.p)
        g = r.p.grad
        if type(g) is not type(r.p) or g.placements != r.p.placements:
            raise TypeError(f"fastreg.penalty.accumulate_: tensor {i} is a DTensor with "
                            f"placements {r.p.placements}, but its .grad is "
                            f"{getattr(g, 'placements', type(g).__name__)}")
        gl = g.to_local()
        if gl.layout is not torch.strided:
            raise TypeError("fastreg.penalty.accumulate_: only dense (strided) gradients are "
                            f"supported, got {gl.layout}")
        _ops.check_grad(r.w, gl, f"tensor {i} of params (local shard)", "its .grad",
                        "fastreg.penalty.accumulate_")
        grads.append(gl)
    return grads


def _dtensor_accumulate(params, l1, l2, group_lasso, groups, global_value):
    mesh, rs = _dtensor_records(params, "accumulate_", l1, l2, group_lasso, groups)
    if not rs:
        return torch.zeros((), dtype=torch.float32)
    grads = _local_grads(rs)
    coord0 = _mesh_info(mesh)[1] == 0
    rep = [(r, g) for r, g in zip(rs, grads) if r.replicated]
    shd = [(r, g) for r, g in zip(rs, grads) if not r.replicated]
    v_rep = _local_kernels([r for r, _ in rep], [g for _, g in rep])
    v_shd = _local_kernels([r for r, _ in shd], [g for _, g in shd])
    span = [(r, g) for r, g in shd if r.span]
    collective = bool(span) or (global_value and bool(shd))
    if not collective:  # replicated tensors only, or this rank's share of local groups
        return (v_shd + (v_rep if coord0 or not shd else 0.0)).to(torch.float32)
    share = v_shd + (v_rep if coord0 else 0.0)  # shares sum to the global value
    dev = rs[0].w.device
    # named groups: squares in the parameter's dtype summed in float64 (a float64 copy of
    # every shard cost more than the kernels); index groups in float64
    w64 = [r.w.detach().reshape(-1) if r.block is not None
           else r.w.detach().reshape(-1).to(torch.float64) for r, _ in span]
    parts = [_group_sums(r, w * w) for (r, _), w in zip(span, w64)]
    head = [share.reshape(1).to(dev)] if global_value else []
    buf = torch.cat(head + parts)
    _all_reduce(buf, mesh)  # the call's one collective
    value = buf[0].cpu() if global_value else share
    at = len(head)
    group_value = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for (r, g), w, part in zip(span, w64, parts):
            nrm = buf[at:at + r.ng].sqrt()
            at += r.ng
            tg = r.gl * r.cnt.to(nrm.device).sqrt()
            group_value = group_value + (tg * nrm).sum().cpu()
            scale = torch.where(nrm > 0, tg / torch.where(nrm > 0, nrm, 1.0), 0.0)  # subgradient 0
            if w.numel():
                g.add_(_per_element(r, scale.to(w.dtype), w).reshape(g.shape).to(g.dtype))
    if global_value or coord0:
        value = value + group_value
    return value.to(torch.float32)


def _dtensor_prox(params, lr, l1, l2, group_lasso, groups):
    mesh, rs = _dtensor_records(params, "prox_", l1, l2, group_lasso, groups)
    _local_kernels([r for r in rs if not r.span], lr=lr)
    span = [r for r in rs if r.span]
    if not span:
        return
    zs = []
    for r in span:
        w = r.w.detach().reshape(-1).to(torch.float64)
        zs.append(torch.sign(w) * torch.clamp(w.abs() - lr * r.l1, min=0.0))  # soft threshold
    parts = [_group_sums(r, z * z) for r, z in zip(span, zs)]
    buf = torch.cat(parts)
    _all_reduce(buf, mesh)  # the call's one collective
    at = 0
    with torch.no_grad():
        for r, z in zip(span, zs):
            nrm = buf[at:at + r.ng].sqrt()
            at += r.ng
            tg = lr * r.gl * r.cnt.to(nrm.device).sqrt()
            f = torch.where(nrm > 0, torch.clamp(1.0 - tg / torch.where(nrm > 0, nrm, 1.0),
                                                 min=0.0), 0.0)
            if z.numel():
                r.w.copy_((_per_element(r, f, z) / (1.0 + 2.0 * lr * r.l2)).reshape(r.w.shape))
        torch._C._increment_version([r.w for r in span])


def _dtensor_sparsity(params, groups, global_value):
    mesh, rs = _dtensor_records(params, "sparsity", 0.0, 0.0, 0.0, groups, all_groups=True)
    shd = [r for r in rs if not r.replicated]
    collective = bool(shd) and (global_value or any(r.span or r.mode == MODE_NONE for r in shd))
    # replicated tensors count once where shares are summed
    count_rep = _mesh_info(mesh)[1] == 0 or not collective
    counts = torch.zeros(4, dtype=torch.float64)  # zero weights, weights, zero groups, groups
    parts, span = [], []
    for r in rs:
        if r.replicated and not count_rep:
            continue
        w = r.w.detach()
        counts[0] += int((w == 0).sum())
        counts[1] += w.numel()
        nonzero = (w.reshape(-1) != 0).to(torch.float64)
        if r.mode == MODE_NONE and not r.replicated:  # the tensor is one group, on all shards
            parts.append(nonzero.sum().reshape(1).to(w.device))
            span.append(1)
        elif r.span:
            parts.append(_group_sums(r, nonzero))
            span.append(r.ng)
        elif w.numel():  # the groups are whole on this rank
            gi, k = _ops.group_index(tuple(w.shape), r.mode, r.idx, w.device)
            nz = torch.zeros(k, dtype=torch.float64, device=w.device).index_add_(0, gi, nonzero)
            counts[2] += int((nz == 0).sum())
            counts[3] += k
    if collective:
        dev = rs[0].w.device
        head = [counts.to(dev)] if global_value else []
        buf = torch.cat(head + parts)
        _all_reduce(buf, mesh)  # the call's one collective
        buf = buf.cpu()
        if global_value:
            counts = buf[:4].clone()
        at = len(head) * 4
        for k in span:
            if global_value or _mesh_info(mesh)[1] == 0:  # each spanning group once
                counts[2] += int((buf[at:at + k] == 0).sum())
                counts[3] += k
            at += k
    nz, n, zg, ng = (int(x) for x in counts.tolist())
    return {"weights": nz / n if n else 0.0, "groups": zg / ng if ng else 0.0,
            "zero_groups": zg, "num_groups": ng}


def _loss_strength(v, name, n, device):
    """A strength of penalty.loss as an n-long float64 vector (one entry per tensor), still
    attached to the caller's tensor when that requires grad."""
    if isinstance(v, torch.Tensor):
        if not v.dtype.is_floating_point:
            raise TypeError(f"fastreg.penalty.loss: {name} must be a float tensor, got {v.dtype}")
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != n):
            raise ValueError(f"fastreg.penalty.loss: {name} must be a number, a 0-dim tensor or a "
                             f"1-D tensor with one entry per tensor of params ({n}), got shape "
                             f"{tuple(v.shape)}")
        # a data-dependent check: eager only (torch.compile traces without reading values)
        if not torch.compiler.is_compiling() and not (
                bool(torch.isfinite(v).all()) and bool((v >= 0).all())):
            raise ValueError(f"fastreg.penalty.loss: {name} must be finite and >= 0")
        v64 = v.to(device=device, dtype=torch.float64)
        return v64.expand(n) if v.dim() == 0 else v64
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"fastreg.penalty.loss: {name} has {len(v)} entries but params has {n}")
        vals = [_real(x, f"{name}[{i}]", "penalty.loss") for i, x in enumerate(v)]
        return torch.tensor(vals, dtype=torch.float64, device=device)
    return torch.full((n,), _real(v, name, "penalty.loss"), dtype=torch.float64, device=device)


def loss(params, *, l1=0.0, l2=0.0, group_lasso=0.0, groups=None) -> torch.Tensor:
    """The penalty as a differentiable scalar, to add to a loss:

        total = task_loss + fastreg.penalty.loss(weights, l1=..., l2=..., group_lasso=..., groups=...)

    P = sum_i l1_i |w_i|_1 + l2_i |w_i|^2 + group_lasso_i sum_g sqrt(|g|) ||w_{i,g}||, with
    groups as in accumulate_ (a name, an index tensor, or a list with one of those or None
    per tensor; a None there means that tensor has no group term). Unlike accumulate_, it can sit inside a closure that autograd
    differentiates (ReversibleSGD.reverse), so the strengths get hypergradients.

    params: a tensor or an iterable of tensors (not param-group dicts). Each strength is a
    number, a list with one number per tensor, a 0-dim tensor (shared) or a 1-D tensor with
    one entry per tensor; tensors that require grad receive d P / d strength.
    The value is float64 if any tensor is float64, else float32 (sums in float64). The
    gradient with respect to the tensors comes from the fused penalty kernels (one pass over
    all tensors); double backward (Hessian-vector products) is supported and is exact away
    from w = 0 for the L1 term and from all-zero groups for the group term, where the
    subgradient 0 and a zero Hessian are used (fastreg/ops/penalty_loss.py).
    Under torch.compile the penalty is traced as torch ops (no graph break; the compiler fuses
    them) with the same subgradients, instead of calling the fused kernels; the strengths'
    value checks (finite, >= 0) run in eager mode only, and index-tensor groups (read when
    the call is set up) break the graph: use named groups there.
    """
    from fastreg.ops import penalty_loss as PL

    ws = _as_list(params)
    if not isinstance(ws, (list, tuple)):
        raise TypeError(f"fastreg.penalty.loss: params must be a tensor or an iterable of tensors, "
                        f"got {type(params).__name__}")
    ws = list(ws)
    for i, w in enumerate(ws):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"fastreg.penalty.loss: params[{i}] must be a tensor, got "
                            f"{type(w).__name__} (param-group dicts are not accepted here)")
        if type(w) not in (torch.Tensor, torch.nn.Parameter):
            # the fused kernels read raw storage: a subclass (DTensor, ...) must not reach them
            raise TypeError(f"fastreg.penalty.loss: params[{i}] is a {type(w).__name__}; only plain "
                            "tensors and Parameters are accepted")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fastreg.penalty.loss: params[{i}] must be float32, float64, float16 "
                            f"or bfloat16, got {w.dtype}")
        if w.layout is not torch.strided:
            raise TypeError(f"fastreg.penalty.loss: params[{i}] must be dense, got {w.layout}")
        if w.device != ws[0].device:
            raise ValueError(f"fastreg.penalty.loss: params must all be on one device, got "
                             f"{ws[0].device} and {w.device}")
    n = len(ws)
    if n == 0:
        return torch.zeros((), dtype=torch.float32)
    device = ws[0].device
    c1 = _loss_strength(l1, "l1", n, device)
    c2 = _loss_strength(l2, "l2", n, device)
    cg = _loss_strength(group_lasso, "group_lasso", n, device)
    if isinstance(groups, (list, tuple)):
        if len(groups) != n:
            raise ValueError(f"fastreg.penalty.loss: groups has {len(groups)} entries but params "
                             f"has {n}")
        specs = [_group_spec(g, w, "loss", f"groups[{i}]") for i, (g, w) in enumerate(zip(groups, ws))]
    else:
        specs = [_group_spec(groups, w, "loss", "groups") for w in ws]
    modes = [m for m, _ in specs]
    compiling = torch.compiler.is_compiling()
    if isinstance(group_lasso, torch.Tensor):  # (values unread under torch.compile)
        gl_vals = [0.0] * n if compiling else cg.detach().tolist()
    elif isinstance(group_lasso, (list, tuple)):
        gl_vals = [float(g) for g in group_lasso]
    else:
        gl_vals = [float(group_lasso)] * n
    for i, (m, g) in enumerate(zip(modes, gl_vals)):
        # a None in a per-tensor list opts that tensor out of the group term
        if g > 0.0 and m == MODE_NONE and not isinstance(groups, (list, tuple)):
            raise ValueError(f"fastreg.penalty.loss: group_lasso={g} for params[{i}] needs groups "
                             "('rows', 'cols', 'filters', 'channels' or an index tensor)")
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in ws) else torch.float32
    spec = PL.Spec(ws, modes, [e for _, e in specs], out_dtype)
    if compiling:
        # traced as torch ops (inductor fuses the reductions), with the eager path's subgradients
        return PL.traced_loss(spec, c1, c2, cg, ws)
    return PL.PenaltyLoss.apply(spec, c1, c2, cg, *ws)

