"""The one table of optimizers under test: every test module iterates it.

In the spirit of torch's ``optim_db`` and optax's ``_OPTIMIZERS_UNDER_TEST``: one
:class:`OptimizerCase` per public optimizer class, holding its option grid (every option that
changes the math, in combination), one "rich" configuration with every option switched on,
hyper-parameter values it must refuse, and its oracles -- the numpy reference of
``tests/reference.py`` and, when torch is importable, the torch.optim class of the same name.
Adding an optimizer to fastadapt means adding one case here (and its reference).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

import fastadapt as fa
from fastadapt import functional as F
from fastadapt.algorithms import BY_NAME

import reference as ref


def grid(**axes):
    """Every combination of the given option values, as a list of dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


@dataclass(frozen=True)
class OptimizerCase:
    """One public optimizer and what the tests need to know about it.

    Attributes
    ----------
    name : str
        The public class name (``fa.<name>``), also the algorithm's and torch's.
    key : str
        The name of its reference rule in ``tests/reference.py`` (``ref.DENSE_RULES[key]``,
        ``ref.init_state(key, ...)``, ``ref.torch_run(key, ...)``).
    options : list of dict
        The option grid: each dict a configuration (``lr`` included where the default would
        make steps too small to compare); together they cover every option that changes the math.
    rich : dict
        One configuration with every option that adds work switched on.
    bad : tuple of (str, object)
        Hyper-parameter values that must be refused (at construction and when set between steps).
    dense : bool
        Accepts dense gradients (SparseAdam: no).
    torch : bool
        torch.optim has a class of the same name and semantics.
    """

    name: str
    key: str
    options: list
    rich: dict
    bad: tuple = ()
    dense: bool = True
    torch: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return getattr(fa, self.name)

    @property
    def algorithm(self):
        return BY_NAME[self.name]

    @property
    def functional(self) -> Optional[Callable]:
        name = self.algorithm.functional
        return getattr(F, name) if name else None

    def reference(self, p, g, state, **hyper):
        """One step of the numpy reference, in place on ``p`` and ``state``."""
        return ref.DENSE_RULES[self.key](p, g, state, **hyper)

    def init_state(self, p, **hyper):
        """The reference's initial state for ``p``."""
        return ref.init_state(self.key, p, **hyper)

    def __str__(self):
        return self.name


