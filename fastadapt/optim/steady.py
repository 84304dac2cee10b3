"""The steady-state step: what :meth:`Optimizer.step <fastadapt.Optimizer.step>` runs once
nothing but the gradients changes from step to step.

A training loop calls ``step`` thousands of times with the same parameters, state buffers and
hyper-parameters and fresh dense gradients.  After a step that went through the general path
(:mod:`fastadapt.optim.base`: every check, then the kernels), the optimizer builds a
:class:`SteadyPlan` of everything that step established -- the parameters, their state
buffers, the batches of :mod:`fastadapt.optim.many` with their kernel tables -- and the next
steps run the plan: the same checks, in bulk, and the same kernels, so that a step costs a few
microseconds plus the kernel rather than a few microseconds per parameter.

What the plan re-checks at every step, before anything is written (each in one C-level pass
over all parameters, or in one compiled pass over the gradients):

* the param groups and their ``params`` lists are the same objects, of the same lengths, and
  hold the same arrays; the hyper-parameters pass their checks (the optimizer's cache) and use
  the same state buffers;
* every parameter keeps its numba type (dtype, rank, contiguity, writeable), its dtype object
  (byte order) and its shape;
* every gradient is a numpy array (not a subclass) of its parameter's dtype object, rank and
  shape, C-contiguous and aligned, and shares no memory with any parameter
  (:func:`fastadapt.backends.cpu.grad_addresses`);
* every state still holds the same buffer objects, the same step count and carried scalars.

Anything else -- a None or sparse gradient, a device array, a changed option -- sends the step
to the general path, which finds the problem, names it, or handles the case; the plan is then
rebuilt.  The general path is the definition: the plan gives the same result, bit for bit, and
never accepts a step the general path would refuse.
"""

from itertools import chain, repeat
from operator import attrgetter, eq, is_, itemgetter

import numpy as np

from ..backends.cpu import GRAD_CHUNK, compiled, fingerprint, grad_addresses
from . import many
from .many import _Plan, _proto

__all__ = ["SteadyPlan", "build"]

_shape = attrgetter("shape")
_dtype = attrgetter("dtype")
_shape_dtype = attrgetter("shape", "dtype")
_step = itemgetter("step")

#: :meth:`SteadyPlan.run`'s answers besides True: the plan does not fit these gradients (keep it),
#: or no longer fits the optimizer (drop it)
NOT_MINE, STALE = None, False


class _Batch:
    """Parameters of one group, dtype, step count and carried values: one table, one kernel call."""

    __slots__ = ("group", "dtype", "proto", "states", "step", "carried", "table", "total", "segments",
                 "units", "plan", "buffers", "buffer_states", "buffer_names")


class _Chunk:
    """Up to GRAD_CHUNK gradients of one batch and rank, handed to one compiled check."""

    __slots__ = ("take", "batch", "shapes", "rows", "size")


def _taker(positions):
    """``grads -> tuple of grads[i] for i in positions``, in C."""
    if len(positions) == 1:
        i = positions[0]
        return lambda grads: (grads[i],)
    return itemgetter(*positions)


def build(opt, work):
    """A :class:`SteadyPlan` for ``opt`` after a step that applied ``work`` (the general path's
    prepared items), or None when the optimizer's setup does not have a steady state (device
    arrays, another non-finite policy, sparse-only algorithms, pending sparse decay)."""
    if opt.nonfinite != "propagate" or not opt.accepts_dense or not opt._params:
        return None
    if any(type(p) is not np.ndarray for p in opt._params):
        return None
    for st in opt.state:
        if "step" not in st or "_decay" in st or any(getattr(type(v), "compressed_state", False) for v in st.values()):
            return None
    return SteadyPlan(opt)


