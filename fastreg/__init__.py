"""fastreg: fused, memory-cheap regularisation kernels for PyTorch."""

from fastreg import _native
from fastreg._backend import forced_backend, set_backend, use_backend
from fastreg.ops import rng
from fastreg.ops.dropout import dropout, dropout_add
from fastreg import nn, optim  # noqa: E402
from fastreg import adversarial  # noqa: E402  (issue 5: fastreg.adversarial.fgsm / pgd_step)
from fastreg.ops.noise import gaussian_dropout, input_noise, multiplicative_noise  # noqa: E402,F401  (issue 5: noise)
from fastreg.ops.locked import dropconnect_linear, locked_dropout  # noqa: E402,F401  (issue 5: noise)
from fastreg.ops.bias_act import bias_act_dropout  # noqa: E402,F401  (issue 5: noise)
from fastreg import penalty  # noqa: E402,F401  (issue 4: penalty)
from fastreg.penalty import activity_penalty  # noqa: E402,F401  (issue 4: penalty)

__version__ = "0.1.0"

_native.native()  # one warning at import if the native extension is missing

__all__ = ["dropout", "dropout_add", "nn", "optim", "rng", "set_backend", "use_backend", "forced_backend", "__version__"]
