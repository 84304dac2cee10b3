"""CPU sparse steps over compressed state: decode a touched row, run the rule on it, encode it back.

The sparse loops of :mod:`fastadapt.backends.cpu_sparse` with state stored as
:class:`~fastadapt.backends.compressed.CompressedBuffer` (``state_dtype`` "bfloat16" or
"int8").  Per touched row (flat elements ``row * ncols .. row * ncols + ncols - 1``) the used
slots are decoded into a float32 scratch with :func:`fastadapt.backends.cpu_codec.decode_span`,
the row helpers of :mod:`~fastadapt.backends.cpu_sparse` run the unchanged compiled rule over
the row -- on views (no meminfo, :func:`fastadapt.backends.cpu._view`) of the parameter's row
and of the scratch, so that index ``c`` of the row is the row's element ``c`` -- and the
scratch is encoded back with :func:`~fastadapt.backends.cpu_codec.encode_span`.  The scratch is
allocated once per parallel work unit (a chunk of touched rows), O(row), never O(table).

bfloat16 stochastic rounding is keyed by the buffer's seed, the step and the *global* flat
element index, as in the dense loop, so a sparse step that touches every row gives the codes
of the dense step with the same gradient, whatever the threading.  int8 needs every block in
one row (:func:`fastadapt.backends.compressed.row_aligned`): the caller refuses other shapes
before anything is written.  An untouched row's codes and scales are never read or written by
the lazy and decay loops.

Modes, as for plain state: lazy (the touched rows; CSR: the rule at the stored entries only,
the rest of the row is decoded and encoded back unchanged -- for int8 it shares the new scale of
its block), exact ``FUSED`` (every row: untouched runs of rows in sub-blocks with ``g = 0``),
exact ``Decay`` (a touched row is caught up in closed form in the scratch, then updated, then
encoded once) and :func:`settle` (every row behind is caught up and encoded).
"""

from typing import Any, Tuple

import numpy as np
from numba import njit, prange

from .. import config
from .cpu_loops import _view
from .cpu_codec import decode_span, encode_span, packed_slots, sub_block
from .cpu_compile import compiled
from .cpu_sparse import (_FACTOR_OF, _SCALE, CPUSparseKernels, _decay_row, _dense_row, _merged_row, _nchunks, _run,
                         _stored_entries, _zero_run)

__all__ = ["touched", "exact", "settle", "CPUCodecSparseKernels", "KERNELS"]

_OPTS = config.NJIT_OPTIONS


# =========================================================================== row helpers

@njit(inline="always", **_OPTS)
def _decode3(c1, c2, c3, a1, a2, a3, used, signed, bs, start, n, x1, x2, x3):
    if used[0]:
        decode_span(c1, a1, bs, start, n, signed[0], x1)
    if used[1]:
        decode_span(c2, a2, bs, start, n, signed[1], x2)
    if used[2]:
        decode_span(c3, a3, bs, start, n, signed[2], x3)


@njit(inline="always", **_OPTS)
def _encode3(x1, x2, x3, c1, c2, c3, a1, a2, a3, used, signed, bs, start, n, seed, step, nearest):
    if used[0]:
        encode_span(x1, c1, a1, bs, start, n, signed[0], seed, step, nearest)
    if used[1]:
        encode_span(x2, c2, a2, bs, start, n, signed[1], seed, step, nearest)
    if used[2]:
        encode_span(x3, c3, a3, bs, start, n, signed[2], seed, step, nearest)


@njit(inline="always", **_OPTS)
def _views(p, pa, xa1, xa2, xa3, used, start, n):
    """Views of ``p[start:start + n]`` and of the scratch rows (an unused slot: the parameter's
    row, never touched by the rule, as in the dense loops)."""
    a = pa + start * p.itemsize
    return (_view(p, a, n), _view(p, xa1 if used[0] else a, n), _view(p, xa2 if used[1] else a, n),
            _view(p, xa3 if used[2] else a, n))


# =========================================================================== touched rows: lazy and decay

