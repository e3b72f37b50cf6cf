"""Noise layers: GaussianDropout, MultiplicativeNoise (learned sigma), LockedDropout,
DropConnectLinear. Each is the identity (or the plain layer) in eval mode."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fastreg._validate import check_probability
from fastreg.ops.noise import DISTS, gaussian_dropout, multiplicative_noise


class GaussianDropout(nn.Module):
    """input * (1 + sigma * eps), eps ~ N(0, 1), sigma = sqrt(p / (1 - p)) in training;
    the identity in eval. Saves nothing per element for backward.

    seed=None draws a fresh seed per call from torch's default generator; an int
    fixes the noise (the same on every call)."""

    def __init__(self, p: float = 0.5, *, seed=None):
        super().__init__()
        self.p = check_probability(p, "p", "nn.GaussianDropout")
        if self.p >= 1.0:
            raise ValueError(f"fastreg.nn.GaussianDropout: p must be in [0, 1), got {self.p}")
        self.seed = seed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gaussian_dropout(input, self.p, self.training, seed=self.seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiplicativeNoise(nn.Module):
    """input * (1 + sigma * eps) with a learned sigma, the identity in eval.

    shape: sigma's shape, broadcast over the input as torch broadcasts (right
    aligned): () for one sigma, (C, 1, 1) per channel of an NCHW input, (F,) per
    feature of the last dim. init: sigma's initial value. dist: "gaussian" or
    "uniform" (eps uniform on (-sqrt(3), sqrt(3)), unit variance). learn=False
    keeps sigma fixed (a buffer), and then nothing is saved per element.
    The sigma gradient is reduced over the broadcast dims inside the backward pass.
    sigma is not constrained: the noise is symmetric, so a sigma driven below 0 by the
    optimizer acts as |sigma|.
    """

    def __init__(self, shape=(), init: float = 0.1, *, dist: str = "gaussian",
                 learn: bool = True, seed=None):
        super().__init__()
        if isinstance(shape, numbers.Integral):
            shape = (int(shape),)
        shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"fastreg.nn.MultiplicativeNoise: shape must have sizes >= 1, "
                             f"got {shape}")
        if isinstance(init, bool) or not isinstance(init, numbers.Real) or not math.isfinite(init):
            raise TypeError(f"fastreg.nn.MultiplicativeNoise: init must be a finite number, "
                            f"got {init!r}")
        if dist not in DISTS:
            raise ValueError(f"fastreg.nn.MultiplicativeNoise: dist must be one of {DISTS}, "
                             f"got {dist!r}")
        sigma = torch.full(shape, float(init))
        if learn:
            self.sigma = nn.Parameter(sigma)
        else:
            self.register_buffer("sigma", sigma)
        self.dist = dist
        self.seed = seed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return input
        return multiplicative_noise(input, self.sigma, dist=self.dist,
                                    seed=self.seed)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.sigma.shape)}, dist={self.dist}"


class LockedDropout(nn.Module):
    """Locked (variational) dropout: one mask shared along `dim` (e.g. the time dim
    of an RNN's (T, B, F) or (B, T, F) activations), identity in eval. Saves nothing
    per element for backward. A fresh mask per call unless `seed` is given."""

    def __init__(self, p: float = 0.5, dim: int = 0, *, seed=None):
        super().__init__()
        self.p = check_probability(p, "p", "nn.LockedDropout")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"fastreg.nn.LockedDropout: dim must be an int, got {dim!r}")
        self.dim = int(dim)
        self.seed = seed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from fastreg.ops.locked import locked_dropout

        return locked_dropout(input, self.p, dim=self.dim, training=self.training, seed=self.seed)

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}"


class DropConnectLinear(nn.Linear):
    """nn.Linear whose weights are dropped (DropConnect, Wan et al. 2013) in training:
    y = x (W * mask / (1 - p))^T + b, a fresh mask per call (or fixed by `seed`); in
    eval the plain linear layer (the mean of the masked weight is W).

    Memory: the masked weight exists only as a temporary inside forward and again
    inside backward (regenerated from the seed); autograd saves x and W (as nn.Linear
    does) and an 8-byte seed -- no mask and no masked copy of W.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5,
                 *, seed=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.p = check_probability(p, "p", "nn.DropConnectLinear")
        self.seed = seed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from fastreg.ops.locked import dropconnect_linear

        return dropconnect_linear(input, self.weight, self.bias, self.p,
                                  self.training, seed=self.seed)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"
