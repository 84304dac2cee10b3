"""Backends: where arrays live and the loops that walk them.

A backend owns one kind of array (:mod:`fastadapt.backends.cpu`: numpy arrays;
:mod:`fastadapt.backends.cuda`: CUDA arrays) and implements :class:`~.protocols.Backend`:
array checks and helpers, the dense loop, the non-finite scan, and its sparse kernels
(:class:`~.protocols.SparseKernels`).  The loops compile the rules of
:mod:`fastadapt.algorithms` on first use and know no optimizer by name.

This module is the one door: :func:`backend_for` picks the backend of an array,
:func:`is_device_array` is the one test for CUDA arrays, :func:`unused_slot` the one cache
of buffers for rule slots that the current options leave unused.  The CUDA backend is
imported here only when a CUDA array is seen, so ``import fastadapt`` never needs a GPU.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from .protocols import Backend, SparseKernels

__all__ = ["Backend", "SparseKernels", "backend_for", "is_device_array", "device_key", "unused_slot",
           "cpu_backend"]


def is_device_array(a: Any) -> bool:
    """True for CUDA arrays: ``__cuda_array_interface__`` (CuPy, torch CUDA tensors, numba
    device arrays) or numba's simulated device arrays (``NUMBA_ENABLE_CUDASIM=1``)."""
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


_CPU: list = []


def cpu_backend() -> Backend:
    """The CPU backend (imported on first use; an import statement costs ~1 us per call)."""
    if _CPU:
        return _CPU[0]
    from .cpu import BACKEND
    _CPU.append(BACKEND)
    return BACKEND


def backend_for(p: Any) -> Backend:
    """The backend that owns array ``p``.

    Raises
    ------
    TypeError
        ``p`` is neither a numpy array nor a CUDA array.
    """
    if isinstance(p, np.ndarray):
        return _CPU[0] if _CPU else cpu_backend()
    if is_device_array(p):
        from .cuda import backend      # imported only when a CUDA array is seen
        return backend()
    raise TypeError(f"parameters must be numpy arrays or CUDA arrays (CuPy, torch CUDA tensors, "
                    f"numba device arrays), got {type(p).__name__}")


def device_key(backend: Backend, p: Any) -> str:
    """Where ``p`` lives: ``"cpu"`` or ``"cuda:N"`` (for the one-device-per-optimizer check)."""
    device = backend.device_of(p)
    return backend.name if device is None else f"{backend.name}:{device}"


_UNUSED: Dict[Tuple[str, str], Any] = {}


def unused_slot(backend: Backend, p: Any) -> Any:
    """A 1-element buffer of ``p``'s dtype on ``p``'s device, for rule slots that the current
    options leave unused; made once per (device, dtype) and shared by every caller."""
    key = (device_key(backend, p), backend.dtype_of(p).str)
    d = _UNUSED.get(key)
    if d is None:
        d = _UNUSED[key] = backend.flat(backend.full_like(backend.flat(p)[:1], 0.0))
    return d
