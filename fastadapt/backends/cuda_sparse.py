"""Sparse gradients on the GPU: the device-side validation scans and the grid-stride sparse loops.

The twin of :mod:`fastadapt.backends.cpu_sparse`: :class:`CUDASparseKernels` has the same
methods as :class:`fastadapt.backends.cpu_sparse.CPUSparseKernels`, and its kernels call the
same rules of :mod:`fastadapt.algorithms` (compiled with ``numba.cuda.jit(device=True)``).
The device gradient formats that use the scans live in :mod:`fastadapt.grads.device`.

Gradients on the device
-----------------------
* :class:`fastadapt.RowGrad` whose ``rows`` and ``values`` are device arrays;
* a device CSR: ``cupyx.scipy.sparse.csr_matrix``, or :class:`DeviceCSR` wrapping device
  ``(data, indices, indptr)`` arrays.

A host (scipy / numpy) sparse gradient for a device parameter is refused: keep parameter and
gradient on one device.

Validation and canonical forms
------------------------------
Indices are checked on the device by one small reduction kernel (bounds, ``indptr`` shape,
whether columns / row ids are strictly ascending); its eight counters are read back to the
host, **one host synchronisation per sparse gradient** -- the price of raising before anything
is written (numba does not bounds-check, and a wrong index on a GPU corrupts memory silently).

* Canonical input (a CSR with strictly ascending columns in every row -- cupyx's
  ``has_canonical_format`` -- or strictly ascending unique row ids, in the parameter's dtype)
  is used **zero-copy**: a CSR is walked through its full ``indptr`` (each stored entry finds
  its row by binary search), so no touched-rows array is built and nothing is allocated.
* Anything else (duplicates or unsorted indices to sort and sum, values of another dtype,
  non-contiguous arrays, and every error message) goes through the CPU canonicaliser of
  :mod:`fastadapt.grads.sparse`: the gradient is copied to the host, canonicalised, and the
  canonical arrays (O(nnz)) are copied back.  numba.cuda has no device sort; sort and sum
  duplicates on the device first (``g.sum_duplicates()`` in CuPy) to stay on the fast path.

The loops
---------
Every loop is a grid-stride loop over one flat range: stored entries (lazy CSR), elements of
touched rows (lazy rows, exact-decay rows), groups of up to 32 threads per row of the CSR's
``indptr`` (exact-decay CSR: an untouched row's group exits at once), or every element of the
parameter (exact fused: the rule runs with ``g = 0`` where nothing is stored, finding a stored
value by binary search in its row).  Exact-decay stamps live on the parameter's device and are
written by a second kernel, after every thread has read them.
"""

from typing import Any, Tuple

import numpy as np

from ..algorithms import decay_factor, fma, scale_slots
from ..algorithms._spec import RULE_HELPERS
from .cuda_arrays import (SIMULATOR, _context_of, _fill, _shape, _stream_of, as_device_array, cuda, device_of,
                          launch_dims)



def _fma_cuda(a: Any, b: Any, c: Any) -> Any:
    """The rules' :func:`fastadapt.algorithms.fma` on the device: CUDA's fused multiply-add.
    (Under numba's simulator device functions run as Python, with the exact Python ``fma``.)"""
    return cuda.fma(a, b, c)  # type: ignore[call-arg]  # numba.cuda.fma: the device intrinsic


if not SIMULATOR:
    import inspect

    from numba.core.extending import overload as _overload

    @_overload(fma, target="cuda")
    def _fma_cuda_overload(a, b, c):
        return _fma_cuda

    def _device_helper(helper):
        """Rules call ``helper`` (:func:`fastadapt.algorithms.rule_helper`): compiled as device code."""
        def typer(*args):
            return helper

        typer.__signature__ = inspect.signature(helper)   # numba compares the two signatures
        _overload(helper, target="cuda", inline="always")(typer)

    for _helper in RULE_HELPERS:
        _device_helper(_helper)

__all__ = ["CUDASparseKernels", "ROW_LANES", "row_lanes", "scan_csr", "scan_rows", "to_host",
           "upload"]


@cuda.jit(device=True)
def _upper_bound(a, lo, hi, x):
    """First position in [lo, hi) with a[pos] > x (a ascending)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _lower_bound(a, lo, hi, x):
    """First position in [lo, hi) with a[pos] >= x (a ascending)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


