"""CPU loops for row rules (:attr:`fastadapt.algorithms.Algorithm.rows`, row-wise Adagrad).

A row rule updates a whole row of the parameter's row view ``(nrows, ncols)`` and keeps one
state value per row; these loops hand it rows, in parallel (``prange`` over rows: each row and
its state value belong to one thread, so there are no races).  As in
:mod:`fastadapt.backends.cpu_sparse`, the rule is a compiled first-class function inlined into
each loop, the arrays it gets carry no reference count (so the row's inner loops vectorise), and
the gradients arrive validated (the loops check nothing):

* :meth:`CPURowKernels.dense`: every row, from a dense gradient;
* :meth:`CPURowKernels.lazy`: the touched rows of a rows-form gradient (``rows`` strictly
  ascending, ``vals`` ``(k, ncols)`` flat);
* :meth:`CPURowKernels.fused`: every row, the touched ones from ``vals``, the others from a zero
  row (``sparse_mode="exact"`` when a zero gradient moves a row, e.g. with weight decay);
* :meth:`CPURowKernels.from_csr`: a touched-rows CSR as the rows form (zeros where not stored).

:data:`KERNELS` implements :class:`fastadapt.backends.protocols.RowKernels`.
"""

from typing import Any

import numpy as np
from numba import njit, prange

from .. import config
from .cpu_compile import compiled
from .cpu_loops import _view
from .cpu_sparse import _borrowed, _run

__all__ = ["CPURowKernels", "KERNELS"]

_OPTS = config.NJIT_OPTIONS


@njit(inline="always", **_OPTS)
def _row(rule, p, r, g, t, ncols, s1, s2, s3, width, k):
    """The rule on row ``r`` of ``p`` with gradient row ``t`` of ``g``: the rows as views made from
    their addresses (no reference count, indices from 0), so the row's loops vectorise."""
    if r >= 0 and t >= 0 and ncols > 0:
        size = p.itemsize * ncols
        rule(_view(p, p.ctypes.data + r * size, ncols), _borrowed(s1), _borrowed(s2), _borrowed(s3), r,
             _view(g, g.ctypes.data + t * size, ncols), width, k)


@njit(parallel=True, **_OPTS)
def _dense(rule, p, g, ncols, s1, s2, s3, width, k, nrows):
    for r in prange(nrows):
        _row(rule, p, r, g, r, ncols, s1, s2, s3, width, k)


@njit(parallel=True, **_OPTS)
def _lazy(rule, p, rows, g, ncols, s1, s2, s3, width, k):
    for t in prange(rows.size):
        _row(rule, p, rows[t], g, t, ncols, s1, s2, s3, width, k)


@njit(parallel=True, **_OPTS)
def _fused(rule, p, nrows, rows, g, zero, ncols, s1, s2, s3, width, k):
    for r in prange(nrows):
        t = np.searchsorted(rows, r)
        if t < rows.size and rows[t] == r:
            _row(rule, p, r, g, t, ncols, s1, s2, s3, width, k)
        else:
            _row(rule, p, r, zero, 0, ncols, s1, s2, s3, width, k)


@njit(parallel=True, **_OPTS)
def _from_csr(indptr, cols, vals, ncols, out):
    for t in prange(indptr.size - 1):
        base = t * ncols
        for j in range(indptr[t], indptr[t + 1]):
            out[base + cols[j]] = vals[j]


class CPURowKernels:
    """The row-rule loops of the CPU backend (:class:`fastadapt.backends.protocols.RowKernels`).

    ``p``, ``g``, ``vals`` and the slots ``s1, s2, s3`` (one value per row, or 1-element
    dummies) are flat numpy arrays; ``width`` is the row width as a number of ``p``'s dtype.
    The loops are called through their compiled entry points (``cpu_sparse._run``): numba's
    dispatcher would type the rule and the scalars at every call (tens of microseconds).
    """

    @staticmethod
    def dense(rule: Any, p: Any, g: Any, s1: Any, s2: Any, s3: Any, width: Any, k: Any, nrows: int) -> None:
        if p.size:                          # (no rows, or rows of no element: nothing to update)
            _run(_dense, compiled(rule), p, g, p.size // nrows, s1, s2, s3, width, k, nrows)

    @staticmethod
    def lazy(rule: Any, p: Any, rows: Any, vals: Any, s1: Any, s2: Any, s3: Any, width: Any, k: Any) -> None:
        if rows.size and p.size:
            _run(_lazy, compiled(rule), p, rows, vals, vals.size // rows.size, s1, s2, s3, width, k)

    @staticmethod
    def fused(rule: Any, p: Any, nrows: int, rows: Any, vals: Any, s1: Any, s2: Any, s3: Any, width: Any,
              k: Any) -> None:
        if p.size:
            zero = np.zeros(int(width), p.dtype)
            _run(_fused, compiled(rule), p, nrows, rows, vals if vals.size else zero, zero, p.size // nrows, s1, s2,
                 s3, width, k)

    @staticmethod
    def touched(indptr: Any) -> Any:
        full = np.asarray(indptr, np.int64)
        rows = np.flatnonzero(np.diff(full)).astype(np.int64)
        return rows, np.append(full[rows], full[-1])

    @staticmethod
    def from_csr(indptr: Any, cols: Any, vals: Any, ncols: int) -> Any:
        out = np.zeros((indptr.size - 1) * ncols, vals.dtype)
        if vals.size:
            _from_csr(indptr, cols, vals, ncols, out)
        return out


#: the CPU backend's row kernels
KERNELS = CPURowKernels()
