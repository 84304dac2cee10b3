"""Functional layer: one in-place update of a parameter with state kept by the caller.

For users who manage their own state (or their own loop over parameters).  There is one
function per registered algorithm that has one (``adagrad``, ``rmsprop``, ``adam``,
``adamw``, ...), generated from the algorithm's declaration (:mod:`fastadapt.algorithms`):
the parameter, the gradient and the state buffers in slot order, then ``step`` and the
hyper-parameters as keywords.  Each function checks its arrays and hyper-parameters, then
runs the same compiled rule as the optimizer classes.  ``step`` is the number of this update, counting from 1 (it is
what bias correction and Adagrad's ``lr_decay`` use); the caller keeps and increments
it.

The arrays are numpy arrays, or CUDA arrays on one device (CuPy, torch CUDA tensors,
numba device arrays; see the GPU guide, docs/gpu.rst); dtypes are compared as numpy dtypes
whatever the array library, and unused rule slots share one cached 1-element buffer per
device and dtype (nothing is allocated per call).

Example
-------
>>> import numpy as np
>>> from fastadapt import functional as F
>>> p = np.ones(4); g = np.full(4, 0.5); m = np.zeros(4); v = np.zeros(4)
>>> F.adam(p, g, m, v, step=1, lr=0.1)
>>> p
array([0.9, 0.9, 0.9, 0.9])
"""

import numbers
from operator import is_

import numpy as np

from .algorithms import REGISTRY
from .algorithms._spec import MAX_STEP, check_number, short_repr
from .backends import backend_for, unused_slot
from .grads import prepare_grad

__all__ = [a.functional for a in REGISTRY if a.functional]



def _host_arrays(param, grad, buffers):
    """The common case, all numpy arrays and all well formed, in a couple of microseconds: the
    same result as :func:`_check_arrays`, or None (then that function finds and names the problem)."""
    dtype, shape = param.dtype, param.shape
    pf = param.flags
    if dtype.char not in "fd" or not (pf.c_contiguous and pf.writeable) or grad.dtype != dtype \
            or grad.shape != shape or not grad.flags.c_contiguous:
        return None
    backend = backend_for(param)
    flats = [param.reshape(-1), grad.reshape(-1)]
    slots = []
    for _, buf in buffers:
        if buf is None:
            slots.append(None)
            continue
        bf = getattr(buf, "flags", None)
        if type(buf) is not np.ndarray or buf.dtype != dtype or buf.shape != shape \
                or not (bf.c_contiguous and bf.writeable):
            return None
        flat = buf.reshape(-1)
        flats.append(flat)
        slots.append(flat)
    n = param.nbytes
    if n:
        starts = sorted(backend.address(f) for f in flats)
        for a, b in zip(starts, starts[1:]):
            if b < a + n:
                return None                           # two of them share memory
    dummy = unused_slot(backend, param) if any(f is None for f in slots) else None
    return backend, dtype, flats[1], [f if f is not None else dummy for f in slots]


_CPU: list = []
_DUMMIES: dict = {}
_PLAIN: dict = {}       # numba fingerprint of (param, grad, s1, s2, s3) -> all C-contiguous, p and slots writeable


def _cpu():
    """:mod:`fastadapt.backends.cpu`, imported on first use (it imports numba)."""
    if not _CPU:
        from .backends import cpu
        _CPU.append(cpu)
    return _CPU[0]


def _plain_arrays(param, grad, buffers):
    """The common case, checked in bulk: ``(p, g, s1, s2, s3, fingerprint)`` when ``param``, ``grad``
    and the used buffers are numpy arrays (not subclasses) of one dtype object and one shape, and
    numba's fingerprint of them says C-contiguous, with ``param`` and the buffers writeable; else
    None.  What is left -- alignment and shared memory -- the compiled loop checks
    (:func:`fastadapt.backends.cpu.dense_step_checked`)."""
    if type(param) is not np.ndarray or type(grad) is not np.ndarray:
        return None
    dtype, shape = param.dtype, param.shape
    if grad.dtype is not dtype or grad.shape != shape:
        return None
    out = [param, grad]
    for _, buf in buffers:
        if buf is None:
            dummy = _DUMMIES.get(dtype)
            if dummy is None:
                if dtype.char not in "fd":
                    return None
                dummy = _DUMMIES[dtype] = unused_slot(backend_for(param), param)
            out.append(dummy)
        elif type(buf) is not np.ndarray or buf.dtype is not dtype or buf.shape != shape:
            return None
        else:
            out.append(buf)
    fp = _cpu().fingerprint(tuple(out))
    plain = _PLAIN.get(fp)
    if plain is None:
        plain = _PLAIN[fp] = (dtype.char in "fd" and all(a.flags.c_contiguous for a in out)
                              and param.flags.writeable and all(a.flags.writeable for a in out[2:]))
    if not plain:
        return None
    out.append(fp)
    return out


