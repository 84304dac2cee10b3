"""Numba kernels of the recommender example (:mod:`fastadapt.apps.recsys`): a mini-batch's BPR
gradients, summed per row.

A mini-batch is ``b`` triples ``(user, pos, neg)``.  The kernels

1. group a batch's row ids (:class:`Grouper`): the unique rows, ascending, and where each one
   occurs, by a counting pass over a persistent per-table counter (O(b), no O(rows) work but a
   sort of the unique ids);
2. score the triples in parallel (:func:`pair_scores`): ``x = X[u] . (V[pos] - V[neg])``, the
   factor ``sigmoid(-x)`` of every gradient and ``-log sigmoid(x)``;
3. sum the gradients of every unique row in parallel, in order of appearance
   (:func:`user_grads`, :func:`item_grads`), so the result is deterministic and needs no atomics.

The outputs are unique ascending rows with C-contiguous float rows of the table's dtype: the
input :meth:`fastadapt.Optimizer.step` uses as it is, without a sort or a copy.  Everything
here is the model's own arithmetic; the optimizer only sees the finished gradients.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np
from numba import njit, prange

__all__ = ["Grouper", "pair_scores", "user_grads", "item_grads", "bag_user_grads", "gather_bags",
           "user_vectors"]


# =========================================================================== grouping

@njit(cache=True, nogil=True)
def _first_seen(rows: Any, count: Any) -> Any:
    """Unique ``rows`` in order of first appearance; ``count[r]`` += occurrences of ``r``."""
    uniq = np.empty(rows.size, np.int64)
    k = 0
    for t in range(rows.size):
        r = rows[t]
        if count[r] == 0:
            uniq[k] = r
            k += 1
        count[r] += 1
    return uniq[:k]


@njit(cache=True, nogil=True)
def _bucket(rows: Any, urows: Any, count: Any, starts: Any, order: Any, slot: Any) -> None:
    """Counting sort of ``rows`` by ``urows`` (ascending unique): occurrences of ``urows[j]`` are
    ``order[starts[j]:starts[j+1]]`` (ascending positions), ``slot[t]`` is ``j`` for
    ``rows[t] == urows[j]``; ``count`` is left all zero again."""
    k = urows.size
    starts[0] = 0
    for j in range(k):
        r = urows[j]
        starts[j + 1] = starts[j] + count[r]
        count[r] = starts[j]                          # now the next free position of row r
    for t in range(rows.size):
        r = rows[t]
        q = count[r]
        order[q] = t
        count[r] = q + 1
    for j in range(k):
        count[urows[j]] = 0
        for q in range(starts[j], starts[j + 1]):
            slot[order[q]] = j


class Grouper:
    """Groups row ids of one table by row; keeps an all-zero counter of the table's rows
    between calls (one int64 per row, allocated once)."""

    def __init__(self, nrows: int) -> None:
        self.count = np.zeros(int(nrows), np.int64)

    def __call__(self, rows: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``rows`` int64 (n,) in range -> ``urows`` (k,) ascending unique, ``starts`` (k + 1,),
        ``order`` (n,): positions of ``urows[j]``'s occurrences at ``order[starts[j]:starts[j+1]]``,
        ``slot`` (n,): ``rows[t] == urows[slot[t]]``."""
        urows = np.sort(_first_seen(rows, self.count))   # numpy's sort: ~10x numba's on 4k ids
        starts = np.empty(urows.size + 1, np.int64)
        order = np.empty(rows.size, np.int64)
        slot = np.empty(rows.size, np.int64)
        _bucket(rows, urows, self.count, starts, order, slot)
        return urows, starts, order, slot


# =========================================================================== BPR

@njit(parallel=True, cache=True, nogil=True)
def pair_scores(X: Any, xrow: Any, V: Any, pos: Any, neg: Any, s: Any, loss: Any) -> None:
    """For every triple ``t``: ``x = X[xrow[t]] . (V[pos[t]] - V[neg[t]])`` (summed in float64),
    ``s[t] = sigmoid(-x)`` (minus the derivative of ``-log sigmoid(x)``), ``loss[t] = -log sigmoid(x)``."""
    dim = V.shape[1]
    for t in prange(pos.size):
        u, p, n = xrow[t], pos[t], neg[t]
        x = 0.0
        for c in range(dim):
            x += np.float64(X[u, c]) * (np.float64(V[p, c]) - np.float64(V[n, c]))
        if x >= 0:
            e = np.exp(-x)
            s[t] = e / (1.0 + e)
            loss[t] = np.log1p(e)
        else:
            e = np.exp(x)
            s[t] = 1.0 / (1.0 + e)
            loss[t] = np.log1p(e) - x


