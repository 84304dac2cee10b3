"""CPU backend: numba loops that walk memory and call the rules of :mod:`fastadapt.algorithms`.

The loops know nothing about any optimizer.  A rule is passed in as a first-class
function (a numba dispatcher made from the algorithm's Python rule by
:func:`fastadapt.backends.cpu_compile.compiled`,
on first use, with ``inline="always"``), so each loop is specialised once per rule and
dtype, inlined and vectorised, and cached on disk (``cache=True``).
"""

import contextlib
from typing import Any, ContextManager, Optional, Tuple

import numpy as np
from numba import njit, prange

from .. import config
from .cpu_compile import compiled, direct
from .cpu_loops import _run, _view, address, fingerprint, work_unit  # noqa: F401 (re-exported)
from .compressed import CompressedBuffer
from .cpu_codec import codec_step
from .cpu_rows import KERNELS as _ROW_KERNELS
from .cpu_sparse_codec import KERNELS as _SPARSE_KERNELS
from .protocols import RowKernels, SparseKernels

_OPTS = config.NJIT_OPTIONS


@njit(**_OPTS)
def _slot_address(s, p):
    """``s``'s address, or ``p``'s when ``s`` is an unused slot's dummy."""
    return s.ctypes.data if s.size == p.size else p.ctypes.data


@njit(**_OPTS)
def _dense_chunk(rule, p, g, s1, s2, s3, k, start, stop):
    off = start * p.itemsize
    _run(rule, p, p.ctypes.data + off, g.ctypes.data + off, _slot_address(s1, p) + off,
         _slot_address(s2, p) + off, _slot_address(s3, p) + off, stop - start, k)


