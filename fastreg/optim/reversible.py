"""ReversibleSGD: exactly reversible momentum SGD and hypergradients through training.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through
Reversible Learning", ICML 2015, made practical: fixed-point w and v, the bits that
the multiplication by gamma destroys kept in a per-element streaming arithmetic code
(a 64-bit head per element plus 32-bit spill words), fused kernels for the forward
step and for the two halves of the reverse step. The maths is in docs/reversible.md.

    opt = ReversibleSGD(model.parameters(), lr=lr_schedule, momentum=0.9)
    for t in range(T):
        opt.zero_grad(); loss_fn(model, batch(t)).backward(); opt.step()
    opt.reverse(lambda: val_loss(model), lambda t: loss_fn(model, batch(t)))
    lr_schedule.grad, [p.grad for p in model.parameters()]   # hypergradients
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import torch

from fastreg.ops import reversible as K

_HYPERS = ("lr", "momentum", "weight_decay")
# The information-buffer code's layout, saved in state_dict: version 1 pushed v's low bits
# before popping the symbol (until 2026-11-28); version 2 pops first (docs/reversible.md).
CODER_VERSION = 2


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _data(p: torch.Tensor) -> torch.Tensor:
    """The plain tensor the kernels read and write for parameter p: p.data, or the local shard
    of a DTensor parameter (FSDP2), sharing its storage."""
    d = p.data
    if type(d) in _PLAIN:
        return d
    from torch.distributed.tensor import DTensor

    if isinstance(d, DTensor):
        with torch.no_grad():
            return d.to_local()
    raise TypeError(f"ReversibleSGD: parameters must be plain tensors or DTensors, got a "
                    f"{type(d).__module__}.{type(d).__qualname__}")


class ReversibleOverflowError(OverflowError):
    """A value left the fixed-point range (or a gradient was not finite)."""


class NondeterministicClosureError(RuntimeError):
    """reverse() did not recover w_0 bit for bit: closure(t) did not recompute the forward run's
    gradients. `step`: the first step met (reverse runs from the last step backwards) whose
    recomputed gradients differed from the forward run's (None where unknown); `ranks`: the ranks (of the
    DDP group; [0] without one) whose closure(step) gave other gradients when called twice."""

    def __init__(self, msg: str, step: int | None = None, ranks: list | None = None):
        super().__init__(msg)
        self.step, self.ranks = step, list(ranks or [])


def _fingerprints(gs: list) -> torch.Tensor:
    """int64 checksums (one per tensor, on the first one's device) of flat float32/float64
    gradients: the wrapping sum of each one's bit patterns in their own width (one reduction
    each, order-independent: the same on every device and backend)."""
    sums = [g.view(torch.int32 if g.dtype == torch.float32 else torch.int64).sum(dtype=None if
            g.dtype == torch.float64 else torch.int32) for g in gs]
    dev = sums[0].device
    if all(s.dtype == sums[0].dtype and s.device == dev for s in sums):
        return torch.stack(sums).to(torch.int64)
    return torch.stack([s.to(device=dev, dtype=torch.int64) for s in sums])


def _culprit_text(step, ranks, world: int) -> str:
    if step is None:
        return ("No step's recomputed gradients differed from the forward run's fingerprints "
                "(unknown: steps loaded from a checkpoint without them)")
    first = ("Reversing from the last step, the recomputed gradients first differed at "
             f"step {step}")
    if ranks:
        where = "closure" if world == 1 else "the closure of rank(s) " + str(ranks)
        return (f"{first}; {where} gave other gradients when closure({step}) was called twice at "
                "the same parameters: a nondeterministic closure (unseeded random numbers, "
                "nondeterministic kernels)")
    if world > 1:
        return (f"{first}, but closure({step}) repeated itself on every rank: it differs from the "
                "forward run deterministically (another batch, seed or model) on some rank, which "
                "the averaged gradients cannot name")
    return (f"{first}, but closure({step}) repeated itself: it differs from the forward run "
            "deterministically (another batch, seed or model)")


class ReversibleSGD(torch.optim.Optimizer):
    """Momentum SGD whose training run can be undone bit for bit.

    Update of step t (paper form, v0 = 0), per parameter group:
        v <- gamma_t * v - (1 - gamma_t) * (g + lambda_t * w)
        w <- w + alpha_t * v
    w and v are integers times 2^-frac_bits; gamma_t is rounded to n_t / 2^momentum_bits.

    Args:
        params: parameters or parameter groups (groups may carry their own lr,
            momentum, weight_decay).
        lr (alpha), momentum (gamma), weight_decay (lambda): a float, a 0-dim tensor
            (constant), or a 1-D tensor of length T (one value per step: a schedule).
            Tensors with requires_grad receive hypergradients in `.grad` from `reverse`.
        frac_bits: F, the fixed-point resolution 2^-F; values must stay below
            2^(62-F) in magnitude (default 44: resolution 5.7e-14, range 262144).
        momentum_bits: k, gamma is represented as n / 2^k (default 16).
        backend: None (by device: Numba on CPU, CUDA C++ on GPU), "numba", "cpp" (the
            C++ host build of the CUDA header), "cuda" or "torch" (the reference).

    The parameters are rounded to the fixed-point grid when they join the optimizer,
    so the model only ever sees values that `reverse` can restore exactly.
    A parameter whose `.grad` is None is stepped with a zero gradient.
    """

    def __init__(self, params, lr, momentum, *, weight_decay=0.0, frac_bits: int = 44,
                 momentum_bits: int = 16, backend: str | None = None):
        if not isinstance(frac_bits, int) or not 8 <= frac_bits <= 60:
            raise ValueError(f"frac_bits must be an int in [8, 60], got {frac_bits!r}")
        if not isinstance(momentum_bits, int) or not 2 <= momentum_bits <= 24:
            raise ValueError(f"momentum_bits must be an int in [2, 24], got {momentum_bits!r}")
        if backend not in (None, "numba", "cpp", "cuda", "torch"):
            raise ValueError(f"backend must be None, 'numba', 'cpp', 'cuda' or 'torch', got {backend!r}")
        self.frac_bits = frac_bits
        self.momentum_bits = momentum_bits
        self.scale = 2.0**frac_bits
        self.inv_scale = 2.0**-frac_bits
        self._backend_name = backend
        self._t = 0
        self._checksums: dict[int, str] = {}
        # per step, the fingerprints of the gradients step() applied (one int64 per parameter,
        # _fingerprints), to find the first step whose gradients reverse() recomputes differently;
        # None for steps loaded from a checkpoint without them, or with DTensor parameters
        self._gfp: list = []
        self._broken: str | None = None
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    # ------------------------------------------------------------ set-up
    @property
    def range(self) -> float:
        """Largest magnitude a weight or velocity may take: 2^(62 - frac_bits)."""
        return 2.0 ** (62 - self.frac_bits)

    @property
    def resolution(self) -> float:
        return self.inv_scale

    @property
    def steps(self) -> int:
        """Steps taken (and not yet reversed)."""
        return self._t

    def add_param_group(self, param_group: dict) -> None:
        if self._t != 0:
            raise RuntimeError("ReversibleSGD: parameter groups can only be added before the first step")
        super().add_param_group(param_group)
        try:
            self._set_up_group(len(self.param_groups) - 1)
        except BaseException:
            # refused as a whole: no half-added group (without state) is left for step()
            for p in self.param_groups.pop()["params"]:
                self.state.pop(p, None)
            raise

    def _set_up_group(self, gi: int) -> None:
        group = self.param_groups[gi]
        for name in _HYPERS:
            _check_hyper(group[name], name)
        m = group["momentum"]
        vals = m.detach().reshape(-1).tolist() if isinstance(m, torch.Tensor) else [m]
        for x in vals:
            if not 0.0 < x <= 1.0 or round(x * 2**self.momentum_bits) < 2:
                raise ValueError(f"momentum must lie in (0, 1] and be at least 2^-{self.momentum_bits - 1} "
                                 f"(momentum_bits={self.momentum_bits}), got {x!r}")
        for pi, p in enumerate(group["params"]):
            if p.device.type == "meta":
                raise TypeError(f"params: {self._pname(gi, pi)} is a meta tensor (no data); "
                                "ReversibleSGD needs parameters with values")
            if p.layout is not torch.strided:
                raise TypeError(f"params: {self._pname(gi, pi)} has layout {p.layout}; ReversibleSGD "
                                "takes dense (strided) parameters")
            if p.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise TypeError(f"params: {self._pname(gi, pi)} has dtype {p.dtype}; ReversibleSGD "
                                "takes float16, bfloat16, float32 or float64 parameters")
            self._init_state(p, gi, pi)

    def _pname(self, gi: int, pi: int) -> str:
        names = self.param_groups[gi].get("param_names") if gi < len(self.param_groups) else None
        p = self.param_groups[gi]["params"][pi]
        base = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"parameter {names[pi]!r} = {base}" if names else f"parameter {base}"

    def _params_where(self):
        """All parameters in group order, and each one's (group index, index in the group)."""
        params = [p for g in self.param_groups for p in g["params"]]
        where = [(gi, pi) for gi, g in enumerate(self.param_groups)
                 for pi in range(len(g["params"]))]
        return params, where

    def _check_size(self, p: torch.Tensor, st: dict, gi: int, pi: int) -> None:
        """The kernels write p through raw pointers, sized by the state: a parameter whose
        `.data` was replaced by one of another size is refused before they run (step() checks
        the gradient's size itself)."""
        n = st["w"].numel()
        if p.numel() != n:  # p: the plain tensor or a DTensor's local shard
            raise ValueError(f"ReversibleSGD: {self._pname(gi, pi)} has {p.numel()} elements, but its "
                             f"state was made for {n} (was .data replaced?); build a new optimizer")

    def _init_state(self, p: torch.Tensor, gi: int, pi: int) -> None:
        # only add_param_group (torch's __init__ calls it too) gets here, and it refuses after step 0
        with torch.no_grad():
            x = _data(p).to(torch.float64).reshape(-1) * self.scale
            if not bool(torch.isfinite(x).all()) or bool((x.abs() >= 2.0**62).any()):
                raise ReversibleOverflowError(
                    f"ReversibleSGD: {self._pname(gi, pi)} has values outside the fixed-point range "
                    f"|w| < {self.range:g} (frac_bits={self.frac_bits}) or non-finite values")
            w = torch.round(x).to(torch.int64)
            st = self.state[p]
            st["w"] = w
            st["v"] = torch.zeros_like(w)
            st["head"] = torch.full_like(w, K.L)
            st["count"] = torch.zeros(w.numel(), dtype=torch.int32, device=w.device)
            st["spill"] = torch.zeros((0, w.numel()), dtype=torch.int32, device=w.device)
            st["bound"] = 0
            self._write_param(p, w)

    def _write_param(self, p: torch.Tensor, w: torch.Tensor) -> None:
        d = _data(p)
        d.copy_((w.to(torch.float64) * self.inv_scale).view_as(d))

    # ------------------------------------------------------------ hyperparameters
    def _hyper(self, group: dict, name: str, t: int) -> float:
        h = group[name]
        if isinstance(h, torch.Tensor):
            if h.dim() == 0:
                return float(h.detach())
            if t >= h.shape[0]:
                raise ValueError(f"ReversibleSGD: the {name} schedule has {h.shape[0]} steps; step {t} "
                                 "needs a longer one")
            return float(h[t].detach())
        return float(h)

    def _step_consts(self, group: dict, t: int):
        alpha = self._hyper(group, "lr", t)
        n = int(round(self._hyper(group, "momentum", t) * 2**self.momentum_bits))
        lam = self._hyper(group, "weight_decay", t)
        gamma = n / 2.0**self.momentum_bits
        omg = 1.0 - gamma  # exact: n / 2^k is a dyadic rational
        return alpha, n, gamma, omg, omg * self.scale, lam

    def quantized_momentum(self, group_index: int = 0, t: int = 0) -> float:
        """The momentum the run really uses at step t: n / 2^momentum_bits."""
        return self._step_consts(self.param_groups[group_index], t)[2]

    # ------------------------------------------------------------ kernels plumbing
    def _backend(self, p: torch.Tensor) -> str:
        if self._backend_name is not None:
            return self._backend_name
        return K.backend_for(p.device)

    def _backends(self):
        """p -> backend, chosen once per device for one pass over the parameters (the choice
        reads FASTREG_BACKEND: about 4 us, a tenth of a small parameter's step)."""
        chosen = {}

        def of(p: torch.Tensor) -> str:
            b = chosen.get(p.device)
            if b is None:
                b = chosen[p.device] = self._backend(p)
            return b
        return of

    @staticmethod
    def _fbuf(p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _out_view(self, p: torch.Tensor):
        """A flat float32/float64 buffer the kernel writes the new parameter values into."""
        if p.dtype in (torch.float32, torch.float64) and p.data.is_contiguous():
            return p.data.view(-1), False
        return torch.empty(p.numel(), dtype=self._fbuf(p), device=p.device), True

    def _flat(self, t: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
        want = self._fbuf(p)
        if t is None:
            return torch.zeros(p.numel(), dtype=want, device=p.device)
        if t.dtype is want and not t.requires_grad and t.is_contiguous():
            return t.view(-1)  # the common case, without three no-op conversions
        return t.detach().to(want).contiguous().view(-1)

    def _ensure_capacity(self, st: dict) -> None:
        cap = st["spill"].shape[0]
        if st["bound"] + 1 <= cap:
            return
        st["bound"] = int(st["count"].max()) if st["count"].numel() else 0
        if st["bound"] + 1 <= cap:
            return
        grow = max(8, cap // 4)
        spill = st["spill"]
        new = torch.zeros((cap + grow, spill.shape[1]), dtype=spill.dtype, device=spill.device)
        new[:cap] = spill
        st["spill"] = new

    def _check_ok(self):
        if self._broken is not None:
            raise RuntimeError(f"ReversibleSGD: the state is invalid after an earlier error ({self._broken}); "
                               "load a checkpoint or build a new optimizer")

    def _raise(self, code: int, gi: int, pi: int, t: int, where: str) -> None:
        what = []
        if code & K.BAD_NONFINITE:
            what.append("a non-finite (or huge) gradient")
        if code & K.BAD_V_RANGE:
            what.append(f"a velocity outside the fixed-point range |v| < {self.range:g}")
        if code & K.BAD_W_RANGE:
            what.append(f"a weight outside the fixed-point range |w| < {self.range:g}")
        if code & K.BAD_CAPACITY:
            what.append("an information buffer without room (internal error)")
        msg = (f"ReversibleSGD {where} step {t}: {self._pname(gi, pi)} got " + " and ".join(what)
               + f" (frac_bits={self.frac_bits}: resolution 2^-{self.frac_bits}, range 2^{62 - self.frac_bits};"
               " lower frac_bits for more range)")
        self._broken = msg
        raise ReversibleOverflowError(msg)

    def _w0_lost(self, here: list, where: str, why: str, step=None, ranks=None) -> None:
        """reverse() ended away from w_0: the state no longer holds a training run, so the optimizer
        refuses to step until a checkpoint is loaded. `here`: this rank's parameters that missed
        (named in parentheses after `where`)."""
        self._broken = "w_0 was not recovered"
        raise NondeterministicClosureError(
            f"ReversibleSGD.reverse: w_0 was not recovered bit for bit {where}"
            + (" (here: " + ", ".join(here) + ")" if here else "") + why, step=step, ranks=ranks)

    def _checksum(self, st: dict) -> str:
        return hashlib.blake2b(st["w"].cpu().numpy().tobytes(), digest_size=16).hexdigest()

    # ------------------------------------------------------------ forward
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One exact step. `closure`, if given, recomputes the loss (and its gradients)."""
        self._check_ok()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self._t
        grads = self._local_grads()  # all checked before any parameter changes
        if t == 0:
            self._checksums = {id(p): self._checksum(self.state[p])
                               for g in self.param_groups for p in g["params"]}
        consts = [self._step_consts(g, t) for g in self.param_groups]
        backend = self._backends()
        # no fingerprints of DTensor (FSDP2) parameters: their gradient shards differ by rank
        fps = [] if all(type(p) in _PLAIN for g in self.param_groups for p in g["params"]) else None
        k = 0
        for gi, group in enumerate(self.param_groups):
            alpha, n, _gamma, _omg, c1s, lam = consts[gi]
            for pi, p in enumerate(group["params"]):
                st = self.state[p]
                p, grad = _data(p), grads[k]  # plain tensors (a DTensor's local shards)
                k += 1
                self._check_size(p, st, gi, pi)
                if grad is not None and grad.numel() != st["w"].numel():
                    raise ValueError(f"ReversibleSGD: {self._pname(gi, pi)} has a gradient of "
                                     f"{grad.numel()} elements for {st['w'].numel()} weights")
                self._ensure_capacity(st)
                g = self._flat(grad, p)
                if fps is not None:
                    fps.append(g)
                out, copy = self._out_view(p)
                code = K.fwd_step(backend(p), st["w"], st["v"], st["head"], st["count"],
                                  st["spill"], g, out, self.momentum_bits, n, alpha, c1s, lam,
                                  self.inv_scale)
                if copy:
                    p.copy_(out.view_as(p))
                st["bound"] += 1
                if code:
                    self._raise(code, gi, pi, t, "forward")
        self._gfp.append(_fingerprints(fps) if fps else None)
        self._t = t + 1
        return loss

    def _local_grads(self) -> list:
        """Every parameter's gradient as the kernels read it (None, a plain dense tensor, or a
        DTensor gradient's local shard), in group order; sparse and other non-strided gradients
        (nn.Embedding(sparse=True)) are refused, naming the parameter."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is not None and type(g) not in _PLAIN:
                    g = _data(g)
                if g is not None and g.layout is not torch.strided:
                    raise TypeError(f"ReversibleSGD: {self._pname(gi, pi)} has a {g.layout} gradient; "
                                    "only dense gradients can be stepped exactly (for an embedding, "
                                    "use nn.Embedding(..., sparse=False))")
                out.append(g)
        return out

    # ------------------------------------------------------------ reverse
    def reverse(self, objective, closure: Callable[[int], torch.Tensor], *,
                inputs: Iterable[torch.Tensor] | None = None, ddp=None, fsdp=None) -> torch.Tensor:
        """Backward through training: restores w_0 exactly and accumulates hypergradients.

        objective: the scalar to differentiate (a tensor computed from the final
            parameters, or a callable returning it).
        closure(t): recomputes step t's training loss from the current parameters
            (same batch, same random seeds as in the forward run).
        inputs: meta-parameters to differentiate (default: every leaf tensor that
            requires grad in the graphs of the objective and the training losses,
            other than the parameters).

        Accumulates into `.grad`: lr / momentum / weight_decay tensors that require
        grad (per step for schedules) and the meta-parameters (zero theirs first: the
        forward run's backward() calls accumulated into them too). The parameters'
        `.grad` is replaced by d objective / d w_0. Returns the objective's value. Raises
        NondeterministicClosureError (a RuntimeError) when w_0 is not recovered bit for bit (a
        nondeterministic closure), with `.step`: the first step met, from the last one back,
        whose recomputed gradients differ from the fingerprints step() kept of the forward
        run's, and `.ranks`: the ranks whose closure(step), called once more there, gave other
        gradients (a nondeterministic closure; empty if it repeated itself, i.e. it differs from
        the forward run deterministically).

        ddp: the DistributedDataParallel module the forward run trained (step() after its
            backward, i.e. after the gradient all-reduce). closure(t) and objective run the
            same DDP forward; reverse runs them under ddp.no_sync() and averages, over
            ddp.process_group, the recomputed gradients as DDP does (times 1/world size, then
            summed: bit-identical to the forward run's), the Hessian-vector products and the
            objective's gradients (each rank's objective is its share of the mean). Every rank
            restores w_0; a rank whose state differs from the majority's (on a tie, rank 0's) is
            named in the error, and so is a rank whose closure does not repeat itself (above):
            every rank raises, none hangs. docs/distributed.md.
        fsdp: the fully_shard-ed (FSDP2) module the forward run trained (step() after its
            backward, on the reduce-scattered shards); needed when the parameters are DTensors.
            closure(t) runs twice per step: once as in training (FSDP2's forward, backward and
            reduce-scatter give the gradients step() applied, bit for bit; the .grad it touches
            is put back), and once with every FSDPModule unsharded (resharding and gradient sync
            off, put back afterwards) for the Hessian-vector product: its direction is
            all-gathered, the full products averaged over the mesh's ranks in float64 and each
            rank keeps its rows. The objective runs unsharded too (each rank's objective is its
            share of the mean); the lr, momentum and weight decay terms are summed over the
            ranks. Every rank restores its shards of w_0 and raises, naming the ranks that
            missed, if any did (the step is not known: no fingerprints of sharded gradients).
            The gradients written to .grad are DTensors laid out as the parameters. Takes
            FSDP2's Shard(0) on a 1-D mesh (not HSDP or FSDP + TP). docs/distributed.md.
        """
        self._check_ok()
        if not callable(closure):
            raise TypeError("closure must be a callable closure(t) returning the training loss of step t")
        params, where = self._params_where()
        if fsdp is not None and ddp is not None:
            raise ValueError("ReversibleSGD.reverse: pass ddp= or fsdp=, not both")
        fs = None
        if fsdp is not None:
            fs = _FullyShardedDP(fsdp, params, lambda i: self._pname(*where[i]))
        elif any(type(p) not in _PLAIN for p in params):
            raise ValueError(
                "ReversibleSGD.reverse: the parameters are DTensors (FSDP2's fully_shard); pass "
                "reverse(..., fsdp=model), the fully_shard-ed module the forward run trained")
        dp = _DataParallel(ddp)
        if dp.group is not None:
            self._check_ranks(dp, "before reverse")
        # the plain tensors the kernels read and write: the parameters, or their local shards
        loc = {id(p): (p if type(p) in _PLAIN else _data(p)) for p in params}
        for p, (gi, pi) in zip(params, where):  # (.grad is replaced at the end)
            self._check_size(loc[id(p)], self.state[p], gi, pi)
        pids = {id(p) for p in params}
        T = self._t
        if T == 0:  # no step to undo: the weights are w_0 (step() fingerprints them at its first call)
            self._checksums = {id(p): self._checksum(self.state[p]) for p in params}
        fixed_inputs = None if inputs is None else [x for x in inputs if id(x) not in pids]

        if fs is not None:  # the mean over ranks of their objectives; this rank's rows of its gradient
            obj, gr, metas = fs.objective(objective, fixed_inputs, pids)
        else:
            with torch.enable_grad(), dp.no_sync():
                obj = objective() if callable(objective) else objective
                if not isinstance(obj, torch.Tensor) or obj.numel() != 1:
                    raise ValueError("objective must be a scalar tensor (or a callable returning one)")
                metas = fixed_inputs if fixed_inputs is not None else _leaves(obj, pids)
                gr = torch.autograd.grad(obj, params + metas, allow_unused=True) if obj.requires_grad \
                    else [None] * (len(params) + len(metas))
        if dp.group is not None:  # the mean over ranks of their objectives
            red = dp.mean64(list(gr) + [obj.detach().reshape(())], list(params) + list(metas) + [obj])
            gr, obj = red[:-1], red[-1].to(obj.dtype)
        dw = {id(p): (gr[i].detach().to(torch.float64).reshape(-1).clone() if gr[i] is not None
                      else torch.zeros(loc[id(p)].numel(), dtype=torch.float64, device=p.device))
              for i, p in enumerate(params)}
        dv = {id(p): torch.zeros(loc[id(p)].numel(), dtype=torch.float64, device=p.device)
              for p in params}
        meta_acc: dict[int, list] = {}
        for m, gm in zip(metas, gr[len(params):]):
            _acc(meta_acc, m, gm, 1.0)
        hyp = {(gi, name): torch.zeros(T, dtype=torch.float64) for gi in range(len(self.param_groups))
               for name in _HYPERS}

        backend = self._backends()

        def consts_of(t):
            return [self._step_consts(g, t) for g in self.param_groups]

        def restore(p, gi, t, consts_t, step_t1=None):
            """Step t's restore of p (w_{t+1} -> w_t, d alpha_t, dv += alpha dw), alone or in one
            pass after step t+1's rev_step (step_t1: its arguments and constants). Returns the
            HVP direction u of step t, and the rev_step's (status, d gamma, dv.w) if any."""
            alpha, n, gamma, omg, c1s, lam = consts_t[gi]
            st = self.state[p]
            d = loc[id(p)]
            out, copy = self._out_view(d)
            u = torch.empty(d.numel(), dtype=self._fbuf(d), device=d.device)
            rev = None
            if step_t1 is None:
                da = K.rev_restore(backend(d), st["w"], st["v"], dw[id(p)], dv[id(p)], u, out,
                                   alpha, omg, self.inv_scale)
            else:
                args, consts_t1 = step_t1
                *rev, da = K.rev_step_restore(*args, u, out, *consts_t1, alpha, omg, self.inv_scale)
            if copy:
                d.data.copy_(out.view_as(d))
            hyp[(gi, "lr")][t] += da
            return u, rev

        first_bad, culprits = None, []
        consts = consts_of(T - 1) if T else []
        with torch.no_grad():
            us = [restore(p, gi, T - 1, consts)[0] for p, (gi, pi) in zip(params, where)] if T else []
        for t in range(T - 1, -1, -1):
            consts_prev = consts_of(t - 1) if t > 0 else None
            if fs is not None:  # FSDP2's own gradients (one closure), then the mean HVP (another)
                gs = fs.gradients(closure, t, params, pids)
                hv, metas_t = fs.hvp(closure, t, us, fixed_inputs, pids)
                outs = gouts = loss = gs_local = None
            else:
                with torch.enable_grad(), dp.no_sync():
                    loss = closure(t)
                    _check_loss(loss, t)
                    metas_t = fixed_inputs if fixed_inputs is not None else _leaves(loss, pids)
                    gs = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    outs, gouts = [], []
                    for p, g, u in zip(params, gs, us):
                        if g is not None and g.requires_grad:
                            outs.append(g)
                            gouts.append(u.to(g.dtype).view_as(g))
                    hv = torch.autograd.grad(outs, params + metas_t, grad_outputs=gouts,
                                             allow_unused=True) \
                        if outs else [None] * (len(params) + len(metas_t))
                gs_local = gs
            if dp.group is not None:  # the forward run's gradients, and the mean HVP
                gs = dp.ddp_mean(gs, params)
                hv = dp.mean64(hv, list(params) + list(metas_t))
            if first_bad is None and self._gradients_differ(t, gs, params):
                # the first step whose (averaged) gradients are not the forward run's: the
                # parameters still hold w_t, so each rank can ask whether its closure(t) repeats
                first_bad = t
                culprits = self._unrepeatable_ranks(dp, closure, t, gs_local, params)
            with torch.no_grad():
                for m, hm in zip(metas_t, hv[len(params):]):
                    _acc(meta_acc, m, hm, -1.0)
                next_us = []
                for i, (p, (gi, pi)) in enumerate(zip(params, where)):
                    alpha, n, gamma, omg, c1s, lam = consts[gi]
                    st = self.state[p]
                    d = loc[id(p)]
                    g = self._flat(gs[i], d)
                    h = self._flat(hv[i], d)
                    args = (backend(d), st["w"], st["v"], st["head"], st["count"], st["spill"], g, h,
                            dw[id(p)], dv[id(p)])
                    rev_consts = (self.momentum_bits, n, gamma, c1s, lam, omg)
                    if t > 0:  # this step's rev_step and step t-1's restore, in one pass
                        u, (code, dg, dl) = restore(p, gi, t - 1, consts_prev, step_t1=(args, rev_consts))
                        next_us.append(u)
                    else:
                        code, dg, dl = K.rev_step(*args, *rev_consts, self.inv_scale)
                    if code:
                        self._raise(code, gi, pi, t, "reverse")
                    hyp[(gi, "momentum")][t] += dg
                    hyp[(gi, "weight_decay")][t] += -omg * dl
                us, consts = next_us, consts_prev
            del gs, hv, outs, gouts, loss
            self._t = t

        # -- bit-exact recovery check
        bad = []
        for p, (gi, pi) in zip(params, where):
            st = self.state[p]
            ok = self._checksum(st) == self._checksums.get(id(p))
            ok = ok and bool((st["head"] == K.L).all()) and bool((st["count"] == 0).all())
            if not ok:
                bad.append(self._pname(gi, pi))
        if fs is not None:
            bad_ranks = fs.ranks_where(bool(bad))
            if bad_ranks:
                self._w0_lost(
                    bad, f"on rank(s) {bad_ranks} of {fs.world}", ": the gradients recomputed by "
                    "closure(t) under FSDP2 (their local shards) were not bit-identical to those of the "
                    "forward run (a nondeterministic closure, or one that differs from the forward run: "
                    "another batch, seed or model, on some rank). The step is unknown: step() keeps no "
                    "gradient fingerprints of sharded parameters")
        if dp.group is not None:
            bad_ranks = dp.ranks_where(bool(bad))
            if bad_ranks:
                self._w0_lost(
                    bad, f"on rank(s) {bad_ranks} of {dp.world}", ": the gradients recomputed by "
                    "closure(t) and averaged over the ranks were not bit-identical to those of the "
                    "forward run. " + _culprit_text(first_bad, culprits, dp.world),
                    step=first_bad, ranks=culprits)
            self._check_ranks(dp, "after reverse")
        if bad:
            self._w0_lost(
                [], "for " + ", ".join(bad), ": the gradients recomputed by closure(t) were not "
                "bit-identical to those of the forward run (a nondeterministic closure: different "
                "batches, random seeds, or nondeterministic kernels; under DistributedDataParallel, "
                "pass reverse(..., ddp=model)). " + _culprit_text(first_bad, culprits, 1),
                step=first_bad, ranks=culprits)
        self._gfp = []
        if fs is not None:  # each rank's lr, momentum and weight decay terms are its shards' share
            fs.sum_(list(hyp.values()))

        # -- write the hypergradients
        with torch.no_grad():
            for p in params:
                d = loc[id(p)]
                gw = dw[id(p)].view_as(d).to(p.dtype)
                if d is not p:  # a DTensor parameter: its gradient is a DTensor of the same layout
                    if p.grad is None:
                        p.grad = fs.like(p, gw)
                    else:
                        _data(p.grad).copy_(gw)
                else:
                    p.grad = gw if p.grad is None else p.grad.copy_(gw)
                st = self.state[p]
                st["bound"] = 0  # the buffer is empty again: release its spill rows
                st["spill"] = torch.zeros((0, st["spill"].shape[1]), dtype=torch.int32, device=p.device)
            for gi, group in enumerate(self.param_groups):
                for name in _HYPERS:
                    h = group[name]
                    if isinstance(h, torch.Tensor) and h.requires_grad:
                        d = hyp[(gi, name)]
                        d = d.sum() if h.dim() == 0 else torch.nn.functional.pad(d, (0, h.shape[0] - T))
                        d = d.to(device=h.device, dtype=h.dtype)
                        h.grad = d.clone() if h.grad is None else h.grad.add_(d)
            for m, acc in meta_acc.values():
                d = acc.to(m.dtype)
                m.grad = d if m.grad is None else m.grad.add_(d)
        return obj.detach()

    def _state_hash(self, plain_only: bool = False) -> int:
        """A 63-bit hash of the whole optimizer state (steps, w, v, information buffers and
        gradient fingerprints); plain_only: of the plain (not DTensor) parameters' state only."""
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self._t).encode())
        for g in self.param_groups:
            for p in g["params"]:
                if plain_only and type(p.data) not in _PLAIN:
                    continue
                st = self.state[p]
                used = int(st["count"].max()) if st["count"].numel() else 0
                for key in ("w", "v", "head", "count"):
                    h.update(st[key].cpu().numpy().tobytes())
                h.update(st["spill"][:used].cpu().numpy().tobytes())
        for f in self._gfp:
            h.update(b"-" if f is None else f.cpu().numpy().tobytes())
        return int.from_bytes(h.digest(), "little") >> 1

    def _check_ranks(self, dp, when: str) -> None:
        diverged = dp.ranks_differing(self._state_hash())
        if diverged:
            raise RuntimeError(
                f"ReversibleSGD ({when}): the optimizer state of rank(s) {diverged} differs from the "
                f"majority's (of {dp.world} ranks; on a tie, from rank 0's); under DistributedDataParallel "
                "every rank must hold the same state (a rank that stepped with other gradients, loaded "
                "another checkpoint, or changed its parameters)")

    def _gradients_differ(self, t: int, gs, params) -> bool:
        """Whether the gradients reverse() recomputed for step t (averaged over the ranks under
        DDP) have other fingerprints than those step() applied (False where unknown)."""
        ref = self._gfp[t] if t < len(self._gfp) else None
        if ref is None or ref.numel() != len(params):
            return False
        got = _fingerprints([self._flat(g, p) for g, p in zip(gs, params)])
        return not torch.equal(got.to(ref.device), ref)

    def _unrepeatable_ranks(self, dp, closure, t: int, gs_local, params) -> list:
        """The ranks whose closure(t), called again at the same parameters, gives gradients other
        than its first call's: one more closure(t) on every rank and, under DDP, one all-reduce
        (every rank gets here together: the averaged gradients and the fingerprints are the same
        on every rank)."""
        with torch.enable_grad(), dp.no_sync():
            again = torch.autograd.grad(closure(t), params, allow_unused=True)
        differs = any(not torch.equal(self._flat(a, p), self._flat(b, p))
                      for a, b, p in zip(gs_local, again, params))
        if dp.group is not None:
            return dp.ranks_where(differs)
        return [0] if differs else []

    def check_ranks(self, ddp) -> None:
        """Raise RuntimeError naming the ranks (of ddp.process_group) whose optimizer state
        differs from the majority's (on a tie, the state of the lowest rank among the largest
        groups: rank 0's with 2 ranks); one all-reduce."""
        self._check_ranks(_DataParallel(ddp), "check_ranks")

    # ------------------------------------------------------------ checkpoints
    def state_dict(self):
        sd = super().state_dict()
        # torch packs the live per-parameter dicts: copy each before trimming its spill, so that
        # saving leaves the optimizer as it was
        for k, s in list(sd["state"].items()):
            if "spill" in s:
                used = int(s["count"].max()) if s["count"].numel() else 0
                sd["state"][k] = {**s, "spill": s["spill"][:used].clone()}
        sd["reversible"] = dict(t=self._t, checksums=[self._checksums.get(id(p)) for g in self.param_groups
                                                      for p in g["params"]],
                                frac_bits=self.frac_bits, momentum_bits=self.momentum_bits,
                                coder=CODER_VERSION, grad_fingerprints=self._gfp_table())
        return sd

    def _gfp_table(self):
        """The gradient fingerprints for a checkpoint: dict(table=(steps, parameters) int64 CPU
        tensor, first=the first step they are known from), or None when there are none."""
        known = [i for i, f in enumerate(self._gfp) if f is not None]
        if not known or known != list(range(known[0], len(self._gfp))) or len(self._gfp) != self._t:
            return None
        rows = [self._gfp[i].cpu() for i in known]
        table = torch.zeros((self._t, rows[0].numel()), dtype=torch.int64)
        table[known[0]:] = torch.stack(rows)
        return dict(table=table, first=known[0])

    def _set_gfp(self, saved, t: int, n: int) -> None:
        dev = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        if saved is None or saved["table"].shape != (t, n):
            self._gfp = [None] * t
        else:
            self._gfp = [None if i < saved["first"] else saved["table"][i].to(dev).clone()
                         for i in range(t)]

    def load_state_dict(self, state_dict):
        sd = dict(state_dict)
        extra = sd.pop("reversible", None)
        if extra is None:
            raise ValueError("state_dict: not a ReversibleSGD state dict (no 'reversible' entry)")
        self._check_format(extra)
        saved_state = sd["state"]
        params, where = self._params_where()
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            raise ValueError(f"state_dict: it holds {len(ids)} parameters, this optimizer {len(params)}")
        for (gi, pi), p, i in zip(where, params, ids):  # all checked before anything changes
            if i not in saved_state:
                raise ValueError(f"state_dict: no state for {self._pname(gi, pi)}")
            self._check_loaded(saved_state[i], p, gi, pi)
        super().load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
        for p, i in zip(params, ids):
            s = saved_state[i]
            st = self.state[p]
            for key in ("w", "v", "head", "count"):
                st[key] = s[key].to(p.device).clone()
            spill = s["spill"].to(p.device)
            st["spill"] = torch.cat([spill, torch.zeros((8, spill.shape[1]), dtype=spill.dtype,
                                                        device=p.device)])
            st["bound"] = spill.shape[0]
            with torch.no_grad():
                self._write_param(p, st["w"])
        self._t = extra["t"]
        self._checksums = {id(p): c for p, c in zip(params, extra["checksums"])}
        self._set_gfp(extra.get("grad_fingerprints"), self._t, len(params))
        self._broken = None

    def _check_format(self, extra: dict) -> None:
        if extra.get("coder", 1) != CODER_VERSION:
            raise ValueError(f"state_dict: its information buffer was written by coder version "
                             f"{extra.get('coder', 1)} (an earlier fastreg); this version reads version "
                             f"{CODER_VERSION} only and could not reverse it")
        if extra["frac_bits"] != self.frac_bits or extra["momentum_bits"] != self.momentum_bits:
            raise ValueError(f"state_dict: saved with frac_bits={extra['frac_bits']}, momentum_bits="
                             f"{extra['momentum_bits']}; this optimizer has {self.frac_bits}, {self.momentum_bits}")

    def _check_loaded(self, s: dict, p: torch.Tensor, gi: int, pi: int) -> None:
        """A loaded state must fit its parameter and keep the coder's invariants: the kernels
        index the spill by count and write through raw pointers sized by w."""
        n, where = _data(p).numel(), self._pname(gi, pi)
        for key, dt in (("w", torch.int64), ("v", torch.int64), ("head", torch.int64),
                        ("count", torch.int32)):
            t = s.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 1 or t.numel() != n:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state_dict: '{key}' of {where} must be a 1-D {dt} tensor of {n} "
                                 f"elements, got {got}")
        sp = s.get("spill")
        if not isinstance(sp, torch.Tensor) or sp.dtype != torch.int32 or sp.dim() != 2 or sp.shape[1] != n:
            raise ValueError(f"state_dict: 'spill' of {where} must be an int32 tensor of shape "
                             f"(words, {n})")
        c, h = s["count"], s["head"]
        if n and (int(c.min()) < 0 or int(c.max()) > sp.shape[0] or int(h.min()) < K.L):
            raise ValueError(f"state_dict: the information buffer of {where} is inconsistent (counts "
                             f"outside [0, {sp.shape[0]}] or heads below 2^31): not a checkpoint of "
                             "this optimizer, or a damaged one")

    # ------------------------------------------------------------ torch.distributed.checkpoint
    def dcp_state_dict(self, checkpoint=None, *, prefix: str = "optim", process_group=None) -> dict:
        """The optimizer state as torch.distributed.checkpoint (DCP) saves and loads it.

        Per parameter p (key: its index in group order): "w", "v", "head", "count" shaped like p,
        "spill" (words, *p.shape), and "w0_hash" (the checksum reverse() checks w_0 against).
        With a DTensor p (FSDP2) they are DTensors on p's mesh with p's placements (spill: the
        shard dim moved one right; w0_hash: one 3-word piece per rank), so each rank saves and
        loads its own shard; with a plain p they are plain tensors, which DCP saves once
        (replicated: identical on every rank, as under DDP). Plus "param_groups" (the
        hyperparameters) and "reversible" (steps, fixed-point format, gradient fingerprints).

        Saving (checkpoint=None): a view of the live state (the spill copied), to hand to
        dcp.save at once. Under torch.distributed (process_group: the one given to dcp.save,
        default the default group) it costs one all_gather: the ranks agree on the spill's
        word count, and a rank whose plain parameters' state, step count or gradient
        fingerprints differ from the majority's raises on every rank, naming it (DCP would
        otherwise keep one rank's copy and silently drop the others).

        Loading (checkpoint: the checkpoint's path, a StorageReader or its Metadata): a zeroed
        destination sized from the checkpoint's metadata (the spill's words, the steps), found
        under the key `prefix` (the key the dict was saved under; "" for the top level). It
        checks, without communicating, that the checkpoint holds as many parameters with the
        same shapes and that this rank's shard of each is one the checkpoint holds (same world
        size and sharding), raising ValueError naming the parameter otherwise. dcp.load fills
        it; then call load_dcp_state_dict on it.

            dcp.save({"model": model.state_dict(), "optim": opt.dcp_state_dict()}, checkpoint_id=path)
            ...
            sd = {"model": model.state_dict(), "optim": opt.dcp_state_dict(path)}
            dcp.load(sd, checkpoint_id=path)
            opt.load_dcp_state_dict(sd["optim"])
        """
        params, where = self._params_where()
        if checkpoint is None:
            return self._dcp_save_dict(params, where, process_group)
        return self._dcp_template(params, where, _dcp_metadata(checkpoint), prefix)

    def _dcp_save_dict(self, params, where, process_group) -> dict:
        used = [int(self.state[p]["count"].max()) if self.state[p]["count"].numel() else 0 for p in params]
        words = list(used)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            world = dist.get_world_size(process_group)
            dev = next((p.device for p in params if p.device.type == "cuda"), torch.device("cpu"))
            mine = torch.tensor([self._state_hash(plain_only=True)] + used, dtype=torch.int64, device=dev)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine, group=process_group)
            every = torch.stack(every).cpu()
            odd = _odd_ones(every[:, 0].tolist())
            if odd:
                raise RuntimeError(
                    f"ReversibleSGD.dcp_state_dict: the state of the plain (replicated) parameters, the "
                    f"step count or the gradient fingerprints of rank(s) {odd} differ from the majority's "
                    f"(of {world} ranks; on a tie, from rank 0's); DCP saves a plain tensor once, as "
                    "if replicated, so the checkpoint would hold one rank's state only")
            words = every[:, 1:].max(dim=0).values.tolist() if params else []
        state = {}
        for i, (p, (gi, pi), w) in enumerate(zip(params, where, words)):
            st = self.state[p]
            n = st["w"].numel()
            spill = torch.zeros((w, n), dtype=torch.int32, device=st["spill"].device)
            u = used[i]
            spill[:u] = st["spill"][:u]
            state[str(i)] = self._dcp_param(p, gi, pi, dict(
                w=st["w"], v=st["v"], head=st["head"], count=st["count"], spill=spill,
                w0_hash=_hash_words(self._checksums.get(id(p)), st["w"].device)))
        fp = self._gfp_table()
        extra = dict(t=self._t, frac_bits=self.frac_bits, momentum_bits=self.momentum_bits,
                     coder=CODER_VERSION, num_params=len(params))
        if fp is not None:
            extra.update(grad_fp=fp["table"], grad_fp_first=fp["first"])
        groups = {str(gi): {name: (g[name].detach() if isinstance(g[name], torch.Tensor) else g[name])
                            for name in _HYPERS} for gi, g in enumerate(self.param_groups)}
        return {"state": state, "param_groups": groups, "reversible": extra}

    def _dcp_param(self, p, gi: int, pi: int, flat: dict) -> dict:
        """Each flat local state tensor shaped like p (plain), or as a DTensor on p's mesh."""
        d = _data(p)
        if type(p.data) in _PLAIN:
            out = {k: flat[k].view(p.shape) for k in ("w", "v", "head", "count")}
            out["spill"] = flat["spill"].view((flat["spill"].shape[0], *p.shape))
            out["w0_hash"] = flat["w0_hash"]
            return out
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh, pls = p.device_mesh, p.placements
        shifted = []
        for pl in pls:
            if type(pl) is Shard:
                shifted.append(Shard((pl.dim % p.dim()) + 1))
            elif type(pl) is Replicate:
                shifted.append(pl)
            else:
                raise NotImplementedError(f"ReversibleSGD.dcp_state_dict: {self._pname(gi, pi)} has placement "
                                          f"{pl}; Shard and Replicate placements are supported")

        def dt(local, placements, shape):
            return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                                      stride=_contiguous_strides(shape))
        out = {k: dt(flat[k].view(d.shape), pls, p.shape) for k in ("w", "v", "head", "count")}
        W = flat["spill"].shape[0]
        out["spill"] = dt(flat["spill"].view((W, *d.shape)), shifted, (W, *p.shape))
        out["w0_hash"] = dt(flat["w0_hash"], [Shard(0)] * mesh.ndim, (3 * mesh.size(),))
        return out

    def _dcp_template(self, params, where, md, prefix: str) -> dict:
        sdm = md.state_dict_metadata
        pre = prefix + "." if prefix else ""

        def meta(key):
            return sdm.get(pre + key)
        if meta("reversible.t") is None:
            raise ValueError(f"ReversibleSGD.dcp_state_dict: the checkpoint holds no ReversibleSGD state "
                             f"under {prefix!r} (pass prefix=, the key the optimizer state was saved under)")
        n_saved = 0
        while meta(f"state.{n_saved}.w") is not None:
            n_saved += 1
        if n_saved != len(params):
            raise ValueError(f"ReversibleSGD.dcp_state_dict: the checkpoint holds {n_saved} parameters, this "
                             f"optimizer {len(params)}")
        state = {}
        for i, (p, (gi, pi)) in enumerate(zip(params, where)):
            name = self._pname(gi, pi)
            mw, ms, mh = meta(f"state.{i}.w"), meta(f"state.{i}.spill"), meta(f"state.{i}.w0_hash")
            if tuple(mw.size) != tuple(p.shape) or ms is None or tuple(ms.size)[1:] != tuple(p.shape):
                raise ValueError(f"ReversibleSGD.dcp_state_dict: {name} was saved with shape "
                                 f"{tuple(mw.size)}; a checkpoint of another model")
            d = _data(p)
            plain = type(p.data) in _PLAIN
            if plain:
                offset, lshape, pieces = (0,) * p.dim(), tuple(p.shape), 1
            else:
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                lshape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                pieces = p.device_mesh.size()
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in mw.chunks]
            have = "[" + ", ".join(f"offsets {o} sizes {z}" for o, z in chunks) + "]"
            if (d.numel() and (tuple(offset), tuple(lshape)) not in chunks) or tuple(mh.size) != (3 * pieces,):
                raise ValueError(
                    f"ReversibleSGD.dcp_state_dict: {name} was saved as {mh.size[0] // 3} piece(s) {have}; "
                    f"this rank holds offsets {tuple(offset)} sizes {tuple(lshape)} of {pieces} piece(s). "
                    "Load with the same world size and sharding (DDP or fully_shard of the same modules) "
                    "as the run that saved it")
            W = ms.size[0]
            n = d.numel()
            dev = d.device
            flat = {k: torch.zeros(n, dtype=torch.int64, device=dev) for k in ("w", "v", "head")}
            flat["count"] = torch.zeros(n, dtype=torch.int32, device=dev)
            flat["spill"] = torch.zeros((W, n), dtype=torch.int32, device=dev)
            flat["w0_hash"] = torch.zeros(3, dtype=torch.int64, device=dev)
            state[str(i)] = self._dcp_param(p, gi, pi, flat)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        groups = {}
        for gi, g in enumerate(self.param_groups):
            groups[str(gi)] = {}
            for name in _HYPERS:
                m = meta(f"param_groups.{gi}.{name}")
                if m is None:
                    raise ValueError(f"ReversibleSGD.dcp_state_dict: the checkpoint has no {name} for "
                                     f"param_groups[{gi}] ({len(self.param_groups)} groups here)")
                groups[str(gi)][name] = (torch.zeros(tuple(m.size), dtype=m.properties.dtype)
                                         if isinstance(m, TensorStorageMetadata) else None)
        extra = dict(t=0, frac_bits=0, momentum_bits=0, coder=0, num_params=0)
        m = meta("reversible.grad_fp")
        if m is not None:
            extra.update(grad_fp=torch.zeros(tuple(m.size), dtype=torch.int64), grad_fp_first=0)
        return {"state": state, "param_groups": groups, "reversible": extra}

    def load_dcp_state_dict(self, state_dict: dict) -> None:
        """Load a dict made by dcp_state_dict; every rank takes its own shards.

        The dict: a destination filled by dcp.load, or one made for saving. Everything is
        checked before anything changes. Hyperparameter tensors are loaded in place, so a
        schedule tensor that requires grad keeps receiving the hypergradients; floats are
        replaced. No communication."""
        extra = state_dict.get("reversible")
        if not isinstance(extra, dict) or "t" not in extra:
            raise ValueError("load_dcp_state_dict: not a dict made by ReversibleSGD.dcp_state_dict")
        self._check_format(extra)
        params, where = self._params_where()
        if extra["num_params"] != len(params) or len(state_dict["state"]) != len(params):
            raise ValueError(f"load_dcp_state_dict: it holds {extra['num_params']} parameters, this "
                             f"optimizer {len(params)}")
        loaded = []
        for i, (p, (gi, pi)) in enumerate(zip(params, where)):
            s = state_dict["state"].get(str(i))
            if s is None:
                raise ValueError(f"load_dcp_state_dict: no state for {self._pname(gi, pi)}")
            n = _data(p).numel()
            flat = {k: _local(s[k]).reshape(-1) for k in ("w", "v", "head", "count")}
            sp = _local(s["spill"])
            flat["spill"] = sp.reshape(sp.shape[0], -1) if sp.dim() >= 1 and sp.shape[0] else sp.reshape(0, n)
            self._check_loaded(flat, p, gi, pi)
            h = _local(s["w0_hash"])
            if h.dtype != torch.int64 or h.numel() != 3:
                raise ValueError(f"load_dcp_state_dict: 'w0_hash' of {self._pname(gi, pi)} must be "
                                 "3 int64 words")
            loaded.append((flat, _hash_hex(h)))
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"load_dcp_state_dict: it holds {len(state_dict['param_groups'])} parameter "
                             f"groups, this optimizer {len(self.param_groups)}")
        hypers = []
        for gi, g in enumerate(self.param_groups):
            for name in _HYPERS:
                v = state_dict["param_groups"][str(gi)][name]
                _check_hyper(v, name)
                hypers.append((g, name, v))
        t = extra["t"]
        fp = extra.get("grad_fp")
        if fp is not None and tuple(fp.shape) != (t, len(params)):
            raise ValueError(f"load_dcp_state_dict: grad_fp has shape {tuple(fp.shape)}, expected "
                             f"({t}, {len(params)})")
        # -- all checked: load
        for g, name, v in hypers:
            h = g[name]
            if isinstance(h, torch.Tensor) and isinstance(v, torch.Tensor) and h.shape == v.shape:
                with torch.no_grad():
                    h.copy_(v.to(device=h.device, dtype=h.dtype))
            else:
                g[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v
        self._checksums = {}
        for p, (flat, hx) in zip(params, loaded):
            st = self.state[p]
            for key in ("w", "v", "head", "count"):
                st[key] = flat[key].to(p.device).clone()
            spill = flat["spill"].to(p.device)
            st["spill"] = torch.cat([spill, torch.zeros((8, spill.shape[1]), dtype=spill.dtype,
                                                        device=p.device)])
            st["bound"] = spill.shape[0]
            if hx is not None:
                self._checksums[id(p)] = hx
            with torch.no_grad():
                self._write_param(p, st["w"])
        self._t = t
        saved_fp = None if fp is None else dict(table=fp.cpu(), first=extra["grad_fp_first"])
        self._set_gfp(saved_fp, t, len(params))
        self._broken = None

    # ------------------------------------------------------------ accounting
    def buffer_bits(self) -> dict:
        """Information-buffer size: bits stored (64 per head + 32 per spill word in use), allocated
        (heads + spill capacity), and the information held (32 per word + log2(head) - 31 per element)."""
        used = alloc = nel = 0
        info = 0.0
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                used += 64 * st["head"].numel() + 32 * int(st["count"].to(torch.int64).sum())
                alloc += 64 * st["head"].numel() + 32 * st["spill"].numel()
                nel += st["head"].numel()
                info += float((32.0 * st["count"].to(torch.float64)
                               + torch.log2(st["head"].to(torch.float64)) - 31.0).sum())
        return dict(used_bits=used, allocated_bits=alloc, info_bits=info, numel=nel)


class _DataParallel:
    """What reverse needs of a DistributedDataParallel module: no_sync, the process group, and
    the averages it computes (group is None without one: nothing is communicated)."""

    def __init__(self, ddp):
        self.ddp, self.group, self.world, self.rank = ddp, None, 1, 0
        if ddp is None:
            return
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"ddp must be the DistributedDataParallel module the forward run trained, "
                            f"got {type(ddp).__name__}")
        import torch.distributed as dist

        self.dist = dist
        self.group = ddp.process_group
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def no_sync(self):
        import contextlib

        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def ddp_mean(self, gs, params):
        """Gradients averaged as DDP averages them: each times 1/world in its dtype, then one
        summing all-reduce per dtype (the sum of two terms is the same in any order)."""
        out = list(gs)
        by = {}
        for i, (g, p) in enumerate(zip(gs, params)):
            by.setdefault(p.dtype, []).append(i)
        for dtype, ix in by.items():
            flat = torch.cat([(gs[i].detach() if gs[i] is not None
                               else torch.zeros_like(params[i])).reshape(-1).to(dtype)
                              * (1.0 / self.world) for i in ix])
            self.dist.all_reduce(flat, group=self.group)
            at = 0
            for i in ix:
                n = params[i].numel()
                out[i] = flat[at:at + n].view_as(params[i])
                at += n
        return out

    def mean64(self, xs, like):
        """float64 means over the ranks of the tensors xs (None as zeros of like's shape), in
        one all-reduce; returns them (float64, like's shapes)."""
        flat = torch.cat([(x.detach().to(torch.float64) if x is not None
                           else torch.zeros(l.shape, dtype=torch.float64, device=l.device)).reshape(-1)
                          for x, l in zip(xs, like)])
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world
        out, at = [], 0
        for l in like[:len(xs)]:
            n = l.numel()
            out.append(flat[at:at + n].view(l.shape))
            at += n
        return out

    def _gather_ints(self, v: int) -> list:
        t = torch.zeros(self.world, dtype=torch.int64, device=self._device())
        t[self.rank] = v
        self.dist.all_reduce(t, group=self.group)
        return t.tolist()

    def _device(self):
        return next(self.ddp.module.parameters()).device

    def ranks_where(self, flag: bool) -> list:
        return [r for r, f in enumerate(self._gather_ints(int(flag))) if f]

    def ranks_differing(self, h: int) -> list:
        return _odd_ones(self._gather_ints(h))


