"""The optimizer API: :class:`Optimizer` and one generated class per registered algorithm.

``fastadapt.Adam`` and its siblings are made here from :data:`fastadapt.algorithms.REGISTRY`
(:func:`~fastadapt.optim.classes.optimizer_class`); :data:`CLASSES` maps their names to them.
"""

from typing import Dict, Type

from ..algorithms import REGISTRY
from .base import NONFINITE, Optimizer
from .classes import optimizer_class

#: public class name -> class, in registry order
CLASSES: Dict[str, Type[Optimizer]] = {}
for _alg in REGISTRY:
    CLASSES[_alg.name] = optimizer_class(_alg, CLASSES[_alg.parent] if _alg.parent else Optimizer)
del _alg

globals().update(CLASSES)

__all__ = ["Optimizer", "CLASSES", "NONFINITE", "optimizer_class", *CLASSES]
