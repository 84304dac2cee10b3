"""Sparse gradients: the formats, their canonical forms, validation, and the prepared sparse steps.

Formats :meth:`fastadapt.Optimizer.step` accepts (the spec, "Sparse gradients")
-----------------------------------------------------------------------------
* a scipy ``csr_matrix`` or ``csr_array`` of the parameter's 2-D shape, or ``(1, n)`` for a
  1-D parameter of ``n`` elements;
* :class:`RowGrad` ``(rows, values)``: ``values[t]`` is the gradient of row ``rows[t]`` of the
  parameter (``values`` has shape ``(k,) + p.shape[1:]``) -- the fast path for embedding tables;
* :class:`fastadapt.BagGrad` ``(indices, offsets, grad_out, per_sample_weights, mode)`` of a 2-D
  parameter: an embedding-bag backward, coalesced into the rows form below by
  :func:`fastadapt.grads.bag.canonical_bag` (:mod:`fastadapt.grads.bag`).

Duplicates are summed (in their order of appearance), explicit stored zeros count as touched,
floating data of another dtype is cast to the parameter's dtype; integer, boolean and complex
data are refused.  The caller's arrays are never modified.

Row view
--------
Every loop sees a parameter as a C-order table ``(nrows, ncols)`` -- see :func:`row_view`:
``(p.shape[0], p.size // p.shape[0])`` for ``p.ndim >= 2`` and ``(n, 1)`` for a 1-D ``p``, whose
elements are its rows.  So a CSR gradient ``(1, n)`` of a 1-D parameter is turned into the rows
form below with ``rows`` = its column ids and ``ncols = 1``, which gives exact mode per-element
stamps.

Canonical forms (what the loops of :mod:`fastadapt.backends.cpu_sparse` and the CUDA backend receive)
----------------------------------------------------------------------------------------------------
*Touched-rows CSR* ``(rows, indptr, cols, vals)`` of a 2-D table ``(nrows, ncols)``:

* ``rows``: int64 ``(k,)``, strictly ascending, in ``[0, nrows)``: the rows with at least one
  stored entry (explicit zeros included);
* ``indptr``: int64 ``(k + 1,)``, ``indptr[0] == 0``, non-decreasing; the entries of ``rows[t]``
  are positions ``indptr[t] .. indptr[t + 1] - 1`` of ``cols`` and ``vals``;
* ``cols``: int32 or int64 (the CSR's index dtype), strictly ascending within a row, in
  ``[0, ncols)``;
* ``vals``: the parameter's dtype, 1-D C-contiguous; duplicates summed, explicit zeros kept.

*Rows form* ``(rows, values)`` of a table ``(nrows, ncols)``:

* ``rows``: int64 ``(k,)``, strictly ascending, in ``[0, nrows)``;
* ``values``: the parameter's dtype, C-contiguous ``(k, ncols)``; duplicate rows summed.

When the input is already canonical (a CSR with sorted unique columns per row, row ids sorted
and unique) nothing is copied but ``rows``/``indptr`` (O(k)), and, for CSR, one parallel
O(nrows + nnz) pass checks the structure and every index.

Public functions: :func:`row_view`, :func:`canonical_csr`, :func:`canonical_rows`,
:func:`prepare_sparse_grad`, :func:`settle`.  :class:`CSRGrad` and :class:`RowsGrad` are the
prepared steps; they call the backend's sparse kernels
(:class:`fastadapt.backends.protocols.SparseKernels`).  CUDA parameters take the device formats
of :mod:`fastadapt.grads.device`, which end in the same prepared steps.

Exact mode (``sparse_mode="exact"``) -- the result equals the dense step on the densified
gradient.  The algorithm declares how (``Algorithm.exact``, :mod:`fastadapt.algorithms`):

* ``LAZY``: a zero gradient changes nothing (Adagrad without weight decay), so the lazy loop is
  already exact: O(nnz);
* a :class:`~fastadapt.algorithms.Decay`: a zero gradient only decays some state slots
  geometrically by ``base`` (RMSprop without momentum or weight decay, Adadelta).  Each row
  keeps the step up to which it is current (a :class:`PendingDecay` in ``state["_decay"]``); a
  touched row is caught up in closed form (``base ** gap``) and then updated; every row is
  caught up (:func:`settle`) before the state is read or saved, or before any other kind of
  step: O(rows touched x ncols);
* ``FUSED``: one pass over the whole parameter running the rule with ``g = 0`` on untouched
  entries, never building a dense gradient.
"""

