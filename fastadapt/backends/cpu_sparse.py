"""CPU loops for sparse gradients: they walk touched rows and call the rules of :mod:`fastadapt.algorithms`.

Like :func:`fastadapt.backends.cpu._dense_parallel`, every update loop takes the compiled
rule (:func:`fastadapt.backends.cpu_compile.compiled`) as its first argument, so each loop is specialised
once per rule and dtype, the rule is inlined, and the result is cached on disk.  The
loops know nothing about any optimizer; the math stays in the rules.

A parameter is seen as a table ``(nrows, ncols)`` in C order (element ``(r, c)`` is
flat index ``r * ncols + c``; see :func:`fastadapt.sparse.row_view`), and gradients
arrive in the canonical forms of :mod:`fastadapt.grads.sparse`, which validated them: the
loops trust their input and check nothing.  Because the touched rows are unique, the
rows a ``prange`` hands to different threads never overlap, so there are no races.

Nothing here allocates memory proportional to the parameter: the lazy loops touch the
given rows only, the exact loops walk the parameter once, and the canonicalisation
helpers allocate in proportion to the gradient.

:data:`KERNELS` (a :class:`CPUSparseKernels`) is the interface :mod:`fastadapt.sparse`
calls (:class:`fastadapt.backends.protocols.SparseKernels`); the CUDA backend provides an
object with the same methods.
"""

import numba
from typing import Any, Tuple

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from ..algorithms import decay_factor, scale_slots
from .cpu_compile import compiled, direct, type_key

#: the closed-form catch-up of a Decay algorithm (algorithms.scale_slots, factor
#: algorithms.decay_factor), passed to the loops as arguments like every rule, so that their
#: cached versions follow changes to them
_SCALE = compiled(scale_slots)
_FACTOR_OF = compiled(decay_factor)

__all__ = ["CPUSparseKernels"]

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


def _slots(p: Any, s1: Any, s2: Any, s3: Any) -> Any:
    """The rule's slots, an unused one (a 1-element dummy) replaced by the parameter itself.

    The rule never touches an unused slot, but a vectorised loop may still issue masked
    (all-false) loads and stores at its index; past a 1-element dummy those hit unmapped or
    cold pages and each costs a microcode assist (see fastadapt.cpu).  The parameter's
    pages are mapped and in use.
    """
    n = p.size
    return (s1 if s1.size == n else p), (s2 if s2.size == n else p), (s3 if s3.size == n else p)


def _nchunks(nrows: int) -> int:
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


@njit(**_OPTS)
def _full_row(rule, p, s1, s2, s3, base, vals, off, ncols, k):
    """:func:`_dense_row` as a function of its own (not inlined): where a loop also holds the
    scattered per-entry path, LLVM vectorised neither; called, this one vectorises."""
    _dense_row(rule, p, s1, s2, s3, base, vals, off, ncols, k)


@njit(inline="always", **_OPTS)
def _merged_row(rule, p, s1, s2, s3, base, ncols, cols, vals, j, end, zero, k):
    """The rule on a whole row: entries j .. end - 1 (ascending columns) with their value, 0 elsewhere."""
    if end - j == ncols:                  # every column stored (ascending, in range: 0 .. ncols-1)
        _full_row(rule, _borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base, _borrowed(vals), j,
                  ncols, k)
    elif base >= 0:
        for c in range(ncols):
            g = zero
            if j < end and cols[j] == c:
                g = vals[j]
                j += 1
            rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base + c, g, k)


@njit(inline="always", **_OPTS)
def _stored_entries(rule, p, s1, s2, s3, base, ncols, cols, vals, j, end, k):
    """The rule on the stored entries j .. end - 1 of a row (scattered: does not vectorise, unless
    the row is full)."""
    if end - j == ncols:                  # every column stored (ascending, in range: 0 .. ncols-1)
        _full_row(rule, _borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base, _borrowed(vals), j,
                  ncols, k)
    elif base >= 0:
        for q in range(j, end):
            rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), base + cols[q], vals[q], k)


