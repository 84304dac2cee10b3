"""Functional layer: one in-place update of a parameter with state kept by the caller.

For users who manage their own state (or their own loop over parameters).  Each
function checks its arrays and hyper-parameters, then runs the same compiled rule as
the optimizer classes.  ``step`` is the number of this update, counting from 1 (it is
what bias correction and Adagrad's ``lr_decay`` use); the caller keeps and increments
it.

The arrays are numpy arrays, or CUDA arrays on one device (CuPy, torch CUDA tensors,
numba device arrays; see the README's GPU section); dtypes are compared as numpy dtypes
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

import numpy as np

from . import rules
from .grads import prepare_grad
from .optim import _check_betas, _check_number, backend_for

__all__ = ["adagrad", "rmsprop", "adam", "adamw"]


def _dtype_of(backend, a):
    """``a``'s dtype as a numpy dtype (torch tensors have their own dtype type; the CUDA
    backend's ``dtype_of`` reads it from the array interface)."""
    dtype_of = getattr(backend, "dtype_of", None)
    return np.dtype(a.dtype) if dtype_of is None else dtype_of(a)


_DUMMIES = {}


def _dummy(backend, param, dtype):
    """A 1-element buffer of ``dtype`` on ``param``'s device for rule slots that are unused
    with the given options; made once per (backend, device, dtype), then reused."""
    device_of = getattr(backend, "device_of", None)
    key = (backend.name, None if device_of is None else device_of(param), dtype.str)
    d = _DUMMIES.get(key)
    if d is None:
        d = _DUMMIES[key] = backend.flat(backend.full_like(backend.flat(param)[:1], 0.0))
    return d


def _check_arrays(param, grad, buffers):
    """Check the arrays of one update; returns (backend, numpy dtype, flat gradient, (s1, s2, s3))."""
    backend = backend_for(param)
    backend.check_param(param, "param")
    dtype = _dtype_of(backend, param)
    prepared = prepare_grad(grad, param, backend, "grad")
    if not hasattr(prepared, "g"):
        raise TypeError("the functional layer takes dense gradients; use an optimizer class for sparse ones")
    flats = []
    for name, buf in buffers:
        if buf is None:
            flats.append(None)
            continue
        backend.check_param(buf, name)
        buf_dtype = _dtype_of(backend, buf)
        if tuple(buf.shape) != tuple(param.shape) or buf_dtype != dtype:
            raise ValueError(f"{name} has shape {tuple(buf.shape)} and dtype {buf_dtype}; it must match "
                             f"param ({tuple(param.shape)}, {dtype})")
        check_same_device = getattr(backend, "check_same_device", None)
        if check_same_device is not None:
            check_same_device(buf, param, name)
        flats.append(backend.flat(buf))
    spans = [("param", backend.memory_span(param))] + [
        (name, backend.memory_span(buf)) for name, buf in buffers if buf is not None]
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            (na, (a0, a1)), (nb, (b0, b1)) = spans[a], spans[b]
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{na} and {nb} share memory; each needs its own array")
    if len(flats) < 3 or any(f is None for f in flats):
        dummy = _dummy(backend, param, dtype)
        flats = [f if f is not None else dummy for f in flats]
        flats += [dummy] * (3 - len(flats))
    return backend, dtype, prepared.g, flats


def _check_step(step):
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be the number of this update, an int >= 1; got {step!r}")


def adagrad(param, grad, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
            maximize=False):
    """One Adagrad update of ``param`` and ``state_sum``, in place.

    Parameters
    ----------
    param, grad, state_sum : array
        Same shape and dtype (float32 or float64), C-contiguous; ``param`` and
        ``state_sum`` are written.
    step : int
        Number of this update, from 1.
    lr, lr_decay, weight_decay, eps, maximize
        As :class:`fastadapt.Adagrad`.
    """
    _check_step(step)
    for name, value in (("lr", lr), ("lr_decay", lr_decay), ("weight_decay", weight_decay), ("eps", eps)):
        _check_number(name, value, 0.0)
    backend, dtype, g, (s1, s2, s3) = _check_arrays(param, grad, [("state_sum", state_sum)])
    k = rules.adagrad_scalars(dtype, step, lr, lr_decay, weight_decay, eps, maximize)
    backend.dense_step(rules.adagrad_rule, backend.flat(param), g, s1, s2, s3, k)


def rmsprop(param, grad, square_avg, momentum_buffer=None, grad_avg=None, *, step, lr=1e-2, alpha=0.99,
            eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    """One RMSprop update of ``param`` and its averages, in place.

    Parameters
    ----------
    param, grad, square_avg : array
        Same shape and dtype, C-contiguous.
    momentum_buffer : array, optional
        Required when ``momentum > 0``.
    grad_avg : array, optional
        Required when ``centered``.
    step : int
        Number of this update, from 1 (RMSprop does not use it; kept for symmetry).
    lr, alpha, eps, weight_decay, momentum, centered, maximize
        As :class:`fastadapt.RMSprop`.
    """
    _check_step(step)
    for name, value in (("lr", lr), ("alpha", alpha), ("eps", eps), ("weight_decay", weight_decay),
                        ("momentum", momentum)):
        _check_number(name, value, 0.0)
    if momentum > 0 and momentum_buffer is None:
        raise ValueError("momentum > 0 needs a momentum_buffer array")
    if centered and grad_avg is None:
        raise ValueError("centered=True needs a grad_avg array")
    backend, dtype, g, (s1, s2, s3) = _check_arrays(param, grad, [
        ("square_avg", square_avg), ("momentum_buffer", momentum_buffer if momentum > 0 else None),
        ("grad_avg", grad_avg if centered else None)])
    k = rules.rmsprop_scalars(dtype, step, lr, alpha, eps, weight_decay, momentum, centered, maximize)
    backend.dense_step(rules.rmsprop_rule, backend.flat(param), g, s1, s2, s3, k)


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3, betas=(0.9, 0.999),
         eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False):
    """One Adam (or AdamW) update of ``param`` and its moments, in place.

    Parameters
    ----------
    param, grad, exp_avg, exp_avg_sq : array
        Same shape and dtype, C-contiguous.
    max_exp_avg_sq : array, optional
        Required when ``amsgrad``.
    step : int
        Number of this update, from 1; bias correction uses it.
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As :class:`fastadapt.Adam`.
    """
    _check_step(step)
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        _check_number(name, value, 0.0)
    _check_betas(betas)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("amsgrad=True needs a max_exp_avg_sq array")
    backend, dtype, g, (s1, s2, s3) = _check_arrays(param, grad, [
        ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
        ("max_exp_avg_sq", max_exp_avg_sq if amsgrad else None)])
    k = rules.adam_scalars(dtype, step, lr, betas, eps, weight_decay, amsgrad, maximize,
                           decoupled_weight_decay)
    backend.dense_step(rules.adam_rule, backend.flat(param), g, s1, s2, s3, k)


def adamw(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3, betas=(0.9, 0.999),
          eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False):
    """One AdamW update: :func:`adam` with decoupled weight decay (default 1e-2)."""
    adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, betas=betas, eps=eps,
         weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True)
