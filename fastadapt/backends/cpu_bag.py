"""CPU loops of embedding bags: the checks, the coalescing of a bag gradient, the forward.

:mod:`fastadapt.grads.bag` calls these after the cheap checks (dtypes, shapes); the kernels
here check what needs a pass over the data (index ranges, the order of ``offsets``) and do
the work.  The inputs are C-contiguous: ``indices`` and ``offsets`` int64, float arrays of
one dtype (the parameter's or the table's).

Coalescing a bag gradient (:func:`coalesce`) -- the table's gradient in rows form
``(rows, values)`` (:mod:`fastadapt.grads.sparse`) without ever building a per-lookup
``(n_lookups, dim)`` array:

1. group the lookups by row id, keeping lookup order within a row: a counting sort
   (histogram over the table's rows, prefix sums, a stable scatter walking the bags in order,
   which also records each lookup's bag) when the table has at most
   ``config.BAG_COUNTING_SORT_RATIO`` rows per lookup; otherwise a sort of the keys
   ``row * n + t`` (unique, so a plain sort is stable; a stable argsort when those keys would
   overflow int64) and a parallel fill of the bag ids from ``offsets`` -- so a step never costs
   more than O(lookups log lookups), whatever the table's size;
2. in parallel over the unique rows (ascending), ``values[u] = 0 + c_1 + c_2 + ...`` over
   the row's lookups ``t`` in lookup order, ``c_t = grad_out[bag(t)] * s_t`` and
   ``s_t = w_t`` (mode "sum") or ``w_t / size(bag(t))`` (mode "mean"), ``w_t`` the
   per-sample weight or 1, all in the parameter's dtype.  That is, bit for bit,
   ``np.add.at(zeros, indices, grad_out[bag] * s[:, None])`` in that dtype (and the order
   torch's CPU backward adds in).  Distinct rows go to distinct threads: no races.
"""

from typing import Any, Tuple

import numpy as np
from numba import njit, prange

from .. import config
from .cpu_loops import _view

__all__ = ["scan_ids", "scan_offsets", "coalesce", "forward"]

_OPTS = config.NJIT_OPTIONS


# =========================================================================== checks

@njit(parallel=True, **_OPTS)
def _scan_ids(indices, nrows):
    """Number of ids outside [0, nrows)."""
    bad = 0
    for t in prange(indices.size):
        r = indices[t]
        if r < 0 or r >= nrows:
            bad += 1
    return bad


@njit(parallel=True, **_OPTS)
def _scan_offsets(offsets):
    """Number of descents offsets[b + 1] < offsets[b]."""
    bad = 0
    for b in prange(offsets.size - 1):
        if offsets[b + 1] < offsets[b]:
            bad += 1
    return bad


def scan_ids(indices: Any, nrows: int) -> int:
    """How many of the int64 ``indices`` lie outside ``[0, nrows)`` (one parallel pass)."""
    return int(_scan_ids(indices, nrows))


def scan_offsets(offsets: Any) -> int:
    """How many times the int64 ``offsets`` decrease (one parallel pass)."""
    return int(_scan_offsets(offsets))


# =========================================================================== coalescing

@njit(**_OPTS)
def _counting_sort(indices, offsets, nrows):
    """Group lookups by row: (unique rows ascending, starts (k + 1), lookup ids, their bags).

    The lookups of row ``rows[u]`` are ``src_t[starts[u]:starts[u + 1]]`` in lookup order,
    ``src_b`` their bags.
    """
    n = indices.size
    cursor = np.zeros(nrows, np.int64)
    for t in range(n):
        cursor[indices[t]] += 1
    k = 0
    for r in range(nrows):
        if cursor[r] != 0:
            k += 1
    rows = np.empty(k, np.int64)
    starts = np.empty(k + 1, np.int64)
    pos = 0
    u = 0
    for r in range(nrows):
        c = cursor[r]
        cursor[r] = pos
        if c != 0:
            rows[u] = r
            starts[u] = pos
            u += 1
            pos += c
    starts[k] = n
    src_t = np.empty(n, np.int64)
    src_b = np.empty(n, np.int64)
    for b in range(offsets.size - 1):          # bags in order, lookups in order: a stable scatter
        for t in range(offsets[b], offsets[b + 1]):
            q = cursor[indices[t]]
            cursor[indices[t]] = q + 1
            src_t[q] = t
            src_b[q] = b
    return rows, starts, src_t, src_b


@njit(parallel=True, **_OPTS)
def _bag_ids(offsets, n):
    """bag[t] = the bag of lookup t (offsets validated: every lookup is in exactly one bag)."""
    bag = np.empty(n, np.int64)
    for b in prange(offsets.size - 1):
        for t in range(offsets[b], offsets[b + 1]):
            bag[t] = b
    return bag


