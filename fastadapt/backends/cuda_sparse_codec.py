"""Sparse steps over compressed state on CUDA: one CUDA block per row.

The device twin of :mod:`fastadapt.backends.cpu_sparse_codec` (:func:`touched`: lazy and exact
decay, :func:`exact`: exact fused, :func:`settle`), written with the codec device functions of
:mod:`fastadapt.backends.cuda_compressed` (not a copy of the codec).  Lazy mode:

bfloat16
    The block's threads stride over the row's elements; each decodes its element's slots
    (``bits << 16``), runs the unchanged rule on one-element local copies (rows form: with
    the row's gradient; CSR: with the stored value found by binary search in the row's
    columns, the element left as it is where nothing is stored) and encodes with the same
    stochastic rounding hash as the dense kernel, keyed by the buffer's seed, the step and
    the *global* flat element index -- so the codes are the CPU's.
int8 blockwise
    The parameter's blocks lie within rows (:func:`fastadapt.backends.compressed.row_aligned`,
    the optimizer refuses other shapes first), so a row is ``ncols // block`` whole blocks.
    Block by block, the threads decode, run the rule (CSR: at the stored entries; the rest of
    the block is decoded and re-encoded, sharing its block's new scale, as on the CPU), keep
    the float32 state in a global scratch, reduce the block's ``|bits|`` maximum in shared
    memory and encode with :func:`fastadapt.backends.cuda_compressed._q8_store`.

In lazy and decay mode an untouched row's codes and scales are neither read nor written.  A zero-copy CSR
(``rows=None``: ``indptr`` is the gradient's full ``indptr``) is walked row by row, an empty
row's block moving on at once.

Exact ``Decay`` mode (RMSprop, Adadelta, ...): a touched row's stamp is read by every thread,
the row caught up in closed form (:func:`fastadapt.algorithms.scale_slots`) in the decoded
values, updated whole and encoded once; thread 0 stamps it after a barrier.  :func:`settle`
catches every row behind up the same way (no rule).  Exact ``FUSED`` mode (:func:`exact`) walks
every row of the table (a touched row found by binary search in ``rows``), the rule running with
0 where nothing is stored, as the CPU's fused pass.
"""

from typing import Any, Dict, Tuple

import numpy as np

from .. import config
from .codec import sr_key
from .cuda_arrays import _context_of, _stream_of, cuda
from .cuda_sparse import CUDASparseKernels, _decay_functions, _no_rows
from .cuda_compressed import (_ABS, _QMAPS, _U0, DeviceCompressedBuffer, _bf16_decode, _bf16_encode, _f32_bits,
                              _q8_store, _scratch, _sr_bits, SCRATCH_ELEMS)

__all__ = ["SparseCodecKernels", "CUDACodecSparseKernels", "KERNELS", "touched", "exact", "settle"]

# the closed-form catch-up of exact decay (algorithms.scale_slots, decay_factor) as device functions
_scale, _factor_of, _ = _decay_functions(np.float32)


