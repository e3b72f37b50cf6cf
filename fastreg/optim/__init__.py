"""Optimizers built on fastreg kernels."""

# -- reversible (issue 3) --
from fastreg.optim.reversible import ReversibleOverflowError, ReversibleSGD  # noqa: E402,F401
