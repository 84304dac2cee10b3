"""CPU loops for sparse gradients: they walk touched rows and call the rules of :mod:`fastadapt.rules`.

Like :func:`fastadapt.cpu._dense_parallel`, every update loop takes the compiled rule
(``cpu.adam``, ``cpu.rmsprop``, ...) as its first argument, so each loop is specialised
once per rule and dtype, the rule is inlined, and the result is cached on disk.  The
loops know nothing about any optimizer; the math stays in the rules.

A parameter is seen as a table ``(nrows, ncols)`` in C order (element ``(r, c)`` is
flat index ``r * ncols + c``; see :func:`fastadapt.sparse.row_view`), and gradients
arrive in the canonical forms of :mod:`fastadapt.sparse`, which validated them: the
loops trust their input and check nothing.  Because the touched rows are unique, the
rows a ``prange`` hands to different threads never overlap, so there are no races.

Nothing here allocates memory proportional to the parameter: the lazy loops touch the
given rows only, the exact loops walk the parameter once, and the canonicalisation
helpers allocate in proportion to the gradient.

:data:`KERNELS` (a :class:`CPUSparseKernels`) is the interface :mod:`fastadapt.sparse`
calls; a device backend provides an object with the same methods.
"""

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import config
from .cpu import COMPILED

__all__ = ["CPUSparseKernels", "KERNELS"]

_OPTS = config.NJIT_OPTIONS


@intrinsic
def _borrowed(typingctx, a):
    """``a`` without its reference count: the same data, shape and strides, no meminfo.

    A rule passed as a first-class function is inlined by LLVM, not by numba, and brings
    the reference-count calls numba puts around its array arguments; where a rule branches
    LLVM cannot pair them, they stay in the loop and it does not vectorise.  With a null
    meminfo they fold away.  The caller keeps the arrays alive during the loop.
    """
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(a)(context, builder, value=args[0])
        out = context.make_array(a)(context, builder)
        for name in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(out, name, getattr(src, name))
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        return out._getvalue()

    return a(a), codegen


def _slots(p, s1, s2, s3):
    """The rule's slots, an unused one (a 1-element dummy) replaced by the parameter itself.

    The rule never touches an unused slot, but a vectorised loop may still issue masked
    (all-false) loads and stores at its index; past a 1-element dummy those hit unmapped or
    cold pages and each costs a microcode assist (see fastadapt.cpu).  The parameter's
    pages are mapped and in use.
    """
    n = p.size
    return (s1 if s1.size == n else p), (s2 if s2.size == n else p), (s3 if s3.size == n else p)


def _nchunks(nrows):
    """Row chunks for the loops that walk the whole table: a few per thread (load balance)."""
    return max(1, min(nrows, 4 * numba.get_num_threads()))


# =========================================================================== row helpers
# Inlined into the loops below.  The `>= 0` tests are always true (the indices were
# validated); they tell LLVM that an index is non-negative, so numba's negative-index
# wraparound folds away and a row's loop vectorises (without them it did not).

@njit(inline="always", **_OPTS)
def _zero_run(rule, p, s1, s2, s3, start, stop, zero, k):
    """The rule with g = 0 on the contiguous flat range start .. stop - 1."""
    if start >= 0 and stop > start:
        for i in range(stop - start):        # (range(start, stop) did not vectorise in a while loop)
            rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), start + i, zero, k)


@njit(inline="always", **_OPTS)
def _dense_row(rule, p, s1, s2, s3, base, vals, off, ncols, k):
    """The rule on flat elements base .. base + ncols - 1 with gradients vals[off:off + ncols]."""
    if base >= 0 and off >= 0 and ncols > 0:
        for c in range(ncols):
            rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base + c, vals[off + c], k)


@njit(inline="always", **_OPTS)
def _merged_row(rule, p, s1, s2, s3, base, ncols, cols, vals, j, end, zero, k):
    """The rule on a whole row: entries j .. end - 1 (ascending columns) with their value, 0 elsewhere."""
    if base >= 0:
        for c in range(ncols):
            g = zero
            if j < end and cols[j] == c:
                g = vals[j]
                j += 1
            rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base + c, g, k)