def _check_arrays(param, grad, buffers, alg=None):
    """Check the arrays of one update; returns (backend, numpy dtype, flat gradient, [s1, s2, s3]).

    ``buffers`` is ``[(name, array or None)]`` in slot order (None: unused slot); ``alg`` (a row
    rule's algorithm) gives the buffers' shape, else it is the parameter's.
    """
    rows = alg is not None and alg.rows
    if not rows and type(param) is np.ndarray and type(grad) is np.ndarray:
        fast = _host_arrays(param, grad, buffers)
        if fast is not None:
            return fast
    backend = backend_for(param)
    backend.check_param(param, "param")
    dtype = backend.dtype_of(param)
    prepared = prepare_grad(grad, param, backend, "grad")
    if not hasattr(prepared, "g"):
        raise TypeError("the functional layer takes dense gradients; use an optimizer class for sparse ones")
    flats = []
    want = alg.state_shape(tuple(param.shape)) if rows else tuple(param.shape)
    for name, buf in buffers:
        if buf is None:
            flats.append(unused_slot(backend, param))
            continue
        backend.check_param(buf, name)
        buf_dtype = backend.dtype_of(buf)
        if tuple(buf.shape) != want or buf_dtype != dtype:
            if rows:
                raise ValueError(f"{name} has shape {tuple(buf.shape)} and dtype {buf_dtype}; it must have shape "
                                 f"{want} (one value per row of param {tuple(param.shape)}) and dtype {dtype}")
            raise ValueError(f"{name} has shape {tuple(buf.shape)} and dtype {buf_dtype}; it must match "
                             f"param ({tuple(param.shape)}, {dtype})")
        backend.check_same_device(buf, param, name)
        flats.append(backend.flat(buf))
    spans = [("param", backend.memory_span(param)), ("grad", backend.memory_span(grad))] + [
        (name, backend.memory_span(buf)) for name, buf in buffers if buf is not None]
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            (na, (a0, a1)), (nb, (b0, b1)) = spans[a], spans[b]
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{na} and {nb} share memory; each needs its own array")
    return backend, dtype, prepared.g, flats


def _check_step(step):
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be the number of this update, an int >= 1; got {step!r}")
    if step >= MAX_STEP:
        raise ValueError(f"step must be below 2**53 (exact as the float64 that bias corrections use); "
                         f"got {short_repr(step)}")


class _Spec:
    """What the generated function of one algorithm needs at every call (made once)."""

    __slots__ = ("alg", "arg_of", "hypers", "base", "last", "last_h", "used")

    def __init__(self, alg):
        self.alg = alg
        self.arg_of = {n: alg.functional_args.get(n, n) for n in alg.slots if n is not None}
        self.hypers = tuple(h.name for h in alg.hypers if h.functional)
        self.base = {h.name: h.default for h in alg.hypers}
        self.base.update(alg.fixed)
        self.last = None            # the hyper-parameter values of the last validated call
        self.used = ()


def _update(spec, param, grad, buffers, step, values, carried):
    """The body of every generated function: check everything, then run the rule once."""
    alg = spec.alg
    _check_step(step)
    last = spec.last
    if last is not None and all(map(is_, last, values)):
        h, used = spec.last_h, spec.used        # the same objects as the last validated call
    else:
        h = dict(spec.base)
        h.update(zip(spec.hypers, values))
        alg.check_group(h)
        used = alg.used_buffers(h)
        if all(type(v) in _IMMUTABLE for v in values):
            spec.last, spec.last_h, spec.used = values, h, used
        else:
            spec.last = None
    slot_arrays = []
    for n, buf in zip(alg.slots, buffers):
        if n is not None and n in used:
            if buf is None:
                on = ", ".join(f"{k}={h[k]!r}" for k in h if h[k] != spec.base.get(k)) or "the defaults"
                raise ValueError(f"{alg.functional} with {on} needs a {spec.arg_of[n]} array")
            slot_arrays.append((spec.arg_of[n], buf))
        else:
            slot_arrays.append((n or "unused", None))
    if alg.rows:
        return _row_update(alg, param, grad, slot_arrays, step, h)
    plain = _plain_arrays(param, grad, slot_arrays)
    if plain is not None:
        dtype = param.dtype
    else:
        backend, dtype, g, (s1, s2, s3) = _check_arrays(param, grad, slot_arrays)
    carry = {}
    for (name, _), value in zip(alg.carry, carried):
        check_number(name, value)
        carry[name] = float(value)
    if alg.advance is not None:
        carry = dict(carry, **alg.advance(step, h, carry))
    k = alg.scalars(dtype, step, h, carry)
    if plain is not None:
        cpu = _cpu()
        if cpu.dense_step_checked(cpu.compiled(alg.rule), *plain[:5], k, plain[5]):
            return carry if alg.carry else None
        backend, dtype, g, (s1, s2, s3) = _check_arrays(param, grad, slot_arrays)   # names the problem
    backend.dense_step(alg.rule, backend.flat(param), g, s1, s2, s3, k)
    return carry if alg.carry else None