# =========================================================================== lazy loops
# Only the stored entries change: the rule runs once per (row, col) of the gradient.

@njit(**_OPTS)
def _csr_lazy_serial(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, k):
    for t in range(rows.size):
        _stored_entries(rule, p, s1, s2, s3, rows[t] * ncols, ncols, cols, vals, indptr[t], indptr[t + 1], k)


@njit(parallel=True, **_OPTS)
def _csr_lazy_parallel(rule, p, s1, s2, s3, rows, indptr, cols, vals, ncols, k):
    for t in prange(rows.size):
        _stored_entries(rule, p, s1, s2, s3, rows[t] * ncols, ncols, cols, vals, indptr[t], indptr[t + 1], k)


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
# For algorithms whose zero-gradient step only decays state geometrically (a Decay exact
# plan: RMSprop without momentum or weight decay, Adadelta: the parameter does not move and
# the flagged slots are multiplied by `base`), each row keeps the step up to which it is
# current (`stamp`); a touched row is first caught up in closed form (`decay` =
# algorithms.scale_slots with the factor `factor_of(base, gap)` = algorithms.decay_factor),
# then updated by the rule.  Untouched rows cost nothing.
#
# Two passes: catch the touched rows up, then run the rule on them (the lazy loop for row
# gradients).  Measured alternatives were slower: catch-up and rule in one loop per row
# stopped the rule's loop from vectorising (5x), and blocks of 16 rows (catch up, then
# update, while in cache) ran 1.5-2x slower than the two passes.  Consecutive rows caught
# up by the same gap share one pow().


@njit(inline="always", **_OPTS)
def _decay_row(decay, s1, s2, s3, base, ncols, kd):
    if base >= 0:
        for c in range(ncols):
            decay(_borrowed(s1), _borrowed(s2), _borrowed(s3), base + c, kd)


@njit(inline="always", **_OPTS)
def _catch_up_range(decay, factor_of, s1, s2, s3, rows, t0, t1, ncols, stamp, step, base, u1, u2, u3):
    """Bring rows[t0:t1] up to ``step - 1`` and stamp them ``step`` (their update follows)."""
    last = -1
    factor = s1.dtype.type(1)
    for t in range(t0, t1):
        row = rows[t]
        gap = step - 1 - stamp[row]
        if gap > 0:
            if gap != last:
                factor = s1.dtype.type(factor_of(base, gap))
                last = gap
            _decay_row(decay, s1, s2, s3, row * ncols, ncols, (u1, u2, u3, factor))
        stamp[row] = step


@njit(**_OPTS)
def _catch_up_serial(decay, factor_of, s1, s2, s3, rows, ncols, stamp, step, base, u1, u2, u3):
    _catch_up_range(decay, factor_of, s1, s2, s3, rows, 0, rows.size, ncols, stamp, step, base, u1, u2, u3)


