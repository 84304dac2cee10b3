"""The one table of optimizers under test: every test module iterates it.

In the spirit of torch's ``optim_db`` and optax's ``_OPTIMIZERS_UNDER_TEST``: one
:class:`OptimizerCase` per public optimizer class, holding its option grid (every option that
changes the math, in combination), one "rich" configuration with every option switched on,
hyper-parameter values it must refuse, and its oracles -- the numpy reference of
``tests/reference.py`` and, when torch is importable, the torch.optim class of the same name.

How the tests are organised
---------------------------
Adding an optimizer to fastadapt means adding **one** :class:`OptimizerCase` to
:data:`OPTIMIZERS` (name, reference key, option grid, rich config, refused values, ``dense`` and
``torch`` flags) and its rule to ``tests/reference.py`` (``DENSE_RULES[key]``, a branch of
``init_state``; for a sparse-only optimizer a ``LAZY_RULES[key]`` entry; where the reference
must be told about a torch quirk, ``TORCH_REFERENCE_HYPER[key]``).  ``tests/conftest.py``
refuses to run while a registered algorithm has no case, and holds the shared constants
(``DTYPES``, ``DTYPE_IDS``, ``RTOL``).  No test module keeps its own list of optimizers or
option grid; each iterates this table, and picks a subset only by a rule declared here
(:meth:`OptimizerCase.small_grid`, :meth:`OptimizerCase.exact_groups`, ``rich`` / ``plain``):

* ``test_reference.py`` -- the numpy references against torch.optim (``case.torch``, full grid)
  and the reference helpers (lazy / exact steps, float32 never promoted);
* ``test_dense.py`` -- dense steps against the reference: full grid and defaults, bit-for-bit
  operation order, shapes x both CPU loops (rich config), compilation counts, hypothesis over
  :meth:`OptimizerCase.hyper_strategy` (:data:`HYPER_SPACES` if the case has one, else drawn
  from its grid) -- ``case.dense`` only;
* ``test_sparse.py`` -- CSR / RowGrad gradients, lazy for every case and exact where the
  algorithm has ``sparse_mode`` (strategy from ``case.algorithm.exact(h)``): the whole grid in
  float64 and its corners in float32, :meth:`OptimizerCase.exact_groups` for the other formats
  (RowGrad, 1-D parameters, whole rows, parallel loops); hostile input;
* ``test_many.py`` / ``test_threads.py`` -- the many-tensor kernel and 1 vs 2 threads are
  bit-identical (rich and plain configs);
* ``test_state_dict.py`` -- layout (buffers from ``case.algorithm.used_buffers``), round trips,
  refusals (rich config and defaults; every pair of cases whose state_dicts differ);
* ``test_torch_parity.py`` -- 50 steps against torch.optim (``case.torch and case.dense``):
  grid, defaults, shapes, schedules, None gradients, param groups;
* ``test_api.py`` -- validation (``case.bad``, the algorithm's non-negative hypers), None
  gradients, non-finite policies, schedules, the functional layer (buffers from the
  algorithm's slots and ``functional_args``);
* ``test_cuda.py`` -- the CUDA backend against the CPU one (numba's simulator without a GPU):
  dense over the whole grid in float64 and its corners in float32, sparse over
  :meth:`OptimizerCase.exact_groups` (less the lazy defaults);
* ``tests/mpi/*.py`` (run by ``test_distributed.py``) -- sharded optimizer (rich and plain
  configs of the dense cases) and sharded table (every exact group of every case);
* ``test_vectorised.py`` -- iterates ``fastadapt.algorithms.REGISTRY`` directly.

Optimizer-specific behaviour (Adagrad's eager state and per-group initial accumulator,
RMSprop's centered clamp, SparseAdam refusing dense gradients, ...) stays in named tests.
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

    # -- derived from the table and the library's registry (no per-optimizer code below) ---------

    @property
    def plain(self) -> dict:
        """The first grid entry: every option off (only ``lr`` set)."""
        return dict(self.options[0])

    def valid(self, options) -> bool:
        """Whether the algorithm accepts ``options`` (some combinations are refused: SGD's nesterov
        without momentum)."""
        try:
            self.algorithm.check_group(self.group(options))
        except (TypeError, ValueError):
            return False
        return True

    def group(self, options=None) -> dict:
        """The param group ``options`` make: the algorithm's defaults updated with them."""
        return dict(self.algorithm.defaults, **(options or {}))

    def buffers(self, options=None) -> tuple:
        """The state buffers a parameter has after a step with ``options``."""
        return self.algorithm.used_buffers(self.group(options))

    def exact_plan(self, options=None):
        """How ``sparse_mode="exact"`` runs with ``options``: "lazy", "fused" or ("decay", slots)."""
        plan = self.algorithm.exact(self.group(options))
        return plan if isinstance(plan, str) else ("decay", tuple(plan.slots))

    def exact_groups(self):
        """``[(mode, options)]``: lazy with the defaults and with the rich config, then one
        configuration per distinct exact plan found in defaults + grid + rich (only lazy for an
        algorithm without ``sparse_mode``)."""
        out = [("lazy", {}), ("lazy", dict(self.rich))]
        if self.algorithm.sparse_mode:
            seen = set()
            for o in [{}] + list(self.options) + [self.rich]:
                plan = self.exact_plan(o)
                if plan not in seen:
                    seen.add(plan)
                    out.append(("exact", dict(o)))
        return out

    def small_grid(self):
        """The grid's corners: defaults, :attr:`plain` (the first entry), every entry that differs
        from it in one option, the last entry (every axis at its last value) and rich -- for
        paths too slow for the whole grid (sparse formats, the CUDA simulator)."""
        base = self.options[0]
        singles = [dict(o) for o in self.options
                   if sum(1 for k in set(o) | set(base) if o.get(k) != base.get(k)) <= 1]
        last = [dict(self.options[-1])] if self.options[-1] not in singles else []
        return [{}] + singles + last + [dict(self.rich)]

    @property
    def modes(self) -> tuple:
        """The sparse modes of this optimizer ("exact" only with a ``sparse_mode`` option)."""
        return ("lazy", "exact") if self.algorithm.sparse_mode else ("lazy",)

    def mode_options(self, mode) -> dict:
        """The constructor argument selecting ``mode`` (none when there is no ``sparse_mode``)."""
        return {"sparse_mode": mode} if self.algorithm.sparse_mode else {}

    def nonneg_hypers(self) -> list:
        """Hyper-parameters that must be real numbers >= 0 (torch's ``>= 0`` checks)."""
        from fastadapt.algorithms._spec import nonneg
        return [h.name for h in self.algorithm.hypers if h.check is nonneg]

    def has_hyper(self, name) -> bool:
        return any(h.name == name for h in self.algorithm.hypers)

    @property
    def constructor_only(self) -> tuple:
        """Hyper-parameters that only set up state (torch reads them at construction only)."""
        return tuple(h.name for h in self.algorithm.hypers if not h.functional)

    @property
    def refused(self) -> tuple:
        """:attr:`bad` plus what every optimizer refuses: a NaN lr, an unknown ``sparse_mode``."""
        extra = (("lr", float("nan")),) + ((("sparse_mode", "eager"),) if self.algorithm.sparse_mode else ())
        return tuple(self.bad) + extra

    def schedulable(self) -> list:
        """Hyper-parameters (besides lr) that may change between steps without changing the
        state layout: the rich config's numbers whose change keeps :meth:`buffers` the same."""
        out = []
        for k, v in self.rich.items():
            if k == "lr" or isinstance(v, bool) or k in self.constructor_only:
                continue
            if self.buffers(dict(self.plain, **{k: v})) == self.buffers(self.plain):
                out.append(k)
        return out

    def lazy_rule(self):
        """The reference rule a lazy sparse step applies to the touched elements."""
        return ref.LAZY_RULES[self.key]

    def sparse_reference(self, p, rows, cols, vals, state, mode="lazy", **hyper):
        """One sparse step of the reference (``lazy_step`` / ``exact_step``), in place."""
        if mode == "lazy":
            ref.lazy_step(self.lazy_rule(), p, None, rows, cols, vals, state, **hyper)
        else:
            ref.exact_step(ref.DENSE_RULES[self.key], p, rows, cols, vals, state, **hyper)

    def torch_reference_hyper(self, options) -> dict:
        """``options`` for the reference when it is compared with torch (e.g. RMSprop unclamped)."""
        return dict(options, **ref.TORCH_REFERENCE_HYPER.get(self.key, {}))

    def torch_run(self, p0, grads, **kw):
        """:func:`reference.torch_run` with torch.optim's class of the same name."""
        return ref.torch_run(self.key, p0, grads, torch_class=self.name, **kw)

    def hyper_strategy(self):
        """A hypothesis strategy of hyper-parameter dicts: :data:`HYPER_SPACES` where the case
        has one, otherwise every option over the values its grid uses and lr in [0, 0.5]."""
        from hypothesis import strategies as st
        space = HYPER_SPACES.get(self.name)
        if space is None:
            values = {}
            for o in self.options:
                for k, v in o.items():
                    values.setdefault(k, [])
                    if v not in values[k]:
                        values[k].append(v)
            space = {k: st.sampled_from(v) for k, v in values.items()}
            space["lr"] = st.floats(0.0, 0.5, allow_nan=False)
        return st.fixed_dictionaries(space).filter(self.valid)

    def __str__(self):
        return self.name


