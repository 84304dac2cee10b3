"""Embedding bags: :class:`BagGrad` (the table's gradient from a bag backward) and :func:`embedding_bag`.

An embedding bag looks up ``indices`` in a table ``(nrows, dim)`` and reduces each bag's rows
(``offsets``, CSR-style: bag ``b`` holds lookups ``offsets[b] .. offsets[b + 1] - 1``) to one
row: their (weighted) sum or mean.  Its backward gives the table the gradient

    row ``r``: the sum over the lookups ``t`` with ``indices[t] == r`` of ``s_t * grad_out[bag(t)]``,
    ``s_t = w_t`` (mode ``"sum"``) or ``w_t / size(bag(t))`` (mode ``"mean"``), ``w_t`` the
    per-sample weight or 1;

a :class:`BagGrad` hands that to :meth:`fastadapt.Optimizer.step` unreduced: the step
validates it and coalesces it into the rows form of :mod:`fastadapt.grads.sparse` (unique
ascending rows, their summed values) in one compiled pass
(:func:`fastadapt.backends.cpu_bag.coalesce`), never building a per-lookup array, and then
runs the same sparse step as a :class:`fastadapt.RowGrad`.

The checks and their messages are shared by :class:`BagGrad` (in ``step()``) and
:func:`embedding_bag`; a bad input raises before anything is written.
"""

from typing import Any, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ..backends import is_device_array

__all__ = ["BagGrad", "embedding_bag", "canonical_bag", "BagIndexError"]

MODES = ("sum", "mean")


class BagIndexError(IndexError, ValueError):
    """A lookup id outside the table (an :class:`IndexError`, as for :class:`fastadapt.RowGrad`,
    and a :class:`ValueError`)."""


# =========================================================================== BagGrad