@njit(parallel=True, **_OPTS)
def _catch_up_parallel(decay, factor_of, s1, s2, s3, rows, ncols, stamp, step, base, u1, u2, u3, nchunks):
    chunk = (rows.size + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _catch_up_range(decay, factor_of, s1, s2, s3, rows, c * chunk, min(rows.size, c * chunk + chunk), ncols,
                        stamp, step, base, u1, u2, u3)


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
def _settle_range(decay, factor_of, s1, s2, s3, stamp, r0, r1, step, ncols, base, u1, u2, u3):
    last = -1
    factor = s1.dtype.type(1)
    for row in range(r0, r1):
        gap = step - stamp[row]
        if gap > 0:
            if gap != last:
                factor = s1.dtype.type(factor_of(base, gap))
                last = gap
            _decay_row(decay, s1, s2, s3, row * ncols, ncols, (u1, u2, u3, factor))
            stamp[row] = step


@njit(**_OPTS)
def _settle_serial(decay, factor_of, s1, s2, s3, stamp, step, ncols, base, u1, u2, u3):
    _settle_range(decay, factor_of, s1, s2, s3, stamp, 0, stamp.size, step, ncols, base, u1, u2, u3)


@njit(parallel=True, **_OPTS)
def _settle_parallel(decay, factor_of, s1, s2, s3, stamp, step, ncols, base, u1, u2, u3, nchunks):
    chunk = (stamp.size + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _settle_range(decay, factor_of, s1, s2, s3, stamp, c * chunk, min(stamp.size, c * chunk + chunk), step,
                      ncols, base, u1, u2, u3)


# =========================================================================== canonicalisation helpers

@njit(**_OPTS)
def _scan_chunk(indptr, indices, ncols, r0, r1, rows, starts, o, limit, stats):
    """Rows r0 .. r1 - 1 of :func:`_csr_scan` (a function of its own: inside a parfor body
    its flat loops did not vectorise, 4x slower)."""
    cap = indices.size
    o0 = o
    bad_col = 0
    unsorted = 0          # descents inside rows (columns not strictly ascending)
    # pointers: non-decreasing (a vectorised count) and within [0, len(indices)]
    # (loops run from 0 over an offset known to be >= 0: an index that may be negative
    # needs numpy's wraparound, which stops vectorisation -- 6x slower here)
    bad_ptr = 0
    if r0 >= 0:
        for r in range(r1 - r0):
            bad_ptr += indptr[r0 + r + 1] < indptr[r0 + r]
    e0 = np.int64(indptr[r0])
    e1 = np.int64(indptr[r1])
    if e0 < 0 or e1 > cap:
        bad_ptr += 1
    if bad_ptr == 0 and e0 >= 0:        # (e0 >= 0 is implied; LLVM needs to see it)
        # column indices: out of range, and descents (flat, vectorised passes over the
        # chunk's entries; a descent across a row boundary is taken back below)
        for j in range(e1 - e0):
            col = indices[e0 + j]
            bad_col += (col < 0) | (col >= ncols)
        for j in range(e1 - e0 - 1):
            unsorted += indices[e0 + j + 1] <= indices[e0 + j]
        r = r0
        while r < r1:
            if r + 8 <= r1 and indptr[r + 8] == indptr[r]:
                r += 8                                       # eight empty rows (pointers monotone)
                continue
            a = indptr[r]
            if indptr[r + 1] > a:
                if o < limit:
                    rows[o] = r
                    starts[o] = a
                o += 1
                if a > e0:
                    unsorted -= indices[a] <= indices[a - 1]
            r += 1
    stats[0] = o - o0
    stats[1] = bad_ptr
    stats[2] = bad_col
    stats[3] = unsorted


@njit(parallel=True, **_OPTS)
def _csr_scan(indptr, indices, ncols, nchunks):
    """One pass over a CSR's structure: checks it and collects its touched rows.

    Returns ``(stats, bound, rows, starts)``; ``stats[c]`` holds, for row chunk ``c``:
    touched rows, bad ``indptr`` pairs (decreasing, or the chunk's pointers outside
    ``[0, len(indices)]``), column indices outside ``[0, ncols)``, and descents inside
    rows (places where a row's columns are not strictly ascending).  Chunk ``c``'s
    touched rows and their first entries are written to ``rows`` / ``starts`` from
    ``bound[c]`` on (a chunk has at most as many touched rows as rows and as stored
    entries, so the buffers hold ``min(nrows, nnz)`` at most).  Nothing outside the
    arrays is read or written, whatever they hold.
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
        _scan_chunk(indptr, indices, ncols, r0, min(nrows, r0 + chunk), rows, starts, bound[c], bound[c + 1],
                    stats[c])
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


def csr_scan(indptr: Any, indices: Any, ncols: int) -> Any:
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
        column indices outside ``[0, ncols)``, descents inside rows (non-zero: some row is
        unsorted or has duplicates).
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


def csr_sort_rows(cptr: Any, cols: Any, vals: Any) -> Any:
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


def rows_scan(rows: Any, nrows: int) -> Any:
    """(number of row ids outside [0, nrows), whether ``rows`` is strictly ascending)."""
    bad, ascending = _rows_scan(rows, nrows)
    return int(bad), bool(ascending)


def rows_sum_duplicates(rows: Any, values: Any, nrows: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sort row ids, sum the value rows of duplicates in order of appearance.

    ``rows`` int64 (k,) in ``[0, nrows)``, ``values`` C-contiguous (k, ncols); returns new
    arrays.
    """
    k = rows.size
    if k and nrows * k < 2 ** 62:
        # a stable order from a plain sort of unique keys (row, position): 10-15x faster than
        # numpy's stable argsort (measured: 8192 ids, 20 us against 300 us)
        keys = rows * k + np.arange(k, dtype=np.int64)
        keys.sort()
        srows = keys // k
        order = keys - srows * k
    else:
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

def _decay_slots(s1: Any, s2: Any, s3: Any) -> Any:
    """The catch-up's slots: an unused one (a 1-element dummy) replaced by ``s1`` (never
    written: its flag is off; see :func:`_slots` for why not the dummy)."""
    n = s1.size
    return s1, (s2 if s2.size == n else s1), (s3 if s3.size == n else s1)


def _run(loop, *args):
    """``loop(*args)`` through its compiled entry point (:func:`fastadapt.backends.cpu.direct`):
    numba's dispatcher would type the rule and the NamedTuple of scalars at every call."""
    direct(loop, type_key(args), *args)


class CPUSparseKernels:
    """The sparse-step interface of the CPU backend (what :mod:`fastadapt.grads.sparse` calls;
    :class:`fastadapt.backends.protocols.SparseKernels`).

    ``rule`` is a rule function of :mod:`fastadapt.algorithms`; it is compiled on first use
    (:func:`fastadapt.backends.cpu_compile.compiled`).  Arrays are the flat parameter and state
    buffers and the canonical gradient arrays (see :mod:`fastadapt.grads.sparse`).
    """

    name = "cpu"

    @staticmethod
    def csr_lazy(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, indptr: Any, cols: Any, vals: Any,
            ncols: int, k: Any,
    ) -> None:
        """Run ``rule`` at the stored entries of a touched-rows CSR gradient."""
        if vals.size == rows.size * ncols:          # every touched row whole: it is the rows form
            CPUSparseKernels.rows_lazy(rule, p, s1, s2, s3, rows, vals, ncols, k)
            return
        loop = _csr_lazy_parallel if vals.size >= config.PARALLEL_THRESHOLD else _csr_lazy_serial
        _run(loop, compiled(rule), p, *_slots(p, s1, s2, s3), rows, indptr, cols, vals, ncols, k)

    @staticmethod
    def rows_lazy(rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, vals: Any, ncols: int, k: Any) -> None:
        """Run ``rule`` on every element of the given rows; ``vals`` flat (k * ncols)."""
        loop = _rows_lazy_parallel if vals.size >= config.PARALLEL_THRESHOLD else _rows_lazy_serial
        _run(loop, compiled(rule), p, *_slots(p, s1, s2, s3), rows, vals, ncols, k)

    @staticmethod
    def csr_exact(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, nrows: int, ncols: int, rows: Any, indptr: Any,
            cols: Any, vals: Any, k: Any,
    ) -> None:
        """Run ``rule`` on every element: stored entries with their value, others with 0."""
        if vals.size == rows.size * ncols:
            CPUSparseKernels.rows_exact(rule, p, s1, s2, s3, nrows, ncols, rows, vals, k)
            return
        if p.size >= config.PARALLEL_THRESHOLD:
            _run(_csr_exact, compiled(rule), p, *_slots(p, s1, s2, s3), nrows, ncols, rows, indptr, cols, vals,
                       p.dtype.type(0), k, _nchunks(nrows))
        else:
            _run(_csr_exact_serial, compiled(rule), p, *_slots(p, s1, s2, s3), nrows, ncols, rows, indptr, cols,
                              vals, p.dtype.type(0), k)

    @staticmethod
    def rows_exact(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, nrows: int, ncols: int, rows: Any, vals: Any, k: Any,
    ) -> None:
        """Run ``rule`` on every element: the given rows with their values, others with 0."""
        if p.size >= config.PARALLEL_THRESHOLD:
            _run(_rows_exact, compiled(rule), p, *_slots(p, s1, s2, s3), nrows, ncols, rows, vals, p.dtype.type(0),
                        k, _nchunks(nrows))
        else:
            _run(_rows_exact_serial, compiled(rule), p, *_slots(p, s1, s2, s3), nrows, ncols, rows, vals,
                               p.dtype.type(0), k)

    @staticmethod
    def _catch_up(
            s1: Any, s2: Any, s3: Any, rows: Any, ncols: int, stamp: Any, step: int, base: float,
            slots: Tuple[bool, bool, bool],
    ) -> None:
        u1, u2, u3 = (bool(u) for u in slots)
        if rows.size * ncols >= config.PARALLEL_THRESHOLD:
            _run(_catch_up_parallel, _SCALE, _FACTOR_OF, *_decay_slots(s1, s2, s3), rows, ncols, stamp, step,
                               float(base), u1, u2, u3, _nchunks(rows.size))
        else:
            _run(_catch_up_serial, _SCALE, _FACTOR_OF, *_decay_slots(s1, s2, s3), rows, ncols, stamp, step,
                             float(base), u1, u2, u3)

    @staticmethod
    def csr_decay(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, indptr: Any, cols: Any, vals: Any,
            ncols: int, k: Any, stamp: Any, step: int, base: float, slots: Tuple[bool, bool, bool],
    ) -> None:
        """Catch the touched rows up (``base ** gap`` on the flagged ``slots``), stamp them
        ``step``, run ``rule`` on them whole."""
        if vals.size == rows.size * ncols:
            CPUSparseKernels.rows_decay(rule, p, s1, s2, s3, rows, vals, ncols, k, stamp, step, base, slots)
            return
        CPUSparseKernels._catch_up(s1, s2, s3, rows, ncols, stamp, step, base, slots)
        loop = (_csr_full_rows_parallel if rows.size * ncols >= config.PARALLEL_THRESHOLD
                else _csr_full_rows_serial)
        _run(loop, compiled(rule), p, *_slots(p, s1, s2, s3), rows, indptr, cols, vals, ncols, p.dtype.type(0), k)

    @staticmethod
    def rows_decay(
            rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, vals: Any, ncols: int, k: Any,
            stamp: Any, step: int, base: float, slots: Tuple[bool, bool, bool],
    ) -> None:
        """Row-gradient twin of :meth:`csr_decay` (whole rows: the lazy loop runs the rule)."""
        CPUSparseKernels._catch_up(s1, s2, s3, rows, ncols, stamp, step, base, slots)
        CPUSparseKernels.rows_lazy(rule, p, s1, s2, s3, rows, vals, ncols, k)

    @staticmethod
    def settle(
            s1: Any, s2: Any, s3: Any, stamp: Any, step: int, ncols: int, base: float, slots: Tuple[bool, bool, bool],
    ) -> None:
        """Catch every row up to ``step`` (state about to be read)."""
        u1, u2, u3 = (bool(u) for u in slots)
        if s1.size >= config.PARALLEL_THRESHOLD:
            _run(_settle_parallel, _SCALE, _FACTOR_OF, *_decay_slots(s1, s2, s3), stamp, step, ncols, float(base),
                             u1, u2, u3, _nchunks(stamp.size))
        else:
            _run(_settle_serial, _SCALE, _FACTOR_OF, *_decay_slots(s1, s2, s3), stamp, step, ncols, float(base),
                           u1, u2, u3)

    @staticmethod
    def new_stamp(nrows: int, value: Any) -> Any:
        """A per-row stamp array (int64) filled with ``value``."""
        return np.full(nrows, value, dtype=np.int64)

