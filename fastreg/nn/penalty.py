"""fastreg.nn.ActivityPenalty: an L1/L2 penalty on a layer's activations (docs/penalty.md)."""

from __future__ import annotations

import torch

from fastreg.penalty import _real, activity_penalty


class ActivityPenalty(torch.nn.Module):
    """Identity in the forward pass; the backward adds l1 sign(x) + 2 l2 x to the gradient.

    Equivalent to adding l1 |x|_1 + l2 |x|^2 to the loss, without a second pass over x. The
    penalty of the last forward is kept in `last_value` (a detached 0-dim float32 tensor,
    computed in the forward's single pass; None before the first call) for logging.
    """

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        super().__init__()
        self.l1 = _real(l1, "l1", "nn.ActivityPenalty")
        self.l2 = _real(l2, "l2", "nn.ActivityPenalty")
        self.last_value = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_value = activity_penalty(x, l1=self.l1, l2=self.l2, return_value=True)
        return y

    def extra_repr(self) -> str:
        return f"l1={self.l1}, l2={self.l2}"