@njit(parallel=True, cache=True, nogil=True)
def user_grads(V: Any, pos: Any, neg: Any, s: Any, order: Any, starts: Any,
               U: Any, urows: Any, reg: float, out: Any) -> None:
    """``out[j] = sum over the triples t of user urows[j] of -s[t] (V[pos[t]] - V[neg[t]]) + reg U[urows[j]]``
    (the L2 term once per use), summed in order of appearance."""
    dim = V.shape[1]
    for j in prange(urows.size):
        a, b = starts[j], starts[j + 1]
        for c in range(dim):
            out[j, c] = 0
        for q in range(a, b):
            t = order[q]
            st = s[t]
            p, n = pos[t], neg[t]
            for c in range(dim):
                out[j, c] += -st * (V[p, c] - V[n, c]) + reg * U[urows[j], c]


@njit(parallel=True, cache=True, nogil=True)
def bag_user_grads(V: Any, pos: Any, neg: Any, s: Any, order: Any, starts: Any,
                   P: Any, urows: Any, M: Any, reg: float, gP: Any, gM: Any) -> None:
    """The bag model's user side: with ``G_j`` the sum over user ``urows[j]``'s triples of
    ``-s[t] (V[pos[t]] - V[neg[t]])`` (the gradient of the user vector ``P[u] + M[j]``) and
    ``m`` their number, ``gP[j] = G_j + m reg P[urows[j]]``, ``gM[j] = G_j + m reg M[j]`` (L2 on
    the user row and on the bag's mean, once per use)."""
    dim = V.shape[1]
    for j in prange(urows.size):
        a, b = starts[j], starts[j + 1]
        u = urows[j]
        for c in range(dim):
            gP[j, c] = 0
            gM[j, c] = 0
        for q in range(a, b):
            t = order[q]
            st = s[t]
            p, n = pos[t], neg[t]
            for c in range(dim):
                g = -st * (V[p, c] - V[n, c])
                gP[j, c] += g + reg * P[u, c]
                gM[j, c] += g + reg * M[j, c]


@njit(parallel=True, cache=True, nogil=True)
def item_grads(X: Any, xrow: Any, s: Any, order: Any, starts: Any, V: Any, irows: Any,
               reg: float, out: Any) -> None:
    """Item side: the occurrences are those of ``concatenate([pos, neg])`` (position ``o < b`` is
    triple ``o`` as the positive, ``o >= b`` triple ``o - b`` as the negative);
    ``out[j] = sum of (-s[t] X[xrow[t]] as a positive, +s[t] X[xrow[t]] as a negative) + reg V[irows[j]]``
    per use, in order of appearance."""
    dim = V.shape[1]
    b = s.size
    for j in prange(irows.size):
        i = irows[j]
        for c in range(dim):
            out[j, c] = 0
        for q in range(starts[j], starts[j + 1]):
            o = order[q]
            if o < b:
                t = o
                st = -s[t]
            else:
                t = o - b
                st = s[t]
            u = xrow[t]
            for c in range(dim):
                out[j, c] += st * X[u, c] + reg * V[i, c]


# =========================================================================== bags

@njit(cache=True, nogil=True)
def gather_bags(hist_ptr: Any, hist_idx: Any, urows: Any) -> Tuple[Any, Any]:
    """The bags of users ``urows`` from the history CSR (``hist_idx[hist_ptr[u]:hist_ptr[u+1]]``):
    ``(indices, offsets)``, offsets of length ``len(urows) + 1``."""
    k = urows.size
    offsets = np.empty(k + 1, np.int64)
    offsets[0] = 0
    for j in range(k):
        u = urows[j]
        offsets[j + 1] = offsets[j] + hist_ptr[u + 1] - hist_ptr[u]
    indices = np.empty(offsets[k], np.int64)
    for j in range(k):
        u = urows[j]
        a = hist_ptr[u]
        for q in range(offsets[j], offsets[j + 1]):
            indices[q] = hist_idx[a + q - offsets[j]]
    return indices, offsets


@njit(parallel=True, cache=True, nogil=True)
def user_vectors(P: Any, urows: Any, M: Any, out: Any) -> None:
    """``out[j] = P[urows[j]] + M[j]``."""
    for j in prange(urows.size):
        u = urows[j]
        for c in range(P.shape[1]):
            out[j, c] = P[u, c] + M[j, c]
