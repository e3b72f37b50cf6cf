"""Modules built on fastreg ops (one module file per family)."""

from fastreg.nn.dropout import Dropout  # noqa: F401
