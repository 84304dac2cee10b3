"""Gradient formats: what :meth:`fastadapt.Optimizer.step` accepts, checked before anything is written.

:func:`prepare_grad` turns one user gradient into a prepared step with two methods,
``all_finite()`` and ``apply(optimizer, group, param, state)``: dense arrays
(:mod:`.dense`), scipy CSR and :class:`fastadapt.RowGrad` (:mod:`.sparse`),
:class:`fastadapt.BagGrad` (:mod:`.bag`, coalesced into a RowGrad's form), and the device
formats of CUDA parameters (:mod:`.device`, imported only for them).  Preparing never writes
to a parameter or to state.
"""

from typing import Any

import numpy as np

from ..backends import is_device_array
from ..backends.protocols import Backend
from .dense import DenseGrad, dense_host_grad
from .bag import BagGrad
from .sparse import RowGrad, prepare_sparse_grad

__all__ = ["prepare_grad", "dense_host_grad", "DenseGrad", "RowGrad", "BagGrad"]


def _is_sparse(g: Any) -> bool:
    if type(g).__name__ in ("RowGrad", "BagGrad", "DeviceCSR"):      # DeviceCSR: fastadapt.cuda_sparse
        return True
    module = type(g).__module__ or ""
    return module.startswith(("scipy.sparse", "cupyx.scipy.sparse"))


def prepare_grad(g: Any, p: Any, backend: Backend, where: str, *, accepts_dense: bool = True,
                 optimizer_name: str = "this optimizer") -> Any:
    """Check gradient ``g`` of parameter ``p`` and wrap it for the step.

    Parameters
    ----------
    g : array, scipy sparse matrix, RowGrad or BagGrad
    p : array
        The parameter.
    backend : Backend
        ``p``'s backend (:func:`fastadapt.backends.backend_for`).
    where : str
        How to name the gradient in error messages ("gradient 3").
    accepts_dense : bool
        False for SparseAdam, which refuses dense gradients as torch does.
    optimizer_name : str
        For the message refusing a dense gradient.

    Returns
    -------
    object with ``all_finite()`` and ``apply(optimizer, group, p, state)``.
    """
    if accepts_dense:
        prepared = dense_host_grad(g, p, backend)
        if prepared is not None:
            return prepared
    if _is_sparse(g):
        if is_device_array(p):               # CUDA parameters take the device formats
            if type(g).__name__ == "BagGrad":
                raise TypeError(f"{where} is a fastadapt.BagGrad but its parameter lives on the GPU; BagGrad is "
                                "host only for now: coalesce the bags yourself and pass a fastadapt.RowGrad "
                                "of device arrays")
            from .device import prepare_device_sparse_grad
            return prepare_device_sparse_grad(g, p, backend, where)
        return prepare_sparse_grad(g, p, backend, where)
    if backend.owns(g):
        if not accepts_dense:
            raise TypeError(f"{where} is dense; {optimizer_name} takes sparse gradients only "
                            "(scipy CSR or fastadapt.RowGrad): use Adam for dense gradients")
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{where} has shape {tuple(g.shape)}, its parameter has shape {tuple(p.shape)}")
        g_dtype, p_dtype = backend.dtype_of(g), backend.dtype_of(p)   # CUDA: torch/CuPy dtypes as numpy's
        if g_dtype != p_dtype:
            raise TypeError(f"{where} has dtype {g_dtype}, its parameter has dtype {p_dtype}; "
                            f"convert it first (g.astype(np.{p_dtype})): fastadapt never copies "
                            "a gradient silently")
        if not _c_contiguous(g):
            raise ValueError(f"{where} is not C-contiguous; pass np.ascontiguousarray(g)")
        a0, a1 = backend.memory_span(g)
        b0, b1 = backend.memory_span(p)
        if a0 < b1 and b0 < a1:
            raise ValueError(f"{where} shares memory with its parameter (the parameter passed as its "
                             "own gradient?); pass a separate gradient array")
        backend.check_same_device(g, p, where)
        return DenseGrad(g, backend)
    if isinstance(g, np.ndarray) or is_device_array(g):
        raise TypeError(f"{where} is a {'host' if isinstance(g, np.ndarray) else 'device'} array "
                        f"but its parameter lives on the {backend.name} backend; keep parameters "
                        "and gradients on the same device")
    raise TypeError(f"{where} has unsupported type {type(g).__name__}; pass an array of the parameter's "
                    "shape and dtype, a scipy CSR matrix, a fastadapt.RowGrad or BagGrad, or None")


def _c_contiguous(a: Any) -> bool:
    flags = getattr(a, "flags", None)
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except (KeyError, TypeError):
            return bool(getattr(flags, "c_contiguous", True))
    if hasattr(a, "is_contiguous"):
        return bool(a.is_contiguous())
    return True
