"""Sparse gradients of CUDA parameters: the device formats, validated before anything is written.

* :class:`fastadapt.RowGrad` whose ``rows`` and ``values`` are device arrays;
* a device CSR: ``cupyx.scipy.sparse.csr_matrix``, or :class:`DeviceCSR` wrapping device
  ``(data, indices, indptr)`` arrays.

Indices are checked on the device (:func:`fastadapt.backends.cuda_sparse.scan_csr`,
:func:`~fastadapt.backends.cuda_sparse.scan_rows`: one host synchronisation per gradient).
Canonical input is used zero-copy; anything else goes through the host canonicaliser of
:mod:`fastadapt.grads.sparse` and back.  The result is the same prepared step as on the CPU
(:class:`~fastadapt.grads.sparse.CSRGrad` / :class:`~fastadapt.grads.sparse.RowsGrad`), run by
the CUDA backend's sparse kernels.  Imported only for CUDA parameters.
"""

from typing import Any, Iterable, Sequence, Tuple

import numpy as np

from ..backends.cuda_arrays import _dtype, _shape, as_device_array
from ..backends.cuda_sparse import scan_csr, scan_rows, to_host, upload
from ..backends.protocols import Backend
from .sparse import CSRGrad, RowsGrad, canonical_csr, canonical_rows, row_view

__all__ = ["DeviceCSR", "prepare_device_sparse_grad"]


class DeviceCSR:
    """A CSR gradient held in device arrays (CuPy, torch CUDA, numba): ``(data, indices, indptr)``.

    Parameters
    ----------
    arg : tuple
        ``(data, indices, indptr)``, device arrays in scipy's layout (row ``r`` holds
        ``indices[indptr[r]:indptr[r + 1]]``); nothing is copied.
    shape : (int, int)
        The parameter's shape (``(1, n)`` for a 1-D parameter of ``n`` elements).

    Examples
    --------
    >>> opt.step([fastadapt.DeviceCSR((data, indices, indptr), shape=E.shape)])  # doctest: +SKIP
    """

    format = "csr"

    def __init__(self, arg: Tuple[Any, Any, Any], shape: Iterable[int]) -> None:
        self.data, self.indices, self.indptr = arg
        self.shape = tuple(int(s) for s in shape)

    def __repr__(self) -> str:
        return f"DeviceCSR(shape={self.shape}, {_shape(self.data)[0]} stored entries)"


# =========================================================================== device helpers


def _require_device(arrays: Sequence[Tuple[str, Any]], p: Any, where: str, backend: Backend) -> None:
    for name, a in arrays:
        if isinstance(a, np.ndarray) or not backend.owns(a):
            raise TypeError(f"{where}: its {name} is a {type(a).__name__}, not a device array, but the "
                            "parameter lives on the GPU; keep parameter and gradient on one device")
        backend.check_same_device(a, p, f"{where} ({name})")


def _is_int(dtype: np.dtype) -> bool:
    return dtype.kind in "iu" and dtype != np.bool_


def prepare_device_sparse_grad(g: Any, p: Any, backend: Backend, where: str) -> "CSRGrad | RowsGrad":
    """Check a device sparse gradient of device parameter ``p``; nothing is written.

    Returns a :class:`~fastadapt.grads.sparse.CSRGrad` or
    :class:`~fastadapt.grads.sparse.RowsGrad` over device arrays (see the module docstring for
    the zero-copy fast path and the host fallback).
    """
    dtype = _dtype(p)
    nrows, ncols = row_view(_shape(p))
    module = type(g).__module__ or ""
    if module.startswith("scipy.sparse"):
        raise TypeError(f"{where} is a host scipy sparse matrix but the parameter lives on the GPU; "
                        "move it to the device (cupyx.scipy.sparse.csr_matrix(g)) or pass a "
                        "fastadapt.RowGrad of device arrays")
    if type(g).__name__ == "RowGrad":
        return _prepare_rows(backend, g, p, where, dtype, nrows, ncols)
    if getattr(g, "format", None) != "csr":
        raise TypeError(f"{where} is a {module}.{type(g).__name__} (format {getattr(g, 'format', None)!r}); "
                        "device sparse gradients must be CSR: convert it with g.tocsr(), or pass a "
                        "fastadapt.RowGrad")
    return _prepare_csr(backend, g, p, where, dtype, nrows, ncols)