from typing import Any, Iterable, Mapping, MutableMapping, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ..algorithms import LAZY, Decay
from ..algorithms._spec import ExactPlan
from ..backends import backend_for, is_device_array, unused_slot
from ..backends.protocols import Backend
from .bag import canonical_bag

__all__ = ["RowGrad", "row_view", "canonical_csr", "canonical_rows", "prepare_sparse_grad",
           "CSRGrad", "RowsGrad", "PendingDecay", "settle", "settle_unless_continued"]


# =========================================================================== RowGrad

class RowGrad:
    """A row-indexed sparse gradient, e.g. of an embedding table.

    Parameters
    ----------
    rows : array_like of int, shape (k,)
        Row ids of the parameter (its first axis).  May repeat (duplicates are summed)
        and come in any order.
    values : array_like of float, shape (k,) + p.shape[1:]
        ``values[t]`` is the gradient of row ``rows[t]``.  For a 1-D parameter,
        shape ``(k,)`` (or ``(k, 1)``).  Cast to the parameter's dtype if needed.

    Notes
    -----
    Nothing is copied or checked against a parameter here; :meth:`Optimizer.step` checks
    everything (row ids in range, shapes, dtypes) before it writes anything.  The fastest
    input is unique, ascending ``rows`` with C-contiguous ``values`` of the parameter's
    dtype: it is used without a copy.  Device arrays (CuPy, torch CUDA tensors, numba
    device arrays) are kept as they are, for a parameter on the GPU; anything else is
    converted with ``np.asarray``.

    Examples
    --------
    >>> import numpy as np, fastadapt as fa
    >>> E = np.zeros((1000, 8), np.float32)
    >>> opt = fa.SparseAdam([E], lr=0.1)
    >>> opt.step([fa.RowGrad([3, 7, 3], np.ones((3, 8), np.float32))])
    True
    """

    __slots__ = ("rows", "values")

    def __init__(self, rows: Any, values: Any) -> None:
        if not is_device_array(rows):             # device arrays (CuPy, torch CUDA, numba) are kept as they are
            rows = np.asarray(rows)
        if not is_device_array(values):
            values = np.asarray(values)
        if len(rows.shape) != 1:
            raise ValueError(f"RowGrad rows must be 1-D (one row id per row of values), got shape "
                             f"{tuple(rows.shape)}")
        if len(values.shape) < 1 or values.shape[0] != rows.shape[0]:
            raise ValueError(f"RowGrad values must have one row per row id: rows has {rows.shape[0]} "
                             f"entries, values has shape {tuple(values.shape)}")
        self.rows = rows
        self.values = values

    def __repr__(self) -> str:
        return f"RowGrad(k={self.rows.shape[0]}, values {tuple(self.values.shape)} {self.values.dtype})"


# =========================================================================== views and checks

def row_view(shape: Iterable[int]) -> Tuple[int, int]:
    """The ``(nrows, ncols)`` table a parameter of ``shape`` is seen as by the sparse loops.

    ``(n, 1)`` for a 1-D parameter; ``(shape[0], prod(shape[1:]))`` otherwise.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("sparse gradients need a parameter with at least one dimension, got a 0-d one")
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))


def _float_dtype_check(dtype: npt.DTypeLike, what: str, where: str) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return
    kind = {"c": "complex", "i": "integer", "u": "integer", "b": "boolean"}.get(dtype.kind, str(dtype))
    raise TypeError(f"{where}: {what} has {kind} dtype {dtype}; gradients must be real floating point "
                    f"(convert with .astype(np.float32) or np.float64)")


def _int_index(a: np.ndarray, what: str, where: str) -> None:
    if a.dtype.kind not in "iu" or a.dtype == np.bool_:
        raise TypeError(f"{where}: {what} must be an integer array, got dtype {a.dtype}")


def _cast(a: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` (no copy when it already is one)."""
    if a.dtype != dtype:
        with np.errstate(over="ignore"):       # a value beyond the dtype's range becomes inf:
            return a.astype(dtype, order="C")  # the nonfinite policy sees it
    return np.ascontiguousarray(a)


