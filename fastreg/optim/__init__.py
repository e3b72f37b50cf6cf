"""Optimizers built on fastreg kernels."""

# -- reversible --
from fastreg.optim.reversible import ReversibleOverflowError, ReversibleSGD  # noqa: E402,F401
