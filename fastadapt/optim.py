"""The optimizer API: param groups, state, ``state_dict``, validation, backend dispatch.

Each algorithm is a short class naming its rule (:mod:`fastadapt.rules`), its state
buffers and how its per-step scalars are made; :class:`Optimizer` does the rest.  A
step runs in three phases so that bad input never leaves a half-applied step:

1. *prepare*: every hyper-parameter, parameter and gradient of the step is checked,
   sparse gradients are canonicalised; nothing is written;
2. *non-finite policy* (``nonfinite="skip"`` or ``"raise"``): all gradients are scanned;
3. *apply*: the step counters advance and the kernels run, parameter by parameter.
"""

import bisect
import math
import numbers

import numpy as np

from . import rules
from .grads import DenseGrad, dense_host_grad, prepare_grad

__all__ = ["Optimizer", "Adagrad", "RMSprop", "Adam", "AdamW", "SparseAdam"]

_NONFINITE = ("propagate", "skip", "raise")
_SPARSE_MODES = ("lazy", "exact")


def _is_device_array(a):
    """True for CUDA arrays: ``__cuda_array_interface__``, or numba's (simulated) device arrays."""
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def _device_key(backend, p):
    """Where ``p`` lives, for the one-device check: "cpu", or "cuda:N"."""
    device_of = getattr(backend, "device_of", None)
    return backend.name if device_of is None else f"{backend.name}:{device_of(p)}"


_CPU = []


def backend_for(p):
    """The backend that owns array ``p``: :mod:`fastadapt.cpu` or :mod:`fastadapt.cuda`."""
    if isinstance(p, np.ndarray):
        if _CPU:
            return _CPU[0]
        from .cpu import BACKEND       # imported on first use (an import statement costs ~1 us per call)
        _CPU.append(BACKEND)
        return BACKEND
    if _is_device_array(p):
        from .cuda import backend      # imported only when a CUDA array is seen
        return backend()
    raise TypeError(f"parameters must be numpy arrays or CUDA arrays (CuPy, torch CUDA tensors, "
                    f"numba device arrays), got {type(p).__name__}")