@njit(parallel=True, **_OPTS)
def _dense_parallel(rule, p, g, s1, s2, s3, k, chunk):
    n = p.size
    for c in prange((n + chunk - 1) // chunk):
        _dense_chunk(rule, p, g, s1, s2, s3, k, c * chunk, min(n, (c + 1) * chunk))


@njit(**_OPTS)
def _dense_serial(rule, p, g, s1, s2, s3, k):
    _dense_chunk(rule, p, g, s1, s2, s3, k, 0, p.size)


def dense_step(rule: Any, p: np.ndarray, g: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray,
               k: Any) -> None:
    """Apply ``rule`` to every element of the flat arrays ``p`` and ``g``.

    Parameters
    ----------
    rule : numba dispatcher
        A compiled rule (:func:`~fastadapt.backends.cpu_compile.compiled`).
    p, g : ndarray
        1-D, C-contiguous, same length and dtype; ``p`` is updated in place.
    s1, s2, s3 : ndarray
        The rule's state buffers (1-D, ``p``'s length and dtype) or 1-element dummies
        for slots the rule does not use with these flags.
    k : tuple
        The rule's per-step scalars (``rules.*_scalars``).
    """
    # the state buffers and unused-slot dummies are the optimizer's own (aligned, writeable)
    pf, gf = p.flags, g.flags
    key = (rule, p.dtype.char, pf.aligned, gf.aligned, gf.writeable)
    if p.size >= config.PARALLEL_THRESHOLD:
        direct(_dense_parallel, key, rule, p, g, s1, s2, s3, k, work_unit(p.size))
    else:
        direct(_dense_serial, key, rule, p, g, s1, s2, s3, k)


@njit(**_OPTS)
def _separate(p, g, s1, s2, s3):
    """0 when p, g and the used slots are aligned and share no memory; else 1 (nothing is written)."""
    n = p.size * p.itemsize
    starts = np.empty(5, np.int64)
    m = 0
    for a, size in ((p.ctypes.data, p.size), (g.ctypes.data, g.size), (s1.ctypes.data, s1.size),
                    (s2.ctypes.data, s2.size), (s3.ctypes.data, s3.size)):
        if a % p.itemsize != 0:
            return 1
        if size == p.size:                      # (an unused slot's 1-element dummy is not written)
            starts[m] = a
            m += 1
    if n > 0:
        order = np.sort(starts[:m])
        for i in range(m - 1):
            if order[i + 1] < order[i] + n:
                return 1
    return 0


@njit(**_OPTS)
def _checked_serial(rule, p, g, s1, s2, s3, k):
    if p.size != g.size or _separate(p, g, s1, s2, s3):
        return 1
    _dense_chunk(rule, p, g, s1, s2, s3, k, 0, p.size)
    return 0


@njit(parallel=True, **_OPTS)
def _checked_parallel(rule, p, g, s1, s2, s3, k, chunk):
    if p.size != g.size or _separate(p, g, s1, s2, s3):
        return 1
    n = p.size
    for c in prange((n + chunk - 1) // chunk):
        _dense_chunk(rule, p, g, s1, s2, s3, k, c * chunk, min(n, (c + 1) * chunk))
    return 0


def dense_step_checked(rule: Any, p: np.ndarray, g: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray,
                       k: Any, fp: Optional[bytes] = None) -> bool:
    """:func:`dense_step` for arrays checked by their numba type only: the compiled loop first
    checks what that type does not fix (equal sizes, alignment, no shared memory between ``p``,
    ``g`` and the used slots), and runs only if they hold.

    The caller has checked that every array is a C-contiguous numpy array of one dtype (byte
    order included) and of one shape (slots: that shape, or a 1-element dummy), and that ``p``
    and the used slots are writeable.  Arrays of any rank are walked as flat memory.

    ``fp``: :func:`fingerprint` of ``(p, g, s1, s2, s3)`` when the caller has it.

    Returns
    -------
    bool
        True when the step ran; False when a check failed and nothing was written (then the
        caller's full checks name the problem).
    """
    key = (rule, fingerprint((p, g, s1, s2, s3)) if fp is None else fp)
    if p.size >= config.PARALLEL_THRESHOLD:
        return not direct(_checked_parallel, key, rule, p, g, s1, s2, s3, k, work_unit(p.size))
    return not direct(_checked_serial, key, rule, p, g, s1, s2, s3, k)


# --------------------------------------------------------------------------- dense, many tensors
# One call for many parameters: a launch per parameter costs ~5 us of dispatch (typing a
# rule argument and a dozen scalars), more than torch's fused multi-tensor kernels spend
# per tensor.  The parameters of one step are described by a table of addresses instead.

#: columns of a many-tensor table: addresses of p, g, s1, s2, s3, then their lengths
TABLE_COLUMNS = 9


@njit(**_OPTS)
def _table_address(table, row, column, off):
    """Address of table entry (row, column) plus ``off``; an unused slot's is p's (see above)."""
    if column >= 2 and table[row, column + 4] != table[row, 5]:
        column = 0
    return table[row, column] + off


@njit(**_OPTS)
def _segment(rule, proto, table, row, start, stop, k):
    """Elements ``start:stop`` of the tensors of table row ``row``."""
    off = start * proto.itemsize
    _run(rule, proto, _table_address(table, row, 0, off), _table_address(table, row, 1, off),
         _table_address(table, row, 2, off), _table_address(table, row, 3, off),
         _table_address(table, row, 4, off), stop - start, k)


@njit(parallel=True, **_OPTS)
def _many_parallel(rule, proto, table, segments, units, k):
    for u in prange(units.size - 1):
        for s in range(units[u], units[u + 1]):
            _segment(rule, proto, table, segments[s, 0], segments[s, 1], segments[s, 2], k)


@njit(**_OPTS)
def _many_serial(rule, proto, table, segments, units, k):
    for s in range(segments.shape[0]):
        _segment(rule, proto, table, segments[s, 0], segments[s, 1], segments[s, 2], k)


@njit(**_OPTS)
def plan_segments(lengths, unit):
    """Split tensors of ``lengths`` into work units of about ``unit`` elements each.

    Returns ``(segments, units)``: ``segments[s] = (row, start, stop)`` pieces of the
    tensors in order, and work unit ``u`` is ``segments[units[u]:units[u + 1]]``; small
    tensors share a unit, large ones are cut, so units weigh the same.
    """
    total = 0
    for n in lengths:
        total += n
    max_segments = lengths.size + total // unit + 1
    segments = np.empty((max_segments, 3), np.int64)
    units = np.empty(max_segments + 1, np.int64)
    units[0] = 0
    ns = 0
    nu = 1
    filled = 0
    for row in range(lengths.size):
        n = lengths[row]
        start = 0
        while start < n:
            stop = min(n, start + unit - filled)
            segments[ns, 0] = row
            segments[ns, 1] = start
            segments[ns, 2] = stop
            ns += 1
            filled += stop - start
            start = stop
            if filled >= unit:
                units[nu] = ns
                nu += 1
                filled = 0
    if units[nu - 1] != ns:
        units[nu] = ns
        nu += 1
    return segments[:ns].copy(), units[:nu].copy()


def dense_step_many(rule: Any, proto: np.ndarray, table: np.ndarray, segments: np.ndarray, units: np.ndarray,
                    k: Any, total: int) -> None:
    """Apply ``rule`` to every element of many tensors in one call.

    Parameters
    ----------
    rule : numba dispatcher
        A compiled rule (:func:`~fastadapt.backends.cpu_compile.compiled`).
    proto : ndarray
        Any 1-D C array of the tensors' dtype (it gives the loops their type).
    table : ndarray of int64, shape (n_tensors, 9)
        Row ``r``: the addresses of p, g, s1, s2, s3 and the lengths of p (and g), s1,
        s2, s3 (1 for a 1-element dummy), all C-contiguous arrays of ``proto``'s dtype
        that stay alive during the call.
    segments, units : ndarray of int64
        :func:`plan_segments` of the lengths.
    k : tuple
        The rule's per-step scalars, shared by every tensor of the call.
    total : int
        The number of elements of all tensors: the parallel loop runs from
        ``config.PARALLEL_THRESHOLD`` on, as for one tensor.
    """
    key = (rule, proto.dtype.char)              # every argument's type follows from these
    if total >= config.PARALLEL_THRESHOLD:
        direct(_many_parallel, key, rule, proto, table, segments, units, k)
    else:
        direct(_many_serial, key, rule, proto, table, segments, units, k)


# --------------------------------------------------------------------------- dense gradients, checked in bulk
# The steady-state step (fastadapt.optim.steady) hands the gradients over as tuples of up to
# GRAD_CHUNK arrays: numba types and unboxes a tuple of arrays in C (~0.15 us per array), where
# reading shape, flags and address of each in Python costs ~0.8 us.  The tuple's numba type is
# fixed by numba's own fingerprint of it (:func:`fingerprint`), so the compiled specialisation
# is found without numba's dispatcher; the fingerprint does not see byte order or ndarray
# subclasses, which the caller checks.

#: gradients per tuple handed to :func:`grad_addresses` (numba compiles one specialisation per
#: tuple length; longer tuples compile slowly: 0.6 s at 32, 80 s at 1000)
GRAD_CHUNK = 32



@njit(**_OPTS)
def _grad_addresses(gs, shapes, rows, table, starts, ends):
    for i in range(len(gs)):
        g = gs[i]
        sh = g.shape
        for d in range(len(sh)):
            if sh[d] != shapes[i, d]:
                return i
        a = g.ctypes.data
        if a % g.itemsize != 0:
            return i
        n = g.size * g.itemsize
        if n > 0:
            j = np.searchsorted(starts, a + n) - 1         # the last parameter starting before g's end
            if j >= 0 and ends[j] > a:
                return i
        table[rows[i], 1] = a
    return -1


_GRAD_ENTRIES: dict = {}


def grad_addresses(gs: tuple, shapes: np.ndarray, rows: np.ndarray, table: np.ndarray, starts: np.ndarray,
                   ends: np.ndarray) -> Optional[int]:
    """Check dense gradients in one compiled pass and write their addresses into a many-tensor table.

    Parameters
    ----------
    gs : tuple of ndarray
        Up to :data:`GRAD_CHUNK` C-contiguous numpy arrays of one dtype and rank, native byte
        order (the caller checks dtype and type; anything else makes this return None).
    shapes : ndarray of int64, shape (len(gs), rank)
        The shape each gradient must have (its parameter's).
    rows : ndarray of int64
        The table row of each gradient; its address goes to column 1.
    table : ndarray of int64
        A many-tensor table (:func:`dense_step_many`).
    starts, ends : ndarray of int64
        The parameters' byte spans, sorted by start (they do not overlap); a gradient must not
        meet any of them.

    Returns
    -------
    int or None
        -1 when every gradient passed; the position of the first that did not (wrong shape,
        misaligned, or sharing memory with a parameter); None when ``gs`` is not a tuple of
        arrays of one numba type.  Only ``table`` is written, and only for gradients that passed.
    """
    key = fingerprint(gs)
    entry = _GRAD_ENTRIES.get(key)
    if entry is None:
        if key in _GRAD_ENTRIES or not gs:
            return None                                    # known not to be a uniform tuple of arrays
        first = gs[0]
        if not (type(first) is np.ndarray and first.flags.c_contiguous and first.dtype.char in "fd"
                and first.ndim == shapes.shape[1] and all(fingerprint(g) == fingerprint(first) for g in gs)):
            _GRAD_ENTRIES[key] = None
            return None
        args = (gs, shapes, rows, table, starts, ends)
        _grad_addresses(*args)
        entry = _grad_addresses.overloads[tuple(_grad_addresses.typeof_pyval(a) for a in args)].entry_point
        _GRAD_ENTRIES[key] = entry
    return entry(gs, shapes, rows, table, starts, ends)


# --------------------------------------------------------------------------- checks

@njit(parallel=True, **_OPTS)
def _count_nonfinite_parallel(a):
    n = 0
    for i in prange(a.size):
        x = a[i]
        if not (x - x == 0):        # NaN or +-Inf
            n += 1
    return n


@njit(**_OPTS)
def _count_nonfinite_serial(a):
    for i in range(a.size):
        x = a[i]
        if not (x - x == 0):
            return 1
    return 0


def all_finite(a: np.ndarray) -> bool:
    """True when the flat array ``a`` holds no NaN and no infinity."""
    if a.size >= config.PARALLEL_THRESHOLD:
        return _count_nonfinite_parallel(a) == 0
    return _count_nonfinite_serial(a) == 0


# --------------------------------------------------------------------------- backend

class CPUBackend:
    """Host numpy arrays: the loops above, run in the calling thread's numba pool
    (implements :class:`fastadapt.backends.protocols.Backend`)."""

    name = "cpu"

    @staticmethod
    def owns(a: Any) -> bool:
        return isinstance(a, np.ndarray)

    @staticmethod
    def check_param(p: Any, where: str) -> None:
        if not isinstance(p, np.ndarray):
            raise TypeError(f"{where} must be a numpy array (or a CUDA array), got {type(p).__name__}")
        if p.dtype not in (np.float32, np.float64):
            raise TypeError(f"{where} has dtype {p.dtype}; fastadapt updates float32 or float64 "
                            f"arrays in place (convert with p.astype(np.float32))")
        if not p.flags.c_contiguous:
            raise ValueError(f"{where} is not C-contiguous; pass np.ascontiguousarray(p) and keep "
                             f"that array as the parameter")
        if not p.flags.writeable:
            raise ValueError(f"{where} is read-only; fastadapt updates parameters in place "
                             f"(pass a writeable array, e.g. p.copy())")

    @staticmethod
    def dtype_of(a: Any) -> np.dtype:
        return a.dtype

    @staticmethod
    def device_of(a: Any) -> Optional[int]:
        return None

    @staticmethod
    def check_same_device(a: Any, p: Any, where: str) -> None:
        return None

    @staticmethod
    def context(p: Any) -> ContextManager[Any]:
        return contextlib.nullcontext()

    @staticmethod
    def full_like(p: Any, value: float) -> Any:
        return np.full(p.shape, value, dtype=p.dtype)

    @staticmethod
    def full_rows(p: Any, value: float) -> Any:
        return np.full(p.shape[:1], value, dtype=p.dtype)

    @staticmethod
    def flat(a: Any) -> Any:
        return a.reshape(-1)

    @staticmethod
    def to_numpy(a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    @staticmethod
    def copy_into(dst: Any, src: np.ndarray) -> None:
        np.copyto(dst, src, casting="no")

    #: address of a 1-D numpy array's first element (fast; see :func:`address`)
    address = staticmethod(address)

    @staticmethod
    def memory_span(a: Any) -> Tuple[int, int]:
        """(start, end) byte addresses of ``a``'s buffer, for overlap checks."""
        if a.flags.c_contiguous and a.dtype.char in "fd":
            start = address(a.reshape(-1))     # ~0.3 us, where __array_interface__ takes ~1.6
        else:
            start = a.__array_interface__["data"][0]
        return start, start + a.nbytes

    @staticmethod
    def dense_step(rule: Any, p: Any, g: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        dense_step(compiled(rule), p, g, s1, s2, s3, k)

    @staticmethod
    def all_finite(a: Any) -> bool:
        return all_finite(a)

    @staticmethod
    def compressed_full(p: Any, value: float, kind: str, signed: bool, seed: int) -> Any:
        return CompressedBuffer.full(tuple(p.shape), value, kind, signed, seed)

    @staticmethod
    def compressed_from(p: Any, values: np.ndarray, kind: str, signed: bool, seed: int) -> Any:
        return CompressedBuffer.encode(np.asarray(values, np.float32).reshape(p.shape), kind, signed, seed)

    @staticmethod
    def compressed_load(p: Any, buf: Any) -> Any:
        return buf

    #: sparse gradients with compressed state: the codec row loops (cpu_sparse_codec)
    sparse_compressed = True

    @staticmethod
    def sparse_compressed_supports(plan: Any) -> bool:
        """Every sparse plan (lazy, fused, decay) runs with compressed state on the CPU."""
        return True

    @staticmethod
    def codec_step(rule: Any, p: Any, g: Any, slots: Any, k: Any, step: int, nearest: bool) -> None:
        live = [s for s in slots if s is not None]
        codec_step(compiled(rule), p, g, slots, k, live[0].seed if live else 0, step, nearest)

    @property
    def sparse_kernels(self) -> SparseKernels:
        """:data:`fastadapt.backends.cpu_sparse_codec.KERNELS`."""
        return _SPARSE_KERNELS

    @property
    def row_kernels(self) -> RowKernels:
        """:data:`fastadapt.backends.cpu_rows.KERNELS`."""
        return _ROW_KERNELS


BACKEND = CPUBackend()