class BagGrad:
    """The gradient of an embedding table from an embedding-bag backward, unreduced.

    Parameters
    ----------
    indices : array_like of int, shape (n,)
        The row looked up by each lookup, in ``[0, nrows)`` (negative ids are not wrapped).
    offsets : array_like of int, shape (n_bags + 1,)
        CSR-style bag boundaries: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == n``;
        bag ``b`` holds lookups ``offsets[b] .. offsets[b + 1] - 1`` (it may be empty).
        (torch's ``offsets`` without ``include_last_offset``: append ``len(indices)``.)
    grad_out : array_like of float, shape (n_bags, dim)
        The gradient of the loss with respect to each bag's output; ``dim`` is the table's
        row width.  Cast to the parameter's dtype.
    per_sample_weights : array_like of float, shape (n,), optional
        A weight per lookup (1 when omitted).  Cast to the parameter's dtype.
    mode : {"sum", "mean"}
        The bag's reduction: in ``"mean"`` each lookup's contribution is divided by its bag's
        size.

    Notes
    -----
    The table's gradient row ``r`` is the sum, over the lookups ``t`` with ``indices[t] == r``
    in lookup order, of ``grad_out[bag(t)] * s_t`` with ``s_t = w_t`` (``"sum"``) or
    ``w_t / size(bag(t))`` (``"mean"``), computed in the parameter's dtype and added from
    zero: bit for bit ``np.add.at(zeros, indices, grad_out[bag] * s[:, None])``.  A row no
    lookup names is untouched; an empty bag contributes nothing; a row looked up only with
    weight 0 counts as touched (as an explicit zero of a :class:`RowGrad`).  NaN and infinity
    are carried into the coalesced values and follow the optimizer's ``nonfinite=`` option.

    The parameter must be a 2-D host (numpy) table ``(nrows, dim)``.  Nothing is checked
    here but ``mode``: :meth:`Optimizer.step` checks everything (ids in range, offsets,
    shapes, dtypes) in compiled passes before it writes anything.  Coalescing costs
    O(n log n) at worst, O(n + nrows) on a small table, and O(unique rows x dim) memory.

    Examples
    --------
    >>> import numpy as np, fastadapt as fa
    >>> E = np.ones((100, 4), np.float32)          # an embedding table
    >>> indices = np.array([3, 7, 3, 9])           # bag 0: rows 3, 7; bag 1: rows 3, 9
    >>> offsets = np.array([0, 2, 4])
    >>> fa.embedding_bag(E, indices, offsets, mode="mean")
    array([[1., 1., 1., 1.],
           [1., 1., 1., 1.]], dtype=float32)
    >>> grad_out = np.ones((2, 4), np.float32)     # d loss / d (each bag's output)
    >>> opt = fa.SGD([E], lr=0.5)
    >>> opt.step([fa.BagGrad(indices, offsets, grad_out, mode="mean")])
    True
    >>> E[[3, 7, 9, 0], 0]                         # row 3: 0.5 + 0.5; rows 7, 9: 0.5; row 0 untouched
    array([0.5 , 0.75, 0.75, 1.  ], dtype=float32)
    """

    __slots__ = ("indices", "offsets", "grad_out", "per_sample_weights", "mode")

    def __init__(self, indices: Any, offsets: Any, grad_out: Any, per_sample_weights: Any = None,
                 mode: str = "sum") -> None:
        _check_mode(mode, "BagGrad")
        self.indices = indices if is_device_array(indices) else np.asarray(indices)
        self.offsets = offsets if is_device_array(offsets) else np.asarray(offsets)
        self.grad_out = grad_out if is_device_array(grad_out) else np.asarray(grad_out)
        if per_sample_weights is not None and not is_device_array(per_sample_weights):
            per_sample_weights = np.asarray(per_sample_weights)
        self.per_sample_weights = per_sample_weights
        self.mode = mode

    def __repr__(self) -> str:
        w = "" if self.per_sample_weights is None else ", weighted"
        return (f"BagGrad(n={self.indices.shape[0] if len(self.indices.shape) else '?'}, "
                f"n_bags={self.offsets.shape[0] - 1 if len(self.offsets.shape) else '?'}, grad_out "
                f"{tuple(self.grad_out.shape)} {self.grad_out.dtype}, mode={self.mode!r}{w})")


# =========================================================================== shared checks

def _check_mode(mode: Any, where: str) -> bool:
    """True for "mean"; raise unless ``mode`` is "sum" or "mean"."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{where}: mode must be 'sum' or 'mean', got {mode!r}"
                         + ("; 'max' bags have no linear backward and are not supported" if mode == "max" else ""))
    return mode == "mean"


def _host(a: Any, what: str, where: str) -> np.ndarray:
    if is_device_array(a):
        raise TypeError(f"{where}: {what} is a device array; embedding bags are host (numpy) only for now: "
                        "pass numpy arrays (a.get(), t.cpu().numpy())")
    return np.asarray(a)


def _float(a: np.ndarray, what: str, where: str) -> None:
    if a.dtype.kind != "f":
        kind = {"c": "complex", "i": "integer", "u": "integer", "b": "boolean"}.get(a.dtype.kind, str(a.dtype))
        raise TypeError(f"{where}: {what} has {kind} dtype {a.dtype}; it must be real floating point "
                        "(convert with .astype(np.float32) or np.float64)")


def _cast(a: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` (no copy when it already is one)."""
    if a.dtype != dtype:
        with np.errstate(over="ignore"):       # beyond the dtype's range: inf, seen by the nonfinite policy
            return a.astype(dtype, order="C")
    return np.ascontiguousarray(a)


