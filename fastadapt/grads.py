"""Gradient formats: what :meth:`Optimizer.step` accepts, checked before anything is written.

:func:`prepare_grad` turns one user gradient into a prepared object with two methods,
``all_finite()`` and ``apply(optimizer, group, param, state)``.  Dense arrays are
handled here; sparse formats (scipy CSR, :class:`fastadapt.RowGrad`) by
:mod:`fastadapt.sparse`.  Preparing never writes to a parameter or to state.
"""

import numpy as np

__all__ = ["prepare_grad", "dense_host_grad", "DenseGrad"]


class DenseGrad:
    """A dense gradient: the parameter's shape and dtype, C-contiguous, viewed flat."""

    __slots__ = ("g", "backend", "address")

    def __init__(self, g, backend):
        self.g = backend.flat(g)
        self.backend = backend
        self.address = None               # host arrays: set by dense_host_grad

    def all_finite(self):
        return self.backend.all_finite(self.g)

    def apply(self, opt, group, p, state):
        backend = self.backend
        s1, s2, s3 = opt._slot_arrays(group, p, state, backend.flat)
        k = opt._scalars(group, state["step"], self.g.dtype)   # == p's dtype, as a numpy dtype
        backend.dense_step(opt.rule, backend.flat(p), self.g, s1, s2, s3, k)


def dense_host_grad(g, p, backend, p_span=None):
    """The common case, in about half a microsecond: ``g`` a numpy array that passes every
    dense check of :func:`prepare_grad` for the numpy parameter ``p`` (same shape and dtype,
    C-contiguous, not overlapping ``p``, whose ``backend.memory_span`` is ``p_span`` when
    given).  Returns its :class:`DenseGrad`, which keeps ``g``'s address for the many-tensor
    path, or None for anything else (then :func:`prepare_grad` decides, or raises)."""
    if (type(g) is np.ndarray and type(p) is np.ndarray and g.shape == p.shape and g.dtype == p.dtype
            and g.flags.c_contiguous):
        flat = g.reshape(-1)
        start = backend.address(flat)
        if p_span is None:
            p_span = backend.memory_span(p)
        if start < p_span[1] and p_span[0] < start + flat.nbytes:
            return None                   # overlaps its parameter: prepare_grad says so
        prepared = object.__new__(DenseGrad)
        prepared.g = flat
        prepared.backend = backend
        prepared.address = start
        return prepared
    return None


def _is_sparse(g):
    if type(g).__name__ in ("RowGrad", "DeviceCSR"):      # DeviceCSR: fastadapt.cuda_sparse
        return True
    module = type(g).__module__ or ""
    return module.startswith(("scipy.sparse", "cupyx.scipy.sparse"))


def prepare_grad(g, p, backend, where, *, accepts_dense=True, optimizer=None):
    """Check gradient ``g`` of parameter ``p`` and wrap it for the step.

    Parameters
    ----------
    g : array, scipy sparse matrix or RowGrad
    p : array
        The parameter.
    backend : backend object
        ``p``'s backend (:mod:`fastadapt.cpu` or :mod:`fastadapt.cuda`).
    where : str
        How to name the gradient in error messages ("gradient 3").
    accepts_dense : bool
        False for SparseAdam, which refuses dense gradients as torch does.
    optimizer : Optimizer, optional
        The optimizer (sparse formats read its sparse mode and rule).

    Returns
    -------
    object with ``all_finite()`` and ``apply(optimizer, group, p, state)``.
    """
    if accepts_dense:
        prepared = dense_host_grad(g, p, backend)
        if prepared is not None:
            return prepared
    if _is_sparse(g):
        from .sparse import prepare_sparse_grad
        return prepare_sparse_grad(g, p, backend, where, optimizer=optimizer)
    if backend.owns(g):
        if not accepts_dense:
            raise TypeError(f"{where} is dense; {type(optimizer).__name__} takes sparse gradients only "
                            "(scipy CSR or fastadapt.RowGrad): use Adam for dense gradients")
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{where} has shape {tuple(g.shape)}, its parameter has shape {tuple(p.shape)}")
        dtype_of = getattr(backend, "dtype_of", None)        # CUDA: torch/CuPy/numba dtypes as numpy's
        g_dtype, p_dtype = (g.dtype, p.dtype) if dtype_of is None else (dtype_of(g), dtype_of(p))
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
        check_same_device = getattr(backend, "check_same_device", None)
        if check_same_device is not None:
            check_same_device(g, p, where)
        return DenseGrad(g, backend)
    if isinstance(g, np.ndarray) or hasattr(g, "__cuda_array_interface__") or getattr(g, "__cuda_ndarray__", False):
        raise TypeError(f"{where} is a {'host' if isinstance(g, np.ndarray) else 'device'} array "
                        f"but its parameter lives on the {backend.name} backend; keep parameters "
                        "and gradients on the same device")
    raise TypeError(f"{where} has unsupported type {type(g).__name__}; pass an array of the parameter's "
                    "shape and dtype, a scipy CSR matrix, a fastadapt.RowGrad, or None")


def _c_contiguous(a):
    flags = getattr(a, "flags", None)
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except (KeyError, TypeError):
            return bool(getattr(flags, "c_contiguous", True))
    if hasattr(a, "is_contiguous"):
        return bool(a.is_contiguous())
    return True
