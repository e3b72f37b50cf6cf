"""Sparsifying variational dropout (Molchanov, Ashukha & Vetrov 2017, "Variational
Dropout Sparsifies Deep Neural Networks").

Each weight w_ij carries Gaussian multiplicative noise, w_ij (1 + sqrt(alpha_ij) eps),
i.e. variance sigma_ij^2 = alpha_ij w_ij^2. With the local reparameterisation trick the
noise is drawn on the layer's output instead of on its weights:

    mean = x W^T + b,   var = (x^2) (sigma^2)^T,   out = mean + sqrt(var + eps) * z

and the last line is the fused op fastreg.ops.variational.vd_sample (z from the fastreg
RNG, regenerated in backward, never stored). The parameters are W and log sigma^2
(the paper's additive reparameterisation); log alpha = log sigma^2 - log W^2 is clipped
to [-8, 8]. Weights with log alpha >= threshold (3) are pruned at evaluation, which is
deterministic: out = x (W * [log alpha < 3])^T + b.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastreg._seed import check_stream
from fastreg.ops.variational import vd_sample

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0


class VariationalDropoutLinear(nn.Module):
    """A Linear layer with sparsifying variational dropout.

    Args:
        in_features, out_features, bias: as torch.nn.Linear.
        threshold: weights with log alpha >= threshold are pruned in eval mode (3.0,
            i.e. alpha > 20: the weight's noise dwarfs its value).
        init_log_sigma2: initial log sigma^2 of every weight (-10: almost no noise).
        eps: added to the output variance under the square root (d/dvar finite at 0).
        stream: RNG stream of this layer's noise (layers sharing a seed differ by stream).
    Training: call forward in train mode and add ``kl_weight * layer.kl()`` (the sum over
    weights of the paper's KL approximation) to the data term of the loss, whose data
    term is the sum (not the mean) over the training set, i.e. N * mean cross-entropy.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 threshold: float = 3.0, init_log_sigma2: float = -10.0, eps: float = 1e-8,
                 stream: int = 0, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"fastreg.nn.VariationalDropoutLinear: {name} must be a "
                                 f"positive int, got {v!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"fastreg.nn.VariationalDropoutLinear: bias must be a bool, "
                            f"got {bias!r}")
        for name, v in (("threshold", threshold), ("init_log_sigma2", init_log_sigma2),
                        ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"fastreg.nn.VariationalDropoutLinear: {name} must be a finite "
                                 f"number, got {v!r}")
        if eps < 0:
            raise ValueError(f"fastreg.nn.VariationalDropoutLinear: eps must be >= 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.eps = float(threshold), float(eps)
        check_stream(stream, "nn.VariationalDropoutLinear")
        self.stream = int(stream)  # the op folds it at each call (fastreg.distributed)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.log_sigma2 = nn.Parameter(torch.full((out_features, in_features),
                                                  float(init_log_sigma2), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(init_log_sigma2)

    def reset_parameters(self, init_log_sigma2: float = -10.0) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as torch.nn.Linear
        with torch.no_grad():
            self.log_sigma2.fill_(init_log_sigma2)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def log_alpha(self) -> torch.Tensor:
        """log alpha = log sigma^2 - log W^2, clipped to [-8, 8]."""
        la = self.log_sigma2 - torch.log(self.weight * self.weight + 1e-8)
        return la.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def mask(self) -> torch.Tensor:
        """True where a weight survives pruning (log alpha < threshold)."""
        return self.log_alpha() < self.threshold

    def pruned_weight(self) -> torch.Tensor:
        return self.weight * self.mask().to(self.weight.dtype)

    def forward(self, input: torch.Tensor, *, seed=None) -> torch.Tensor:
        if not self.training:
            return F.linear(input, self.pruned_weight(), self.bias)
        la = self.log_alpha()
        mean = F.linear(input, self.weight, self.bias)
        var = F.linear(input * input, torch.exp(la) * (self.weight * self.weight))
        return vd_sample(mean, var, seed=seed, stream=self.stream, eps=self.eps)

    def _local_log_alpha(self):
        """(log alpha of the weights held here, process group to sum over or None): under
        FSDP2 (DTensor parameters outside forward) the local shards'."""
        from fastreg.distributed import dtensor_locals

        (w, ls), group = dtensor_locals(self.weight, self.log_sigma2)
        la = (ls - torch.log(w * w + 1e-8)).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        return la, group

    def kl(self) -> torch.Tensor:
        """KL(q || log-uniform prior) summed over the weights, by the paper's approximation
        -KL ~ k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1 (>= 0 here).

        Under FSDP2 (sharded DTensor parameters) the global sum, a plain tensor: one
        all-reduce, whose backward gives each shard its own terms' gradient."""
        la, group = self._local_log_alpha()
        neg_kl = K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1
        if group is None:
            return -neg_kl.sum()
        from fastreg.distributed import sum_across_ranks

        return sum_across_ranks(-neg_kl.sum(), group)

    @torch.no_grad()
    def _pruned_counts(self):
        la, group = self._local_log_alpha()
        c = torch.tensor([float((~(la < self.threshold)).sum()), float(la.numel())],
                         dtype=torch.float64, device=la.device)
        if group is not None:  # one all-reduce (FSDP2)
            import torch.distributed as dist

            dist.all_reduce(c, group=group)
        return int(c[0]), int(c[1])

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of weights pruned in eval mode (log alpha >= threshold); under FSDP2 over
        the full weight (one all-reduce)."""
        pruned, total = self._pruned_counts()
        return pruned / total if total else 0.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, stream={self.stream}")


def total_kl(model: nn.Module) -> torch.Tensor:
    """Sum of .kl() over every VariationalDropoutLinear in model."""
    terms = [m.kl() for m in model.modules() if isinstance(m, VariationalDropoutLinear)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def total_sparsity(model: nn.Module) -> float:
    """Fraction of the weights of every VariationalDropoutLinear in model that are pruned."""
    pruned = total = 0
    for m in model.modules():
        if isinstance(m, VariationalDropoutLinear):
            a, b = m._pruned_counts()
            pruned += a
            total += b
    return pruned / total if total else 0.0