def _ints(a: Any, what: str, where: str) -> np.ndarray:
    """``a`` as a C-contiguous 1-D int64 array; TypeError/ValueError naming the fix."""
    a = _host(a, what, where)
    if a.ndim != 1:
        raise ValueError(f"{where}: {what} must be 1-D, got shape {a.shape}")
    if a.size == 0 and a.dtype.kind not in "iu":
        a = a.astype(np.int64)                 # np.asarray([]) is float64
    if a.dtype.kind not in "iu" or a.dtype == np.bool_:
        raise TypeError(f"{where}: {what} must be an integer array, got dtype {a.dtype}; convert with "
                        ".astype(np.int64)")
    if a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.size and a.max() > np.iinfo(np.int64).max:
        raise BagIndexError(f"{where}: {what} holds {int(a.max())}, beyond int64: out of range")
    return np.ascontiguousarray(a, dtype=np.int64)


def _bag_inputs(indices: Any, offsets: Any, per_sample_weights: Any, mode: Any, nrows: int, dim: int,
                dtype: npt.DTypeLike, where: str
                ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], bool]:
    """Validate what a bag forward and backward share against a table ``(nrows, dim)``.

    Returns ``(indices int64, offsets int64, weights of dtype or None, mean)``, C-contiguous.
    Every check that reads the data runs compiled: O(n) in all.
    """
    from ..backends import cpu_bag

    mean = _check_mode(mode, where)
    idx = _ints(indices, "indices", where)
    off = _ints(offsets, "offsets", where)
    n = idx.size
    if off.size == 0:
        raise ValueError(f"{where}: offsets is empty; it needs n_bags + 1 entries (CSR-style, from 0 to "
                         "len(indices)): pass [0] for no bags")
    if off[0] != 0:
        raise ValueError(f"{where}: offsets[0] is {int(off[0])}; offsets start at 0 (bag b holds lookups "
                         "offsets[b] .. offsets[b + 1] - 1)")
    if cpu_bag.scan_offsets(off):
        b = int(np.flatnonzero(off[1:] < off[:-1])[0])
        raise ValueError(f"{where}: offsets decrease at bag {b} (offsets[{b}] = {int(off[b])}, offsets[{b + 1}] = "
                         f"{int(off[b + 1])}); they must be non-decreasing (an empty bag repeats an offset)")
    if off[-1] != n:
        raise ValueError(f"{where}: offsets end at {int(off[-1])} but indices has {n} entries; offsets has "
                         "n_bags + 1 entries and its last is len(indices) (torch-style offsets without it: "
                         "append it, np.append(offsets, len(indices)))")
    if cpu_bag.scan_ids(idx, nrows):
        t = int(np.flatnonzero((idx < 0) | (idx >= nrows))[0])
        raise BagIndexError(f"{where}: index {int(idx[t])} (lookup {t}) is out of range for a table of {nrows} "
                            f"rows; indices must lie in [0, {nrows}) (negative ids are not wrapped)")
    weights = None
    if per_sample_weights is not None:
        w = _host(per_sample_weights, "per_sample_weights", where)
        if w.shape != (n,):
            raise ValueError(f"{where}: per_sample_weights has shape {w.shape}; it needs one weight per "
                             f"lookup, shape ({n},)")
        _float(w, "per_sample_weights", where)
        weights = _cast(w, dtype)
    return idx, off, weights, mean


# =========================================================================== backward: coalescing