@njit(inline="always", **_OPTS)
def _stored_entries(rule, p, s1, s2, s3, base, cols, vals, j, end, k):
    """The rule on the stored entries j .. end - 1 of a row (scattered: does not vectorise)."""
    if base >= 0:
        for q in range(j, end):
            rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base + cols[q], vals[q], k)


# =========================================================================== lazy loops
# Only the stored entries change: the rule runs once per (row, col) of the gradient.

@njit(**_OPTS)
def _csr_lazy_serial(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, k):
    for t in range(rows.size):
        _stored_entries(rule, p, s1, s2, s3, rows[t] * ncols, cols, vals, indptr[t], indptr[t + 1], k)


@njit(parallel=True, **_OPTS)
def _csr_lazy_parallel(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, k):
    for t in prange(rows.size):
        _stored_entries(rule, p, s1, s2, s3, rows[t] * ncols, cols, vals, indptr[t], indptr[t + 1], k)


@njit(**_OPTS)
def _rows_lazy_serial(rule, p, s1, s2, s3, rows, vals, ncols, k):
    for t in range(rows.size):
        _dense_row(rule, p, s1, s2, s3, rows[t] * ncols, vals, t * ncols, ncols, k)


@njit(parallel=True, **_OPTS)
def _rows_lazy_parallel(rule, p, s1, s2, s3, rows, vals, ncols, k):
    for t in prange(rows.size):
        _dense_row(rule, p, s1, s2, s3, rows[t] * ncols, vals, t * ncols, ncols, k)


# =========================================================================== exact: one fused pass
# Every element runs the rule once: with its gradient where stored, with g = 0
# elsewhere (which is the dense step on the densified gradient, without building it).
# Each chunk of rows walks its touched rows in order; the untouched rows between two
# touched rows are one contiguous flat range.

@njit(inline="always", **_OPTS)
def _csr_exact_range(rule, p, s1, s2, s3, r0, r1, ncols, rows, indptr, cols, vals, zero, k):
    t = np.searchsorted(rows, r0)
    r = r0
    while r < r1:
        nxt = r1
        if t < rows.size and rows[t] < r1:
            nxt = rows[t]
        _zero_run(rule, p, s1, s2, s3, r * ncols, nxt * ncols, zero, k)    # untouched rows
        if nxt < r1:
            _merged_row(rule, p, s1, s2, s3, nxt * ncols, ncols, cols, vals, indptr[t], indptr[t + 1], zero, k)
            t += 1
        r = nxt + 1


@njit(**_OPTS)
def _csr_exact_serial(rule, p, s1, s2, s3, nrows, ncols, rows, indptr, cols, vals, zero, k):
    _csr_exact_range(rule, p, s1, s2, s3, 0, nrows, ncols, rows, indptr, cols, vals, zero, k)


@njit(parallel=True, **_OPTS)
def _csr_exact(rule, p, s1, s2, s3, nrows, ncols, rows, indptr, cols, vals, zero, k, nchunks):
    chunk = (nrows + nchunks - 1) // nchunks
    for c in prange(nchunks):
        r0 = c * chunk
        _csr_exact_range(rule, p, s1, s2, s3, r0, min(nrows, r0 + chunk), ncols,
                         rows, indptr, cols, vals, zero, k)


@njit(inline="always", **_OPTS)
def _rows_exact_range(rule, p, s1, s2, s3, r0, r1, ncols, rows, vals, zero, k):
    t = np.searchsorted(rows, r0)
    r = r0
    while r < r1:
        nxt = r1
        if t < rows.size and rows[t] < r1:
            nxt = rows[t]
        _zero_run(rule, p, s1, s2, s3, r * ncols, nxt * ncols, zero, k)
        if nxt < r1:
            _dense_row(rule, p, s1, s2, s3, nxt * ncols, vals, t * ncols, ncols, k)
            t += 1
        r = nxt + 1


@njit(**_OPTS)
def _rows_exact_serial(rule, p, s1, s2, s3, nrows, ncols, rows, vals, zero, k):
    _rows_exact_range(rule, p, s1, s2, s3, 0, nrows, ncols, rows, vals, zero, k)