def canonical_csr(g: Any, shape2d: Tuple[int, int], dtype: npt.DTypeLike, where: str = "gradient"
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate a scipy CSR gradient and bring it into touched-rows canonical form.

    Parameters
    ----------
    g : scipy.sparse csr_matrix or csr_array
        Any CSR object: duplicates, unsorted columns, explicit zeros and empty rows are
        fine; it is not modified.  Its index arrays are bounds-checked here (scipy does
        not check them on construction).
    shape2d : (int, int)
        The shape ``g`` must have (the parameter's shape; ``(1, n)`` for a 1-D one).
    dtype : numpy dtype
        The parameter's dtype; ``g.data`` (real floating point) is cast to it.
    where : str
        How to name the gradient in error messages.

    Returns
    -------
    rows, indptr, cols, vals : ndarray
        The touched-rows canonical form described in this module's docstring.  ``cols``
        and ``vals`` may be views of ``g``'s arrays (never written to).

    Raises
    ------
    TypeError
        Not a CSR object, host arrays missing, non-integer indices, non-float data.
    ValueError
        Wrong shape, inconsistent ``indptr``/``indices``/``data`` lengths, ``indptr`` not
        starting at 0, decreasing or pointing past the stored entries.
    IndexError
        A column index outside ``[0, ncols)``.
    """
    from ..backends import cpu_sparse

    fmt = getattr(g, "format", None)
    if fmt != "csr":
        raise TypeError(f"{where} is a {type(g).__module__}.{type(g).__name__} (format {fmt!r}); sparse "
                        "gradients must be CSR: convert it with g.tocsr(), or pass a fastadapt.RowGrad")
    nrows, ncols = (int(s) for s in shape2d)
    shape = tuple(getattr(g, "shape", ()))
    if shape != (nrows, ncols):
        raise ValueError(f"{where} has shape {shape}; it must have shape {(nrows, ncols)}"
                         + (" (a 1-D parameter of n elements takes a (1, n) CSR)" if nrows == 1 else ""))
    indptr, indices, data = g.indptr, g.indices, g.data
    for name, a in (("indptr", indptr), ("indices", indices), ("data", data)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{where}: its {name} is a {type(a).__name__}, not a numpy array (a device "
                            "sparse matrix for a host parameter?); keep parameter and gradient on one device")
        if a.ndim != 1:
            raise ValueError(f"{where}: its {name} must be 1-D, got shape {a.shape}")
    _int_index(indptr, "indptr", where)
    _int_index(indices, "indices", where)
    _float_dtype_check(data.dtype, "its data", where)
    if indptr.size != nrows + 1:
        raise ValueError(f"{where}: indptr has {indptr.size} entries; a CSR with {nrows} rows needs "
                         f"{nrows + 1} (a malformed matrix)")
    if indices.size != data.size:
        raise ValueError(f"{where}: indices has {indices.size} entries but data has {data.size}; "
                         "they must have one entry per stored element")
    if indptr.dtype != indices.dtype or indptr.dtype not in (np.int32, np.int64):
        indptr = indptr.astype(np.int64)       # rare (hand-built): one index dtype for the loops
        indices = indices.astype(np.int64)     # uint64 ids above 2**63 wrap negative: caught below
    indptr = np.ascontiguousarray(indptr)
    indices = np.ascontiguousarray(indices)
    if indptr[0] != 0:
        raise ValueError(f"{where}: indptr[0] is {indptr[0]}; a CSR's indptr starts at 0")

    totals, rows, cptr = cpu_sparse.csr_scan(indptr, indices, ncols)
    if totals[1]:
        d = np.diff(indptr)
        bad = np.flatnonzero((d < 0) | (indptr[1:] > indices.size))
        r = int(bad[0])
        a, b = int(indptr[r]), int(indptr[r + 1])
        why = (f"decreases at row {r} (indptr[{r}] = {a}, indptr[{r + 1}] = {b})" if b < a else
               f"points past the stored entries at row {r} (indptr[{r + 1}] = {b} > {indices.size} = "
               "len(indices))")
        raise ValueError(f"{where}: indptr {why}; not a valid CSR matrix (rebuild it with "
                         "scipy.sparse.csr_matrix((data, indices, indptr), shape=...))")
    nnz = int(indptr[-1])
    if totals[2]:
        idx = indices[:nnz]
        j = int(np.flatnonzero((idx < 0) | (idx >= ncols))[0])
        r = int(np.searchsorted(indptr, j, side="right") - 1)
        raise IndexError(f"{where}: column index {int(idx[j])} (row {r}, stored entry {j}) is out of range "
                         f"for shape {(nrows, ncols)}; column indices must lie in [0, {ncols})")
    cols = indices[:nnz]
    vals = _cast(data[:nnz], dtype)
    if totals[3]:
        if vals is data or np.shares_memory(vals, data):
            vals = vals.copy()          # (csr_sort_rows writes new arrays; this is belt and braces)
        cptr, cols, vals = cpu_sparse.csr_sort_rows(cptr, cols, vals)
    return rows, cptr, cols, vals


def canonical_rows(rows: Any, values: Any, nrows: int, ncols: int, dtype: npt.DTypeLike,
                   where: str = "gradient") -> Tuple[np.ndarray, np.ndarray]:
    """Validate a row-indexed gradient and bring it into rows canonical form.

    Parameters
    ----------
    rows : array_like of int, shape (k,)
        Row ids in ``[0, nrows)``, in any order, possibly repeated.
    values : array_like of float, shape (k, ncols) (or (k,) when ``ncols == 1``)
    nrows, ncols : int
        The table (see :func:`row_view`).
    dtype : numpy dtype
        The parameter's dtype; ``values`` is cast to it.
    where : str
        How to name the gradient in error messages.

    Raises
    ------
    TypeError
        Non-integer row ids, non-float values.
    ValueError
        Wrong shapes.
    IndexError
        A row id outside ``[0, nrows)``.

    Returns
    -------
    rows : ndarray of int64, shape (u,)
        Unique, ascending.
    values : ndarray of ``dtype``, shape (u, ncols), C-contiguous
        Duplicates summed in their order of appearance.  No copy when the input was
        already canonical.
    """
    from ..backends import cpu_sparse

    rows = np.asarray(rows)
    values = np.asarray(values)
    if rows.ndim != 1:
        raise ValueError(f"{where}: row ids must be 1-D, got shape {rows.shape}")
    if rows.size == 0 and rows.dtype.kind not in "iu":
        rows = rows.astype(np.int64)            # e.g. np.asarray([]) is float64
    _int_index(rows, "the row ids", where)
    _float_dtype_check(values.dtype, "its values", where)
    k = rows.size
    if values.ndim == 1 and ncols == 1:
        values = values.reshape(k, 1) if values.size == k else values
    if values.shape != (k, ncols):
        raise ValueError(f"{where}: values has shape {values.shape}; {k} row ids of a table with rows of "
                         f"{ncols} element(s) need values of shape {(k, ncols)}")
    if rows.dtype != np.int64:
        if rows.dtype.kind == "u" and k and rows.max() > np.iinfo(np.int64).max:
            raise IndexError(f"{where}: row id {int(rows.max())} is out of range for a table of {nrows} rows")
        rows = rows.astype(np.int64)
    rows = np.ascontiguousarray(rows)
    bad, ascending = cpu_sparse.rows_scan(rows, nrows)
    if bad:
        t = int(np.flatnonzero((rows < 0) | (rows >= nrows))[0])
        raise IndexError(f"{where}: row id {int(rows[t])} (entry {t}) is out of range for a parameter with "
                         f"{nrows} rows; row ids must lie in [0, {nrows}) (negative ids are not wrapped)")
    values = _cast(values, dtype)
    if not ascending:
        rows, values = cpu_sparse.rows_sum_duplicates(rows, values, nrows)
    return rows, values


# =========================================================================== prepared steps

def _plan(opt: Any, group: Mapping[str, Any]) -> ExactPlan:
    """"lazy" (also sparse_mode="lazy"), "fused", or a Decay: how this group's sparse step runs."""
    if group.get("sparse_mode", "lazy") != "exact":
        return LAZY
    return opt.algorithm.exact(group)


def _no_overlap(values: Any, p: Any, backend: Backend, where: str) -> None:
    a0, a1 = backend.memory_span(values)
    b0, b1 = backend.memory_span(p)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{where}: its values share memory with the parameter; pass a separate array")


class PendingDecay:
    """Exact-mode catch-up still owed to the rows of one parameter (``state["_decay"]``).

    Attributes
    ----------
    stamp : array of int64, (nrows,)
        The step up to which each row is current, on the parameter's device.
    plan : Decay
        What a zero-gradient step does (``base`` and the decayed slots).
    names : tuple
        The algorithm's slot names (where :func:`settle` finds the buffers).
    pending : bool
        Whether some row may be behind ``state["step"]``.
    nearest : bool
        Compressed state: whether :func:`settle` rounds bfloat16 to nearest (the group's
        ``state_rounding`` at the last decay step) rather than stochastically.
    """

    __slots__ = ("stamp", "plan", "names", "pending", "nearest")

    def __init__(self, stamp: Any, plan: Any, names: Iterable[Optional[str]], nearest: bool = False) -> None:
        self.stamp, self.plan, self.names, self.pending = stamp, plan, tuple(names), False
        self.nearest = nearest      # compressed state: bfloat16 rounding of the catch-up (state_rounding)


def _any_compressed(state: Mapping[str, Any], slots: Iterable[Optional[str]]) -> bool:
    """Whether some state buffer is compressed (a cheap test before the optimizer's own)."""
    for name in slots:
        if name is not None and getattr(type(state.get(name)), "compressed_state", False):
            return True
    return False


class _Prepared:
    """Shared part of :class:`CSRGrad` and :class:`RowsGrad`."""

    __slots__ = ("rows", "nrows", "ncols", "backend", "kernels")

    rows: Any
    vals: Any
    nrows: int
    ncols: int
    backend: Backend
    kernels: Any

    def _lazy(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        raise NotImplementedError

    def _exact(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        raise NotImplementedError

    def _decay(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any, stamp: Any, step: int,
               base: float, slots: Tuple[bool, bool, bool]) -> None:
        raise NotImplementedError

    def _form(self) -> Tuple[Any, Any]:
        """(indptr, cols) of a CSR gradient, (None, None) for the rows form."""
        raise NotImplementedError

    def nnz(self) -> int:
        """Number of stored (touched) elements after canonicalisation."""
        return int(self.vals.size)

    def all_finite(self) -> bool:
        """True when no stored value is NaN or infinite (after the cast to the param dtype)."""
        return self.backend.all_finite(self.vals)

    def apply(self, opt: Any, group: Mapping[str, Any], p: Any, state: MutableMapping[str, Any]) -> None:
        """Run the step (``state["step"]`` already advanced by the optimizer)."""
        backend = self.backend
        if opt.algorithm.rows:
            self._apply_rows(opt, group, p, state)
            return
        packed = opt._compressed_slots(group, state) if _any_compressed(state, opt.slots) else None
        if packed is not None:              # state_dtype "bfloat16" / "int8": decode, rule, encode per row
            self._apply_compressed(opt, group, p, state, packed)
            return
        with backend.context(p):
            s1, s2, s3 = opt._slot_arrays(group, p, state, backend.flat)
            step = state["step"]
            k = opt._scalars(group, state, backend.dtype_of(p))
            pf = backend.flat(p)
            plan = _plan(opt, group)
            if plan == LAZY:
                self._lazy(opt.rule, pf, s1, s2, s3, k)
            elif isinstance(plan, Decay):
                dec = state.get("_decay")
                if dec is None:              # every row is current up to step - 1
                    dec = state["_decay"] = PendingDecay(self.kernels.new_stamp(self.nrows, step - 1), plan,
                                                         opt.algorithm.slots)
                self._decay(opt.rule, pf, s1, s2, s3, k, dec.stamp, step, plan.base, plan.slots)
                dec.pending = True
            else:
                self._exact(opt.rule, pf, s1, s2, s3, k)

    def _row_form(self) -> Tuple[Any, Any]:
        """``(rows, values)``: the touched rows and their whole gradient rows, flat ``(k, ncols)``
        (a CSR's missing entries as zeros)."""
        indptr, cols = self._form()
        if indptr is None:
            return self.rows, self.vals
        kernels = self.backend.row_kernels
        rows = self.rows
        if rows is None:                    # (a CUDA CSR over its full indptr)
            rows, indptr = kernels.touched(indptr)
        return rows, kernels.from_csr(indptr, cols, self.vals, self.ncols)

    def _apply_rows(self, opt: Any, group: Mapping[str, Any], p: Any, state: MutableMapping[str, Any]) -> None:
        """:meth:`apply` for a row rule: the backend's row loops on the touched rows (lazy), or on
        every row (fused; an algorithm with a row rule never declares a Decay)."""
        backend = self.backend
        with backend.context(p):
            s1, s2, s3 = opt._slot_arrays(group, p, state, backend.flat)
            dtype = backend.dtype_of(p)
            k = opt._scalars(group, state, dtype)
            pf = backend.flat(p)
            width = dtype.type(self.ncols)
            rows, vals = self._row_form()
            kernels = backend.row_kernels
            plan = _plan(opt, group)
            if plan == LAZY:
                kernels.lazy(opt.rule, pf, rows, vals, s1, s2, s3, width, k)
            else:                           # FUSED (Algorithm.check_group refuses a row rule's Decay)
                kernels.fused(opt.rule, pf, self.nrows, rows, vals, s1, s2, s3, width, k)

    def _apply_compressed(self, opt: Any, group: Mapping[str, Any], p: Any, state: MutableMapping[str, Any],
                          packed: Any) -> None:
        """:meth:`apply` with compressed state: the backend's codec loops (the optimizer refused
        int8 state on parameters whose blocks are not row-aligned before anything was written)."""
        backend, kernels = self.backend, self.kernels
        with backend.context(p):
            self._run_compressed(opt, group, p, state, packed)

    def _run_compressed(self, opt: Any, group: Mapping[str, Any], p: Any, state: MutableMapping[str, Any],
                        packed: Any) -> None:
        backend, kernels = self.backend, self.kernels
        step = state["step"]
        k = opt._scalars(group, state, backend.dtype_of(p))
        pf = backend.flat(p)
        nearest = group.get("state_rounding") == "nearest"
        indptr, cols = self._form()
        plan = _plan(opt, group)
        if plan == LAZY:
            kernels.codec_touched(opt.rule, pf, packed, self.rows, indptr, cols, self.vals, self.ncols, k, step,
                                  nearest)
        elif isinstance(plan, Decay):
            dec = state.get("_decay")
            if dec is None:                  # every row is current up to step - 1
                dec = state["_decay"] = PendingDecay(kernels.new_stamp(self.nrows, step - 1), plan,
                                                     opt.algorithm.slots, nearest)
            dec.nearest = nearest
            kernels.codec_touched(opt.rule, pf, packed, self.rows, indptr, cols, self.vals, self.ncols, k, step,
                                  nearest, (dec.stamp, plan.base, plan.slots))
            dec.pending = True
        else:
            kernels.codec_exact(opt.rule, pf, packed, self.nrows, self.ncols, self.rows, indptr, cols, self.vals, k,
                                step, nearest)


class CSRGrad(_Prepared):
    """A prepared CSR gradient of a 2-D parameter (touched-rows canonical form).

    Parameters
    ----------
    rows, indptr, cols, vals : arrays
        The canonical form (:func:`canonical_csr`), on ``backend``'s device.
    nrows, ncols : int
        The parameter's shape.
    backend : Backend
        Runs the step with its sparse kernels.
    """

    __slots__ = ("indptr", "cols", "vals")

    def __init__(self, rows: Any, indptr: Any, cols: Any, vals: Any, nrows: int, ncols: int,
                 backend: Backend) -> None:
        self.rows, self.indptr, self.cols, self.vals = rows, indptr, cols, vals
        self.nrows, self.ncols = int(nrows), int(ncols)
        self.backend = backend
        self.kernels = backend.sparse_kernels

    def _form(self) -> Tuple[Any, Any]:
        if self.rows is not None and self.vals.size == self.rows.size * self.ncols:   # touched rows whole: rows form
            return None, None
        return self.indptr, self.cols

    def _lazy(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        self.kernels.csr_lazy(rule, p, s1, s2, s3, self.rows, self.indptr, self.cols, self.vals,
                              self.ncols, k)

    def _exact(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        self.kernels.csr_exact(rule, p, s1, s2, s3, self.nrows, self.ncols, self.rows, self.indptr,
                               self.cols, self.vals, k)

    def _decay(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any, stamp: Any, step: int,
               base: float, slots: Tuple[bool, bool, bool]) -> None:
        self.kernels.csr_decay(rule, p, s1, s2, s3, self.rows, self.indptr, self.cols, self.vals, self.ncols, k,
                               stamp, step, base, slots)


class RowsGrad(_Prepared):
    """A prepared row-indexed gradient (rows canonical form); also a CSR of a 1-D parameter.

    Parameters
    ----------
    rows : int64 array (k,)
    values : array (k, ncols), C-contiguous, the parameter's dtype
    nrows, ncols : int
        The table (:func:`row_view`).
    backend : Backend
    """

    __slots__ = ("vals",)

    def __init__(self, rows: Any, values: Any, nrows: int, ncols: int, backend: Backend) -> None:
        self.rows = rows
        self.vals = values.reshape(-1)
        self.nrows, self.ncols = int(nrows), int(ncols)
        self.backend = backend
        self.kernels = backend.sparse_kernels

    def _form(self) -> Tuple[Any, Any]:
        return None, None

    def _lazy(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        self.kernels.rows_lazy(rule, p, s1, s2, s3, self.rows, self.vals, self.ncols, k)

    def _exact(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        self.kernels.rows_exact(rule, p, s1, s2, s3, self.nrows, self.ncols, self.rows, self.vals, k)

    def _decay(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, k: Any, stamp: Any, step: int,
               base: float, slots: Tuple[bool, bool, bool]) -> None:
        self.kernels.rows_decay(rule, p, s1, s2, s3, self.rows, self.vals, self.ncols, k, stamp, step, base,
                                slots)


def prepare_sparse_grad(g: Any, p: Any, backend: Backend, where: str) -> "_Prepared":
    """Check a sparse gradient of host parameter ``p`` and canonicalise it; nothing is written.

    (A CUDA parameter's sparse gradients are prepared by
    :func:`fastadapt.grads.device.prepare_device_sparse_grad`.)

    Parameters
    ----------
    g : scipy CSR matrix/array, RowGrad or BagGrad
    p : array
        The parameter (1-D or 2-D for CSR; any ``ndim >= 1`` for RowGrad; 2-D for BagGrad).
    backend : Backend
        ``p``'s backend.
    where : str
        How to name the gradient in error messages.

    Returns
    -------
    CSRGrad or RowsGrad
        With ``all_finite()`` and ``apply(optimizer, group, p, state)``.
    """
    nrows, ncols = row_view(p.shape)
    if type(g).__name__ == "BagGrad":
        if p.ndim != 2:
            raise ValueError(f"{where}: a BagGrad needs a 2-D table (nrows, dim) as its parameter, this one has "
                             f"shape {tuple(p.shape)}; reshape the table to 2-D, or pass a fastadapt.RowGrad")
        rows, values = canonical_bag(g, nrows, ncols, p.dtype, where)      # new arrays: no overlap with p
        return RowsGrad(rows, values, nrows, ncols, backend)
    if type(g).__name__ == "RowGrad":
        values = g.values
        if is_device_array(values) or is_device_array(g.rows):
            raise TypeError(f"{where}: RowGrad holds device arrays but its parameter is a host array; "
                            "keep parameter and gradient on one device")
        values = np.asarray(values)
        vshape = tuple(values.shape)
        if p.ndim == 1 and (len(vshape) == 1 or vshape[1:] == (1,)):
            values = values.reshape(vshape[0], 1)
        elif p.ndim >= 2 and vshape[1:] == tuple(p.shape[1:]):
            values = values.reshape(vshape[0], ncols)
        elif not (p.ndim > 2 and vshape[1:] == (ncols,)):       # (k, prod(shape[1:])) is fine too
            want = "(k,)" if p.ndim == 1 else f"(k,) + {tuple(p.shape[1:])}"
            raise ValueError(f"{where}: RowGrad values have shape {vshape}; for a parameter of shape "
                             f"{tuple(p.shape)} they must have shape {want}")
        rows, values = canonical_rows(g.rows, values, nrows, ncols, p.dtype, where)
        _no_overlap(values, p, backend, where)
        return RowsGrad(rows, values, nrows, ncols, backend)
    if p.ndim > 2:
        raise ValueError(f"{where}: a CSR gradient needs a 1-D or 2-D parameter, this one has shape "
                         f"{tuple(p.shape)}; use fastadapt.RowGrad for row updates of it")
    shape2d = (1, nrows) if p.ndim == 1 else (nrows, ncols)
    rows, indptr, cols, vals = canonical_csr(g, shape2d, p.dtype, where)
    _no_overlap(vals, p, backend, where)
    if p.ndim == 1:       # the elements are the rows: rows form with one column
        return RowsGrad(cols.astype(np.int64), vals.reshape(-1, 1), nrows, 1, backend)
    return CSRGrad(rows, indptr, cols, vals, nrows, ncols, backend)


# =========================================================================== pending exact-mode decay

def settle(p: Any, state: MutableMapping[str, Any], forget: bool = False) -> None:
    """Bring every row of ``p``'s pending exact-mode decay up to ``state["step"]``.

    Called by the optimizer before the state is read, saved or replaced; a no-op
    without pending decay.  With ``forget=True`` the stamps are dropped as well
    (the next step is of another kind and does not keep them up to date).
    """
    dec = state.get("_decay")
    if dec is None:
        return
    if dec.pending:
        backend = backend_for(p)
        _, ncols = row_view(p.shape)
        flagged = [state.get(name) if (name is not None and flag) else None
                   for name, flag in zip(dec.names, dec.plan.slots)]
        if any(getattr(type(b), "compressed_state", False) for b in flagged):
            with backend.context(p):      # compressed state: decode, catch up, encode the rows behind
                backend.sparse_kernels.codec_settle(flagged, dec.stamp, state["step"], ncols, dec.plan.base,
                                                    dec.plan.slots, dec.nearest)
            dec.pending = False
            if forget:
                del state["_decay"]
            return
        bufs = [backend.flat(state[name]) if (name is not None and name in state) else unused_slot(backend, p)
                for name in dec.names]
        with backend.context(p):
            s1, s2, s3 = bufs
            backend.sparse_kernels.settle(s1, s2, s3, dec.stamp, state["step"], ncols, dec.plan.base, dec.plan.slots)
        dec.pending = False
    if forget:
        del state["_decay"]


def settle_unless_continued(opt: Any, group: Mapping[str, Any], p: Any, state: MutableMapping[str, Any],
                            g: Any) -> None:
    """Before a step with prepared gradient ``g``: settle pending decay unless ``g`` continues it.

    A step continues the pending decay when it is a sparse step in exact mode with the same
    :class:`~fastadapt.algorithms.Decay` plan (same base, same slots); any other step (dense,
    lazy, fused, or changed hyper-parameters) first catches every row up and drops the stamps.
    """
    dec = state.get("_decay")
    if dec is None:
        return
    if isinstance(g, _Prepared) and _plan(opt, group) == dec.plan:
        return
    settle(p, state, forget=True)
