"""CUDA kernels for row rules (:attr:`fastadapt.algorithms.Algorithm.rows`, row-wise Adagrad).

The same loops as :mod:`fastadapt.backends.cpu_rows`, as grid-stride kernels with one thread
per row: the rule (compiled with ``numba.cuda.jit(device=True)`` from the one Python function)
walks its row and writes the row's state value, so threads never share a row.  One thread per
row is the simple, correct layout (a row of 64 float32 is 256 contiguous bytes per thread); a
warp per row with a shuffle reduction would coalesce better, and is left for when a GPU
measurement asks for it.

:data:`KERNELS` implements :class:`fastadapt.backends.protocols.RowKernels`.
"""

from typing import Any, Dict

import numpy as np

from .cuda_arrays import _context_of, cuda, device_of
from .cuda_sparse import _fma_cuda, _launch, _lower_bound, to_host, upload  # noqa: F401  (_fma_cuda: the rules' fma)

__all__ = ["CUDARowKernels", "KERNELS"]


class _RowRuleKernels:
    """The kernels of one row rule (numba.cuda kernels cannot take a device function as an argument)."""

    def __init__(self, rule: Any) -> None:
        dev = cuda.jit(device=True)(rule)

        @cuda.jit
        def dense(p, g, ncols, s1, s2, s3, width, k, nrows):
            r = cuda.grid(1)
            stride = cuda.gridsize(1)
            while r < nrows:
                dev(p[r * ncols:(r + 1) * ncols], s1, s2, s3, r, g[r * ncols:(r + 1) * ncols], width, k)
                r += stride

        @cuda.jit
        def lazy(p, rows, g, ncols, s1, s2, s3, width, k):
            t = cuda.grid(1)
            stride = cuda.gridsize(1)
            while t < rows.size:
                r = rows[t]
                dev(p[r * ncols:(r + 1) * ncols], s1, s2, s3, r, g[t * ncols:(t + 1) * ncols], width, k)
                t += stride

        @cuda.jit
        def fused(p, nrows, rows, g, zero, ncols, s1, s2, s3, width, k):
            r = cuda.grid(1)
            stride = cuda.gridsize(1)
            nk = rows.size
            while r < nrows:
                t = _lower_bound(rows, 0, nk, r)
                if t < nk and rows[t] == r:
                    dev(p[r * ncols:(r + 1) * ncols], s1, s2, s3, r, g[t * ncols:(t + 1) * ncols], width, k)
                else:
                    dev(p[r * ncols:(r + 1) * ncols], s1, s2, s3, r, zero, width, k)
                r += stride

        self.dense, self.lazy, self.fused = dense, lazy, fused


@cuda.jit
def _from_csr(indptr, cols, vals, ncols, out):
    t = cuda.grid(1)
    stride = cuda.gridsize(1)
    while t < indptr.size - 1:
        base = t * ncols
        for j in range(indptr[t], indptr[t + 1]):
            out[base + cols[j]] = vals[j]
        t += stride


@cuda.jit
def _zero(a):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < a.size:
        a[i] = 0
        i += stride


_KERNELS: Dict[Any, _RowRuleKernels] = {}
_ZEROS: Dict[Any, Any] = {}


def _kernels(rule: Any) -> _RowRuleKernels:
    ks = _KERNELS.get(rule)
    if ks is None:
        ks = _KERNELS[rule] = _RowRuleKernels(rule)
    return ks


def _zeros(n: int, dtype: Any, like: Any) -> Any:
    """A device array of ``n`` zeros (made once per device, dtype and length; never written)."""
    key = (device_of(like), np.dtype(dtype).str, int(n))
    z = _ZEROS.get(key)
    if z is None:
        with _context_of(like):
            z = _ZEROS[key] = cuda.to_device(np.zeros(max(int(n), 1), dtype))
    return z


class CUDARowKernels:
    """The row-rule kernels of the CUDA backend (:class:`fastadapt.backends.protocols.RowKernels`)."""

    @staticmethod
    def dense(rule: Any, p: Any, g: Any, s1: Any, s2: Any, s3: Any, width: Any, k: Any, nrows: int) -> None:
        if p.size == 0:                     # no rows, or rows of no element: nothing to update
            return
        _launch(_kernels(rule).dense, nrows, p, p, g, p.size // max(nrows, 1), s1, s2, s3, width, k, nrows)

    @staticmethod
    def lazy(rule: Any, p: Any, rows: Any, vals: Any, s1: Any, s2: Any, s3: Any, width: Any, k: Any) -> None:
        if p.size == 0:
            return
        _launch(_kernels(rule).lazy, rows.size, p, p, rows, vals, vals.size // max(rows.size, 1), s1, s2, s3,
                width, k)

    @staticmethod
    def fused(rule: Any, p: Any, nrows: int, rows: Any, vals: Any, s1: Any, s2: Any, s3: Any, width: Any,
              k: Any) -> None:
        if p.size == 0:
            return
        zero = _zeros(int(width), p.dtype, p)
        _launch(_kernels(rule).fused, nrows, p, p, nrows, rows, vals if vals.size else zero, zero,
                p.size // max(nrows, 1), s1, s2, s3, width, k)

    @staticmethod
    def touched(indptr: Any) -> Any:
        """``(rows, indptr)`` of the rows with stored entries of a CSR given by its full ``indptr``
        (reads ``indptr`` back to the host: a device CSR with a row rule is not a fast path)."""
        full = to_host(indptr).astype(np.int64)
        rows = np.flatnonzero(np.diff(full)).astype(np.int64)
        return upload(rows, indptr), upload(np.append(full[rows], full[-1]), indptr)

    @staticmethod
    def from_csr(indptr: Any, cols: Any, vals: Any, ncols: int) -> Any:
        n = (indptr.size - 1) * ncols
        with _context_of(vals):
            out = cuda.device_array(max(n, 1), dtype=vals.dtype)
        _launch(_zero, out.size, vals, out)
        _launch(_from_csr, indptr.size - 1, vals, indptr, cols, vals, ncols, out)
        return out[:n]


#: the CUDA backend's row kernels
KERNELS = CUDARowKernels()