@njit(parallel=True, **_OPTS)
def _rows_exact(rule, p, s1, s2, s3, nrows, ncols, rows, vals, zero, k, nchunks):
    chunk = (nrows + nchunks - 1) // nchunks
    for c in prange(nchunks):
        r0 = c * chunk
        _rows_exact_range(rule, p, s1, s2, s3, r0, min(nrows, r0 + chunk), ncols, rows, vals, zero, k)


# =========================================================================== exact: decay catch-up
# For rules whose zero-gradient step only decays state geometrically (RMSprop without
# momentum or weight decay: the parameter does not move, square_avg and grad_avg are
# multiplied by alpha), each row keeps the step up to which it is current (`stamp`);
# a touched row is first caught up in closed form (`decay` = rules.rmsprop_decay with
# the factor alpha**gap), then updated by the rule.  Untouched rows cost nothing.

@njit(inline="always", **_OPTS)
def _catch_up(decay, s1, s3, base, ncols, gap, alpha, centered):
    if gap > 0 and base >= 0:
        # rules.rmsprop_decay_scalars: the factor computed in float64, then rounded to the dtype
        kd = (centered, s1.dtype.type(alpha ** float(gap)))
        for c in range(ncols):
            decay(_borrowed(s1), _borrowed(s3), base + c, kd)


@njit(inline="always", **_OPTS)
def _catch_up_row(decay, s1, s3, rows, t, ncols, stamp, step, alpha, centered):
    row = rows[t]
    _catch_up(decay, s1, s3, row * ncols, ncols, step - 1 - stamp[row], alpha, centered)
    stamp[row] = step


@njit(**_OPTS)
def _catch_up_rows_serial(decay, s1, s3, rows, ncols, stamp, step, alpha, centered):
    for t in range(rows.size):
        _catch_up_row(decay, s1, s3, rows, t, ncols, stamp, step, alpha, centered)


@njit(parallel=True, **_OPTS)
def _catch_up_rows_parallel(decay, s1, s3, rows, ncols, stamp, step, alpha, centered):
    """Bring the given rows up to ``step - 1`` and stamp them ``step`` (their update follows)."""
    for t in prange(rows.size):
        _catch_up_row(decay, s1, s3, rows, t, ncols, stamp, step, alpha, centered)


@njit(**_OPTS)
def _csr_full_rows_serial(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, zero, k):
    for t in range(rows.size):
        _merged_row(rule, p, s1, s2, s3, rows[t] * ncols, ncols, cols, vals, indptr[t], indptr[t + 1], zero, k)


@njit(parallel=True, **_OPTS)
def _csr_full_rows_parallel(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, zero, k):
    """The rule on every element of the touched rows (0 where nothing is stored)."""
    for t in prange(rows.size):
        _merged_row(rule, p, s1, s2, s3, rows[t] * ncols, ncols, cols, vals, indptr[t], indptr[t + 1], zero, k)


@njit(inline="always", **_OPTS)
def _settle_row(decay, s1, s3, stamp, row, step, ncols, alpha, centered):
    gap = step - stamp[row]
    if gap > 0:
        _catch_up(decay, s1, s3, row * ncols, ncols, gap, alpha, centered)
        stamp[row] = step


@njit(**_OPTS)
def _settle_serial(decay, s1, s3, stamp, step, ncols, alpha, centered):
    for row in range(stamp.size):
        _settle_row(decay, s1, s3, stamp, row, step, ncols, alpha, centered)


@njit(parallel=True, **_OPTS)
def _settle_parallel(decay, s1, s3, stamp, step, ncols, alpha, centered):
    for row in prange(stamp.size):
        _settle_row(decay, s1, s3, stamp, row, step, ncols, alpha, centered)


# =========================================================================== canonicalisation helpers