# =========================================================================== validation kernels
# stats: [touched rows, bad indptr pairs, column ids out of range, rows not strictly ascending,
#         indptr[0], indptr[nrows], -, -]  (rows form: [ids out of range, not ascending, ...])

@cuda.jit
def _csr_scan(indptr, indices, ncols, stats):
    nrows = indptr.size - 1
    cap = indices.size
    r = cuda.grid(1)
    stride = cuda.gridsize(1)
    if r == 0:
        stats[4] = indptr[0]
        stats[5] = indptr[nrows]
    while r < nrows:
        a = indptr[r]
        b = indptr[r + 1]
        if a < 0 or b < a or b > cap:
            cuda.atomic.add(stats, 1, 1)
        elif b > a:
            cuda.atomic.add(stats, 0, 1)
            bad = 0
            ascending = True
            prev = -1
            for j in range(a, b):
                col = indices[j]
                if col < 0 or col >= ncols:
                    bad += 1
                if col <= prev:
                    ascending = False
                prev = col
            if bad:
                cuda.atomic.add(stats, 2, bad)
            if not ascending:
                cuda.atomic.add(stats, 3, 1)
        r += stride


@cuda.jit
def _rows_scan(rows, nrows, stats):
    t = cuda.grid(1)
    stride = cuda.gridsize(1)
    while t < rows.size:
        r = rows[t]
        if r < 0 or r >= nrows:
            cuda.atomic.add(stats, 0, 1)
        if t > 0 and rows[t - 1] >= r:
            cuda.atomic.add(stats, 1, 1)
        t += stride


@cuda.jit
def _stamp_rows(rows, identity, indptr, nwalk, stamp, step):
    """stamp[row] = step for every touched row (after the decay kernel read the stamps)."""
    t = cuda.grid(1)
    stride = cuda.gridsize(1)
    while t < nwalk:
        if identity:
            if indptr[t + 1] > indptr[t]:
                stamp[t] = step
        else:
            stamp[rows[t]] = step
        t += stride


@cuda.jit
def _stamp_all(stamp, step):
    r = cuda.grid(1)
    stride = cuda.gridsize(1)
    while r < stamp.size:
        if stamp[r] < step:
            stamp[r] = step
        r += stride


# =========================================================================== rule kernels

