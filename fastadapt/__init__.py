"""fastadapt: torch.optim's adaptive optimizers as Numba kernels, without torch.

Torch-compatible optimizers over numpy arrays (and CUDA arrays), updated in place::

    import numpy as np, fastadapt as fa
    w = np.zeros(1000, np.float32)
    opt = fa.Adam([w], lr=1e-3)
    opt.step([grad])

One public class per algorithm of :data:`fastadapt.algorithms.REGISTRY` (``Adagrad``,
``RMSprop``, ``Adam``, ``AdamW``, ``SparseAdam``, ...), generated from its declaration.
See the README and the docs for the options, the sparse-gradient semantics and the figures.
"""

from typing import Any

from . import config, functional
from .grads.bag import BagGrad, embedding_bag
from .grads.sparse import RowGrad
from .optim import CLASSES, Optimizer

globals().update(CLASSES)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # fastadapt.DeviceCSR (a CSR gradient of device arrays) lives in fastadapt.grads.device, which
    # imports numba.cuda: imported on first use, so that `import fastadapt` never needs a GPU stack
    if name == "DeviceCSR":
        from .grads.device import DeviceCSR
        return DeviceCSR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*CLASSES, "Optimizer", "RowGrad", "BagGrad", "embedding_bag", "functional", "config", "__version__"]