def canonical_bag(g: BagGrad, nrows: int, ncols: int, dtype: npt.DTypeLike, where: str = "gradient"
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Validate a :class:`BagGrad` of a table ``(nrows, ncols)`` and coalesce it into rows form.

    Parameters
    ----------
    g : BagGrad
    nrows, ncols : int
        The table (the parameter's shape).
    dtype : numpy dtype
        The parameter's dtype: ``grad_out`` and the weights are cast to it, and the sums
        are taken in it.
    where : str
        How to name the gradient in error messages.

    Returns
    -------
    rows : ndarray of int64, shape (k,)
        The rows some lookup names, strictly ascending.
    values : ndarray of ``dtype``, shape (k, ncols), C-contiguous
        Their gradients (the order of the sums: :class:`BagGrad`).

    Raises
    ------
    TypeError
        Non-integer ids or offsets, non-float ``grad_out`` or weights, device arrays.
    ValueError
        Bad ``mode``, shapes, or ``offsets`` (not from 0, decreasing, not ending at
        ``len(indices)``, not one more than ``grad_out``'s rows).
    BagIndexError
        An id outside ``[0, nrows)`` (an IndexError and a ValueError).
    """
    from ..backends import cpu_bag

    grad_out = _host(g.grad_out, "grad_out", where)
    if grad_out.ndim != 2:
        raise ValueError(f"{where}: BagGrad grad_out must be 2-D (n_bags, dim), got shape {grad_out.shape}")
    _float(grad_out, "grad_out", where)
    if grad_out.shape[1] != ncols:
        raise ValueError(f"{where}: BagGrad grad_out has rows of {grad_out.shape[1]} elements but the table's rows "
                         f"have {ncols} (a parameter of shape {(nrows, ncols)}); grad_out is (n_bags, {ncols})")
    idx, off, weights, mean = _bag_inputs(g.indices, g.offsets, g.per_sample_weights, g.mode, nrows, ncols,
                                          dtype, where)
    if grad_out.shape[0] != off.size - 1:
        raise ValueError(f"{where}: BagGrad grad_out has {grad_out.shape[0]} rows but offsets describes "
                         f"{off.size - 1} bags (len(offsets) - 1); one row of grad_out per bag")
    return cpu_bag.coalesce(idx, off, _cast(grad_out, dtype), weights, mean, nrows)


# =========================================================================== forward

def embedding_bag(table: Any, indices: Any, offsets: Any, mode: str = "sum",
                  per_sample_weights: Any = None) -> np.ndarray:
    """The embedding-bag forward: each bag's rows of ``table``, summed or averaged.

    Parameters
    ----------
    table : ndarray of float, shape (nrows, dim)
        The embedding table (host; a non-contiguous one is copied).
    indices : array_like of int, shape (n,)
        The rows looked up, in ``[0, nrows)``.
    offsets : array_like of int, shape (n_bags + 1,)
        CSR-style bag boundaries (as for :class:`BagGrad`): from 0, non-decreasing, ending at
        ``len(indices)``.
    mode : {"sum", "mean"}
    per_sample_weights : array_like of float, shape (n,), optional
        A weight per lookup, cast to the table's dtype (torch allows them with ``"sum"``
        only; here ``"mean"`` divides the weighted sum by the bag's size).

    Returns
    -------
    ndarray of the table's dtype, shape (n_bags, dim)
        ``out[b] = sum_t w_t * table[indices[t]]`` over bag ``b``'s lookups in order, added
        from zero, then divided by the bag's size in ``"mean"``; an empty bag gives zeros
        (as torch's ``embedding_bag``).  Computed in parallel over bags.

    Raises
    ------
    TypeError, ValueError, BagIndexError
        As :func:`canonical_bag` (the same checks and messages), and a table that is not a
        2-D floating-point array.

    Examples
    --------
    >>> import numpy as np, fastadapt as fa
    >>> table = np.arange(8.0).reshape(4, 2)
    >>> fa.embedding_bag(table, [0, 3, 1], [0, 2, 2, 3])           # bags {0, 3}, {}, {1}
    array([[6., 8.],
           [0., 0.],
           [2., 3.]])
    """
    from ..backends import cpu_bag

    where = "embedding_bag"
    t = _host(table, "table", where)
    if t.ndim != 2:
        raise ValueError(f"{where}: the table must be 2-D (nrows, dim), got shape {t.shape}")
    _float(t, "the table", where)
    t = np.ascontiguousarray(t)
    idx, off, weights, mean = _bag_inputs(indices, offsets, per_sample_weights, mode, t.shape[0], t.shape[1],
                                          t.dtype, where)
    return cpu_bag.forward(t, idx, off, weights, mean)
