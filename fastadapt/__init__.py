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

__all__ = ["Adagrad", "RMSprop", "Adam", "AdamW", "SparseAdam", "Optimizer", "RowGrad", "functional", "__version__"]