def _row_update(alg, param, grad, slot_arrays, step, h):
    """:func:`_update` for a row rule (row-wise Adagrad): state of one value per row."""
    backend, dtype, g, (s1, s2, s3) = _check_arrays(param, grad, slot_arrays, alg)
    nrows = int(param.shape[0]) if len(param.shape) else 1        # (a 0-d parameter is one row)
    k = alg.scalars(dtype, step, h, {})
    width = dtype.type(g.size // nrows if nrows else 1)
    with backend.context(param):
        backend.row_kernels.dense(alg.rule, backend.flat(param), g, s1, s2, s3, width, k, nrows)


#: value types whose validation may be reused by the next call (see _update)
_IMMUTABLE = frozenset({float, int, bool, str, tuple, type(None), np.bool_, np.float32, np.float64})


def _make(alg):
    """The functional function of algorithm ``alg``: a real Python function with the signature
    below (generated source, so that binding the arguments costs nothing, unlike
    ``inspect.Signature.bind``), whose body is :func:`_update`."""
    spec = _Spec(alg)
    names = [s for s in alg.slots if s is not None]
    required = set(alg.used_buffers(alg.defaults))
    arg_of = spec.arg_of
    hypers = [h for h in alg.hypers if h.functional]
    defaults = {h.name: h.default for h in hypers}
    defaults.update(alg.carry)
    buf_params = [arg_of[n] if n in required else f"{arg_of[n]}=None" for n in names]
    kw_params = ["step"] + [f"{h.name}=_D[{h.name!r}]" for h in hypers] + [f"{n}=_D[{n!r}]" for n, _ in alg.carry]
    slot_args = ", ".join(arg_of[n] if n is not None else "None" for n in alg.slots)
    src = (f"def {alg.functional}(param, grad, {', '.join(buf_params)}, *, {', '.join(kw_params)}):\n"
           f"    return _update(_S, param, grad, ({slot_args},), step, "
           f"({''.join(h.name + ', ' for h in hypers)}), ({''.join(n + ', ' for n, _ in alg.carry)}))\n")
    namespace = {"_update": _update, "_S": spec, "_D": defaults}
    exec(compile(src, f"<fastadapt.functional.{alg.functional}>", "exec"), namespace)
    update = namespace[alg.functional]
    update.__module__ = __name__
    lines = [f"One {alg.name} update of ``param`` and its state, in place.", "", "Parameters", "----------",
             "param, grad : array",
             "    Same shape and dtype (float32 or float64), C-contiguous; ``param`` is written."]
    for n in names:
        opt = "" if n in required else ", optional"
        shape = "one value per row: shape ``(param.shape[0],)``" if alg.rows else "the parameter's shape"
        lines += [f"{arg_of[n]} : array{opt}",
                  f"    The ``{n}`` state ({shape}, the parameter's dtype), updated in place"
                  + ("." if n in required else "; needed only when the options use it.")]
    lines += ["step : int", "    Number of this update, from 1 (bias corrections and schedules use it)."]
    for hp in hypers:
        lines += [f"{hp.name} : {hp.kind}, default {hp.default!r}"] + ([f"    As :class:`fastadapt.{alg.name}`."])
    for name, value in alg.carry:
        lines += [f"{name} : float, default {value!r}",
                  f"    The carried ``{name}`` state *before* this update (the value the previous call",
                  "    returned; the default is its initial value)."]
    if alg.carry:
        carried = ", ".join(f'``"{name}"``' for name, _ in alg.carry)
        lines += ["", "Returns", "-------", "dict",
                  f"    The carried state after this update ({carried}): pass it to the next call,",
                  f"    e.g. ``c = {alg.functional}(..., step=t, **c)``."]
    update.__doc__ = "\n".join(lines)
    return update


for _alg in REGISTRY:
    if _alg.functional:
        globals()[_alg.functional] = _make(_alg)
del _alg