class _SparseRuleKernels:
    """The sparse grid-stride kernels of one rule and dtype.

    ``cast`` (``np.float32`` / ``np.float64``) rounds the float64 decay factor to the
    parameter dtype inside the kernel, as the CPU loops do.
    """

    def __init__(self, rule: Any, dtype: Any) -> None:
        dev = cuda.jit(device=True)(rule)
        decay, factor_of, cast = _decay_functions(dtype)

        @cuda.jit
        def csr_lazy(p, s1, s2, s3, rows, identity, indptr, cols, vals, nnz, ncols, k):
            j = cuda.grid(1)
            stride = cuda.gridsize(1)
            nptr = indptr.size
            while j < nnz:
                t = _upper_bound(indptr, 0, nptr, j) - 1       # the row holding entry j
                r = t
                if not identity:
                    r = rows[t]
                dev(p, s1, s2, s3, r * ncols + cols[j], vals[j], k)
                j += stride

        @cuda.jit
        def rows_lazy(p, s1, s2, s3, rows, vals, n, ncols, k):
            e = cuda.grid(1)
            stride = cuda.gridsize(1)
            while e < n:
                t = e // ncols
                dev(p, s1, s2, s3, rows[t] * ncols + (e - t * ncols), vals[e], k)
                e += stride

        @cuda.jit
        def csr_exact(p, s1, s2, s3, rows, identity, indptr, cols, vals, zero, ncols, k):
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            n = p.size
            nk = rows.size
            while i < n:
                r = i // ncols
                c = i - r * ncols
                g = zero
                t = r
                found = identity
                if not identity:
                    t = _lower_bound(rows, 0, nk, r)
                    found = t < nk and rows[t] == r
                if found:
                    a = indptr[t]
                    b = indptr[t + 1]
                    q = _lower_bound(cols, a, b, c)
                    if q < b and cols[q] == c:
                        g = vals[q]
                dev(p, s1, s2, s3, i, g, k)
                i += stride

        @cuda.jit
        def rows_exact(p, s1, s2, s3, rows, vals, zero, ncols, k):
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            n = p.size
            nk = rows.size
            while i < n:
                r = i // ncols
                t = _lower_bound(rows, 0, nk, r)
                g = zero
                if t < nk and rows[t] == r:
                    g = vals[t * ncols + (i - r * ncols)]
                dev(p, s1, s2, s3, i, g, k)
                i += stride

        @cuda.jit
        def csr_decay(p, s1, s2, s3, rows, identity, indptr, cols, vals, nwalk, ncols, lanes, zero, k,
                      stamp, step, decay_base, u1, u2, u3):
            # ``lanes`` consecutive threads per walked row (a power of two <= 32, so a group
            # never straddles a warp): an untouched row costs its group two indptr reads
            # (one broadcast), a touched one is walked column by column, lane by lane.
            e = cuda.grid(1)
            stride = cuda.gridsize(1)
            n = nwalk * lanes
            while e < n:
                t = e // lanes
                a = indptr[t]
                b = indptr[t + 1]
                if b > a:                                       # a touched row: caught up, then updated
                    r = t
                    if not identity:
                        r = rows[t]
                    base = r * ncols
                    gap = step - 1 - stamp[r]
                    factor = cast(1.0)
                    if gap > 0:
                        factor = cast(factor_of(decay_base, gap))
                    q = a                                       # columns ascend: the search moves right
                    c = e - t * lanes
                    while c < ncols:
                        i = base + c
                        if gap > 0:
                            decay(s1, s2, s3, i, (u1, u2, u3, factor))
                        g = zero
                        q = _lower_bound(cols, q, b, c)
                        if q < b and cols[q] == c:
                            g = vals[q]
                        dev(p, s1, s2, s3, i, g, k)
                        c += lanes
                e += stride

        @cuda.jit
        def rows_decay(p, s1, s2, s3, rows, vals, n, ncols, k, stamp, step, base, u1, u2, u3):
            e = cuda.grid(1)
            stride = cuda.gridsize(1)
            while e < n:
                t = e // ncols
                r = rows[t]
                i = r * ncols + (e - t * ncols)
                gap = step - 1 - stamp[r]
                if gap > 0:
                    decay(s1, s2, s3, i, (u1, u2, u3, cast(factor_of(base, gap))))
                dev(p, s1, s2, s3, i, vals[e], k)
                e += stride

        self.csr_lazy, self.rows_lazy = csr_lazy, rows_lazy
        self.csr_exact, self.rows_exact = csr_exact, rows_exact
        self.csr_decay, self.rows_decay = csr_decay, rows_decay


_DECAY: dict[Any, Any] = {}


def _decay_functions(dtype: Any) -> Any:
    """The closed-form catch-up (algorithms.scale_slots, decay_factor) as device functions,
    and the cast of the factor to ``dtype``."""
    key = np.dtype(dtype).str
    fns = _DECAY.get(key)
    if fns is None:
        fns = _DECAY[key] = (cuda.jit(device=True)(scale_slots), cuda.jit(device=True)(decay_factor),
                             np.dtype(dtype).type)
    return fns


_SETTLE: dict[Any, Any] = {}


