"""fastreg: fused, memory-cheap regularisation kernels for PyTorch."""

from fastreg import _native
from fastreg._backend import forced_backend, set_backend, use_backend
from fastreg.ops import rng
from fastreg.ops.bias_act import bias_act_dropout
from fastreg.ops.dropout import dropout, dropout_add
from fastreg.ops.locked import dropconnect_linear, locked_dropout
from fastreg.ops.noise import gaussian_dropout, input_noise, multiplicative_noise
from fastreg import adversarial, nn, optim, penalty  # noqa: E402 - after the ops they build on
from fastreg.penalty import activity_penalty  # noqa: E402
from fastreg.early_stopping import EarlyStopping  # noqa: E402

__version__ = "0.1.0"

_native.native()  # one warning at import if the native extension is missing

__all__ = [
    "dropout", "dropout_add", "gaussian_dropout", "multiplicative_noise", "input_noise",
    "locked_dropout", "dropconnect_linear", "bias_act_dropout", "activity_penalty",
    "EarlyStopping", "adversarial", "nn", "optim", "penalty", "rng",
    "set_backend", "use_backend", "forced_backend", "__version__",
]
