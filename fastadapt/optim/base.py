"""The optimizer base: param groups, state, ``state_dict``, the three-phase step.

An optimizer class is generated from an :class:`~fastadapt.algorithms.Algorithm`
(:mod:`fastadapt.optim.classes`); :class:`Optimizer` reads everything it needs from
``self.algorithm`` -- the rule, the state slots, the per-step scalars, the hyper-parameter
checks, the exact sparse strategy.  A step runs in three phases so that bad input never
leaves a half-applied step:

1. *prepare*: every hyper-parameter, parameter and gradient of the step is checked,
   sparse gradients are canonicalised; nothing is written;
2. *non-finite policy* (``nonfinite="skip"`` or ``"raise"``): all gradients are scanned;
3. *apply*: the step counters advance and the kernels run, parameter by parameter.
"""

import bisect
import numbers
import threading
from operator import is_

import numpy as np

from .. import config
from ..algorithms import REGISTRY, Algorithm
from ..algorithms._spec import MAX_STEP, short_repr
from ..backends import backend_for, device_key, is_device_array, unused_slot
from ..backends.compressed import int8_block, row_aligned
from ..grads import DenseGrad, dense_host_grad, prepare_grad
from ..grads.sparse import _plan as sparse_plan
from ..grads.sparse import settle, settle_unless_continued

__all__ = ["Optimizer", "NONFINITE", "MAX_STEP"]

#: the values of the ``nonfinite`` option
NONFINITE = ("propagate", "skip", "raise")


_MANY: list = []


def _many():
    """:mod:`fastadapt.optim.many`, imported on first use: it imports numba, which ``import
    fastadapt`` does not need (an import statement in the step would cost ~1 us per call)."""
    if not _MANY:
        from . import many
        _MANY.append(many)
    return _MANY[0]


_STEADY: list = []
_COMPRESSED: list = []


def _compressed():
    """:mod:`fastadapt.backends.compressed`, imported on first use (it imports numba)."""
    if not _COMPRESSED:
        from ..backends import compressed
        _COMPRESSED.append(compressed)
    return _COMPRESSED[0]


def _kind_of(buf):
    """A state buffer's compressed kind ("bfloat16", "int8"), or None for a plain array."""
    return buf.kind if getattr(type(buf), "compressed_state", False) else None


def _is_compressed(state, slots):
    """Whether ``state`` holds compressed buffers (``state_dtype`` "bfloat16" or "int8")."""
    for name in slots:
        if name is not None:
            b = state.get(name)
            if b is not None:
                return getattr(type(b), "compressed_state", False)
    return False


def _steady():
    """:mod:`fastadapt.optim.steady`, imported on first use (as :func:`_many`)."""
    if not _STEADY:
        from . import steady
        _STEADY.append(steady)
    return _STEADY[0]


_NO_CARRY: dict = {}

#: value types a group's validation may be cached for (see Optimizer._checked)
_IMMUTABLE = frozenset({float, int, bool, str, tuple, type(None), np.bool_, np.float32, np.float64, np.int64})

_BUSY = ("is being used by another thread (one optimizer is stepped, saved and loaded by one thread "
         "at a time; separate optimizers may run in separate threads)")


