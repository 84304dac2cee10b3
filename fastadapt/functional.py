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

import inspect
import numbers

from .algorithms import REGISTRY
from .algorithms._spec import MAX_STEP, check_number, short_repr
from .backends import backend_for, unused_slot
from .grads import prepare_grad

__all__ = [a.functional for a in REGISTRY if a.functional]

_P = inspect.Parameter


def _check_arrays(param, grad, buffers):
    """Check the arrays of one update; returns (backend, numpy dtype, flat gradient, [s1, s2, s3]).

    ``buffers`` is ``[(name, array or None)]`` in slot order (None: unused slot).
    """
    backend = backend_for(param)
    backend.check_param(param, "param")
    dtype = backend.dtype_of(param)
    prepared = prepare_grad(grad, param, backend, "grad")
    if not hasattr(prepared, "g"):
        raise TypeError("the functional layer takes dense gradients; use an optimizer class for sparse ones")
    flats = []
    for name, buf in buffers:
        if buf is None:
            flats.append(unused_slot(backend, param))
            continue
        backend.check_param(buf, name)
        buf_dtype = backend.dtype_of(buf)
        if tuple(buf.shape) != tuple(param.shape) or buf_dtype != dtype:
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


def _make(alg):
    """The functional function of algorithm ``alg``."""
    names = [s for s in alg.slots if s is not None]
    required = set(alg.used_buffers(alg.defaults))
    arg_of = {n: alg.functional_args.get(n, n) for n in names}
    hypers = [h for h in alg.hypers if h.functional]
    params = [_P("param", _P.POSITIONAL_OR_KEYWORD), _P("grad", _P.POSITIONAL_OR_KEYWORD)]
    params += [_P(arg_of[n], _P.POSITIONAL_OR_KEYWORD, **({} if n in required else {"default": None}))
               for n in names]
    params.append(_P("step", _P.KEYWORD_ONLY))
    params += [_P(h.name, _P.KEYWORD_ONLY, default=h.default) for h in hypers]
    params += [_P(name, _P.KEYWORD_ONLY, default=value) for name, value in alg.carry]
    signature = inspect.Signature(params)
    base = {h.name: h.default for h in alg.hypers}
    base.update(alg.fixed)

    def update(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        step = a["step"]
        _check_step(step)
        h = dict(base)
        h.update({hp.name: a[hp.name] for hp in hypers})
        alg.check_group(h)
        used = alg.used_buffers(h)
        for n in used:
            if a[arg_of[n]] is None:
                on = ", ".join(f"{k}={h[k]!r}" for k in h if k not in base or h[k] != base[k]) or "the defaults"
                raise ValueError(f"{alg.functional} with {on} needs a {arg_of[n]} array")
        buffers = [(arg_of[n], a[arg_of[n]]) if (n is not None and n in used) else (n or "unused", None)
                   for n in alg.slots]
        backend, dtype, g, (s1, s2, s3) = _check_arrays(a["param"], a["grad"], buffers)
        carry = {}
        for name, _ in alg.carry:
            check_number(name, a[name])
            carry[name] = float(a[name])
        if alg.advance is not None:
            carry = dict(carry, **alg.advance(step, h, carry))
        k = alg.scalars(dtype, step, h, carry)
        backend.dense_step(alg.rule, backend.flat(a["param"]), g, s1, s2, s3, k)
        return carry if alg.carry else None

    update.__name__ = update.__qualname__ = alg.functional
    update.__module__ = __name__
    update.__signature__ = signature
    lines = [f"One {alg.name} update of ``param`` and its state, in place.", "", "Parameters", "----------",
             "param, grad : array",
             "    Same shape and dtype (float32 or float64), C-contiguous; ``param`` is written."]
    for n in names:
        opt = "" if n in required else ", optional"
        lines += [f"{arg_of[n]} : array{opt}",
                  f"    The ``{n}`` state (the parameter's shape and dtype), updated in place"
                  + ("." if n in required else "; needed only when the options use it.")]
    lines += ["step : int", "    Number of this update, from 1 (bias corrections and schedules use it)."]
    for hp in hypers:
        lines += [f"{hp.name} : {hp.kind}, default {hp.default!r}"] + ([f"    As :class:`fastadapt.{alg.name}`."])
    for name, value in alg.carry:
        lines += [f"{name} : float, default {value!r}",
                  f"    The carried ``{name}`` state *before* this update (the value the previous call",
                  "    returned; the default is its initial value)."]
    if alg.carry:
        names = ", ".join(f'``"{name}"``' for name, _ in alg.carry)
        lines += ["", "Returns", "-------", "dict",
                  f"    The carried state after this update ({names}): pass it to the next call,",
                  f"    e.g. ``c = {alg.functional}(..., step=t, **c)``."]
    update.__doc__ = "\n".join(lines)
    return update


for _alg in REGISTRY:
    if _alg.functional:
        globals()[_alg.functional] = _make(_alg)
del _alg