@njit(parallel=True, **_OPTS)
def _csr_scan(indptr, indices, ncols, nchunks):
    """One pass over a CSR's structure: checks it and collects its touched rows.

    Returns ``(stats, bound, rows, starts)``; ``stats[c]`` holds, for row chunk ``c``:
    touched rows, bad ``indptr`` pairs (decreasing or outside ``[0, len(indices)]``),
    column indices outside ``[0, ncols)``, rows whose columns are not strictly
    ascending.  Chunk ``c``'s touched rows and their first entries are written to
    ``rows`` / ``starts`` from ``bound[c]`` on (a chunk has at most as many touched rows
    as rows and as stored entries, so the buffers hold ``min(nrows, nnz)`` at most).
    Nothing outside the arrays is read or written, whatever they hold.
    """
    nrows = indptr.size - 1
    cap = indices.size
    chunk = (nrows + nchunks - 1) // nchunks
    bound = np.zeros(nchunks + 1, np.int64)
    for c in range(nchunks):
        r0 = min(nrows, c * chunk)
        r1 = min(nrows, r0 + chunk)
        entries = min(max(indptr[r1] - indptr[r0], 0), cap)
        bound[c + 1] = bound[c] + min(r1 - r0, entries)
    rows = np.empty(bound[nchunks], np.int64)
    starts = np.empty(bound[nchunks], np.int64)
    stats = np.zeros((nchunks, 4), np.int64)
    for c in prange(nchunks):
        r0 = min(nrows, c * chunk)
        r1 = min(nrows, r0 + chunk)
        o = bound[c]
        limit = bound[c + 1]
        bad_ptr = 0
        bad_col = 0
        unsorted = 0
        a = indptr[r0]
        for r in range(r0, r1):
            b = indptr[r + 1]
            if b != a:                                   # the rare case in a sparse gradient
                if a < 0 or b < a or b > cap:
                    bad_ptr += 1
                else:
                    if o < limit:
                        rows[o] = r
                        starts[o] = a
                    o += 1
                    prev = -1
                    ascending = True
                    for j in range(a, b):
                        col = indices[j]
                        if col < 0 or col >= ncols:
                            bad_col += 1
                        if col <= prev:
                            ascending = False
                        prev = col
                    if not ascending:
                        unsorted += 1
            elif a < 0 or a > cap:
                bad_ptr += 1
            a = b
        stats[c, 0] = o - bound[c]
        stats[c, 1] = bad_ptr
        stats[c, 2] = bad_col
        stats[c, 3] = unsorted
    return stats, bound, rows, starts


@njit(parallel=True, **_OPTS)
def _csr_sort_rows(cptr, cols, vals, cols_out, vals_out, counts):
    """Sort each row's entries by column (stably) and sum duplicates in their order of
    appearance; row t's unique entries go to [cptr[t], cptr[t] + counts[t])."""
    for t in prange(counts.size):
        a = cptr[t]
        order = np.argsort(cols[a:cptr[t + 1]], kind="mergesort")
        u = a - 1
        prev = -1
        for q in range(order.size):
            j = a + order[q]
            col = cols[j]
            if col != prev:
                u += 1
                cols_out[u] = col
                vals_out[u] = vals[j]
                prev = col
            else:
                vals_out[u] = vals_out[u] + vals[j]
        counts[t] = u + 1 - a


@njit(parallel=True, **_OPTS)
def _csr_compact(cptr, counts, newptr, cols, vals, cols_out, vals_out):
    for t in prange(counts.size):
        a = cptr[t]
        b = newptr[t]
        for q in range(counts[t]):
            cols_out[b + q] = cols[a + q]
            vals_out[b + q] = vals[a + q]


@njit(**_OPTS)
def _rows_scan(rows, nrows):
    """(row ids out of range, whether the ids are strictly ascending)."""
    bad = 0
    ascending = True
    prev = -1
    for t in range(rows.size):
        r = rows[t]
        if r < 0 or r >= nrows:
            bad += 1
        if r <= prev:
            ascending = False
        prev = r
    return bad, ascending


@njit(inline="always", **_OPTS)
def _gather_sum_row(order, starts, values, out, u):
    """out[u] = sum of values[order[starts[u]:starts[u+1]]], added in that order."""
    ncols = values.shape[1]
    a = starts[u]
    src = order[a]
    for c in range(ncols):
        out[u, c] = values[src, c]
    for q in range(a + 1, starts[u + 1]):
        src = order[q]
        for c in range(ncols):
            out[u, c] = out[u, c] + values[src, c]


@njit(**_OPTS)
def _rows_gather_sum_serial(order, starts, values, out):
    for u in range(starts.size - 1):
        _gather_sum_row(order, starts, values, out, u)


@njit(parallel=True, **_OPTS)
def _rows_gather_sum_parallel(order, starts, values, out):
    for u in prange(starts.size - 1):
        _gather_sum_row(order, starts, values, out, u)