@cuda.jit(device=True)
def _find(cols, lo, hi, c):
    """First position in [lo, hi) with cols[pos] >= c (cols ascending)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if cols[mid] < c:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _locate(t, fused, identity, whole, rows, nk, indptr):
    """Walk index ``t``'s row: (table row, its position in the gradient, its first and end
    entries in ``cols`` (CSR), whether the gradient touches it).  Fused: ``t`` is the table
    row, found by binary search in ``rows`` (or directly in a full ``indptr``)."""
    r = t
    tt = t
    if fused:
        if not identity:
            tt = _find(rows, 0, nk, t)
            if tt >= nk or rows[tt] != t:
                return r, tt, 0, 0, False
    elif not identity:
        r = rows[t]
    if whole:
        return r, tt, 0, 0, True
    a = indptr[tt]
    b = indptr[tt + 1]
    return r, tt, a, b, b > a


class SparseCodecKernels:
    """The lazy sparse kernels of one rule over compressed state (compiled lazily by numba).

    Parameters
    ----------
    rule : function
        A rule of :mod:`fastadapt.algorithms` (compiled here with ``cuda.jit(device=True)``).
    """

    def __init__(self, rule: Any) -> None:
        dev = cuda.jit(device=True)(rule)

        @cuda.jit(device=True)
        def at(p, i, lp, x1, x2, x3, hit, whole, merged, cols, q, b, c, vals, voff, k):
            """The rule at element ``i`` (column ``c``) on the decoded ``x1..x3``: with its value
            (rows form: ``vals[voff + c]``; CSR: found from ``q`` on, which is returned), with 0
            where the row is untouched or (``merged``: exact modes) nothing is stored."""
            run = True
            g = np.float32(0)
            if hit:
                if whole:
                    g = vals[voff + c]
                else:
                    q = _find(cols, q, b, c)
                    if q < b and cols[q] == c:
                        g = vals[q]
                    else:
                        run = merged
            if run:
                lp[0] = p[i]
                dev(lp, x1, x2, x3, 0, g, k)
                p[i] = lp[0]
            return q

        @cuda.jit
        def bf16(p, c1, c2, c3, u1, u2, u3, rows, identity, whole, indptr, cols, vals, nwalk, ncols, k, key,
                 nearest, fused, nk, catch_up, stamp, step, dbase, f1, f2, f3):
            lp = cuda.local.array(1, np.float32)
            x1 = cuda.local.array(1, np.float32)
            x2 = cuda.local.array(1, np.float32)
            x3 = cuda.local.array(1, np.float32)
            tid = cuda.threadIdx.x
            ntpb = cuda.blockDim.x
            t = cuda.blockIdx.x
            while t < nwalk:
                r, tt, a, b, hit = _locate(t, fused, identity, whole, rows, nk, indptr)
                if hit or fused:                            # the same for every thread of the block
                    base = r * ncols
                    gap = 0
                    factor = np.float32(1)
                    if catch_up:                            # exact decay: read before thread 0 stamps
                        gap = step - 1 - stamp[r]
                        if gap > 0:
                            factor = np.float32(_factor_of(dbase, gap))
                    q = a                                   # columns ascend: the search moves right
                    c = tid
                    while c < ncols:
                        i = base + c
                        if u1:
                            x1[0] = _bf16_decode(c1[i])
                        if u2:
                            x2[0] = _bf16_decode(c2[i])
                        if u3:
                            x3[0] = _bf16_decode(c3[i])
                        if gap > 0:
                            _scale(x1, x2, x3, 0, (f1, f2, f3, factor))
                        q = at(p, i, lp, x1, x2, x3, hit, whole, catch_up or fused, cols, q, b, c, vals, tt * ncols,
                               k)
                        rb = _U0
                        if not nearest:
                            rb = _sr_bits(key, np.uint64(i))
                        if u1:
                            c1[i] = _bf16_encode(x1[0], rb, nearest)
                        if u2:
                            c2[i] = _bf16_encode(x2[0], rb, nearest)
                        if u3:
                            c3[i] = _bf16_encode(x3[0], rb, nearest)
                        c += ntpb
                    if catch_up:
                        cuda.syncthreads()                  # every thread has read the stamp
                        if tid == 0:
                            stamp[r] = step
                t += cuda.gridDim.x

        @cuda.jit
        def q8(p, c1, c2, c3, a1, a2, a3, u1, u2, u3, sg1, sg2, sg3, bs, rows, identity, whole, indptr, cols, vals,
               nwalk, ncols, scratch, k, fused, nk, catch_up, stamp, step, dbase, f1, f2, f3):
            lp = cuda.local.array(1, np.float32)
            x1 = cuda.local.array(1, np.float32)
            x2 = cuda.local.array(1, np.float32)
            x3 = cuda.local.array(1, np.float32)
            red = cuda.shared.array(3, np.uint32)
            tid = cuda.threadIdx.x
            ntpb = cuda.blockDim.x
            grid = cuda.gridDim.x
            o1 = cuda.blockIdx.x * bs                      # this block's scratch, per slot
            o2 = grid * bs + o1
            o3 = 2 * grid * bs + o1
            nqb = ncols // bs                               # quantisation blocks per row
            t = cuda.blockIdx.x
            while t < nwalk:
                r, tt, a, b, hit = _locate(t, fused, identity, whole, rows, nk, indptr)
                if hit or fused:                            # the same for every thread of the block
                    base = r * ncols
                    gap = 0
                    factor = np.float32(1)
                    if catch_up:                            # exact decay: read before thread 0 stamps
                        gap = step - 1 - stamp[r]
                        if gap > 0:
                            factor = np.float32(_factor_of(dbase, gap))
                    q = a
                    for qb in range(nqb):
                        if tid == 0:
                            red[0] = 0
                            red[1] = 0
                            red[2] = 0
                        cuda.syncthreads()
                        start = base + qb * bs
                        end = start + bs
                        blk = start // bs
                        s1 = a1[blk] if u1 else np.float32(0)
                        s2 = a2[blk] if u2 else np.float32(0)
                        s3 = a3[blk] if u3 else np.float32(0)
                        m1 = _U0
                        m2 = _U0
                        m3 = _U0
                        e = start + tid
                        while e < end:
                            j = e - start
                            c = e - base
                            if u1:
                                x1[0] = _QMAPS[sg1, c1[e]] * s1
                            if u2:
                                x2[0] = _QMAPS[sg2, c2[e]] * s2
                            if u3:
                                x3[0] = _QMAPS[sg3, c3[e]] * s3
                            if gap > 0:
                                _scale(x1, x2, x3, 0, (f1, f2, f3, factor))
                            q = at(p, e, lp, x1, x2, x3, hit, whole, catch_up or fused, cols, q, b, c, vals,
                                   tt * ncols, k)
                            if u1:
                                scratch[o1 + j] = x1[0]
                                m1 = max(m1, _f32_bits(x1[0]) & _ABS)
                            if u2:
                                scratch[o2 + j] = x2[0]
                                m2 = max(m2, _f32_bits(x2[0]) & _ABS)
                            if u3:
                                scratch[o3 + j] = x3[0]
                                m3 = max(m3, _f32_bits(x3[0]) & _ABS)
                            e += ntpb
                        cuda.atomic.max(red, 0, np.uint32(m1))
                        cuda.atomic.max(red, 1, np.uint32(m2))
                        cuda.atomic.max(red, 2, np.uint32(m3))
                        cuda.syncthreads()
                        if u1:
                            _q8_store(scratch, o1, c1, a1, blk, start, end, tid, ntpb, np.uint64(red[0]), sg1)
                        if u2:
                            _q8_store(scratch, o2, c2, a2, blk, start, end, tid, ntpb, np.uint64(red[1]), sg2)
                        if u3:
                            _q8_store(scratch, o3, c3, a3, blk, start, end, tid, ntpb, np.uint64(red[2]), sg3)
                        cuda.syncthreads()                  # (red and the scratch are reused)
                    if catch_up and tid == 0:               # (every thread read the stamp before the syncs)
                        stamp[r] = step
                t += grid

        self.bf16 = bf16
        self.q8 = q8


@cuda.jit
def _bf16_settle(c1, c2, c3, u1, u2, u3, stamp, nrows, ncols, key, nearest, step, dbase, f1, f2, f3):
    """Catch every row behind ``step`` up: decode, ``base ** gap`` on the flagged slots, encode."""
    x1 = cuda.local.array(1, np.float32)
    x2 = cuda.local.array(1, np.float32)
    x3 = cuda.local.array(1, np.float32)
    tid = cuda.threadIdx.x
    ntpb = cuda.blockDim.x
    r = cuda.blockIdx.x
    while r < nrows:
        gap = step - stamp[r]
        if gap > 0:                                         # the same for every thread of the block
            factor = np.float32(_factor_of(dbase, gap))
            base = r * ncols
            c = tid
            while c < ncols:
                i = base + c
                if u1:
                    x1[0] = _bf16_decode(c1[i])
                if u2:
                    x2[0] = _bf16_decode(c2[i])
                if u3:
                    x3[0] = _bf16_decode(c3[i])
                _scale(x1, x2, x3, 0, (f1, f2, f3, factor))
                rb = _U0
                if not nearest:
                    rb = _sr_bits(key, np.uint64(i))
                if u1:
                    c1[i] = _bf16_encode(x1[0], rb, nearest)
                if u2:
                    c2[i] = _bf16_encode(x2[0], rb, nearest)
                if u3:
                    c3[i] = _bf16_encode(x3[0], rb, nearest)
                c += ntpb
            cuda.syncthreads()                              # every thread has read the stamp
            if tid == 0:
                stamp[r] = step
        r += cuda.gridDim.x


@cuda.jit
def _q8_settle(c1, c2, c3, a1, a2, a3, u1, u2, u3, sg1, sg2, sg3, bs, stamp, nrows, ncols, scratch, step, dbase,
               f1, f2, f3):
    """int8 twin of :func:`_bf16_settle` (one row's blocks in turn, as the touched-row kernel)."""
    x1 = cuda.local.array(1, np.float32)
    x2 = cuda.local.array(1, np.float32)
    x3 = cuda.local.array(1, np.float32)
    red = cuda.shared.array(3, np.uint32)
    tid = cuda.threadIdx.x
    ntpb = cuda.blockDim.x
    grid = cuda.gridDim.x
    o1 = cuda.blockIdx.x * bs
    o2 = grid * bs + o1
    o3 = 2 * grid * bs + o1
    nqb = ncols // bs
    r = cuda.blockIdx.x
    while r < nrows:
        gap = step - stamp[r]
        if gap > 0:                                         # the same for every thread of the block
            factor = np.float32(_factor_of(dbase, gap))
            base = r * ncols
            for qb in range(nqb):
                if tid == 0:
                    red[0] = 0
                    red[1] = 0
                    red[2] = 0
                cuda.syncthreads()
                start = base + qb * bs
                end = start + bs
                blk = start // bs
                s1 = a1[blk] if u1 else np.float32(0)
                s2 = a2[blk] if u2 else np.float32(0)
                s3 = a3[blk] if u3 else np.float32(0)
                m1 = _U0
                m2 = _U0
                m3 = _U0
                e = start + tid
                while e < end:
                    j = e - start
                    if u1:
                        x1[0] = _QMAPS[sg1, c1[e]] * s1
                    if u2:
                        x2[0] = _QMAPS[sg2, c2[e]] * s2
                    if u3:
                        x3[0] = _QMAPS[sg3, c3[e]] * s3
                    _scale(x1, x2, x3, 0, (f1, f2, f3, factor))
                    if u1:
                        scratch[o1 + j] = x1[0]
                        m1 = max(m1, _f32_bits(x1[0]) & _ABS)
                    if u2:
                        scratch[o2 + j] = x2[0]
                        m2 = max(m2, _f32_bits(x2[0]) & _ABS)
                    if u3:
                        scratch[o3 + j] = x3[0]
                        m3 = max(m3, _f32_bits(x3[0]) & _ABS)
                    e += ntpb
                cuda.atomic.max(red, 0, np.uint32(m1))
                cuda.atomic.max(red, 1, np.uint32(m2))
                cuda.atomic.max(red, 2, np.uint32(m3))
                cuda.syncthreads()
                if u1:
                    _q8_store(scratch, o1, c1, a1, blk, start, end, tid, ntpb, np.uint64(red[0]), sg1)
                if u2:
                    _q8_store(scratch, o2, c2, a2, blk, start, end, tid, ntpb, np.uint64(red[1]), sg2)
                if u3:
                    _q8_store(scratch, o3, c3, a3, blk, start, end, tid, ntpb, np.uint64(red[2]), sg3)
                cuda.syncthreads()
            if tid == 0:
                stamp[r] = step
        r += grid


_KERNELS: Dict[Any, SparseCodecKernels] = {}


def _kernels(rule: Any) -> SparseCodecKernels:
    ks = _KERNELS.get(rule)
    if ks is None:
        ks = _KERNELS[rule] = SparseCodecKernels(rule)
    return ks


def touched(rule: Any, p: Any, slots: Any, rows: Any, indptr: Any, cols: Any, vals: Any, ncols: int, k: Any,
            step: int, nearest: bool, no_rows: Any, decay: Any = None) -> None:
    """Lazy or exact-decay sparse step of ``rule`` on the touched rows of CUDA parameter ``p``
    with compressed state ``slots``; the codes, scales, parameter (and stamps) are those of
    :func:`fastadapt.backends.cpu_sparse_codec.touched`.

    Parameters
    ----------
    rule : function
        A rule of :mod:`fastadapt.algorithms`.
    p : numba device array
        The flat float32 parameter, updated in place.
    slots : sequence of three
        :class:`~fastadapt.backends.cuda_compressed.DeviceCompressedBuffer` or None (unused slot).
    rows : device array of int64 or None
        Touched rows, strictly ascending; None with a CSR: ``indptr`` is the gradient's full
        ``indptr`` (row ``t`` is row ``t`` of the table).
    indptr, cols : device arrays or None
        The CSR's pointers and columns (ascending in each row); None for the rows form
        (``vals`` then holds ``len(rows) * ncols`` values).
    vals : device array
        Flat gradient values.
    ncols : int
        Elements per row.
    k : tuple
        The rule's scalars.
    step : int
        The step (stochastic rounding key, with the buffers' seed).
    nearest : bool
        bfloat16: round to nearest even instead of stochastically.
    no_rows : device array
        A one-element int64 device array standing for unused index arrays.
    decay : (stamp, base, flags) or None
        Exact ``Decay`` mode: the rows' device stamps (updated to ``step``), the plan's base and
        slot flags; a touched row is caught up in closed form, then updated whole (0 where a
        CSR stores nothing).  None: lazy (the stored entries only).
    """
    if vals.size == 0:
        return                                  # no row touched: nothing to update or stamp
    _step(rule, p, slots, rows, indptr, cols, vals, ncols, k, step, nearest, no_rows, decay, None)


def exact(rule: Any, p: Any, slots: Any, nrows: int, ncols: int, rows: Any, indptr: Any, cols: Any, vals: Any,
          k: Any, step: int, nearest: bool, no_rows: Any) -> None:
    """Exact ``FUSED`` sparse step with compressed state: every row of the table, one CUDA block
    per row, the rule at every element with its gradient where stored and 0 elsewhere; the codes
    of :func:`fastadapt.backends.cpu_sparse_codec.exact` (see :func:`touched` for the arguments;
    ``nrows``: the table's rows)."""
    _step(rule, p, slots, rows, indptr, cols, vals, ncols, k, step, nearest, no_rows, None, int(nrows))


def _step(rule: Any, p: Any, slots: Any, rows: Any, indptr: Any, cols: Any, vals: Any, ncols: int, k: Any,
          step: int, nearest: bool, no_rows: Any, decay: Any, nrows: Any) -> None:
    """Launch the kernels of :func:`touched` (``nrows`` None) or :func:`exact` (every one of
    ``nrows`` rows)."""
    live = [s for s in slots if s is not None]
    if not live:
        return
    for s in live:
        if not isinstance(s, DeviceCompressedBuffer):
            raise TypeError(f"compressed state of a CUDA parameter must be on the device, got {type(s).__name__}")
    first = live[0]
    whole = indptr is None
    identity = rows is None
    fused = nrows is not None
    nk = 0 if identity else int(rows.size)
    if fused:
        nwalk = nrows
    else:
        nwalk = int(rows.size) if whole else int(indptr.size) - 1
    if nwalk <= 0:
        return
    if whole:
        indptr = cols = no_rows
    if identity:
        rows = no_rows
    if decay is None:
        catch_up, stamp, dbase, flags = False, no_rows, 1.0, (False, False, False)
    else:
        (stamp, dbase, flags), catch_up = decay, True
    dargs = (catch_up, stamp, int(step), float(dbase)) + tuple(bool(f) for f in flags)
    ks = _kernels(rule)
    codes = [s.flat_codes if s is not None else first.flat_codes[:1] for s in slots]
    used = [s is not None for s in slots]
    tpb = int(config.CUDA_THREADS_PER_BLOCK)
    stream = _stream_of(p)
    with _context_of(p):
        if first.kind == "bfloat16":
            key = np.uint64(sr_key(int(first.seed), int(step)))
            grid = max(1, min(nwalk, int(config.CUDA_MAX_BLOCKS)))
            ks.bf16[grid, tpb, stream](p, *codes, *used, rows, identity, whole, indptr, cols, vals, nwalk,
                                       int(ncols), k, key, bool(nearest), fused, nk, *dargs)
            return
        bs = first.block
        if int(ncols) % bs:
            raise ValueError(f"int8 blocks of {bs} elements span rows of {ncols}: not a sparse step's layout")
        grid = max(1, min(nwalk, int(config.CUDA_MAX_BLOCKS), SCRATCH_ELEMS // bs))
        scales = [s.flat_absmax if s is not None else first.flat_absmax[:1] for s in slots]
        signed = [int(bool(s.signed)) if s is not None else 1 for s in slots]
        scratch = _scratch(p, stream, 3 * grid * bs)
        ks.q8[grid, tpb, stream](p, *codes, *scales, *used, *signed, bs, rows, identity, whole, indptr, cols,
                                 vals, nwalk, int(ncols), scratch, k, fused, nk, *dargs)


def settle(slots: Any, stamp: Any, step: int, ncols: int, base: float, flags: Any, nearest: bool) -> None:
    """Catch every row of compressed device ``slots`` up to ``step`` (``base ** gap`` on the
    flagged slots), one CUDA block per row; the codes of
    :func:`fastadapt.backends.cpu_sparse_codec.settle`.

    Parameters
    ----------
    slots : sequence of three
        DeviceCompressedBuffer or None.
    stamp : device array of int64
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
    live = [s for s in slots if s is not None]
    nrows = int(stamp.size)
    if not live or nrows == 0:
        return
    first = live[0]
    codes = [s.flat_codes if s is not None else first.flat_codes[:1] for s in slots]
    used = [s is not None for s in slots]
    fl = tuple(bool(f) for f in flags)
    tpb = int(config.CUDA_THREADS_PER_BLOCK)
    stream = _stream_of(first.codes)
    with _context_of(first.codes):
        if first.kind == "bfloat16":
            key = np.uint64(sr_key(int(first.seed), int(step)))
            grid = max(1, min(nrows, int(config.CUDA_MAX_BLOCKS)))
            _bf16_settle[grid, tpb, stream](*codes, *used, stamp, nrows, int(ncols), key, bool(nearest), int(step),
                                            float(base), *fl)
            return
        bs = first.block
        grid = max(1, min(nrows, int(config.CUDA_MAX_BLOCKS), SCRATCH_ELEMS // bs))
        scales = [s.flat_absmax if s is not None else first.flat_absmax[:1] for s in slots]
        signed = [int(bool(s.signed)) if s is not None else 1 for s in slots]
        scratch = _scratch(first.codes, stream, 3 * grid * bs)
        _q8_settle[grid, tpb, stream](*codes, *scales, *used, *signed, bs, stamp, nrows, int(ncols), scratch,
                                      int(step), float(base), *fl)


class CUDACodecSparseKernels(CUDASparseKernels):
    """CUDA's sparse kernels (:class:`fastadapt.backends.cuda_sparse.CUDASparseKernels`) and, for
    compressed state (``state_dtype`` "bfloat16" / "int8"), the row kernels of this module."""

    @staticmethod
    def codec_touched(rule: Any, p: Any, slots: Any, rows: Any, indptr: Any, cols: Any, vals: Any, ncols: int,
                      k: Any, step: int, nearest: bool, decay: Any = None) -> None:
        """Lazy (``decay`` None) or exact-decay step on the touched rows with compressed ``slots``,
        one CUDA block per row (:func:`fastadapt.backends.cuda_sparse_codec.touched`;
        ``rows=None``: ``indptr`` is the full ``indptr`` of a zero-copy CSR)."""
        touched(rule, p, slots, rows, indptr, cols, vals, ncols, k, step, nearest, _no_rows(p), decay)

    @staticmethod
    def codec_exact(rule: Any, p: Any, slots: Any, nrows: int, ncols: int, rows: Any, indptr: Any, cols: Any,
                    vals: Any, k: Any, step: int, nearest: bool) -> None:
        """Exact fused step with compressed ``slots``, one CUDA block per row of the table
        (:func:`fastadapt.backends.cuda_sparse_codec.exact`)."""
        exact(rule, p, slots, nrows, ncols, rows, indptr, cols, vals, k, step, nearest, _no_rows(p))

    @staticmethod
    def codec_settle(slots: Any, stamp: Any, step: int, ncols: int, base: float, flags: Tuple[bool, bool, bool],
                     nearest: bool) -> None:
        """:meth:`settle` with compressed ``slots`` (:func:`fastadapt.backends.cuda_sparse_codec.settle`)."""
        settle(slots, stamp, step, ncols, base, flags, nearest)


#: the CUDA backend's sparse kernels (:attr:`fastadapt.backends.cuda.CUDABackend.sparse_kernels`)
KERNELS = CUDACodecSparseKernels()
