"""fastreg.nn.Dropout: a drop-in for torch.nn.Dropout on fastreg's fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from fastreg._validate import check_probability
from fastreg.ops.dropout import MASK_MODES, dropout


class Dropout(nn.Module):
    """Same constructor, extra_repr and eval behaviour (identity) as torch.nn.Dropout.

    mask="seed" (default) saves nothing per element for backward; "bits" saves a
    packed 1-bit mask. inplace=True writes the result back into the input
    (input.copy_(result), recorded by autograd like any in-place op); it exists for
    API compatibility and saves no memory over inplace=False.
    Each call draws a fresh seed from torch's default generator for the input's
    device, unless `seed` is given (then every call uses the same mask).
    Its output keeps the input's dense layout (channels_last stays channels_last).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, mask: str = "seed", seed=None):
        super().__init__()
        self.p = check_probability(p, "p", "nn.Dropout")
        if mask not in MASK_MODES:
            raise ValueError(f"fastreg.nn.Dropout: mask must be one of {MASK_MODES}, got {mask!r}")
        self.inplace = inplace
        self.mask = mask
        self.seed = seed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = dropout(input, self.p, self.training, seed=self.seed, mask=self.mask)
        if self.inplace and out is not input:
            return input.copy_(out)
        return out

    def extra_repr(self) -> str:
        extra = f", mask={self.mask}" if self.mask != "seed" else ""
        return f"p={self.p}, inplace={self.inplace}{extra}"



def replace_dropout(model: nn.Module, **kwargs) -> int:
    """Swaps every torch.nn.Dropout in `model` (searched recursively) for fastreg.nn.Dropout
    with the same p, inplace and training flag; returns how many it swapped.

    kwargs go to fastreg.nn.Dropout (mask=, seed=). Only exact torch.nn.Dropout modules are
    swapped: other dropout kinds (Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout, and
    subclasses of Dropout, whose forward may differ) stay as they are, as does dropout
    called functionally (F.dropout, the dropout_p of scaled_dot_product_attention inside
    torch.nn.MultiheadAttention). `model` itself is not replaced if it is a Dropout.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastreg.nn.replace_dropout: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    done = {}  # a Dropout registered under several parents stays one (shared) module
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a module's second registration
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout:
                new = done.get(id(child))
                if new is None:
                    new = Dropout(child.p, child.inplace, **kwargs)
                    new.train(child.training)
                    done[id(child)] = new
                setattr(parent, name, new)
    return len(done)