class SteadyPlan:
    """Everything a step re-checks or reuses while only the gradients change (see the module)."""

    def __init__(self, opt):
        alg = opt.algorithm
        self.rule = compiled(opt.rule)
        self.carried = tuple(name for name, _ in alg.carry)
        self.groups = list(opt.param_groups)
        self.lists = [(g["params"], len(g["params"])) for g in self.groups]
        self.names = [opt._checked(g) for g in self.groups]
        self.state_dtypes = [g.get("state_dtype") for g in self.groups]
        self.params = list(opt._params)
        self.n = len(self.params)
        self.param_key = fingerprint(tuple(self.params))
        self.shapes = list(map(_shape, self.params))
        self.shapes_dtypes = list(map(_shape_dtype, self.params))
        order = sorted((s[0], s[1]) for s in opt._spans if s[1] > s[0])
        self.starts = np.array([s[0] for s in order], dtype=np.int64)
        self.ends = np.array([s[1] for s in order], dtype=np.int64)
        # batches: param group, dtype, step count, carried values (as fastadapt.optim.many)
        batches = {}
        j = 0
        for gi, group in enumerate(self.groups):
            for p in group["params"]:
                st = opt.state[j]
                key = (gi, p.dtype, st["step"], tuple(st[n] for n in self.carried))
                batches.setdefault(key, []).append(j)
                j += 1
        self.batches = []
        self.chunks = []
        for (gi, dtype, step, carried), positions in batches.items():
            group = self.groups[gi]
            used = self.names[gi]
            names = tuple(n if (n is not None and n in used) else None for n in opt.slots)
            b = _Batch()
            b.group, b.dtype, b.proto, b.step, b.carried = group, dtype, _proto(dtype), step, carried
            b.states = [opt.state[j] for j in positions]
            items = [(j, group, self.params[j], opt.state[j], None) for j in positions]
            b.plan = _Plan(items, names, b.proto)
            b.table, b.total, b.segments, b.units = b.plan.table, b.plan.total, b.plan.segments, b.plan.units
            b.buffer_states = [st for st in b.states for n in names if n is not None]
            b.buffer_names = [n for _ in b.states for n in names if n is not None]
            b.buffers = [st[n] for st, n in zip(b.buffer_states, b.buffer_names)]
            self.batches.append(b)
            by_rank = {}
            for row, j in enumerate(positions):
                by_rank.setdefault(self.params[j].ndim, []).append((row, j))
            for rank, members in by_rank.items():
                for c in range(0, len(members), GRAD_CHUNK):
                    part = members[c:c + GRAD_CHUNK]
                    ch = _Chunk()
                    ch.take = _taker([j for _, j in part])
                    ch.batch = b
                    ch.shapes = np.array([self.shapes[j] for _, j in part], dtype=np.int64).reshape(len(part), rank)
                    ch.rows = np.array([row for row, _ in part], dtype=np.int64)
                    ch.size = len(part)
                    self.chunks.append(ch)

    def run(self, opt, grads):
        """Apply one step if the plan fits: True; else :data:`NOT_MINE` (these gradients are not
        all dense arrays that pass) or :data:`STALE` (the optimizer changed); nothing is written
        unless True is returned."""
        if (type(grads) is not list and type(grads) is not tuple) or len(grads) != self.n:
            return NOT_MINE
        groups = opt.param_groups
        if type(groups) is not list or len(groups) != len(self.groups) or not all(map(is_, groups, self.groups)):
            return STALE
        for group, (plist, n) in zip(groups, self.lists):
            if group.get("params") is not plist or len(plist) != n:
                return STALE
        for group, names, state_dtype in zip(groups, self.names, self.state_dtypes):
            if opt._checked(group) != names or group.get("state_dtype") != state_dtype:
                return STALE                          # (_checked validates changed hyper-parameters, may raise)
        params = self.params
        if not all(map(is_, chain.from_iterable(pl for pl, _ in self.lists), params)) \
                or fingerprint(tuple(params)) != self.param_key \
                or list(map(_shape_dtype, params)) != self.shapes_dtypes:
            return STALE
        for b in self.batches:
            try:
                if not all(map(is_, map(dict.get, b.buffer_states, b.buffer_names), b.buffers)) \
                        or not all(map(eq, map(_step, b.states), repeat(b.step))):
                    return STALE
                for name, value in zip(self.carried, b.carried):
                    if not all(map(eq, map(itemgetter(name), b.states), repeat(value))):
                        return STALE
            except (KeyError, TypeError):
                return STALE
        for ch in self.chunks:
            gs = ch.take(grads)
            dtype = ch.batch.dtype
            if list(map(type, gs)).count(np.ndarray) != ch.size or list(map(_dtype, gs)).count(dtype) != ch.size:
                return NOT_MINE
            b = ch.batch
            if grad_addresses(gs, ch.shapes, ch.rows, b.table, self.starts, self.ends) != -1:
                return NOT_MINE
        # everything checked: write
        for b in self.batches:
            step = b.step + 1
            for st in b.states:
                st["step"] = step
            b.step = step
            first = b.states[0]
            if self.carried:                            # the same carried values in the batch: advanced once
                opt._advance_carry(b.group, first)
                b.carried = advanced = tuple(first[n] for n in self.carried)
                for st in b.states[1:]:
                    st.update(zip(self.carried, advanced))
            k = opt._scalars(b.group, first, b.dtype)
            many.dense_step_many(self.rule, b.proto, b.table, b.segments, b.units, k, b.total)
        return True