def csr_scan(indptr, indices, ncols):
    """Validate a CSR's structure and find its touched rows in one parallel pass.

    Parameters
    ----------
    indptr : ndarray of int32 or int64, shape (nrows + 1,)
    indices : ndarray, same dtype as ``indptr``
    ncols : int

    Returns
    -------
    totals : ndarray of int64, shape (4,)
        Touched rows, bad ``indptr`` pairs (decreasing or outside ``[0, len(indices)]``),
        column indices outside ``[0, ncols)``, rows whose columns are not strictly
        ascending (unsorted or duplicated).
    rows : ndarray of int64, shape (k,), or None
        The touched rows, ascending (None when an ``indptr`` pair is bad).
    indptr : ndarray of int64, shape (k + 1,), or None
        Their entries' pointers: row ``rows[t]`` holds entries ``indptr[t] .. indptr[t+1]-1``.
    """
    stats, bound, rows_buf, starts_buf = _csr_scan(indptr, indices, ncols, _nchunks(indptr.size - 1))
    totals = stats.sum(axis=0)
    if totals[1]:
        return totals, None, None
    counts = stats[:, 0]
    k = int(totals[0])
    ptr = np.empty(k + 1, np.int64)
    if k == rows_buf.size:                        # every chunk's region full: nothing to compact
        rows = rows_buf
        ptr[:k] = starts_buf
    else:
        rows = np.empty(k, np.int64)
        o = 0
        for c in range(counts.size):
            n = int(counts[c])
            b = int(bound[c])
            rows[o:o + n] = rows_buf[b:b + n]
            ptr[o:o + n] = starts_buf[b:b + n]
            o += n
    ptr[k] = indptr[-1]
    return totals, rows, ptr


def csr_sort_rows(cptr, cols, vals):
    """Sort each touched row by column and sum duplicates: new (cptr, cols, vals)."""
    k = cptr.size - 1
    cols_out = np.empty_like(cols)
    vals_out = np.empty_like(vals)
    counts = np.empty(k, np.int64)
    _csr_sort_rows(cptr, cols, vals, cols_out, vals_out, counts)
    if counts.sum() == cols.size:
        return cptr, cols_out, vals_out
    newptr = np.zeros(k + 1, np.int64)
    np.cumsum(counts, out=newptr[1:])
    cols2 = np.empty(int(newptr[-1]), cols.dtype)
    vals2 = np.empty(int(newptr[-1]), vals.dtype)
    _csr_compact(cptr, counts, newptr, cols_out, vals_out, cols2, vals2)
    return newptr, cols2, vals2


def rows_scan(rows, nrows):
    """(number of row ids outside [0, nrows), whether ``rows`` is strictly ascending)."""
    bad, ascending = _rows_scan(rows, nrows)
    return int(bad), bool(ascending)