OPTIMIZERS = (
    OptimizerCase(
        "Adagrad", "adagrad",
        options=[dict(lr=0.05, **o) for o in grid(lr_decay=[0.0, 0.1], weight_decay=[0.0, 0.1],
                                                 initial_accumulator_value=[0.0, 0.5], maximize=[False, True])],
        rich=dict(lr=0.05, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5, maximize=True),
        bad=(("lr", -1.0), ("lr_decay", -0.1), ("weight_decay", -0.1), ("initial_accumulator_value", -1.0),
             ("eps", -1e-10), ("maximize", np.array([True, False]))),
    ),
    OptimizerCase(
        "RMSprop", "rmsprop",
        options=[dict(lr=1e-2, **o) for o in grid(alpha=[0.99, 0.3], weight_decay=[0.0, 0.1], momentum=[0.0, 0.9],
                                                 centered=[False, True], maximize=[False, True])],
        rich=dict(lr=1e-2, alpha=0.9, weight_decay=0.1, momentum=0.9, centered=True, maximize=True),
        bad=(("lr", -1.0), ("eps", -1e-8), ("weight_decay", -0.1), ("alpha", -0.5), ("momentum", -0.9),
             ("centered", np.array([True, False]))),
    ),
    OptimizerCase(
        "Adam", "adam",
        options=[dict(lr=1e-2, **o) for o in grid(betas=[(0.9, 0.999), (0.3, 0.9)], weight_decay=[0.0, 0.1],
                                                 decoupled_weight_decay=[False, True], amsgrad=[False, True],
                                                 maximize=[False, True])],
        rich=dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True, maximize=True),
        bad=(("lr", -1.0), ("eps", -1e-8), ("weight_decay", -0.1), ("betas", (1.0, 0.999)), ("betas", (0.9, 1.0)),
             ("betas", (-0.5, 0.9)), ("betas", 0.9), ("lr", "0.1"), ("amsgrad", np.array([True, False]))),
    ),
    OptimizerCase(
        "AdamW", "adamw",
        options=[dict(lr=1e-2, **o) for o in grid(weight_decay=[0.0, 0.1, 1e-2], amsgrad=[False, True],
                                                 maximize=[False, True])],
        rich=dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        bad=(("lr", -1.0), ("betas", (0.9, 1.01)), ("decoupled_weight_decay", False)),
    ),
    OptimizerCase(
        "SparseAdam", "sparse_adam",
        options=[dict(lr=1e-2, **o) for o in grid(betas=[(0.9, 0.999), (0.3, 0.9)], maximize=[False, True])],
        rich=dict(lr=1e-2, betas=(0.8, 0.99), maximize=True),
        bad=(("lr", 0.0), ("eps", 0.0), ("betas", (1.0, 0.9))),
        dense=False,
    ),
    OptimizerCase(
        "SGD", "sgd",
        options=[dict(lr=1e-2, **o) for o in grid(momentum=[0.0, 0.9], dampening=[0.0, 0.5], weight_decay=[0.0, 0.1],
                                                 nesterov=[False, True], maximize=[False, True])
                 if not (o["nesterov"] and (o["momentum"] == 0 or o["dampening"] != 0))],
        rich=dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True, maximize=True),
        bad=(("lr", -1.0), ("momentum", -0.9), ("weight_decay", -0.1), ("dampening", "0.5"),
             ("nesterov", True), ("nesterov", np.array([True, False])), ("maximize", np.array([True, False]))),
    ),
    OptimizerCase(
        "Adadelta", "adadelta",
        options=grid(rho=[0.9, 0.3], weight_decay=[0.0, 0.1], maximize=[False, True]),
        rich=dict(rho=0.8, weight_decay=0.1, maximize=True),
        bad=(("lr", -1.0), ("rho", -0.1), ("rho", 1.5), ("eps", -1e-6), ("weight_decay", -0.1),
             ("maximize", np.array([True, False]))),
    ),
    OptimizerCase(
        "Adamax", "adamax",
        options=[dict(lr=1e-2, **o) for o in grid(betas=[(0.9, 0.999), (0.3, 0.9)], weight_decay=[0.0, 0.1],
                                                 maximize=[False, True])],
        rich=dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, maximize=True),
        bad=(("lr", -1.0), ("eps", -1e-8), ("weight_decay", -0.1), ("betas", (1.0, 0.999)), ("betas", (0.9, 1.0)),
             ("maximize", np.array([True, False]))),
    ),
    OptimizerCase(
        "NAdam", "nadam",
        options=[dict(lr=1e-2, **o) for o in grid(betas=[(0.9, 0.999), (0.3, 0.9)], weight_decay=[0.0, 0.1],
                                                 momentum_decay=[4e-3, 0.1], decoupled_weight_decay=[False, True],
                                                 maximize=[False, True])],
        rich=dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.1, decoupled_weight_decay=True,
                  maximize=True),
        bad=(("lr", -1.0), ("eps", -1e-8), ("weight_decay", -0.1), ("momentum_decay", -4e-3),
             ("betas", (1.0, 0.999)), ("betas", (0.9, 1.0)), ("decoupled_weight_decay", np.array([True, False]))),
    ),
    OptimizerCase(
        "RAdam", "radam",
        options=[dict(lr=1e-2, **o) for o in grid(betas=[(0.9, 0.999), (0.3, 0.9), (0.5, 0.5)],
                                                 weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True],
                                                 maximize=[False, True])],
        rich=dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        bad=(("lr", -1.0), ("eps", -1e-8), ("weight_decay", -0.1), ("betas", (1.0, 0.999)), ("betas", (0.9, 1.0)),
             ("decoupled_weight_decay", np.array([True, False]))),
    ),
)

#: name -> case
CASES = {c.name: c for c in OPTIMIZERS}
#: the cases that take dense gradients
DENSE = tuple(c for c in OPTIMIZERS if c.dense)


def option_cases(cases=OPTIMIZERS):
    """``[(case, options)]`` over every case's option grid, for ``pytest.mark.parametrize``."""
    return [(c, o) for c in cases for o in c.options]


def option_id(item):
    """A readable test id of an ``(case, options)`` pair."""
    case, options = item
    return case.name + "".join(f"-{k}={v}" for k, v in options.items() if k != "lr")