OPTIMIZERS = (
    OptimizerCase(
        "Adagrad", "adagrad",
        options=[dict(lr=0.05, **o) for o in grid(lr_decay=[0.0, 0.1], weight_decay=[0.0, 0.1],
                                                 initial_accumulator_value=[0.0, 0.5], maximize=[False, True])]
        + [dict(lr=0.05, eps=0.0, initial_accumulator_value=0.5)],      # eps = 0: exact mode fused
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
             ("nesterov", np.array([True, False])), ("maximize", np.array([True, False]))),
    ),
    OptimizerCase(
        "Adadelta", "adadelta",
        options=[dict(lr=1.0, **o) for o in grid(rho=[0.9, 0.3], weight_decay=[0.0, 0.1], maximize=[False, True])],
        rich=dict(lr=1.0, rho=0.8, weight_decay=0.1, maximize=True),
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
    OptimizerCase(
        "RowwiseAdagrad", "rowwise_adagrad",
        options=[dict(lr=0.05, **o) for o in grid(weight_decay=[0.0, 0.1], weight_decay_mode=["l2", "decoupled"])]
        + [dict(lr=0.05, eps=0.0, weight_decay=0.1)],                    # eps = 0: exact mode fused
        rich=dict(lr=0.05, weight_decay=0.1, weight_decay_mode="decoupled"),
        bad=(("lr", -1.0), ("eps", -1e-10), ("weight_decay", -0.1), ("weight_decay_mode", "L2"),
             ("weight_decay_mode", None)),
        torch=False,
    ),
    OptimizerCase(
        "Ftrl", "ftrl",
        options=[dict(lr=0.05, **o) for o in grid(lr_power=[-0.5, -0.3], l1=[0.0, 0.01], l2=[0.0, 0.1],
                                                 l2_shrinkage=[0.0, 0.1], maximize=[False, True])]
        + [dict(lr=0.05, beta=0.5), dict(lr=0.05, l2=0.1, beta=0.5, maximize=True), dict(lr=0.05, lr_power=0.0),
           dict(lr=0.05, lr_power=-1.0, l1=0.01), dict(lr=0.05, initial_accumulator_value=0.0, beta=0.5)],
        rich=dict(lr=0.05, lr_power=-0.3, initial_accumulator_value=0.5, l1=0.01, l2=0.1, l2_shrinkage=0.1,
                  beta=0.5, maximize=True),
        bad=(("lr", 0.0), ("lr", -1.0), ("lr_power", 0.5), ("initial_accumulator_value", -0.1), ("l1", -0.01),
             ("l2", -0.1), ("l2_shrinkage", -0.1), ("beta", -0.5), ("lr_power", "-0.5"),
             ("maximize", np.array([True, False]))),
        torch=False,
    ),
)