class _FullyShardedDP:
    """What reverse needs of an FSDP2 (fully_shard) model. The gradients step() applied are
    FSDP2's own (closure(t) and backward() as in training: its reduce-scatter, not a copy of
    it). The Hessian-vector products need a double backward, and FSDP2's graph ends at the
    unsharded parameters, not at the sharded DTensors: so the model is unsharded (no resharding,
    no gradient sync), the closure differentiated twice there with the full direction
    (all-gathered), and the full products averaged over the ranks in float64 (FSDP2 averages
    the gradients), of which each rank keeps its own rows."""

    def __init__(self, fsdp, params, pname):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(fsdp, FSDPModule):
            raise TypeError(f"fsdp must be the fully_shard-ed module (an FSDPModule) the forward run "
                            f"trained, got {type(fsdp).__name__}")
        import torch.distributed as dist

        self.dist, self.model = dist, fsdp
        self.mods = [m for m in fsdp.modules() if isinstance(m, FSDPModule)]
        for m in self.mods:  # the root stays unsharded after a forward: name the sharded parameters
            m.reshard()
        names = {id(q): n for n, q in fsdp.named_parameters()}
        self.names, self.rows, self.mesh = [], [], None
        for i, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(f"fsdp: {pname(i)} is not a parameter of the fsdp module")
            if not isinstance(p, DTensor):
                raise ValueError(f"fsdp: {pname(i)} is not sharded (not a DTensor); reverse(fsdp=) "
                                 "takes the parameters of fully_shard-ed modules")
            if p.dim() == 0:
                raise NotImplementedError(f"fsdp: {pname(i)} is a 0-dim DTensor; reverse takes "
                                          "parameters sharded on dim 0")
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"fsdp: {pname(i)} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                    "mesh; reverse takes FSDP2's Shard(0) on a 1-D mesh (not HSDP or FSDP + TP)")
            if self.mesh is None:
                self.mesh = p.device_mesh
                self.group = self.mesh.get_group()
                self.world = dist.get_world_size(self.group)
                self.rank = dist.get_rank(self.group)
            elif p.device_mesh != self.mesh:
                raise NotImplementedError(f"fsdp: {pname(i)} is on another device mesh than the "
                                          "first parameter; reverse takes one mesh")
            # FSDP2 shards dim 0 as torch.chunk does: ceil(rows / world) rows per rank, the last
            # ranks shorter or empty
            n0 = p.shape[0]
            c = -(-n0 // self.world)
            spans = [(min(r * c, n0), min(r * c + c, n0)) for r in range(self.world)]
            a, b = spans[self.rank]
            if tuple(_data(p).shape) != (b - a, *p.shape[1:]):
                raise NotImplementedError(
                    f"fsdp: {pname(i)} has a local shard of shape {tuple(_data(p).shape)} on rank "
                    f"{self.rank}; reverse expects rows {a}:{b} of {tuple(p.shape)} (torch.chunk)")
            self.names.append(names[id(p)])
            self.rows.append((spans, c))
        self.params = list(params)

    def like(self, p, local: torch.Tensor):
        """A DTensor laid out as parameter p, holding this rank's rows `local`."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    # -- the model unsharded, without resharding or gradient sync
    def _settings(self):
        """FSDP2's reshard and sync settings, to put back: it has setters for them, not getters."""
        try:
            out = []
            for m in self.mods:
                st = m._get_fsdp_state()
                out.append((st, st._auto_reshard_after_forward,
                            [(g, g.post_forward_mesh_info, g.reshard_after_backward, g.reduce_grads,
                              g.all_reduce_grads) for g in st._fsdp_param_groups]))
            return out
        except AttributeError as e:
            raise RuntimeError(f"reverse(fsdp=): this torch's FSDP2 keeps its reshard and gradient "
                               f"sync settings elsewhere ({e}); reverse cannot restore them") from e

    @staticmethod
    def _put_back(saved) -> None:
        for st, auto, groups in saved:
            st._auto_reshard_after_forward = auto
            for g, mesh_info, after_bwd, reduce, all_reduce in groups:
                g.post_forward_mesh_info = mesh_info
                g.reshard_after_backward = after_bwd
                g.reduce_grads, g.all_reduce_grads = reduce, all_reduce

    def _unsharded(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            saved = self._settings()
            try:
                for m in self.mods:
                    m.set_reshard_after_forward(False, recurse=False)
                    m.set_reshard_after_backward(False, recurse=False)
                    m.set_requires_gradient_sync(False, recurse=False)
                for m in self.mods:
                    m.unshard()
                full = dict(self.model.named_parameters())
                ups = [full[n] for n in self.names]
                if any(type(u) not in _PLAIN for u in ups):
                    raise RuntimeError("reverse(fsdp=): a parameter stayed sharded after unshard()")
                # the model's unsharded parameters: never meta-parameters
                yield ups, {id(q) for q in full.values()}
            finally:
                self._put_back(saved)
                for m in self.mods:
                    m.reshard()
        return cm()

    # -- what reverse computes under FSDP2
    def gradients(self, closure, t: int, params, pids) -> list:
        """The local shards of the gradients FSDP2 gives closure(t)'s backward() (the forward
        run's); every .grad it touches is put back."""
        saved = [p.grad for p in params]
        touched = []
        try:
            for p in params:
                p.grad = None  # else FSDP2 adds to it
            with torch.enable_grad():
                loss = closure(t)
                _check_loss(loss, t)
                touched = [(m, m.grad) for m in _leaves(loss, pids)]
                for m, _ in touched:
                    m.grad = None  # else backward() adds this step's gradient to it in place
                loss.backward()
            return [None if p.grad is None else _data(p.grad).detach().clone() for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            for m, g in touched:
                m.grad = g

    def hvp(self, closure, t: int, us, fixed_inputs, pids):
        """This rank's rows of the mean over ranks of H u (u: the local shards of the direction),
        as flat float64 tensors, then the meta-parameters' mean products; and the metas."""
        full_u = self._gather(us)
        with self._unsharded() as (ups, uids), torch.enable_grad():
            loss = closure(t)
            _check_loss(loss, t)
            metas = fixed_inputs if fixed_inputs is not None else _leaves(loss, pids | uids)
            gs = torch.autograd.grad(loss, ups, create_graph=True, allow_unused=True)
            outs, gouts = [], []
            for g, u in zip(gs, full_u):
                if g is not None and g.requires_grad:
                    outs.append(g)
                    gouts.append(u.to(device=g.device, dtype=g.dtype).view_as(g))
            hv = torch.autograd.grad(outs, ups + metas, grad_outputs=gouts, allow_unused=True) \
                if outs else [None] * (len(ups) + len(metas))
            hv = [None if h is None else h.detach() for h in hv]
            del gs, outs, gouts, loss
        return self._mean_rows(hv, metas), metas

    def objective(self, objective, fixed_inputs, pids):
        """The mean over ranks of the objective, this rank's rows of its gradient (flat float64)
        and the meta-parameters' mean gradients; and the metas."""
        with self._unsharded() as (ups, uids), torch.enable_grad():
            obj = objective() if callable(objective) else objective
            if not isinstance(obj, torch.Tensor) or obj.numel() != 1:
                raise ValueError("objective must be a scalar tensor (or a callable returning one)")
            metas = fixed_inputs if fixed_inputs is not None else _leaves(obj, pids | uids)
            gr = torch.autograd.grad(obj, ups + metas, allow_unused=True) if obj.requires_grad \
                else [None] * (len(ups) + len(metas))
        red = self._mean_rows(list(gr) + [obj.detach().reshape(())], list(metas) + [obj])
        return red[-1].to(obj.dtype), red[:-1], metas

    def _gather(self, xs) -> list:
        """The full tensors (flat float64) of the local shards xs, in one all_gather of the
        shards padded to ceil(rows / world) rows."""
        sizes = [c * (p.numel() // max(p.shape[0], 1)) for p, (spans, c) in zip(self.params, self.rows)]
        dev = self.params[0].device if self.params else torch.device("cpu")
        mine = torch.zeros(sum(sizes), dtype=torch.float64, device=dev)
        at = 0
        for x, n in zip(xs, sizes):
            mine[at:at + x.numel()] = x.reshape(-1)
            at += n
        every = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(every, mine, group=self.group)
        out, at = [], 0
        for p, (spans, c), n in zip(self.params, self.rows, sizes):
            row = p.numel() // max(p.shape[0], 1)
            out.append(torch.cat([every[r][at:at + (b - a) * row] for r, (a, b) in enumerate(spans)]))
            at += n
        return out

    def _mean_rows(self, xs, extra) -> list:
        """float64 means over the ranks, in one all-reduce, of the full tensors xs[:len(params)]
        (None as zeros; returned as this rank's rows, flat) and of xs[len(params):] (shaped like
        `extra`)."""
        shapes = [p.shape for p in self.params] + [e.shape for e in extra]
        dev = self.params[0].device if self.params else torch.device("cpu")
        flat = torch.cat([(x.detach().to(device=dev, dtype=torch.float64) if x is not None
                           else torch.zeros(s, dtype=torch.float64, device=dev)).reshape(-1)
                          for x, s in zip(xs, shapes)])
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world
        out, at = [], 0
        for i, s in enumerate(shapes):
            n = math.prod(s)
            x = flat[at:at + n]
            if i < len(self.params):
                (spans, c), p = self.rows[i], self.params[i]
                a, b = spans[self.rank]
                row = n // max(p.shape[0], 1)
                x = x[a * row:b * row]
            else:
                x = x.view(s).to(extra[i - len(self.params)].device)
            out.append(x)
            at += n
        return out

    def sum_(self, xs) -> None:
        """Sum the float64 tensors xs over the ranks, in place, in one all-reduce."""
        if not xs:
            return
        dev = self.params[0].device if self.params else torch.device("cpu")
        flat = torch.cat([x.reshape(-1) for x in xs]).to(dev)
        self.dist.all_reduce(flat, group=self.group)
        at = 0
        for x in xs:
            x.copy_(flat[at:at + x.numel()].view_as(x))
            at += x.numel()

    def ranks_where(self, flag: bool) -> list:
        dev = self.params[0].device if self.params else torch.device("cpu")
        t = torch.zeros(self.world, dtype=torch.int64, device=dev)
        t[self.rank] = int(flag)
        self.dist.all_reduce(t, group=self.group)
        return [r for r, f in enumerate(t.tolist()) if f]


def _check_loss(loss, t: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"closure({t}) must return the scalar training loss of step {t}")


def _odd_ones(values: list) -> list:
    """The indices (ranks) whose value differs from the majority's; on a tie, the reference is
    the value of the lowest index among the largest groups (index 0's with two values)."""
    counts: dict = {}
    for x in values:
        counts[x] = counts.get(x, 0) + 1
    ref = max(values, key=lambda x: counts[x]) if values else None  # max keeps the first of ties
    return [r for r, x in enumerate(values) if x != ref]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _contiguous_strides(shape) -> tuple:
    out, acc = [], 1
    for n in reversed(tuple(shape)):
        out.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(out))


def _hash_words(hexdigest, device) -> torch.Tensor:
    """A w_0 checksum (32 hex digits, or None before the first step) as 3 int64 words:
    [known, low, high]."""
    if hexdigest is None:
        return torch.zeros(3, dtype=torch.int64, device=device)
    lo, hi = torch.frombuffer(bytearray(bytes.fromhex(hexdigest)), dtype=torch.int64).tolist()
    return torch.tensor([1, lo, hi], dtype=torch.int64, device=device)


def _hash_hex(words: torch.Tensor):
    known, lo, hi = words.tolist()
    if not known:
        return None
    return torch.tensor([lo, hi], dtype=torch.int64).numpy().tobytes().hex()


def _dcp_metadata(checkpoint):
    """The Metadata of a DCP checkpoint given as a path, a StorageReader or Metadata."""
    from torch.distributed.checkpoint.metadata import Metadata

    if isinstance(checkpoint, Metadata):
        return checkpoint
    if hasattr(checkpoint, "read_metadata"):
        return checkpoint.read_metadata()
    import os

    if isinstance(checkpoint, (str, os.PathLike)):
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(checkpoint).read_metadata()
    raise TypeError(f"checkpoint must be a path, a StorageReader or a Metadata, got "
                    f"{type(checkpoint).__name__}")


def _check_hyper(h, name: str) -> None:
    if isinstance(h, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {h!r}")
    if isinstance(h, (int, float)):
        if not math.isfinite(h):
            raise ValueError(f"{name} must be finite, got {h!r}")
        if name != "lr" and h < 0:
            raise ValueError(f"{name} must be >= 0, got {h!r}")
        return
    if isinstance(h, torch.Tensor):
        if h.dim() > 1 or not h.is_floating_point():
            raise ValueError(f"{name} must be a float, a 0-dim float tensor or a 1-D float tensor "
                             f"(a schedule), got a tensor of shape {tuple(h.shape)} and dtype {h.dtype}")
        if not bool(torch.isfinite(h.detach()).all()):
            raise ValueError(f"{name} must be finite")
        return
    raise TypeError(f"{name} must be a float or a tensor, got {type(h).__name__}")


def _leaves(out: torch.Tensor, exclude: set) -> list:
    """Leaf tensors requiring grad in the autograd graph of `out`, other than `exclude`."""
    found, seen, stack = [], set(), [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            if id(var) not in exclude and all(var is not f for f in found):
                found.append(var)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _acc(store: dict, m: torch.Tensor, g, sign: float) -> None:
    if g is None:
        return
    key = id(m)
    if key not in store:
        store[key] = [m, torch.zeros(m.shape, dtype=torch.float64, device=m.device)]
    store[key][1].add_(g.detach().to(torch.float64), alpha=sign)