class Optimizer:
    """Base class of fastadapt's optimizers (torch.optim's structure, numpy state).

    Parameters
    ----------
    params : iterable of arrays or of dicts
        The arrays to optimise (C-contiguous, writeable float32/float64 numpy arrays,
        or CUDA arrays), or param groups: dicts with a ``"params"`` list and any
        hyper-parameter overriding the defaults for that group.
    defaults : dict
        The hyper-parameters' default values.
    nonfinite : {"propagate", "skip", "raise"}
        What a step does when a gradient holds NaN or infinity: ``"propagate"`` applies
        it (torch's behaviour); ``"skip"`` changes nothing, does not advance the step
        counters and makes :meth:`step` return False; ``"raise"`` raises
        ``FloatingPointError`` and changes nothing.

    Attributes
    ----------
    param_groups : list of dict
        The groups; hyper-parameters are read from here at every step, so assigning
        ``opt.param_groups[0]["lr"] = 1e-4`` takes effect at the next step.
    state : list of dict
        Per-parameter state, by the parameter's position across the groups (the
        index used by :meth:`state_dict`).
    skipped_steps : int
        How many steps ``nonfinite="skip"`` skipped.
    """

    #: the declaration this optimizer runs (set by :func:`fastadapt.optim.classes.optimizer_class`)
    algorithm: Algorithm
    #: ``algorithm.rule``
    rule = None
    #: ``algorithm.slots``: state buffer names in the rule's slot order (s1, s2, s3); None: unused slot
    slots = (None, None, None)
    #: ``algorithm.accepts_dense``: whether gradients may be dense arrays (SparseAdam: no)
    accepts_dense = True

    def __init__(self, params, defaults, *, nonfinite="propagate"):
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.defaults = dict(defaults)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.param_groups = []
        self.state = []
        self._params = []          # flat list of parameters, in group order
        self._spans = []           # their memory spans, for overlap checks
        self._meta = []            # their (shape, dtype), re-checked at every step
        self._group_sizes = []     # parameters per group, re-checked at every step
        self._group_cache = {}     # id(group) -> (its values when last checked, buffer names)
        self._flats = {}           # id(state dict) -> (names, flat, buffers, their flat views)
        self._lock = threading.Lock()
        self._plan = None          # the steady-state plan (fastadapt.optim.steady), once a step made one
        if isinstance(params, np.ndarray) or is_device_array(params):
            raise TypeError("params must be a list of arrays or of param-group dicts, not an array "
                            f"itself: write {type(self).__name__}([w]) rather than "
                            f"{type(self).__name__}(w)")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    # ------------------------------------------------------------------ groups

    def _validate_group(self, group):
        """Check a group's hyper-parameters (the algorithm's checks); raise on bad values."""
        self.algorithm.check_group(group)
        params = group.get("params")
        if group.get("state_dtype") is not None and isinstance(params, list):
            self._check_state_dtype(group["state_dtype"], params)

    def _check_state_dtype(self, state_dtype, params):
        for p in params:
            dtype = backend_for(p).dtype_of(p)
            if dtype != np.float32:
                raise ValueError(f"state_dtype={state_dtype!r} is for float32 parameters; this group has a "
                                 f"{dtype} parameter, whose state stays {dtype} (state_dtype=None); put it in "
                                 "a group of its own")

    def _state_kind(self, group, p):
        """The kind of compressed state parameter ``p`` gets in ``group``: "bfloat16", "int8" or None."""
        kind = group.get("state_dtype")
        if kind is None or kind == "float32":
            return None
        if int(np.prod(p.shape, dtype=np.int64)) < config.STATE_COMPRESS_MIN:   # (torch: size is a method)
            return None
        return kind

    def _checked(self, group):
        """Validate ``group`` -- unless its values are the very objects validated last time -- and
        return the buffer names its options use.

        A step re-checks every group (hyper-parameters may be set between steps); the checks cost
        a few microseconds, so a group whose values are all immutable and identical (``is``) to
        those of its last check is not checked again.
        """
        values = tuple(group.values())
        hit = self._group_cache.get(id(group))
        if hit is not None and len(hit[0]) == len(values) and all(map(is_, hit[0], values)):
            return hit[1]
        self._validate_group(group)
        used = self.algorithm.used_buffers(group)
        if all(type(v) in _IMMUTABLE for k, v in group.items() if k != "params"):
            self._group_cache[id(group)] = (values, used)
        else:
            self._group_cache.pop(id(group), None)
        return used

    def add_param_group(self, param_group):
        """Add a group of parameters, with hyper-parameters overriding the defaults.

        Parameters
        ----------
        param_group : dict
            ``{"params": [arrays...], "lr": ..., ...}``; missing hyper-parameters take
            the optimizer's defaults.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"add_param_group: this optimizer {_BUSY}")
        try:
            self._add_param_group(param_group)
        finally:
            self._lock.release()

    def _add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if params is None:
            raise ValueError("a param group needs a 'params' entry")
        if isinstance(params, np.ndarray) or is_device_array(params):
            params = [params]
        params = list(params)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"unknown hyper-parameter(s) {sorted(unknown)} for {type(self).__name__}; "
                            f"known: {sorted(self.defaults)}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate_group(group)
        if group.get("state_dtype") is not None:
            self._check_state_dtype(group["state_dtype"], params)
        backends = {device_key(backend_for(q), q) for q in self._params}
        new_spans = []
        for j, p in enumerate(params):
            where = f"parameter {len(self._params) + j}"
            backend = backend_for(p)
            backend.check_param(p, where)
            backends.add(device_key(backend, p))
            new_spans.append(backend.memory_span(p) + (backend.name, len(self._params) + j))
        if len(backends) > 1:
            raise ValueError("all parameters of one optimizer must live on the same device "
                             f"(found {sorted(backends)}); use one optimizer per device")
        self._check_overlaps(self._spans + new_spans)
        self._plan = None
        group["params"] = params
        self.param_groups.append(group)
        self._group_sizes.append(len(params))
        for p in params:
            self._params.append(p)
            self._meta.append((tuple(p.shape), backend_for(p).dtype_of(p)))
            self.state.append(self._initial_state(group, p))
        self._spans.extend(new_spans)
        ordered = sorted((s[0], s[1], s[3]) for s in self._spans if s[1] > s[0])
        self._span_starts = [s[0] for s in ordered]      # parameters never overlap: ends sorted too
        self._span_order = ordered

    def _plain_buffer(self, p, value):
        """A new state buffer of ``p`` in its dtype, on its device, filled with ``value``: ``p``'s
        shape, or for a row rule one value per row (``algorithm.state_shape``)."""
        backend = backend_for(p)
        if self.algorithm.rows and len(p.shape) > 0:
            return backend.full_rows(p, value)
        return backend.full_like(p, value)

    def _gradient_overlap(self, start, end):
        """Index of a parameter whose memory meets bytes ``start:end`` (a gradient), or None."""
        i = bisect.bisect_left(self._span_starts, end) - 1
        if i >= 0 and self._span_order[i][1] > start:
            return self._span_order[i][2]
        return None

    @staticmethod
    def _check_overlaps(spans):
        spans = sorted(s for s in spans if s[1] > s[0])
        for a, b in zip(spans, spans[1:]):
            if a[2] == b[2] and b[0] < a[1]:
                raise ValueError(f"parameters {a[3]} and {b[3]} share memory (the same array given "
                                 "twice, or overlapping views); each element may be optimised once")

    def _initial_state(self, group, p):
        """State created when a parameter is added: eager for algorithms that say so (Adagrad)."""
        if not self.algorithm.eager_state:
            return {}
        state = {}
        self._ensure_state(group, p, state)
        return state

    def _ensure_state(self, group, p, state):
        """Create the step count, carried scalars and the buffers the group's current options
        need (lazily, on first use)."""
        if "step" not in state:
            state["step"] = 0
            for name, value in self.algorithm.carry:
                state[name] = value
        names = self._checked(group)
        kind = self._state_kind(group, p)
        if all(map(state.__contains__, names)) and (not names or _kind_of(state[names[0]]) == kind):
            return                                  # the usual case: nothing to create or convert
        fill = self.algorithm.fill
        for name in names:
            have = state.get(name)
            if have is None:
                state[name] = self._new_buffer(p, kind, name, fill(group, name))
            elif _kind_of(have) != kind:            # state_dtype changed: the values are kept
                state[name] = self._convert_buffer(p, kind, name, have)

    def _new_buffer(self, p, kind, name, value):
        backend = backend_for(p)
        if kind is None:
            return self._plain_buffer(p, value)
        return backend.compressed_full(p, value, kind, self._signed(name), self._seed(p))

    def _convert_buffer(self, p, kind, name, buf):
        """``buf`` (plain or compressed) as state of kind ``kind`` (None: the parameter's dtype)."""
        backend = backend_for(p)
        values = np.asarray(buf) if getattr(type(buf), "compressed_state", False) else backend.to_numpy(buf)
        if kind is None:
            out = backend.full_like(p, 0.0)
            backend.copy_into(out, values.astype(backend.dtype_of(p)))
            return out
        return backend.compressed_from(p, values, kind, self._signed(name), self._seed(p))

    def _signed(self, name):
        return self.algorithm.signed[self.slots.index(name)]

    def _seed(self, p):
        """Key of stochastic rounding for ``p``: its position in the optimizer."""
        for j, q in enumerate(self._params):
            if q is p:
                return j
        return len(self._params)

    def _buffer_names(self, group):
        """Names of the state buffers this group's options use, in slot order."""
        return self._checked(group)

    # ------------------------------------------------------------------ the step

    def _scalars(self, group, state, dtype):
        """The rule's per-step scalars for a parameter whose ``state`` was just advanced."""
        alg = self.algorithm
        carry = {name: state[name] for name, _ in alg.carry} if alg.carry else _NO_CARRY
        return alg.scalars(dtype, state["step"], group, carry)

    def step(self, grads):
        """Apply one optimisation step.

        Parameters
        ----------
        grads : sequence
            One gradient per parameter, in group order (the order of
            ``[p for g in opt.param_groups for p in g["params"]]``).  Each is an array
            of the parameter's shape and dtype, a scipy CSR matrix,
            :class:`fastadapt.RowGrad` or :class:`fastadapt.BagGrad` (sparse gradients, see
            docs/sparse.rst), or None to leave that parameter (and its step count) untouched.

        Returns
        -------
        bool
            True if the step was applied; False if ``nonfinite="skip"`` skipped it.

        Raises
        ------
        ValueError, TypeError
            On a gradient of the wrong shape, dtype or kind, a bad hyper-parameter, or
            the wrong number of gradients; nothing is changed.
        FloatingPointError
            With ``nonfinite="raise"``, when a gradient holds NaN or infinity; nothing
            is changed.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"step() called while this optimizer {_BUSY}")
        try:
            plan = self._plan
            if plan:
                done = plan.run(self, grads)         # True: applied; else nothing was written
                if done:
                    return True
            self._plan = None                        # the general path may change what a plan holds
            work = self._prepare(grads)
            if self.nonfinite != "propagate":
                bad = [j for (j, _, _, _, g) in work if not g.all_finite()]
                if bad:
                    if self.nonfinite == "raise":
                        raise FloatingPointError(
                            f"non-finite gradient for parameter(s) {bad}; nothing was changed "
                            "(construct the optimizer with nonfinite='skip' to skip such steps)")
                    self.skipped_steps += 1
                    return False
            self._apply_work(work)
            if len(work) == len(self._params) and not self.algorithm.rows and all(type(w[4]) is DenseGrad and w[4].address is not None
                                                      for w in work):
                self._plan = _steady().build(self, work)     # the next steps may run the plan
            return True
        finally:
            self._lock.release()

    def _check_structure(self):
        """The param groups still hold the arrays the optimizer was built with (O(groups))."""
        groups = self.param_groups
        if len(groups) != len(self._group_sizes):
            raise ValueError(f"param_groups has {len(groups)} groups, but this optimizer was built with "
                             f"{len(self._group_sizes)}: groups were added or removed by hand; add groups "
                             "with add_param_group (or build a new optimizer)")
        for gi, (group, n) in enumerate(zip(groups, self._group_sizes)):
            params = group.get("params") if isinstance(group, dict) else None
            if not isinstance(params, list) or len(params) != n:
                raise ValueError(f"param group {gi}'s 'params' was replaced or resized after construction "
                                 f"(it had {n} parameters); build a new optimizer, or add the arrays with "
                                 "add_param_group")

    def _changed(self, j, p):
        """Raise: parameter ``j`` of a group is not the array it was, or no longer fit to update."""
        if p is not self._params[j]:
            raise ValueError(f"parameter {j} is not the array this optimizer was built with (it was replaced "
                             "in param_groups after construction); build a new optimizer, or call "
                             "add_param_group with the new array")
        backend = backend_for(p)
        backend.check_param(p, f"parameter {j}")      # read-only, retyped or non-contiguous: says which
        shape, dtype = self._meta[j]
        if tuple(p.shape) != shape or backend.dtype_of(p) != dtype:
            raise ValueError(f"parameter {j} changed from {shape} {dtype} to {tuple(p.shape)} "
                             f"{backend.dtype_of(p)} after construction (its state has the old shape); "
                             "build a new optimizer for the new array")

    def _prepare(self, grads):
        if isinstance(grads, np.ndarray) or is_device_array(grads):
            raise TypeError("step() takes a sequence of gradients, one per parameter: "
                            "write opt.step([g]) rather than opt.step(g)")
        grads = list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"step() got {len(grads)} gradients for {len(self._params)} parameters; "
                             "pass one per parameter in group order (None to skip one)")
        self._check_structure()
        work = []
        j = 0
        accepts_dense = self.accepts_dense
        backend = backend_for(self._params[0])     # one device per optimizer (add_param_group)
        spans, states, params, meta = self._spans, self.state, self._params, self._meta
        for group in self.param_groups:
            self._checked(group)
            for p in group["params"]:
                # the same array, unchanged: identity, shape, dtype and flags (O(1) per parameter)
                # (device arrays always take the backend's checks)
                if p is not params[j] or type(p) is not np.ndarray or p.shape != meta[j][0] \
                        or p.dtype is not meta[j][1] or not p.flags.writeable:
                    self._changed(j, p)               # raises, unless a device array is fine
                g = grads[j]
                if g is not None:
                    prepared = dense_host_grad(g, p, backend, spans[j]) if accepts_dense else None
                    if prepared is None:
                        prepared = prepare_grad(g, p, backend, f"gradient {j}",
                                                accepts_dense=accepts_dense,
                                                optimizer_name=type(self).__name__)
                    if type(prepared) is DenseGrad:
                        g_flat = prepared.g
                        start = (prepared.address if prepared.address is not None
                                 else backend.memory_span(g_flat)[0])
                        other = self._gradient_overlap(start, start + g_flat.nbytes)
                        if other is not None:
                            raise ValueError(f"gradient {j} shares memory with parameter {other}, which "
                                             "this step updates; pass a separate gradient array")
                    else:
                        if self._state_kind(group, p) is not None:
                            plan = sparse_plan(self, group)
                            if not (backend.sparse_compressed and backend.sparse_compressed_supports(plan)):
                                raise NotImplementedError(
                                    f"gradient {j} is sparse, and sparse gradients with compressed state "
                                    f"(state_dtype={group.get('state_dtype')!r}) in sparse_mode="
                                    f"{group.get('sparse_mode', 'lazy')!r} ({plan!r} step) are not implemented "
                                    f"for {backend.name} parameters yet; pass a dense gradient, use "
                                    "sparse_mode='lazy', or use state_dtype=None")
                        self._check_sparse_overlap(j, prepared, backend)
                        self._check_sparse_state(j, group, p)
                    work.append((j, group, p, states[j], prepared))
                j += 1
        return work

    def _check_sparse_overlap(self, j, prepared, backend):
        """A sparse gradient's arrays (values and indices, as the loops will read them) must not
        share memory with any parameter of the step: the loops read them while writing."""
        for name in ("vals", "rows", "indptr", "cols"):
            a = getattr(prepared, name, None)
            if a is None or a.size == 0:
                continue
            start, end = backend.memory_span(a)
            other = self._gradient_overlap(start, end)
            if other is not None:
                what = "values" if name == "vals" else "indices"
                raise ValueError(f"gradient {j}: its {what} share memory with parameter {other}, which this "
                                 "step updates; pass a copy")

    def _check_sparse_state(self, j, group, p):
        """A sparse gradient of a parameter with int8 state needs its blocks within rows (a sparse
        step re-encodes whole rows); raise before anything is written."""
        if self._state_kind(group, p) != "int8":
            return
        shape = tuple(p.shape)
        block = int8_block(shape)
        if row_aligned(shape, block):
            return
        why = ("it is 1-D" if len(shape) < 2 else
               f"its rows have {int(np.prod(shape[1:], dtype=np.int64))} elements, fewer than 32")
        raise ValueError(f"gradient {j} is sparse, but parameter {j} (shape {shape}) has state_dtype='int8', whose "
                         f"blocks of {block} elements span several rows because {why}: a sparse step would "
                         "re-quantize rows it does not touch. Put this parameter in a param group with "
                         "state_dtype='bfloat16' (works for every shape), or use a table with rows of 32 "
                         "elements or more, or pass a dense gradient; nothing was changed")

    def _apply(self, group, p, state, g):
        if "_decay" in state:          # pending exact-mode decay (grads.sparse): settle unless continued
            settle_unless_continued(self, group, p, state, g)
        self._ensure_state(group, p, state)
        state["step"] += 1
        self._advance_carry(group, state)
        g.apply(self, group, p, state)

    def _advance_carry(self, group, state):
        """Update the carried scalars (NAdam's ``mu_product``) for the step just counted."""
        advance = self.algorithm.advance
        if advance is not None:
            carry = {name: state[name] for name, _ in self.algorithm.carry}
            state.update(advance(state["step"], group, carry))

    def _apply_work(self, work):
        """Phase 3: apply every prepared gradient.  Two or more dense CPU gradients are
        applied together by :mod:`fastadapt.many` (one kernel call per param group, step
        count and dtype, not one per parameter); the results are the same."""
        dense = []
        rows = self.algorithm.rows                  # row rules: one kernel per parameter
        for item in work:
            j, group, p, state, g = item
            if not rows and type(g) is DenseGrad and g.address is not None and "_decay" not in state \
                    and self._state_kind(group, p) is None:   # host arrays, plain state
                dense.append(item)
            else:
                self._apply(group, p, state, g)
        if len(dense) > 1:
            _many().apply_dense(self, dense)
        else:
            for j, group, p, state, g in dense:
                self._apply(group, p, state, g)

    def _compressed_slots(self, group, state):
        """The rule's three slots as compressed buffers (None for unused ones), or None when the
        state is plain arrays."""
        names = self._checked(group)
        if not _is_compressed(state, names):
            return None
        return tuple(state[n] if (n is not None and n in names) else None for n in self.slots)

    def _slot_arrays(self, group, p, state, flat):
        """The rule's (s1, s2, s3): flat state buffers, dummies for unused slots."""
        names = self._checked(group)
        bufs = tuple(state[name] if (name is not None and name in names) else None for name in self.slots)
        hit = self._flats.get(id(state))
        if hit is not None and hit[0] is names and hit[1] is flat and all(map(is_, hit[2], bufs)):
            return hit[3]                       # the same buffers as last step: their views too
        backend = backend_for(p)
        out = [flat(b) if b is not None else unused_slot(backend, p) for b in bufs]
        self._flats[id(state)] = (names, flat, bufs, out)
        return out

    # ------------------------------------------------------------------ state_dict

    def _read_state(self, j):
        """Hook: bring parameter ``j``'s state up to date before it is read."""
        if "_decay" in self.state[j]:  # exact-mode decay still pending on untouched rows
            settle(self._params[j], self.state[j])

    def state_dict(self, dtype=None):
        """The optimizer's state as plain numpy arrays and Python scalars.

        Parameters
        ----------
        dtype : {None, "float32"}
            None: compressed buffers (``state_dtype`` "bfloat16" or "int8") as their compact
            form, a dict ``{"state_dtype", "codes"}`` (+ ``"absmax"``, ``"signed"``, ``"block"``
            for int8) of copies, which :meth:`load_state_dict` restores bit for bit.
            ``"float32"``: compressed buffers decoded to float32 arrays (what torch.optim and an
            optimizer with float32 state load); the groups' ``state_dtype`` is kept.

        Returns
        -------
        dict
            ``{"state": {index: {"step": int, buffer name: ndarray}}, "param_groups":
            [{hyper-parameters..., "params": [index, ...]}]}`` -- torch's layout, indexed
            by parameter position; the arrays are copies.
        """
        if dtype not in (None, "float32"):
            raise ValueError(f"state_dict(dtype=...) takes None (compact compressed state) or 'float32', got {dtype!r}")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"state_dict() called while this optimizer {_BUSY}")
        try:
            return self._state_dict(dtype)
        finally:
            self._lock.release()

    @staticmethod
    def _export(backend, v, dtype):
        if isinstance(v, (int, float)):
            return v
        if getattr(type(v), "compressed_state", False):
            return v.decode() if dtype == "float32" else v.to_dict()
        return backend.to_numpy(v)

    def _state_dict(self, dtype=None):
        for j in range(len(self._params)):
            self._read_state(j)
        state = {}
        for j, st in enumerate(self.state):
            if not st:
                continue
            backend = backend_for(self._params[j])
            state[j] = {k: self._export(backend, v, dtype) for k, v in st.items() if not k.startswith("_")}
        groups = []
        j = 0
        for group in self.param_groups:
            g = {k: (tuple(v) if isinstance(v, list) and k == "betas" else v)
                 for k, v in group.items() if k != "params"}
            g["params"] = list(range(j, j + len(group["params"])))
            j += len(group["params"])
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load a :meth:`state_dict`; the optimizer continues bit-exactly from it.

        Everything is checked first (group count and sizes, hyper-parameters, buffer
        names, shapes and dtypes, step counts); on any mismatch a ValueError is raised and
        nothing changes.  A state_dict of another optimizer (another fastadapt class, or
        torch.optim's) is named as such.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"load_state_dict() called while this optimizer {_BUSY}")
        try:
            self._load_state_dict(state_dict)
        finally:
            self._lock.release()

    def _foreign(self, groups, saved_state):
        """A sentence naming what ``state_dict`` looks like, when it is not this optimizer's; or None."""
        values = [v for g in groups for v in g.values()] + [v for st in saved_state.values() for v in st.values()]
        if any(type(v).__module__.split(".")[0] == "torch" for v in values) or any(
                k in g for g in groups for k in ("foreach", "differentiable", "capturable", "fused")):
            return ("this looks like a torch.optim state_dict (torch tensors and torch-only options such as "
                    "'foreach'); fastadapt loads the state_dicts of its own optimizers")
        keys = set().union(*(set(g) for g in groups)) - {"params"} if groups else set()
        names = set().union(*(set(st) for st in saved_state.values())) if saved_state else set()
        mine = self.algorithm
        for alg in REGISTRY:
            slots = {s for s in alg.slots if s is not None} | {"step"} | {n for n, _ in alg.carry}
            if keys != set(alg.defaults) or not names <= slots:
                continue
            if any(g.get(k) != v for g in groups for k, v in alg.fixed.items()):
                continue
            if alg is mine or (alg.rule is mine.rule and set(alg.defaults) == set(mine.defaults)
                               and all(g.get(k) == v for g in groups for k, v in mine.fixed.items())):
                return None                       # ours (or a variant this class can load)
            article = "an" if alg.name[0] in "AEIOU" else "a"
            return f"this looks like {article} {alg.name} state_dict; load it into fastadapt.{alg.name}"
        return None

    def _load_state_dict(self, state_dict):
        try:
            groups, saved_state = state_dict["param_groups"], state_dict["state"]
        except (TypeError, KeyError):
            raise ValueError("not a fastadapt state_dict: it needs 'state' and 'param_groups'") from None
        if (not isinstance(saved_state, dict) or not all(isinstance(st, dict) for st in saved_state.values())
                or not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups)):
            raise ValueError("not a fastadapt state_dict: 'state' must map parameter indices to dicts and "
                             "'param_groups' must be a list of dicts (as state_dict() returns)")
        foreign = self._foreign(groups, saved_state)
        if foreign is not None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {foreign}")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        new_groups = []
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(mine["params"]):
                raise ValueError(f"param group {gi} has {len(saved.get('params', ()))} parameters in the "
                                 f"state_dict and {len(mine['params'])} here")
            unknown = set(saved) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"param group {gi} of the state_dict has unknown keys {sorted(unknown)}")
            group = dict(mine)
            group.update({k: v for k, v in saved.items() if k != "params"})
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            self._validate_group(group)
            new_groups.append(group)
        carried = {n for n, _ in self.algorithm.carry}
        known = {s for s in self.slots if s is not None} | {"step"} | carried
        loaded = {}                    # (index, name) -> CompressedBuffer checked from a compact entry
        group_of = {}
        position = {}
        for group, saved in zip(new_groups, groups):
            for idx in saved["params"]:
                group_of[idx] = group
            for idx, p in zip(saved["params"], group["params"]):
                position[idx] = p
        if set(saved_state) - set(position):
            raise ValueError(f"state_dict holds state for parameter indices {sorted(set(saved_state) - set(position))} "
                             "that its param groups do not list")
        for idx, st in saved_state.items():
            p = position[idx]
            if set(st) - known:
                raise ValueError(f"state of parameter {idx} has unknown entries {sorted(set(st) - known)}; "
                                 f"{type(self).__name__} keeps {sorted(known)}")
            step = st.get("step")
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < MAX_STEP:
                raise ValueError(f"state of parameter {idx}: 'step' must be a non-negative int below 2**53, got "
                                 f"{short_repr(step)}")
            for name in carried & set(st):
                value = st[name]
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                    raise ValueError(f"state of parameter {idx}: {name!r} must be a real number, got {value!r}")
            for name, arr in st.items():
                if name == "step" or name in carried:
                    continue
                p_dtype = backend_for(p).dtype_of(p)
                if isinstance(arr, dict):                 # compact compressed state
                    if p_dtype != np.float32:
                        raise ValueError(f"state of parameter {idx}: {name!r} is compressed state, which only "
                                         f"float32 parameters have; the parameter is {p_dtype}")
                    loaded[(idx, name)] = _compressed().CompressedBuffer.from_dict(
                        arr, tuple(p.shape), 0, f"state of parameter {idx}: {name!r}")
                    continue
                arr = np.asarray(arr)
                want = self.algorithm.state_shape(p.shape)
                if arr.shape != want or arr.dtype != p_dtype:
                    per_row = " (one value per row)" if self.algorithm.rows else ""
                    raise ValueError(f"state of parameter {idx}: {name!r} has shape {arr.shape} and dtype "
                                     f"{arr.dtype}; for the parameter of shape {tuple(p.shape)} and dtype {p_dtype} "
                                     f"it must be {want}{per_row} and {p_dtype}")
        # everything checked: now write
        self._flats.clear()                     # (it would keep the replaced buffers alive)
        self._plan = None
        for j in range(len(self._params)):
            self._read_state(j)        # settle anything pending before it is replaced
        for group, mine in zip(new_groups, self.param_groups):
            mine.update({k: v for k, v in group.items() if k != "params"})
        index_of = {id(p): j for j, p in enumerate(self._params)}
        for idx, st in saved_state.items():
            p = position[idx]
            j = index_of[id(p)]
            backend = backend_for(p)
            new = {"step": int(st["step"])}
            kind = self._state_kind(group_of[idx], p)
            for name, arr in st.items():
                if name == "step":
                    continue
                if name in carried:
                    new[name] = float(arr)
                    continue
                buf = loaded.get((idx, name))
                if buf is not None:                         # compact compressed entry
                    buf.seed = j
                    new[name] = (backend.compressed_load(p, buf) if kind == buf.kind
                                 else self._convert_buffer(p, kind, name, buf))
                elif kind is not None:                      # float state into compressed state
                    new[name] = backend.compressed_from(p, np.asarray(arr), kind, self._signed(name), j)
                else:
                    buf = self._plain_buffer(p, 0.0)
                    backend.copy_into(buf, np.asarray(arr))
                    new[name] = buf
            self.state[j] = new
        for j, p in enumerate(self._params):
            if j not in {index_of[id(position[i])] for i in saved_state}:
                self.state[j] = self._initial_state(self._group_of(j), p)

    def _group_of(self, j):
        for group in self.param_groups:
            if j < len(group["params"]):
                return group
            j -= len(group["params"])
        raise IndexError(j)

    def state_of(self, p):
        """The state dict of parameter array ``p`` (by identity)."""
        for j, q in enumerate(self._params):
            if q is p:
                self._read_state(j)
                return self.state[j]
        raise KeyError("this array is not a parameter of the optimizer")

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
