"""Modules built on fastreg ops (one module file per family)."""

from fastreg.nn.dropout import Dropout, replace_dropout  # noqa: F401
from fastreg.nn.variational import VariationalDropoutLinear  # noqa: F401
from fastreg.nn.noise import GaussianDropout, MultiplicativeNoise  # noqa: F401
from fastreg.nn.noise import DropConnectLinear, LockedDropout  # noqa: F401
from fastreg.nn.penalty import ActivityPenalty  # noqa: F401
