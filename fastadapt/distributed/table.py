"""Row-sharded embedding tables trained with row gradients (:class:`ShardedTable`)."""

import time
from typing import Any, Dict, Optional, Sequence, Type, Union

import numpy as np

from .. import optim as _optim
from ..backends.cpu import BACKEND as _CPU
from ._common import (_Collective, _checksum, _decoded, _hyper_items, _is_scalar, _mpi_type, _state_nbytes,
                      shard_bounds, slice_state)

__all__ = ["ShardedTable"]


class ShardedTable(_Collective):
    """An embedding table split by rows over MPI ranks, trained with row gradients.

    Rank ``r`` owns the contiguous rows ``[bounds[r], bounds[r + 1])`` (:attr:`local`)
    and their optimizer state; nobody holds the whole table.  :meth:`step` takes this
    rank's :class:`fastadapt.RowGrad`, sums its duplicate rows, sends each row to its
    owner (``Alltoallv``) and the owner applies the rows it received -- duplicates
    across ranks summed -- with the ordinary optimizer's sparse kernels, in its
    ``sparse_mode`` (``"lazy"``: only touched rows change; ``"exact"``: the dense step
    on the summed gradient).  :meth:`lookup` fetches any rows from their owners.

    The result is that of one process stepping the whole table with all ranks' row
    gradients concatenated (in rank order): bit for bit when the sums of duplicate
    rows are exact, otherwise within the spec's tolerances (each rank pre-sums its own
    duplicates, which changes the order of the additions).

    Collective: every rank constructs it and calls :meth:`step`, :meth:`lookup`,
    :meth:`gather` and the state methods in the same order (with its own arguments).

    Parameters
    ----------
    optimizer_class : type
        Any fastadapt optimizer class, :class:`fastadapt.SparseAdam` included.
    shape : tuple of int
        The whole table's shape ``(num_rows, *row_shape)``; at least one row per rank.
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD`` (duplicated).
    dtype : float32 or float64, default float32
    init : None, ndarray or callable, optional
        The initial rows: None for zeros; the whole table (each rank copies its
        rows: convenient for small tables); or ``init(lo, hi)`` returning rows
        ``[lo, hi)`` -- each rank then builds only its own block.
    **hyper
        The optimizer's arguments (``lr``, ``sparse_mode``, ``nonfinite``, ...), the
        same on every rank; ``nonfinite`` is decided on the combined rows.

    Attributes
    ----------
    local : ndarray
        This rank's rows, ``(hi - lo, *row_shape)``; updated in place by :meth:`step`.
    lo, hi : int
        The global ids of this rank's first row and one past its last.
    bounds : ndarray of int64
        Every rank's first row, and ``num_rows`` at the end.
    param_groups : list of dict
        The optimizer's one param group; hyper-parameters may be changed (identically
        on every rank).
    timings : dict
        Seconds by phase, for steps and lookups together: ``prepare`` (local work:
        checking and de-duplicating this rank's rows), ``agree`` (the per-call
        agreement), ``route`` (Alltoall/Alltoallv of the gradient rows), ``lookup``
        (the lookups' exchanges, serving the asked rows), ``kernel`` (the optimizer
        on the local block); and the counts ``steps``, ``lookups``.

    Examples
    --------
    >>> # mpiexec -n 2 python train.py
    >>> from fastadapt.distributed import ShardedTable                  # doctest: +SKIP
    >>> items = ShardedTable(fa.Adam, (1_000_000, 32), lr=1e-2, init=init)  # doctest: +SKIP
    >>> vecs = items.lookup(batch_items)              # rows from their owners  # doctest: +SKIP
    >>> items.step(fa.RowGrad(batch_items, grad_vecs))                  # doctest: +SKIP
    """

    def __init__(self, optimizer_class: Type[_optim.Optimizer], shape: Union[int, Sequence[int]], comm: Any = None, *,
                 dtype: Any = np.float32, init: Any = None, **hyper: Any) -> None:
        comm = self._setup_comm(comm)
        rank, size = comm.Get_rank(), comm.Get_size()
        error, signature = None, None
        try:
            self._build(optimizer_class, shape, dtype, init, hyper, rank, size)
            signature = (f"{optimizer_class.__module__}.{optimizer_class.__qualname__}", self.shape,
                         str(self.dtype), self.nonfinite, repr(_hyper_items(self.param_groups[0])))
        except Exception as e:
            error = e
        names = ["optimizer class", "table shape", "dtype", "nonfinite", "hyper-parameters"]

        def describe(ref: Any, sig: Any, r: Any) -> str:
            for name, a, b in zip(names, ref, sig):
                if a != b:
                    return f"the {name} is {a} on rank 0 and {b} on rank {r}"
            return "the ranks differ"
        self._agree_construction(comm, error, signature, describe)
        self.comm = comm.Dup()
        self.rank, self.size = rank, size
        MPI = self._MPI
        self._row_type = _mpi_type(self.dtype).Create_contiguous(self._ncols).Commit()
        self._id_type = MPI.INT64_T

    def _build(
            self,
            optimizer_class: Any,
            shape: Any,
            dtype: Any,
            init: Any,
            hyper: Any,
            rank: int,
            size: int,
    ) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, _optim.Optimizer)):
            raise TypeError("optimizer_class must be a fastadapt optimizer class such as fastadapt.Adam, "
                            f"got {optimizer_class!r}")
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be a tuple (num_rows, *row_shape), got {shape!r}") from None
        if len(shape) < 1 or min(shape) < 1:
            raise ValueError(f"the table shape {shape} must have at least one dimension and no empty one")
        if shape[0] < size:
            raise ValueError(f"a table of {shape[0]} rows cannot give each of {size} ranks a row; use "
                             "fewer ranks for it (or an ordinary optimizer: it is small)")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.nonfinite = hyper.pop("nonfinite", "propagate")
        if self.nonfinite not in _optim.NONFINITE:
            raise ValueError(f"nonfinite must be one of {_optim.NONFINITE}, got {self.nonfinite!r}")
        self.shape = shape
        self.row_shape = shape[1:]
        self._ncols = int(np.prod(self.row_shape, dtype=np.int64))
        self.bounds = shard_bounds(shape[0], size)
        self.lo, self.hi = int(self.bounds[rank]), int(self.bounds[rank + 1])
        block = (self.hi - self.lo,) + self.row_shape
        if init is None:
            local = np.zeros(block, self.dtype)
        elif isinstance(init, np.ndarray):
            if init.shape != shape:
                raise ValueError(f"init has shape {init.shape}; the table has shape {shape}")
            local = np.array(init[self.lo:self.hi], dtype=self.dtype, order="C")
        elif callable(init):
            got = np.asarray(init(self.lo, self.hi))
            if got.shape != block:
                raise ValueError(f"init({self.lo}, {self.hi}) returned shape {got.shape}; rows [lo, hi) of "
                                 f"this table have shape {block}")
            local = np.array(got, dtype=self.dtype, order="C")
        else:
            raise TypeError("init must be None, the whole table as an array, or a callable init(lo, hi)")
        self.local = local
        self.skipped_steps = 0
        self.optimizer_class = optimizer_class
        self._hyper = dict(hyper)
        # one rank: the ordinary optimizer does everything (its own checks, its nonfinite policy)
        self._solo = size == 1
        self._inner = optimizer_class([local], nonfinite=self.nonfinite if self._solo else "propagate", **hyper)
        self.param_groups = [dict(self._inner.param_groups[0], params=[local])]
        self.timings = dict(prepare=0.0, agree=0.0, route=0.0, lookup=0.0, kernel=0.0, steps=0, lookups=0)

    # ------------------------------------------------------------------ helpers

    def _agree(self, error: Any, has: int = 1) -> bool:
        """The per-call agreement: raise everywhere if any rank failed; return 'any rank has input'."""
        MPI = self._MPI
        flags = np.zeros(4, dtype=np.int64)
        if error is not None:
            flags[0] = 1
        else:
            h = _checksum(self.param_groups)
            flags[1:] = has, h, -h
        with self._guard("an agreement"):
            self.comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
        if flags[0]:
            self._raise_agreed_error(error, "the call")
        if flags[2] != -flags[3]:
            raise ValueError("the ranks' hyper-parameters differ (a param group changed on some ranks "
                             "only); change them identically on every rank; nothing was changed")
        return bool(flags[1])

    def _exchange(self, ids: Any, payload: Any = None) -> Any:
        """Alltoallv ``ids`` (int64, grouped by destination, ascending) and optional rows.

        Returns (received ids, received rows or None, receive counts, send counts).
        """
        MPI = self._MPI
        cuts = np.searchsorted(ids, self.bounds)
        send = np.diff(cuts).astype(np.int64)
        recv = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(send, recv)
        sdispl, rdispl = cuts[:-1].astype(np.int64), np.concatenate(([0], np.cumsum(recv)[:-1]))
        got = np.empty(int(recv.sum()), dtype=np.int64)
        self.comm.Alltoallv([ids, send, sdispl, self._id_type], [got, recv, rdispl, self._id_type])
        rows = None
        if payload is not None:
            rows = np.empty((got.size, self._ncols), dtype=self.dtype)
            self.comm.Alltoallv([payload, send, sdispl, self._row_type], [rows, recv, rdispl, self._row_type])
        return got, rows, recv, send

    def _check_hyper(self) -> None:
        group = self.param_groups[0]
        unknown = set(group) - set(self._inner.defaults) - {"params"}
        if unknown:
            raise TypeError(f"unknown hyper-parameter(s) {sorted(unknown)} in the param group")
        trial = dict(self._inner.param_groups[0], **{k: v for k, v in group.items() if k != "params"})
        self._inner._validate_group(trial)

    # ------------------------------------------------------------------ step and lookup

    def step(self, grad: Any) -> bool:
        """One collective step with this rank's row gradient.

        Parameters
        ----------
        grad : fastadapt.RowGrad or None
            Row ids (global, any order, duplicates allowed) and their gradient rows
            ``(k, *row_shape)``; None: this rank has none.  The table is stepped (every
            owner's step count advances, also with no rows for it) when at least one
            rank gives a RowGrad; when every rank gives None nothing happens.

        Returns
        -------
        bool
            False when ``nonfinite="skip"`` skipped the step (on every rank), else True.

        Raises
        ------
        ValueError, TypeError, IndexError
            On every rank, nothing changed, when any rank's gradient is invalid (a row id
            out of range, a wrong shape, a non-float dtype) or the hyper-parameters are.
        FloatingPointError
            With ``nonfinite="raise"``: on every rank, nothing changed.
        """
        from ..grads.sparse import RowGrad, canonical_rows
        if self._solo:
            return self._solo_step(grad)
        MPI = self._MPI
        t0 = time.perf_counter()
        error, prepared = None, None
        try:
            self._check_hyper()
            if grad is not None:
                if type(grad).__name__ != "RowGrad":
                    raise TypeError(f"a ShardedTable takes a fastadapt.RowGrad (or None), got "
                                    f"{type(grad).__name__}")
                values = np.asarray(grad.values)
                k = values.shape[0] if values.ndim else -1
                if values.shape not in ((k,) + self.row_shape, (k, self._ncols)):
                    raise ValueError(f"RowGrad values have shape {values.shape}; rows of this table have "
                                     f"shape {self.row_shape}, so they must have shape (k,) + {self.row_shape}")
                prepared = canonical_rows(grad.rows, values.reshape(k, self._ncols), self.shape[0],
                                          self._ncols, self.dtype, "the RowGrad")
        except Exception as e:
            error = e
        t1 = time.perf_counter()
        self.timings["prepare"] += t1 - t0
        stepped = self._agree(error, has=int(prepared is not None))
        self.timings["agree"] += time.perf_counter() - t1
        if not stepped:
            return True
        if prepared is None:
            prepared = (np.empty(0, np.int64), np.empty((0, self._ncols), self.dtype))
        t = time.perf_counter()
        with self._guard("the step's routing"):
            rows, vals, _, _ = self._exchange(*prepared)
        self.timings["route"] += time.perf_counter() - t
        if self.nonfinite != "propagate":
            t = time.perf_counter()
            bad = np.array([int(not _CPU.all_finite(vals.reshape(-1)))], dtype=np.int64)
            with self._guard("the step's non-finite check"):
                self.comm.Allreduce(MPI.IN_PLACE, bad, op=MPI.MAX)
            self.timings["agree"] += time.perf_counter() - t
            if bad[0]:
                if self.nonfinite == "raise":
                    raise FloatingPointError("non-finite row gradient; nothing was changed on any rank "
                                             "(nonfinite='skip' skips such steps)")
                self.skipped_steps += 1
                return False
        t = time.perf_counter()
        with self._guard("the step's update"):
            self._sync_hyper()
            rows -= self.lo
            self._inner.step([RowGrad(rows, vals.reshape((rows.size,) + self.row_shape))])
        self.timings["kernel"] += time.perf_counter() - t
        self.timings["steps"] += 1
        return True

    def _solo_step(self, grad: Any) -> Any:
        """One rank: no routing, no agreement; the ordinary optimizer checks and steps."""
        t0 = time.perf_counter()
        self._check_hyper()
        if grad is None:
            return True
        if type(grad).__name__ != "RowGrad":
            raise TypeError(f"a ShardedTable takes a fastadapt.RowGrad (or None), got {type(grad).__name__}")
        self._sync_hyper()
        applied = self._inner.step([grad])
        self.skipped_steps = self._inner.skipped_steps
        self.timings["kernel"] += time.perf_counter() - t0
        self.timings["steps"] += applied
        return applied

    def lookup(self, rows: Any) -> np.ndarray:
        """Collective: the current values of rows (global ids) from their owners.

        Parameters
        ----------
        rows : array_like of int, shape (k,)
            This rank's row ids, any order, duplicates allowed.

        Returns
        -------
        ndarray, shape (k, *row_shape)
            A new array (the table's dtype).

        Raises
        ------
        IndexError, TypeError, ValueError
            On every rank when any rank asks for an invalid row id.
        """
        t0 = time.perf_counter()
        error = None
        try:
            rows = np.asarray(rows)
            if rows.ndim != 1:
                raise ValueError(f"row ids must be 1-D, got shape {rows.shape}")
            if rows.size == 0:
                rows = rows.astype(np.int64)
            if rows.dtype.kind not in "iu":
                raise TypeError(f"row ids must be integers, got dtype {rows.dtype}")
            if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
                bad = rows[(rows < 0) | (rows >= self.shape[0])][0]
                raise IndexError(f"row id {int(bad)} is out of range for a table of {self.shape[0]} rows")
            if self._solo:                   # one rank: every row is local
                out = self.local[rows]
                self.timings["lookup"] += time.perf_counter() - t0
                self.timings["lookups"] += 1
                return out
            uniq, inverse = np.unique(rows.astype(np.int64), return_inverse=True)
        except Exception as e:
            if self._solo:
                raise
            error = e
        t1 = time.perf_counter()
        self._agree(error)
        t2 = time.perf_counter()
        with self._guard("a lookup"):
            asked, _, recv, send = self._exchange(uniq)
            flat = self.local.reshape(self.hi - self.lo, self._ncols)
            answer = flat[asked - self.lo]
            got = np.empty((uniq.size, self._ncols), dtype=self.dtype)
            self.comm.Alltoallv([answer, recv, np.concatenate(([0], np.cumsum(recv)[:-1])), self._row_type],
                                [got, send, np.concatenate(([0], np.cumsum(send)[:-1])), self._row_type])
        t3 = time.perf_counter()
        out = got[inverse.reshape(-1)].reshape((rows.size,) + self.row_shape)
        tm = self.timings
        tm["prepare"] += (t1 - t0) + (time.perf_counter() - t3)
        tm["agree"] += t2 - t1
        tm["lookup"] += t3 - t2
        tm["lookups"] += 1
        return out

    def gather(self, root: Optional[int] = 0) -> Optional[np.ndarray]:
        """Collective: the whole table on ``root`` (None elsewhere); ``root=None``: on every rank."""
        counts = np.diff(self.bounds)
        displs = self.bounds[:-1]
        with self._guard("gather"):
            if root is None:
                out = np.empty(self.shape, self.dtype)
                self.comm.Allgatherv([self.local, self._row_type], [out, counts, displs, self._row_type])
                return out
            whole = np.empty(self.shape, self.dtype) if self.rank == root else None
            self.comm.Gatherv([self.local, self._row_type],
                              [whole, counts, displs, self._row_type] if self.rank == root else None, root=root)
            return whole

    # ------------------------------------------------------------------ state

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held on this rank (its rows' buffers)."""
        return _state_nbytes(self._inner)

    def state_dict(self, dtype: Optional[str] = None) -> Dict[str, Any]:
        """This rank's rows' optimizer state, in an ordinary optimizer's layout plus ``"shard"``
        (``dtype``: as :meth:`fastadapt.Optimizer.state_dict`; ``"float32"`` decodes compressed state).

        Returns
        -------
        dict
            ``{"state": {0: {"step", buffers of shape (hi - lo, *row_shape)}},
            "param_groups": [...], "shard": {"rank", "size", "bounds", "shape"}}``.
        """
        self._sync_hyper()
        sd = self._inner.state_dict(dtype)
        sd["shard"] = {"rank": self.rank, "size": self.size, "bounds": self.bounds.tolist(),
                       "shape": self.shape}
        return sd

    def consolidated_state_dict(self, root: Optional[int] = 0) -> Optional[Dict[str, Any]]:
        """Collective: the whole table's state as one process's ``state_dict()`` (on ``root``);
        compressed state (``state_dtype``) as decoded float32 arrays."""
        local = self.state_dict(dtype="float32")
        with self._guard("consolidated_state_dict"):
            parts = self.comm.allgather(local) if root is None else self.comm.gather(local, root=root)
        if parts is None:
            return None
        state = {}
        if all(0 in sd["state"] for sd in parts):
            st = {"step": parts[0]["state"][0]["step"]}
            for name, value in parts[0]["state"][0].items():
                if name == "step" or _is_scalar(value):     # carried scalars: the same on every rank
                    st[name] = value
                else:
                    st[name] = np.concatenate([sd["state"][0][name] for sd in parts])
            state[0] = st
        return {"state": state, "param_groups": local["param_groups"]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Collective: load a per-rank shard (same rank, same P) or a consolidated state_dict.

        Checked on every rank first; if any rank rejects its input, every rank raises
        and nothing changes.
        """
        error, new = None, None
        try:
            sd = state_dict
            if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
                raise ValueError("not a fastadapt state_dict: it needs 'state' and 'param_groups'")
            if "shard" in sd:
                info = sd["shard"]
                if (info.get("rank"), info.get("size")) != (self.rank, self.size) or \
                        list(info.get("bounds", ())) != self.bounds.tolist() or \
                        tuple(info.get("shape", ())) != self.shape:
                    raise ValueError(f"this is rank {info.get('rank')}'s shard of a {info.get('size')}-rank "
                                     f"table of shape {info.get('shape')}; this is rank {self.rank} of "
                                     f"{self.size} (load each rank's own file, or a consolidated_state_dict()"
                                     " to change the number of ranks)")
                inner_sd = {"state": sd["state"], "param_groups": sd["param_groups"]}
            else:
                state = {}
                for j, st in sd["state"].items():
                    if j != 0:
                        raise ValueError(f"a table's state_dict holds parameter 0 only, got {j!r}")
                    if isinstance(st, dict) and any(isinstance(v, dict) for v in st.values()):
                        st = _decoded(st, self.shape, "the table's state")
                    state[0] = slice_state(st, self.optimizer_class.algorithm.state_shape(self.shape), self.dtype, lambda a: a[self.lo:self.hi],
                                           "the table's state")
                inner_sd = {"state": state, "param_groups": sd["param_groups"]}
            new = self.optimizer_class([dict(self.param_groups[0], params=[self.local])],
                                       nonfinite=self.nonfinite if self._solo else "propagate", **self._hyper)
            new.load_state_dict(inner_sd)
        except Exception as e:
            error = e
        with self._guard("load_state_dict"):
            failed = self.comm.allreduce(int(error is not None), op=self._MPI.MAX)
        if failed:
            self._raise_agreed_error(error, "load_state_dict")
        assert new is not None                      # no rank failed: this one prepared it
        self._inner = new
        self.param_groups[0].update({k: v for k, v in new.param_groups[0].items() if k != "params"})