@njit(**_OPTS)
def _touched_range(rule, decay, factor_of, p, c1, c2, c3, a1, a2, a3, used, signed, bs, rows, t0, t1, indptr,
                   cols, vals, ncols, whole, catch_up, zero, k, stamp, dbase, dflags, seed, step, nearest):
    """Rows ``rows[t0:t1]``: decode, (catch up,) run the rule, encode.

    ``whole``: rows form (``vals[t * ncols:]``, every element) -- else CSR entries
    ``indptr[t] .. indptr[t+1] - 1``: the stored entries only (lazy), or the whole row with 0
    where nothing is stored (``catch_up``: exact decay).
    """
    scratch = np.empty((3, max(ncols, 1)), np.float32)
    x1, x2, x3 = scratch[0], scratch[1], scratch[2]
    pa = np.int64(p.ctypes.data)
    xa1, xa2, xa3 = np.int64(x1.ctypes.data), np.int64(x2.ctypes.data), np.int64(x3.ctypes.data)
    last = -1
    factor = p.dtype.type(1)
    for t in range(t0, t1):
        row = rows[t]
        base = row * ncols
        _decode3(c1, c2, c3, a1, a2, a3, used, signed, bs, base, ncols, x1, x2, x3)
        pv, s1, s2, s3 = _views(p, pa, xa1, xa2, xa3, used, base, ncols)
        if catch_up:
            gap = step - 1 - stamp[row]
            if gap > 0:
                if gap != last:
                    factor = p.dtype.type(factor_of(dbase, gap))
                    last = gap
                _decay_row(decay, s1, s2, s3, 0, ncols, (dflags[0], dflags[1], dflags[2], factor))
            stamp[row] = step
        if whole:
            _dense_row(rule, pv, s1, s2, s3, 0, vals, t * ncols, ncols, k)
        elif catch_up:
            _merged_row(rule, pv, s1, s2, s3, 0, ncols, cols, vals, indptr[t], indptr[t + 1], zero, k)
        else:
            _stored_entries(rule, pv, s1, s2, s3, 0, ncols, cols, vals, indptr[t], indptr[t + 1], k)
        _encode3(x1, x2, x3, c1, c2, c3, a1, a2, a3, used, signed, bs, base, ncols, seed, step, nearest)