#: name -> case
CASES = {c.name: c for c in OPTIMIZERS}
#: the cases that take dense gradients
DENSE = tuple(c for c in OPTIMIZERS if c.dense)
#: the dense cases with a per-element rule (a row rule -- RowwiseAdagrad -- runs one kernel per
#: parameter: no many-tensor kernel, no steady-state plan)
ELEMENTWISE = tuple(c for c in DENSE if not c.algorithm.rows)
#: the cases with a row rule
ROWWISE = tuple(c for c in OPTIMIZERS if c.algorithm.rows)


def option_cases(cases=OPTIMIZERS):
    """``[(case, options)]`` over every case's option grid, for ``pytest.mark.parametrize``."""
    return [(c, o) for c in cases for o in c.options]


def option_id(item):
    """A readable test id of an ``(case, options)`` pair."""
    case, options = item
    return case.name + "".join(f"-{k}={v}" for k, v in options.items() if k != "lr")


#: the cases with a torch.optim counterpart taking dense gradients
DENSE_TORCH = tuple(c for c in DENSE if c.torch)
#: the cases with a functional-layer function
FUNCTIONAL = tuple(c for c in OPTIMIZERS if c.functional is not None)


def rich_and_plain(cases=DENSE):
    """``[(case, label, options)]``: each case's rich config and its plain one (every option off)."""
    return [(c, label, o) for c in cases for label, o in (("rich", dict(c.rich)), ("plain", c.plain))]


