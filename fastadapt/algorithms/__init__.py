"""The optimizers fastadapt knows: one module each, one registry.

Each module declares one :class:`~fastadapt.algorithms._spec.Algorithm` (its rule,
per-step scalars, state slots, hyper-parameters and exact sparse strategy); everything else
-- the public classes, their validation and docstrings, the functional layer, the compiled
loops of every backend -- is derived from :data:`REGISTRY`.  To add an optimizer, write its
module and add it here (see the README, "How to add an optimizer").

This package imports nothing of fastadapt but itself: it is the bottom layer.
"""

from ._spec import FUSED, LAZY, Algorithm, Decay, Hyper, decay_factor, fma, scale_slots
from .adadelta import ADADELTA
from .adagrad import ADAGRAD
from .adam import ADAM, ADAMW
from .adamax import ADAMAX
from .ftrl import FTRL
from .nadam import NADAM
from .radam import RADAM
from .rmsprop import RMSPROP
from .rowwise_adagrad import ROWWISE_ADAGRAD
from .sgd import SGD
from .sparse_adam import SPARSE_ADAM

#: every algorithm, in the order of the public API
REGISTRY = (ADAGRAD, RMSPROP, ADAM, ADAMW, SPARSE_ADAM, SGD, ADADELTA, ADAMAX, NADAM, RADAM, ROWWISE_ADAGRAD,
            FTRL)

#: name -> algorithm
BY_NAME = {a.name: a for a in REGISTRY}

__all__ = ["REGISTRY", "BY_NAME", "Algorithm", "Hyper", "Decay", "LAZY", "FUSED", "fma", "scale_slots",
           "decay_factor"]