def _check_number(name, value, low=None, high=None, low_inclusive=True, high_inclusive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"invalid {name}: {value!r}; it must be {op} {low}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"invalid {name}: {value!r}; it must be {op} {high}")


def _check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for j, b in enumerate(betas):
        _check_number(f"beta{j + 1} (betas[{j}])", b, 0.0, 1.0)


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

    #: the rule of :mod:`fastadapt.rules` that this optimizer runs
    rule = None
    #: state buffer names, in the rule's slot order (s1, s2, s3); None: unused slot
    slots = (None, None, None)
    #: whether gradients may be dense arrays (SparseAdam: no)
    accepts_dense = True

    def __init__(self, params, defaults, *, nonfinite="propagate"):
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.defaults = dict(defaults)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.param_groups = []
        self.state = []
        self._params = []          # flat list of parameters, in group order
        self._spans = []           # their memory spans, for overlap checks
        if isinstance(params, np.ndarray) or _is_device_array(params):
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
        """Check a group's hyper-parameters (subclasses extend); raise on bad values."""
        mode = group.get("sparse_mode", "lazy")
        if mode not in _SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {_SPARSE_MODES}, got {mode!r}")

    def add_param_group(self, param_group):
        """Add a group of parameters, with hyper-parameters overriding the defaults.

        Parameters
        ----------
        param_group : dict
            ``{"params": [arrays...], "lr": ..., ...}``; missing hyper-parameters take
            the optimizer's defaults.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if params is None:
            raise ValueError("a param group needs a 'params' entry")
        if isinstance(params, np.ndarray) or _is_device_array(params):
            params = [params]
        params = list(params)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"unknown hyper-parameter(s) {sorted(unknown)} for {type(self).__name__}; "
                            f"known: {sorted(self.defaults)}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate_group(group)
        backends = {_device_key(backend_for(q), q) for q in self._params}
        new_spans = []
        for j, p in enumerate(params):
            where = f"parameter {len(self._params) + j}"
            backend = backend_for(p)
            backend.check_param(p, where)
            backends.add(_device_key(backend, p))
            new_spans.append(backend.memory_span(p) + (backend.name, len(self._params) + j))
        if len(backends) > 1:
            raise ValueError("all parameters of one optimizer must live on the same device "
                             f"(found {sorted(backends)}); use one optimizer per device")
        self._check_overlaps(self._spans + new_spans)
        group["params"] = params
        self.param_groups.append(group)
        for p in params:
            self._params.append(p)
            self.state.append(self._initial_state(group, p))
        self._spans.extend(new_spans)
        ordered = sorted((s[0], s[1], s[3]) for s in self._spans if s[1] > s[0])
        self._span_starts = [s[0] for s in ordered]      # parameters never overlap: ends sorted too
        self._span_order = ordered

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
        """State created when a parameter is added (Adagrad's is eager; others: lazy)."""
        return {}

    def _ensure_state(self, group, p, state):
        """Create the buffers the group's current options need (lazily, on first use)."""
        backend = backend_for(p)
        if "step" not in state:
            state["step"] = 0
        for name in self._buffer_names(group):
            if name not in state:
                state[name] = backend.full_like(p, self._buffer_fill(group, name))

    def _buffer_names(self, group):
        """Names of the state buffers this group's options use (subclasses narrow)."""
        return [s for s in self.slots if s is not None]

    def _buffer_fill(self, group, name):
        return 0.0

    # ------------------------------------------------------------------ the step

    def _scalars(self, group, step, dtype):
        """The rule's per-step scalars (a tuple, numbers in ``dtype``)."""
        raise NotImplementedError

    def _exact_strategy(self, group):
        """How ``sparse_mode="exact"`` runs a sparse step for this group (see fastadapt.sparse).

        ``"lazy"``: a zero gradient changes nothing, so the lazy loop is exact (O(nnz));
        ``"decay"``: a zero gradient only decays the state geometrically (RMSprop's closed-form
        catch-up with per-row stamps); ``"fused"`` (default): one pass over the whole parameter.
        """
        return "fused"

    def step(self, grads):
        """Apply one optimisation step.

        Parameters
        ----------
        grads : sequence
            One gradient per parameter, in group order (the order of
            ``[p for g in opt.param_groups for p in g["params"]]``).  Each is an array
            of the parameter's shape and dtype, a scipy CSR matrix or
            :class:`fastadapt.RowGrad` (sparse gradients, see the README), or None to
            leave that parameter (and its step count) untouched.

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
        return True

    def _prepare(self, grads):
        if isinstance(grads, np.ndarray) or _is_device_array(grads):
            raise TypeError("step() takes a sequence of gradients, one per parameter: "
                            "write opt.step([g]) rather than opt.step(g)")
        grads = list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"step() got {len(grads)} gradients for {len(self._params)} parameters; "
                             "pass one per parameter in group order (None to skip one)")
        work = []
        j = 0
        accepts_dense = self.accepts_dense
        backend = backend_for(self._params[0])     # one device per optimizer (add_param_group)
        spans, states = self._spans, self.state
        for group in self.param_groups:
            self._validate_group(group)
            for p in group["params"]:
                g = grads[j]
                if g is not None:
                    prepared = dense_host_grad(g, p, backend, spans[j]) if accepts_dense else None
                    if prepared is None:
                        prepared = prepare_grad(g, p, backend, f"gradient {j}",
                                                accepts_dense=accepts_dense, optimizer=self)
                    if type(prepared) is DenseGrad:
                        g_flat = prepared.g
                        start = (prepared.address if prepared.address is not None
                                 else backend.memory_span(g_flat)[0])
                        other = self._gradient_overlap(start, start + g_flat.nbytes)
                        if other is not None:
                            raise ValueError(f"gradient {j} shares memory with parameter {other}, which "
                                             "this step updates; pass a separate gradient array")
                    work.append((j, group, p, states[j], prepared))
                j += 1
        return work

    def _apply(self, group, p, state, g):
        if "_decay" in state:          # pending exact-mode decay (fastadapt.sparse): settle unless continued
            from .sparse import settle_unless_continued
            settle_unless_continued(self, group, p, state, g)
        self._ensure_state(group, p, state)
        state["step"] += 1
        g.apply(self, group, p, state)

    def _apply_work(self, work):
        """Phase 3: apply every prepared gradient.  Two or more dense CPU gradients are
        applied together by :mod:`fastadapt.many` (one kernel call per param group, step
        count and dtype, not one per parameter); the results are the same."""
        dense = []
        for item in work:
            j, group, p, state, g = item
            if type(g) is DenseGrad and g.address is not None and "_decay" not in state:   # host arrays
                dense.append(item)
            else:
                self._apply(group, p, state, g)
        if len(dense) > 1:
            from .many import apply_dense
            apply_dense(self, dense)
        else:
            for j, group, p, state, g in dense:
                self._apply(group, p, state, g)

    def _slot_arrays(self, group, p, state, flat):
        """The rule's (s1, s2, s3): flat state buffers, dummies for unused slots."""
        backend = backend_for(p)
        names = self._buffer_names(group)
        out = []
        for name in self.slots:
            if name is not None and name in names:
                out.append(flat(state[name]))
            else:
                out.append(_dummy(backend, p))
        return out

    # ------------------------------------------------------------------ state_dict

    def _read_state(self, j):
        """Hook: bring parameter ``j``'s state up to date before it is read."""
        if "_decay" in self.state[j]:  # exact-mode decay still pending on untouched rows
            from .sparse import settle
            settle(self._params[j], self.state[j])

    def state_dict(self):
        """The optimizer's state as plain numpy arrays and Python scalars.

        Returns
        -------
        dict
            ``{"state": {index: {"step": int, buffer name: ndarray}}, "param_groups":
            [{hyper-parameters..., "params": [index, ...]}]}`` -- torch's layout, indexed
            by parameter position; the arrays are copies.
        """
        for j in range(len(self._params)):
            self._read_state(j)
        state = {}
        for j, st in enumerate(self.state):
            if not st:
                continue
            backend = backend_for(self._params[j])
            state[j] = {k: (backend.to_numpy(v) if not isinstance(v, (int, float)) else v)
                        for k, v in st.items() if not k.startswith("_")}
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
        names, shapes and dtypes); on any mismatch a ValueError is raised and nothing
        changes.
        """
        try:
            groups, saved_state = state_dict["param_groups"], state_dict["state"]
        except (TypeError, KeyError):
            raise ValueError("not a fastadapt state_dict: it needs 'state' and 'param_groups'") from None
        if (not isinstance(saved_state, dict) or not all(isinstance(st, dict) for st in saved_state.values())
                or not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups)):
            raise ValueError("not a fastadapt state_dict: 'state' must map parameter indices to dicts and "
                             "'param_groups' must be a list of dicts (as state_dict() returns)")
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
        known = {s for s in self.slots if s is not None} | {"step"}
        position = {}
        for group, saved in zip(new_groups, groups):
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
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"state of parameter {idx}: 'step' must be a non-negative int, got {step!r}")
            for name, arr in st.items():
                if name == "step":
                    continue
                arr = np.asarray(arr)
                p_dtype = getattr(backend_for(p), "dtype_of", lambda a: a.dtype)(p)
                if arr.shape != tuple(p.shape) or arr.dtype != p_dtype:
                    raise ValueError(f"state of parameter {idx}: {name!r} has shape {arr.shape} and dtype "
                                     f"{arr.dtype}, the parameter has {tuple(p.shape)} and {p_dtype}")
        # everything checked: now write
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
            for name, arr in st.items():
                if name == "step":
                    continue
                buf = backend.full_like(p, 0.0)
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


_DUMMIES = {}


def _dummy(backend, p):
    """A 1-element buffer for rule slots unused with the current options (one per device and dtype)."""
    key = (_device_key(backend, p), str(p.dtype))
    d = _DUMMIES.get(key)
    if d is None:
        d = _DUMMIES[key] = backend.flat(backend.full_like(p.reshape(-1)[:1], 0.0))
    return d


# =========================================================================== algorithms

class Adagrad(Optimizer):
    """Adagrad (Duchi et al.), with torch.optim.Adagrad's arguments and defaults.

    Accumulates squared gradients forever, so the step size of a dense, frequently
    updated coordinate decays like 1/sqrt(t): suited to sparse features.

    Parameters
    ----------
    params : iterable
        Arrays or param groups (see :class:`Optimizer`).
    lr : float, default 1e-2
    lr_decay : float, default 0
        Inverse-time decay: the step ``t`` uses ``lr / (1 + (t - 1) * lr_decay)``.
    weight_decay : float, default 0
        L2 penalty, added to the gradient.
    initial_accumulator_value : float, default 0
        Initial value of the ``sum`` state.  Unlike torch, a per-group value is
        honoured (SPEC.md Part A.5).
    eps : float, default 1e-10
        Added to ``sqrt(sum)``.
    maximize : bool, default False
    sparse_mode : {"lazy", "exact"}, default "lazy"
        For sparse gradients; see the README.  Without weight decay both are equal.
    nonfinite : {"propagate", "skip", "raise"}, default "propagate"
    """

    rule = staticmethod(rules.adagrad_rule)
    slots = ("sum", None, None)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, *, maximize=False, sparse_mode="lazy", nonfinite="propagate"):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize, sparse_mode=sparse_mode)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group):
        super()._validate_group(group)
        for name in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            _check_number(name, group[name], 0.0)

    def _initial_state(self, group, p):
        return {"step": 0, "sum": backend_for(p).full_like(p, group["initial_accumulator_value"])}

    def _buffer_fill(self, group, name):
        return group["initial_accumulator_value"]

    def _scalars(self, group, step, dtype):
        return rules.adagrad_scalars(dtype, step, group["lr"], group["lr_decay"], group["weight_decay"],
                                     group["eps"], group["maximize"])

    def _exact_strategy(self, group):
        # without weight decay a zero gradient leaves sum and p unchanged (eps > 0 keeps 0/0 out)
        if group["weight_decay"] == 0 and group["eps"] > 0 and math.isfinite(group["lr"]):
            return "lazy"
        return "fused"


class RMSprop(Optimizer):
    """RMSprop (Hinton), with torch.optim.RMSprop's arguments and defaults.

    Divides by the root of a decaying average of squared gradients.  Note the default
    ``alpha=0.99`` (torch); Keras and the original lecture use 0.9.

    Parameters
    ----------
    params : iterable
    lr : float, default 1e-2
    alpha : float, default 0.99
        Decay of the squared-gradient average.
    eps : float, default 1e-8
        Added after the square root.
    weight_decay : float, default 0
        L2 penalty, added to the gradient.
    momentum : float, default 0
        Momentum of ``g / (sqrt(v) + eps)`` (the learning rate stays outside the buffer).
    centered : bool, default False
        Divide by an estimate of the variance instead of the raw second moment;
        ``v - mean(g)**2`` is clamped at 0 (torch lets rounding make it negative and
        returns NaN: SPEC.md Part A.4).
    maximize : bool, default False
    sparse_mode : {"lazy", "exact"}, default "lazy"
    nonfinite : {"propagate", "skip", "raise"}, default "propagate"
    """

    rule = staticmethod(rules.rmsprop_rule)
    slots = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False, sparse_mode="lazy", nonfinite="propagate"):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize, sparse_mode=sparse_mode)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group):
        super()._validate_group(group)
        for name in ("lr", "eps", "momentum", "weight_decay", "alpha"):
            _check_number(name, group[name], 0.0)

    def _buffer_names(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    def _scalars(self, group, step, dtype):
        return rules.rmsprop_scalars(dtype, step, group["lr"], group["alpha"], group["eps"],
                                     group["weight_decay"], group["momentum"], group["centered"],
                                     group["maximize"])

    def _exact_strategy(self, group):
        # without momentum or weight decay a zero gradient leaves p alone and multiplies the
        # averages by alpha (rules.rmsprop_decay): caught up per row in closed form
        if (group["momentum"] == 0 and group["weight_decay"] == 0 and group["eps"] > 0
                and group["alpha"] <= 1 and math.isfinite(group["lr"])):
            return "decay"
        return "fused"


class Adam(Optimizer):
    """Adam (Kingma & Ba), with torch.optim.Adam's arguments and defaults.

    Momentum plus a per-coordinate scale, both bias-corrected with the parameter's own
    step count ``t`` (counted across the whole run, never reset per epoch).

    Parameters
    ----------
    params : iterable
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
        Decays of the first and second moments, each in [0, 1).
    eps : float, default 1e-8
        Added after the bias-corrected square root (Algorithm 1, as torch; not the
        "epsilon-hat" form of Keras/TF and of :class:`SparseAdam`).
    weight_decay : float, default 0
        L2 penalty added to the gradient, or, with ``decoupled_weight_decay=True``,
        AdamW's decay ``p *= 1 - lr * weight_decay``.
    amsgrad : bool, default False
        Use the running maximum of the (raw) second moment.
    maximize : bool, default False
    decoupled_weight_decay : bool, default False
    sparse_mode : {"lazy", "exact"}, default "lazy"
    nonfinite : {"propagate", "skip", "raise"}, default "propagate"
    """

    rule = staticmethod(rules.adam_rule)
    slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, maximize=False, decoupled_weight_decay=False, sparse_mode="lazy",
                 nonfinite="propagate"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, sparse_mode=sparse_mode)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group):
        super()._validate_group(group)
        for name in ("lr", "eps", "weight_decay"):
            _check_number(name, group[name], 0.0)
        _check_betas(group["betas"])

    def _buffer_names(self, group):
        names = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return names

    def _scalars(self, group, step, dtype):
        return rules.adam_scalars(dtype, step, group["lr"], group["betas"], group["eps"],
                                  group["weight_decay"], group["amsgrad"], group["maximize"],
                                  group["decoupled_weight_decay"])


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): :class:`Adam` with decoupled weight decay.

    ``p *= 1 - lr * weight_decay`` before the moments are updated; the decay follows
    lr schedules and never enters the moments.  Same arguments as :class:`Adam` but
    ``weight_decay`` defaults to 1e-2 and there is no ``decoupled_weight_decay``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, maximize=False, sparse_mode="lazy", nonfinite="propagate"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=True, sparse_mode=sparse_mode,
                         nonfinite=nonfinite)

    def _validate_group(self, group):
        super()._validate_group(group)
        if not group["decoupled_weight_decay"]:
            raise ValueError("AdamW always decouples weight decay; use Adam for the L2 form")


class SparseAdam(Optimizer):
    """torch.optim.SparseAdam: lazy Adam for sparse gradients (CSR or :class:`RowGrad`).

    Only touched entries change (parameter and moments); the step count advances at
    every step, also when a gradient is empty, and bias-corrects every entry.  Epsilon
    is in the "epsilon-hat" form ``lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)``, so even a
    gradient holding every entry differs from :class:`Adam` (use ``Adam`` with
    ``sparse_mode="lazy"`` for Adam's own epsilon).  Dense gradients are refused.

    Parameters
    ----------
    params : iterable
    lr : float, default 1e-3
        Must be > 0.
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
        Must be > 0.
    maximize : bool, default False
    nonfinite : {"propagate", "skip", "raise"}, default "propagate"
    """

    rule = staticmethod(rules.sparse_adam_rule)
    slots = ("exp_avg", "exp_avg_sq", None)
    accepts_dense = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *,
                 nonfinite="propagate"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group):
        _check_number("lr", group["lr"], 0.0, low_inclusive=False)
        _check_number("eps", group["eps"], 0.0, low_inclusive=False)
        _check_betas(group["betas"])

    def _scalars(self, group, step, dtype):
        return rules.sparse_adam_scalars(dtype, step, group["lr"], group["betas"], group["eps"],
                                         group["maximize"])