def config_id(item):
    """A readable test id of a ``(case, ...)`` tuple whose last entry is an options dict."""
    case, options = item[0], item[-1]
    mid = "".join(f"-{x}" for x in item[1:-1] if isinstance(x, str))
    return case.name + mid + ("".join(f"-{k}={v}" for k, v in options.items() if k != "lr") or "-default")


def _strategies():
    """The hypothesis spaces of the property tests (a case without one gets one from its grid)."""
    from hypothesis import strategies as st
    unit = st.floats(0.0, 0.999, allow_nan=False)
    small = st.sampled_from([0.0, 1e-3, 0.1, 0.5])
    eps = st.sampled_from([0.0, 1e-10, 1e-8, 1e-3])
    lr = st.floats(0.0, 0.5, allow_nan=False)
    return {
        "Adagrad": dict(lr=lr, lr_decay=small, weight_decay=small, eps=eps, initial_accumulator_value=small,
                        maximize=st.booleans()),
        "RMSprop": dict(lr=lr, alpha=unit, eps=eps, weight_decay=small, momentum=st.sampled_from([0.0, 0.5, 0.9]),
                        centered=st.booleans(), maximize=st.booleans()),
        "Adam": dict(lr=lr, betas=st.tuples(unit, unit), eps=eps, weight_decay=small, amsgrad=st.booleans(),
                     maximize=st.booleans(), decoupled_weight_decay=st.booleans()),
        "AdamW": dict(lr=lr, betas=st.tuples(unit, unit), eps=eps, weight_decay=small, amsgrad=st.booleans(),
                      maximize=st.booleans()),
    }


#: name -> {hyper-parameter: hypothesis strategy} (optional per case; see OptimizerCase.hyper_strategy)
HYPER_SPACES = _strategies()
