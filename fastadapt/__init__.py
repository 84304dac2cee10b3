"""fastadapt: AdaGrad, RMSprop and Adam (with AdamW and SparseAdam) as Numba kernels.

Torch-compatible optimizers over numpy arrays (and CUDA arrays), updated in place::

    import numpy as np, fastadapt as fa
    w = np.zeros(1000, np.float32)
    opt = fa.Adam([w], lr=1e-3)
    opt.step([grad])

See the README for the options, the sparse-gradient semantics and the figures.
"""

from .optim import Adagrad, Adam, AdamW, Optimizer, RMSprop, SparseAdam
from .sparse import RowGrad
from . import functional

__version__ = "0.1.0"


def __getattr__(name):
    # fastadapt.DeviceCSR (a CSR gradient of device arrays) lives in fastadapt.cuda_sparse, which
    # imports numba.cuda: imported on first use, so that `import fastadapt` never needs a GPU stack
    if name == "DeviceCSR":
        from .cuda_sparse import DeviceCSR
        return DeviceCSR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Adagrad", "RMSprop", "Adam", "AdamW", "SparseAdam", "Optimizer", "RowGrad", "functional", "__version__"]