def _settle_kernel(dtype: Any) -> Any:
    """Catch every element up to ``step`` (state about to be read); one kernel per dtype."""
    key = np.dtype(dtype).str
    kernel = _SETTLE.get(key)
    if kernel is None:
        decay, factor_of, cast = _decay_functions(dtype)

        @cuda.jit
        def settle(s1, s2, s3, stamp, step, n, ncols, base, u1, u2, u3):
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            while i < n:
                gap = step - stamp[i // ncols]
                if gap > 0:
                    decay(s1, s2, s3, i, (u1, u2, u3, cast(factor_of(base, gap))))
                i += stride

        kernel = _SETTLE[key] = settle
    return kernel


_KERNELS: dict[Any, Any] = {}


def _kernels(rule: Any, dtype: Any) -> Any:
    key = (rule, np.dtype(dtype).str)
    ks = _KERNELS.get(key)
    if ks is None:
        ks = _KERNELS[key] = _SparseRuleKernels(rule, dtype)
    return ks


def _launch(kernel: Any, n: int, like: Any, *args: Any) -> None:
    if n <= 0:
        return
    blocks, tpb = launch_dims(n)
    with _context_of(like):
        kernel[blocks, tpb, _stream_of(like)](*args)


#: the most threads walking one row in :meth:`CUDASparseKernels.csr_decay` (a warp)
ROW_LANES = 32


def row_lanes(ncols: int) -> int:
    """Threads per row of the exact-decay CSR loop: the power of two >= ``ncols``, at most
    :data:`ROW_LANES` (a group never straddles a warp; lanes stride over wider rows)."""
    return min(ROW_LANES, 1 << max(int(ncols) - 1, 0).bit_length())


_NO_ROWS: dict[Any, Any] = {}


def _no_rows(like: Any) -> Any:
    """A 1-element int64 device array standing for "rows = identity" (full-indptr CSR)."""
    key = device_of(like)
    d = _NO_ROWS.get(key)
    if d is None:
        with _context_of(like):
            d = _NO_ROWS[key] = cuda.device_array(1, dtype=np.int64)
    return d


# =========================================================================== interface

class CUDASparseKernels:
    """The sparse-step interface of the CUDA backend (what :mod:`fastadapt.sparse` calls).

    Same methods as :class:`fastadapt.backends.cpu_sparse.CPUSparseKernels`, plus one convention:
    ``rows=None`` with a CSR means ``indptr`` is the gradient's full ``indptr``
    (``nrows + 1`` entries) rather than the touched rows' one.
    """

    name = "cuda"

    @staticmethod
    def csr_lazy(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, indptr: Any, cols: Any, vals: Any,
            ncols: int, k: Any,
    ) -> None:
        """Run ``rule`` at the stored entries of a CSR gradient (one thread per entry)."""
        ks = _kernels(rule, p.dtype)
        identity = rows is None
        _launch(ks.csr_lazy, vals.size, p, p, s1, s2, s3, _no_rows(p) if identity else rows, identity,
                indptr, cols, vals, vals.size, ncols, k)

    @staticmethod
    def rows_lazy(rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, vals: Any, ncols: int, k: Any) -> None:
        """Run ``rule`` on every element of the given rows; ``vals`` flat (k * ncols)."""
        ks = _kernels(rule, p.dtype)
        _launch(ks.rows_lazy, vals.size, p, p, s1, s2, s3, rows, vals, vals.size, ncols, k)

    @staticmethod
    def csr_exact(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, nrows: int, ncols: int, rows: Any, indptr: Any,
            cols: Any, vals: Any, k: Any,
    ) -> None:
        """Run ``rule`` on every element: stored entries with their value, others with 0."""
        ks = _kernels(rule, p.dtype)
        identity = rows is None
        _launch(ks.csr_exact, p.size, p, p, s1, s2, s3, _no_rows(p) if identity else rows, identity,
                indptr, cols, vals, p.dtype.type(0), ncols, k)

    @staticmethod
    def rows_exact(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, nrows: int, ncols: int, rows: Any, vals: Any, k: Any,
    ) -> None:
        """Run ``rule`` on every element: the given rows with their values, others with 0."""
        ks = _kernels(rule, p.dtype)
        _launch(ks.rows_exact, p.size, p, p, s1, s2, s3, rows, vals, p.dtype.type(0), ncols, k)

    @staticmethod
    def csr_decay(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, indptr: Any, cols: Any, vals: Any,
            ncols: int, k: Any, stamp: Any, step: int, base: float, slots: Tuple[bool, bool, bool],
    ) -> None:
        """Catch the touched rows up (``base ** gap`` on the flagged ``slots``), run ``rule`` on
        them whole, stamp them ``step``.

        A group of :func:`row_lanes` threads walks each row of ``indptr``: with ``rows``
        given (the touched rows), O(touched rows) threads; with ``rows=None`` (the full
        ``indptr`` of a zero-copy CSR, touched rows unknown), O(nrows) threads, where the
        group of an untouched row exits after reading ``indptr[r]`` and ``indptr[r + 1]``
        (the device twin of the CPU path's ``indptr`` scan).  The work on touched rows is
        O(touched rows x ncols) either way.
        """
        if vals.size == 0:
            return                                      # no row touched: nothing to catch up or stamp
        ks = _kernels(rule, p.dtype)
        identity = rows is None
        rows_ = _no_rows(p) if identity else rows
        nwalk = indptr.size - 1
        lanes = row_lanes(ncols)
        _launch(ks.csr_decay, nwalk * lanes, p, p, s1, s2, s3, rows_, identity, indptr, cols, vals, nwalk,
                ncols, lanes, p.dtype.type(0), k, stamp, step, float(base), *(bool(u) for u in slots))
        _launch(_stamp_rows, nwalk, p, rows_, identity, indptr, nwalk, stamp, step)

    @staticmethod
    def rows_decay(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, vals: Any, ncols: int, k: Any,
            stamp: Any, step: int, base: float, slots: Tuple[bool, bool, bool],
    ) -> None:
        """Row-gradient twin of :meth:`csr_decay`."""
        ks = _kernels(rule, p.dtype)
        _launch(ks.rows_decay, vals.size, p, p, s1, s2, s3, rows, vals, vals.size, ncols, k, stamp, step,
                float(base), *(bool(u) for u in slots))
        _launch(_stamp_rows, rows.size, p, rows, False, rows, rows.size, stamp, step)

    @staticmethod
    def settle(
            s1: Any, s2: Any, s3: Any, stamp: Any, step: int, ncols: int, base: float, slots: Tuple[bool, bool, bool],
    ) -> None:
        """Catch every row up to ``step`` (state about to be read)."""
        _launch(_settle_kernel(s1.dtype), s1.size, s1, s1, s2, s3, stamp, step, s1.size, ncols, float(base),
                *(bool(u) for u in slots))
        _launch(_stamp_all, stamp.size, s1, stamp, step)

    @staticmethod
    def new_stamp(nrows: int, value: Any) -> Any:
        """A per-row stamp array (int64) filled with ``value``, on the current device.

        Called from a sparse step, which runs in its parameter's device context
        (:class:`_DeviceStep`), so the stamps live on the parameter's device.  Made once
        per parameter: the fill (on the legacy default stream) is waited for, so that a
        kernel on any stream of the parameter reads it filled.
        """
        stamp = cuda.device_array(int(nrows), dtype=np.int64)
        if nrows:
            blocks, tpb = launch_dims(nrows)
            _fill[blocks, tpb](stamp, np.int64(value))
            if not SIMULATOR:
                cuda.default_stream().synchronize()
        return stamp




# =========================================================================== validation scans, transfers

_STATS: dict[Any, Any] = {}


def _stats_buffers(like: Any) -> Any:
    key = device_of(like)
    bufs = _STATS.get(key)
    if bufs is None:
        with _context_of(like):
            bufs = _STATS[key] = (cuda.device_array(8, dtype=np.int64), np.zeros(8, np.int64))
    return bufs


def _run_scan(kernel: Any, n: int, like: Any, *args: Any) -> Any:
    """Run a validation kernel into the device counters and read them back (one sync)."""
    dev_stats, host_stats = _stats_buffers(like)
    stream = _stream_of(like)
    with _context_of(like):
        _fill[1, 8, stream](dev_stats, np.int64(0))
        if n > 0:
            blocks, tpb = launch_dims(n)
            kernel[blocks, tpb, stream](*args, dev_stats)
        dev_stats.copy_to_host(host_stats, stream=stream)
        if stream:
            stream.synchronize()
    return host_stats.copy()


def scan_rows(rows: Any, nrows: int, like: Any) -> Any:
    """Counters of a device row-id array: ``[0]`` ids out of ``[0, nrows)``, ``[1]`` not
    strictly ascending (one host synchronisation)."""
    return _run_scan(_rows_scan, rows.size, like, rows, nrows)


def scan_csr(indptr: Any, indices: Any, nrows: int, ncols: int, like: Any) -> Any:
    """Counters of a device CSR (see ``_csr_scan``): ``[1..4]`` problems, ``[5]`` nnz."""
    return _run_scan(_csr_scan, nrows, like, indptr, indices, ncols)


def to_host(a: Any) -> np.ndarray:
    """A host copy of device array ``a``."""
    view = as_device_array(a)
    if not SIMULATOR:
        cuda.synchronize()
    return np.array(view.copy_to_host(), copy=True).reshape(_shape(view))


def upload(a: Any, like: Any) -> Any:
    """Host array ``a`` copied to ``like``'s device."""
    with _context_of(like):
        return cuda.to_device(np.ascontiguousarray(a))