def rows_sum_duplicates(rows, values):
    """Sort row ids, sum the value rows of duplicates in order of appearance.

    ``rows`` int64 (k,), ``values`` C-contiguous (k, ncols); returns new arrays.
    """
    order = np.argsort(rows, kind="stable")
    srows = rows[order]
    new = np.empty(srows.size, bool)
    new[:1] = True
    np.not_equal(srows[1:], srows[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    urows = srows[starts]
    starts = np.append(starts, srows.size)
    out = np.empty((urows.size, values.shape[1]), values.dtype)
    if values.size >= config.PARALLEL_THRESHOLD:
        _rows_gather_sum_parallel(order, starts, values, out)
    else:
        _rows_gather_sum_serial(order, starts, values, out)
    return urows, out


# =========================================================================== interface

class CPUSparseKernels:
    """The sparse-step interface of the CPU backend (what :mod:`fastadapt.sparse` calls).

    ``rule`` and ``decay`` are the Python rule functions of :mod:`fastadapt.rules`;
    they are mapped to their compiled dispatchers here.  Arrays are the flat parameter
    and state buffers and the canonical gradient arrays (see :mod:`fastadapt.sparse`).
    """

    name = "cpu"

    @staticmethod
    def csr_lazy(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, k):
        """Run ``rule`` at the stored entries of a touched-rows CSR gradient."""
        loop = _csr_lazy_parallel if vals.size >= config.PARALLEL_THRESHOLD else _csr_lazy_serial
        loop(COMPILED[rule], p, *_slots(p, s1, s2, s3), rows, indptr, cols, vals, ncols, k)

    @staticmethod
    def rows_lazy(rule, p, s1, s2, s3, rows, vals, ncols, k):
        """Run ``rule`` on every element of the given rows; ``vals`` flat (k * ncols)."""
        loop = _rows_lazy_parallel if vals.size >= config.PARALLEL_THRESHOLD else _rows_lazy_serial
        loop(COMPILED[rule], p, *_slots(p, s1, s2, s3), rows, vals, ncols, k)

    @staticmethod
    def csr_exact(rule, p, s1, s2, s3, nrows, ncols, rows, indptr, cols, vals, k):
        """Run ``rule`` on every element: stored entries with their value, others with 0."""
        if p.size >= config.PARALLEL_THRESHOLD:
            _csr_exact(COMPILED[rule], p, *_slots(p, s1, s2, s3), nrows, ncols, rows, indptr, cols, vals,
                       p.dtype.type(0), k, _nchunks(nrows))
        else:
            _csr_exact_serial(COMPILED[rule], p, *_slots(p, s1, s2, s3), nrows, ncols, rows, indptr, cols,
                              vals, p.dtype.type(0), k)

    @staticmethod
    def rows_exact(rule, p, s1, s2, s3, nrows, ncols, rows, vals, k):
        """Run ``rule`` on every element: the given rows with their values, others with 0."""
        if p.size >= config.PARALLEL_THRESHOLD:
            _rows_exact(COMPILED[rule], p, *_slots(p, s1, s2, s3), nrows, ncols, rows, vals, p.dtype.type(0),
                        k, _nchunks(nrows))
        else:
            _rows_exact_serial(COMPILED[rule], p, *_slots(p, s1, s2, s3), nrows, ncols, rows, vals,
                               p.dtype.type(0), k)

    @staticmethod
    def _catch_up(decay, s1, s3, rows, ncols, stamp, step, alpha, centered):
        loop = (_catch_up_rows_parallel if rows.size * ncols >= config.PARALLEL_THRESHOLD
                else _catch_up_rows_serial)
        loop(COMPILED[decay], s1, s3 if s3.size == s1.size else s1, rows, ncols, stamp, step, float(alpha),
             bool(centered))

    @staticmethod
    def csr_decay(rule, decay, p, s1, s2, s3, rows, indptr, cols, vals, ncols, k, stamp, step, alpha,
                  centered):
        """Catch the touched rows up (``decay``), stamp them ``step``, run ``rule`` on them whole."""
        # two passes (catch-up, then the rule) rather than one loop: fused, the rule's loop
        # stopped vectorising (measured 5x slower serially)
        CPUSparseKernels._catch_up(decay, s1, s3, rows, ncols, stamp, step, alpha, centered)
        loop = (_csr_full_rows_parallel if rows.size * ncols >= config.PARALLEL_THRESHOLD
                else _csr_full_rows_serial)
        loop(COMPILED[rule], p, *_slots(p, s1, s2, s3), rows, indptr, cols, vals, ncols, p.dtype.type(0), k)

    @staticmethod
    def rows_decay(rule, decay, p, s1, s2, s3, rows, vals, ncols, k, stamp, step, alpha, centered):
        """Row-gradient twin of :meth:`csr_decay` (the rows are whole: the lazy loop runs them)."""
        CPUSparseKernels._catch_up(decay, s1, s3, rows, ncols, stamp, step, alpha, centered)
        CPUSparseKernels.rows_lazy(rule, p, s1, s2, s3, rows, vals, ncols, k)

    @staticmethod
    def settle(decay, s1, s3, stamp, step, ncols, alpha, centered):
        """Catch every row up to ``step`` (state about to be read)."""
        loop = _settle_parallel if s1.size >= config.PARALLEL_THRESHOLD else _settle_serial
        loop(COMPILED[decay], s1, s3 if s3.size == s1.size else s1, stamp, step, ncols, float(alpha),
             bool(centered))

    @staticmethod
    def new_stamp(nrows, value):
        """A per-row stamp array (int64) filled with ``value``."""
        return np.full(nrows, value, dtype=np.int64)


KERNELS = CPUSparseKernels()