@njit(**_OPTS)
def _runs(srows, order, bag):
    """From lookups sorted by (row, lookup): (unique rows, starts, lookup ids, their bags)."""
    n = srows.size
    k = 0
    for q in range(n):
        if q == 0 or srows[q] != srows[q - 1]:
            k += 1
    rows = np.empty(k, np.int64)
    starts = np.empty(k + 1, np.int64)
    src_b = np.empty(n, np.int64)
    u = 0
    for q in range(n):
        if q == 0 or srows[q] != srows[q - 1]:
            rows[u] = srows[q]
            starts[u] = q
            u += 1
        src_b[q] = bag[order[q]]
    starts[k] = n
    return rows, starts, src_b


@njit(parallel=True, **_OPTS)
def _gather(starts, src_t, src_b, grad_out, weights, weighted, sizes, mean, out, zero):
    """out[u] = sum over the lookups of unique row u (in lookup order, from 0) of grad_out[bag] * s.

    Rows are views made from addresses (no reference count, indices from 0), so the inner loops
    vectorise; the first lookup's term is added to ``zero`` (+0.0) rather than to a zeroed row,
    the same sum in one pass less."""
    ncols = grad_out.shape[1]
    size = grad_out.itemsize * ncols
    for u in prange(starts.size - 1):
        row = _view(out, out.ctypes.data + u * size, ncols)
        q0 = starts[u]
        for q in range(q0, starts[u + 1]):
            b = src_b[q]
            s = weights[src_t[q]] if weighted else weights[0]
            if mean:
                s = s / sizes[b]
            g = _view(grad_out, grad_out.ctypes.data + b * size, ncols)
            if q == q0:
                for c in range(ncols):
                    row[c] = zero + g[c] * s
            else:
                for c in range(ncols):
                    row[c] = row[c] + g[c] * s


def _weights_and_sizes(offsets: np.ndarray, weights: Any, dtype: Any, mean: bool
                       ) -> Tuple[np.ndarray, bool, np.ndarray]:
    weighted = weights is not None
    w = weights if weighted else np.ones(1, dtype)
    sizes = np.diff(offsets).astype(dtype) if mean else np.ones(1, dtype)
    return w, weighted, sizes


def coalesce(indices: Any, offsets: Any, grad_out: Any, weights: Any, mean: bool, nrows: int
             ) -> Tuple[np.ndarray, np.ndarray]:
    """The table's gradient in rows form from a validated bag gradient (the module docstring).

    Parameters
    ----------
    indices : int64 (n,), in ``[0, nrows)``
    offsets : int64 (n_bags + 1,), from 0, non-decreasing, ending at n
    grad_out : (n_bags, dim), C-contiguous, the parameter's dtype
    weights : (n,) of that dtype, or None
    mean : bool
    nrows : int

    Returns
    -------
    rows : int64 (k,), strictly ascending
    values : (k, dim), C-contiguous, grad_out's dtype
    """
    n = indices.size
    dtype = grad_out.dtype
    if n and nrows <= config.BAG_COUNTING_SORT_RATIO * n:
        rows, starts, src_t, src_b = _counting_sort(indices, offsets, nrows)
    elif n and nrows * n < 2 ** 62:
        keys = indices * n + np.arange(n, dtype=np.int64)      # unique keys: a plain sort is stable
        keys.sort()
        srows = keys // n
        src_t = keys - srows * n
        rows, starts, src_b = _runs(srows, src_t, _bag_ids(offsets, n))
    else:
        src_t = np.argsort(indices, kind="stable").astype(np.int64)
        rows, starts, src_b = _runs(indices[src_t], src_t, _bag_ids(offsets, n))
    w, weighted, sizes = _weights_and_sizes(offsets, weights, dtype, mean)
    values = np.empty((rows.size, grad_out.shape[1]), dtype)
    if rows.size:
        _gather(starts, src_t, src_b, grad_out, w, weighted, sizes, mean, values, dtype.type(0))
    return rows, values


# =========================================================================== forward

@njit(parallel=True, **_OPTS)
def _forward(table, indices, offsets, weights, weighted, sizes, mean, out):
    ncols = table.shape[1]
    for b in prange(offsets.size - 1):
        a, e = offsets[b], offsets[b + 1]
        for c in range(ncols):
            out[b, c] = 0
        for t in range(a, e):
            r = indices[t]
            s = weights[t] if weighted else weights[0]
            for c in range(ncols):
                out[b, c] = out[b, c] + table[r, c] * s
        if mean and e > a:
            d = sizes[b]
            for c in range(ncols):
                out[b, c] = out[b, c] / d


def forward(table: Any, indices: Any, offsets: Any, weights: Any, mean: bool) -> np.ndarray:
    """``out[b] = sum_t w_t * table[indices[t]]`` over bag ``b``'s lookups in order (from 0),
    divided by the bag's size for ``mean`` (an empty bag gives zeros); validated inputs."""
    w, weighted, sizes = _weights_and_sizes(offsets, weights, table.dtype, mean)
    out = np.empty((offsets.size - 1, table.shape[1]), table.dtype)
    if out.size:
        _forward(table, indices, offsets, w, weighted, sizes, mean, out)
    return out