def _prepare_rows(backend: Backend, g: Any, p: Any, where: str, dtype: np.dtype, nrows: int,
                  ncols: int) -> RowsGrad:
    rows, values = g.rows, g.values
    _require_device([("rows", rows), ("values", values)], p, where, backend)
    vshape = _shape(values)
    pshape = _shape(p)
    k = _shape(rows)[0]
    if not (len(pshape) >= 2 and vshape[1:] == pshape[1:]
            or len(pshape) == 1 and (vshape == (k,) or vshape == (k, 1))):
        raise ValueError(f"{where}: RowGrad values have shape {vshape}; for a parameter of shape {pshape} "
                         f"they must have shape (k,) + {pshape[1:]}")
    rdt, vdt = _dtype(rows), _dtype(values)
    if not _is_int(rdt):
        raise TypeError(f"{where}: the row ids must be an integer array, got dtype {rdt}")
    rows_d = as_device_array(rows)
    values_d = as_device_array(values)
    fast = (rdt == np.int64 and vdt == dtype and rows_d.is_c_contiguous()
            and values_d.is_c_contiguous())
    if fast:
        stats = scan_rows(rows_d, nrows, p)
        fast = stats[0] == 0 and stats[1] == 0
    if not fast:                                   # errors, sorting, summing, casting: on the host
        rows_h, vals_h = canonical_rows(to_host(rows), to_host(values).reshape(k, ncols),
                                                nrows, ncols, dtype, where)
        rows_d, values_d = upload(rows_h, p), upload(vals_h, p)
    values_2d = values_d.reshape(rows_d.size, ncols) if rows_d.size else values_d
    _no_overlap(backend, values_d, p, where)
    return RowsGrad(rows_d, values_2d, nrows, ncols, backend)


def _prepare_csr(backend: Backend, g: Any, p: Any, where: str, dtype: np.dtype, nrows: int,
                 ncols: int) -> "CSRGrad | RowsGrad":
    pshape = _shape(p)
    if len(pshape) > 2:
        raise ValueError(f"{where}: a CSR gradient needs a 1-D or 2-D parameter, this one has shape "
                         f"{pshape}; use fastadapt.RowGrad for row updates of it")
    shape2d = (1, nrows) if len(pshape) == 1 else (nrows, ncols)
    shape = tuple(int(s) for s in getattr(g, "shape", ()))
    if shape != shape2d:
        raise ValueError(f"{where} has shape {shape}; it must have shape {shape2d}"
                         + (" (a 1-D parameter of n elements takes a (1, n) CSR)" if len(pshape) == 1 else ""))
    indptr, indices, data = g.indptr, g.indices, g.data
    _require_device([("indptr", indptr), ("indices", indices), ("data", data)], p, where, backend)
    ip, ix, dv = as_device_array(indptr), as_device_array(indices), as_device_array(data)
    for name, a in (("indptr", ip), ("indices", ix), ("data", dv)):
        if len(a.shape) != 1:
            raise ValueError(f"{where}: its {name} must be 1-D, got shape {_shape(a)}")
    if not (_is_int(ip.dtype) and _is_int(ix.dtype)):
        raise TypeError(f"{where}: indptr and indices must be integer arrays, got {ip.dtype} and {ix.dtype}")
    fast = (ip.dtype == ix.dtype and ip.dtype in (np.int32, np.int64) and dv.dtype == dtype
            and ip.size == shape2d[0] + 1 and ix.size == dv.size
            and ip.is_c_contiguous() and ix.is_c_contiguous() and dv.is_c_contiguous())
    if fast:
        stats = scan_csr(ip, ix, shape2d[0], shape2d[1], p)
        nnz = int(stats[5])
        fast = stats[1] == 0 and stats[2] == 0 and stats[3] == 0 and stats[4] == 0
    if not fast:                                   # errors, sorting, summing, casting: on the host
        host = _HostCSR(to_host(data), to_host(indices), to_host(indptr), shape)
        rows_h, cptr_h, cols_h, vals_h = canonical_csr(host, shape2d, dtype, where)
        _no_overlap(backend, dv, p, where)
        if len(pshape) == 1:
            return RowsGrad(upload(cols_h.astype(np.int64), p), upload(vals_h.reshape(-1, 1), p),
                                  nrows, 1, backend)
        return CSRGrad(upload(rows_h, p), upload(cptr_h, p), upload(cols_h, p), upload(vals_h, p),
                             nrows, ncols, backend)
    cols, vals = ix[:nnz], dv[:nnz]
    _no_overlap(backend, vals, p, where)
    if len(pshape) == 1:
        # the elements are the rows: the row ids are the (ascending, unique) columns of row 0
        if cols.dtype != np.int64:
            cols = upload(to_host(cols).astype(np.int64), p)
        return RowsGrad(cols, vals.reshape(nnz, 1) if nnz else vals, nrows, 1, backend)
    return CSRGrad(None, ip, cols, vals, nrows, ncols, backend)


class _HostCSR:
    format = "csr"

    def __init__(self, data: Any, indices: Any, indptr: Any, shape: Tuple[int, int]) -> None:
        self.data, self.indices, self.indptr, self.shape = data, indices, indptr, shape


def _no_overlap(backend: Backend, values: Any, p: Any, where: str) -> None:
    a0, a1 = backend.memory_span(values)
    b0, b1 = backend.memory_span(p)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{where}: its values share memory with the parameter; pass a separate array")
