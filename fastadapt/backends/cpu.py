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
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from .. import config
from .cpu_compile import compiled, direct
from .cpu_sparse import KERNELS as _SPARSE_KERNELS
from .protocols import SparseKernels

_OPTS = config.NJIT_OPTIONS


# --------------------------------------------------------------------------- dense
# Every dense loop ends in `_run`: the rule over elements 0..m-1 of views made from raw
# addresses.  Why views from addresses rather than the arrays themselves (each measured):
#
# * A rule passed as a first-class function is inlined by LLVM, not by numba, and brings the
#   reference-count calls numba puts around its array arguments; where a rule branches
#   (RMSprop's momentum and centered variants) LLVM cannot pair them, they stay in the loop
#   and the loop does not vectorise (RMSprop: 1.8 ns per element instead of 0.2).  A view
#   made here has no meminfo, so those calls fold away.
# * A rule indexes with a signed integer; an index that may be negative needs numpy's
#   wraparound, which stops vectorisation.  The loop index runs from 0, and a chunk of a
#   larger array is a view that begins at the chunk.
# * An unused slot gets the parameter's address, not its 1-element dummy's.  The rule never
#   reads it, but where LLVM does not split the loop on the rule's flags it vectorises the
#   flagged-off accesses as masked loads and stores with an all-false mask: they touch no
#   memory, yet on pages past a 1-element dummy (unmapped, or not faulted in) each costs a
#   microcode assist (RMSprop's prange loop: 9-17 ns per element from ~6M elements on).
#   The parameter's pages are mapped and in use.
# * The parallel loop is a prange over chunks, each a call of the same `_run`: inside a
#   parfor body LLVM if-converted the flags into exactly those masked accesses.


@intrinsic
def _view(typingctx, proto, address, n):
    """A 1-D C array of ``proto``'s dtype over ``n`` elements at ``address`` (not owned)."""
    if not (isinstance(proto, types.Array) and isinstance(address, types.Integer)
            and isinstance(n, types.Integer)):
        return None
    rtype = types.Array(proto.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        _, addr, length = args
        out = context.make_array(rtype)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(rtype.dtype)))
        intp = context.get_value_type(types.intp)
        populate_array(out, data=builder.inttoptr(addr, out.data.type),
                       shape=[builder.sext(length, intp) if length.type.width < intp.width else length],
                       strides=[itemsize], itemsize=itemsize, meminfo=None)
        return out._getvalue()

    return rtype(proto, address, n), codegen


@njit(**_OPTS)
def address(a):
    """Address of the first element of the 1-D array ``a`` (~0.1 us; numpy's takes ~1.5)."""
    return a.ctypes.data


@njit(**_OPTS)
def _run(rule, proto, ap, ag, a1, a2, a3, m, k):
    """``rule`` over ``m`` elements of p, g, s1, s2, s3 starting at these addresses."""
    p = _view(proto, ap, m)
    g = _view(proto, ag, m)
    s1 = _view(proto, a1, m)
    s2 = _view(proto, a2, m)
    s3 = _view(proto, a3, m)
    for i in range(m):
        rule(p, s1, s2, s3, i, g[i], k)


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


def work_unit(n: int) -> int:
    """Elements per work unit of a parallel step over ``n`` elements (see config.PARALLEL_CHUNK)."""
    return min(config.PARALLEL_CHUNK, max(config.PARALLEL_MIN_CHUNK, n // 16))


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

    @property
    def sparse_kernels(self) -> SparseKernels:
        """:data:`fastadapt.backends.cpu_sparse.KERNELS`."""
        return _SPARSE_KERNELS


BACKEND = CPUBackend()