@njit(parallel=True, **_OPTS)
def _touched_loop(rule, decay, factor_of, p, c1, c2, c3, a1, a2, a3, used, signed, bs, rows, indptr, cols, vals,
                  ncols, whole, catch_up, zero, k, stamp, dbase, dflags, seed, step, nearest, nchunks):
    chunk = (rows.size + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _touched_range(rule, decay, factor_of, p, c1, c2, c3, a1, a2, a3, used, signed, bs, rows, c * chunk,
                       min(rows.size, c * chunk + chunk), indptr, cols, vals, ncols, whole, catch_up, zero, k,
                       stamp, dbase, dflags, seed, step, nearest)


# =========================================================================== exact: one fused pass

@njit(**_OPTS)
def _exact_range(rule, p, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, r0, r1, ncols, rows, indptr, cols, vals,
                 whole, zero, k, seed, step, nearest):
    """Rows ``r0 .. r1 - 1``: untouched runs of rows in sub-blocks of ``sub`` with ``g = 0``,
    touched rows whole with their gradient (0 where a CSR stores nothing)."""
    scratch = np.empty((3, max(sub, ncols)), np.float32)
    x1, x2, x3 = scratch[0], scratch[1], scratch[2]
    pa = np.int64(p.ctypes.data)
    xa1, xa2, xa3 = np.int64(x1.ctypes.data), np.int64(x2.ctypes.data), np.int64(x3.ctypes.data)
    t = np.searchsorted(rows, r0)
    r = r0
    while r < r1:
        nxt = r1
        if t < rows.size and rows[t] < r1:
            nxt = rows[t]
        s = r * ncols
        e = nxt * ncols
        while s < e:                                       # untouched rows r .. nxt - 1
            n = min(sub, e - s)
            _decode3(c1, c2, c3, a1, a2, a3, used, signed, bs, s, n, x1, x2, x3)
            pv, s1, s2, s3 = _views(p, pa, xa1, xa2, xa3, used, s, n)
            _zero_run(rule, pv, s1, s2, s3, 0, n, zero, k)
            _encode3(x1, x2, x3, c1, c2, c3, a1, a2, a3, used, signed, bs, s, n, seed, step, nearest)
            s += n
        if nxt < r1:
            base = nxt * ncols
            _decode3(c1, c2, c3, a1, a2, a3, used, signed, bs, base, ncols, x1, x2, x3)
            pv, s1, s2, s3 = _views(p, pa, xa1, xa2, xa3, used, base, ncols)
            if whole:
                _dense_row(rule, pv, s1, s2, s3, 0, vals, t * ncols, ncols, k)
            else:
                _merged_row(rule, pv, s1, s2, s3, 0, ncols, cols, vals, indptr[t], indptr[t + 1], zero, k)
            _encode3(x1, x2, x3, c1, c2, c3, a1, a2, a3, used, signed, bs, base, ncols, seed, step, nearest)
            t += 1
        r = nxt + 1


@njit(parallel=True, **_OPTS)
def _exact_loop(rule, p, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, nrows, ncols, rows, indptr, cols, vals,
                whole, zero, k, seed, step, nearest, nchunks):
    chunk = (nrows + nchunks - 1) // nchunks
    for c in prange(nchunks):
        r0 = c * chunk
        _exact_range(rule, p, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, r0, min(nrows, r0 + chunk), ncols,
                     rows, indptr, cols, vals, whole, zero, k, seed, step, nearest)


# =========================================================================== settle

@njit(**_OPTS)
def _settle_range(decay, factor_of, proto, c1, c2, c3, a1, a2, a3, used, signed, bs, stamp, r0, r1, ncols,
                  dbase, dflags, seed, step, nearest):
    scratch = np.empty((3, max(ncols, 1)), np.float32)
    x1, x2, x3 = scratch[0], scratch[1], scratch[2]
    last = -1
    factor = proto.dtype.type(1)
    for row in range(r0, r1):
        gap = step - stamp[row]
        if gap > 0:
            if gap != last:
                factor = proto.dtype.type(factor_of(dbase, gap))
                last = gap
            base = row * ncols
            _decode3(c1, c2, c3, a1, a2, a3, used, signed, bs, base, ncols, x1, x2, x3)
            _decay_row(decay, x1, x2 if used[1] else x1, x3 if used[2] else x1, 0, ncols,
                       (dflags[0], dflags[1], dflags[2], factor))
            _encode3(x1, x2, x3, c1, c2, c3, a1, a2, a3, used, signed, bs, base, ncols, seed, step, nearest)
            stamp[row] = step


@njit(parallel=True, **_OPTS)
def _settle_loop(decay, factor_of, proto, c1, c2, c3, a1, a2, a3, used, signed, bs, stamp, ncols, dbase, dflags,
                 seed, step, nearest, nchunks):
    nrows = stamp.size
    chunk = (nrows + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _settle_range(decay, factor_of, proto, c1, c2, c3, a1, a2, a3, used, signed, bs, stamp, c * chunk,
                      min(nrows, c * chunk + chunk), ncols, dbase, dflags, seed, step, nearest)


# =========================================================================== interface

_NO_INDEX = np.zeros(1, np.int64)       # indptr / cols / stamp of a call that does not use them


def _chunks(elements: int, units: int) -> int:
    """Parallel work units: one below the parallel threshold, else a few per thread."""
    return 1 if elements < config.PARALLEL_THRESHOLD else _nchunks(units)


def _seed(slots: Any) -> int:
    return int(next(s for s in slots if s is not None).seed)


def touched(rule: Any, p: np.ndarray, slots: Any, rows: np.ndarray, indptr: Any, cols: Any, vals: np.ndarray,
            ncols: int, k: Any, step: int, nearest: bool, decay: Any = None) -> None:
    """The rule on the touched rows of ``p`` with compressed state ``slots`` (lazy, or exact decay).

    Parameters
    ----------
    rule : function
        A rule of :mod:`fastadapt.algorithms` (compiled here on first use).
    p : ndarray
        The flat float32 parameter, updated in place.
    slots : sequence of three
        :class:`~fastadapt.backends.compressed.CompressedBuffer` or None (unused slot).
    rows : ndarray of int64
        Touched rows, strictly ascending, validated.
    indptr, cols : ndarray or None
        The touched-rows CSR's pointers and columns; None for the rows form (``vals`` then holds
        ``len(rows) * ncols`` values).
    vals : ndarray
        Flat gradient values.
    ncols : int
        Elements per row.
    k : tuple
        The rule's scalars.
    step : int
        The step (stochastic rounding key; the stamp of a decay step).
    nearest : bool
        bfloat16 round to nearest instead of stochastically.
    decay : (stamp, base, flags) or None
        Exact ``Decay`` mode: the rows' stamps (updated), the plan's base and slot flags; a row
        is caught up in closed form before its update, the whole row updated (0 where a CSR
        stores nothing).  None: lazy (the stored entries only).
    """
    codes, scales, used, signed, bs = packed_slots(slots)
    whole = indptr is None
    if whole:
        indptr = cols = _NO_INDEX
    if decay is None:
        stamp, base, flags, catch_up = _NO_INDEX, 1.0, (False, False, False), False
    else:
        (stamp, base, flags), catch_up = decay, True
    _run(_touched_loop, compiled(rule), _SCALE, _FACTOR_OF, p, *codes, *scales, used, signed, bs, rows, indptr,
         cols, vals, int(ncols), whole, catch_up, p.dtype.type(0), k, stamp, float(base),
         tuple(bool(f) for f in flags), _seed(slots), int(step), bool(nearest),
         _chunks(rows.size * ncols, rows.size))


def exact(rule: Any, p: np.ndarray, slots: Any, nrows: int, ncols: int, rows: np.ndarray, indptr: Any, cols: Any,
          vals: np.ndarray, k: Any, step: int, nearest: bool) -> None:
    """Exact ``FUSED`` sparse step with compressed state: every element runs the rule, with its
    gradient where stored and 0 elsewhere (see :func:`touched` for the arguments; ``nrows``:
    the table's rows)."""
    codes, scales, used, signed, bs = packed_slots(slots)
    whole = indptr is None
    if whole:
        indptr = cols = _NO_INDEX
    _run(_exact_loop, compiled(rule), p, *codes, *scales, used, signed, bs, sub_block(bs), int(nrows), int(ncols),
         rows, indptr, cols, vals, whole, p.dtype.type(0), k, _seed(slots), int(step), bool(nearest),
         _chunks(p.size, nrows))


def settle(slots: Any, stamp: np.ndarray, step: int, ncols: int, base: float, flags: Tuple[bool, bool, bool],
           nearest: bool) -> None:
    """Catch every row of compressed ``slots`` up to ``step`` (``base ** gap`` on the flagged slots).

    Parameters
    ----------
    slots : sequence of three
        CompressedBuffer or None.
    stamp : ndarray of int64
        Per row, the step it is current to (updated).
    step : int
        The parameter's step count (also the stochastic rounding key).
    ncols : int
        Elements per row.
    base : float
        The Decay plan's base.
    flags : tuple of three bools
        The decayed slots.
    nearest : bool
        bfloat16 round to nearest instead of stochastically.
    """
    codes, scales, used, signed, bs = packed_slots(slots)
    proto = np.zeros(1, np.float32)
    _run(_settle_loop, _SCALE, _FACTOR_OF, proto, *codes, *scales, used, signed, bs, stamp, int(ncols), float(base),
         tuple(bool(f) for f in flags), _seed(slots), int(step), bool(nearest),
         _chunks(stamp.size * ncols, stamp.size))


class CPUCodecSparseKernels(CPUSparseKernels):
    """The CPU's sparse loops (:class:`fastadapt.backends.cpu_sparse.CPUSparseKernels`) and, for
    compressed state (``state_dtype`` "bfloat16" / "int8"), the codec row loops of this module."""

    @staticmethod
    def codec_touched(
            rule: Any, p: Any, slots: Any, rows: Any, indptr: Any, cols: Any, vals: Any, ncols: int, k: Any,
            step: int, nearest: bool, decay: Any = None,
    ) -> None:
        """Lazy (``decay`` None) or exact-decay step on the touched rows with compressed ``slots``
        (:func:`fastadapt.backends.cpu_sparse_codec.touched`)."""
        touched(rule, p, slots, rows, indptr, cols, vals, ncols, k, step, nearest, decay)

    @staticmethod
    def codec_exact(
            rule: Any, p: Any, slots: Any, nrows: int, ncols: int, rows: Any, indptr: Any, cols: Any, vals: Any,
            k: Any, step: int, nearest: bool,
    ) -> None:
        """Exact fused step with compressed ``slots`` (:func:`fastadapt.backends.cpu_sparse_codec.exact`)."""
        exact(rule, p, slots, nrows, ncols, rows, indptr, cols, vals, k, step, nearest)

    @staticmethod
    def codec_settle(
            slots: Any, stamp: Any, step: int, ncols: int, base: float, flags: Tuple[bool, bool, bool],
            nearest: bool,
    ) -> None:
        """:meth:`settle` with compressed ``slots`` (:func:`fastadapt.backends.cpu_sparse_codec.settle`)."""
        settle(slots, stamp, step, ncols, base, flags, nearest)


#: the CPU backend's sparse kernels (:attr:`fastadapt.backends.cpu.CPUBackend.sparse_kernels`)
KERNELS = CPUCodecSparseKernels()
