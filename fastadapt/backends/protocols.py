"""The interfaces a backend implements (checked structurally, ``typing.Protocol``).

Every method is implemented by every backend; callers never probe with ``getattr`` or
branch on a backend's name.  Arrays are the backend's own (numpy arrays on the CPU;
anything with ``__cuda_array_interface__`` on CUDA); "flat" means a 1-D C-contiguous view.
``rule`` arguments are rule functions of :mod:`fastadapt.algorithms` (plain Python; each
backend compiles them on first use), ``k`` their per-step scalars.
"""

from __future__ import annotations

from typing import Any, ContextManager, Optional, Protocol, Tuple

import numpy as np


class SparseKernels(Protocol):
    """The sparse loops of a backend, over the canonical forms of :mod:`fastadapt.grads.sparse`.

    ``p, s1, s2, s3`` are flat; ``rows, indptr, cols, vals`` a touched-rows CSR or a rows
    form (validated, so the loops check nothing).  ``decay`` arguments describe a pending
    closed-form catch-up (:class:`fastadapt.algorithms.Decay`): ``base`` and the slot flags.
    """

    def csr_lazy(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, indptr: Any, cols: Any,
                 vals: Any, ncols: int, k: Any) -> None: ...

    def rows_lazy(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, vals: Any, ncols: int,
                  k: Any) -> None: ...

    def csr_exact(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, nrows: int, ncols: int, rows: Any,
                  indptr: Any, cols: Any, vals: Any, k: Any) -> None: ...

    def rows_exact(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, nrows: int, ncols: int, rows: Any,
                   vals: Any, k: Any) -> None: ...

    def csr_decay(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, indptr: Any, cols: Any,
                  vals: Any, ncols: int, k: Any, stamp: Any, step: int, base: float,
                  slots: Tuple[bool, bool, bool]) -> None: ...

    def rows_decay(self, rule: Any, p: Any, s1: Any, s2: Any, s3: Any, rows: Any, vals: Any, ncols: int,
                   k: Any, stamp: Any, step: int, base: float, slots: Tuple[bool, bool, bool]) -> None: ...

    def settle(self, s1: Any, s2: Any, s3: Any, stamp: Any, step: int, ncols: int, base: float,
               slots: Tuple[bool, bool, bool]) -> None: ...

    def new_stamp(self, nrows: int, value: int) -> Any: ...

    # compressed state (state_dtype "bfloat16" / "int8"): the same steps on decoded rows
    def codec_touched(self, rule: Any, p: Any, slots: Any, rows: Any, indptr: Any, cols: Any, vals: Any,
                      ncols: int, k: Any, step: int, nearest: bool, decay: Any = None) -> None: ...

    def codec_exact(self, rule: Any, p: Any, slots: Any, nrows: int, ncols: int, rows: Any, indptr: Any,
                    cols: Any, vals: Any, k: Any, step: int, nearest: bool) -> None: ...

    def codec_settle(self, slots: Any, stamp: Any, step: int, ncols: int, base: float,
                     flags: Tuple[bool, bool, bool], nearest: bool) -> None: ...


class RowKernels(Protocol):
    """The loops of a backend for row rules (:attr:`fastadapt.algorithms.Algorithm.rows`).

    ``p``, ``g``, ``vals`` are flat; ``s1, s2, s3`` hold one value per row (or are 1-element
    dummies); ``width`` is the row width as a number of ``p``'s dtype; ``rows`` strictly
    ascending and ``vals`` their ``(k, ncols)`` gradient rows, flat (validated).
    """

    def dense(self, rule: Any, p: Any, g: Any, s1: Any, s2: Any, s3: Any, width: Any, k: Any,
              nrows: int) -> None:
        """The rule on every row, from the dense gradient ``g``."""

    def lazy(self, rule: Any, p: Any, rows: Any, vals: Any, s1: Any, s2: Any, s3: Any, width: Any,
             k: Any) -> None:
        """The rule on the touched rows only."""

    def fused(self, rule: Any, p: Any, nrows: int, rows: Any, vals: Any, s1: Any, s2: Any, s3: Any,
              width: Any, k: Any) -> None:
        """The rule on every row: touched rows from ``vals``, the others from a zero row."""

    def touched(self, indptr: Any) -> Tuple[Any, Any]:
        """``(rows, indptr)`` of the rows with stored entries of a CSR given by its full ``indptr``."""

    def from_csr(self, indptr: Any, cols: Any, vals: Any, ncols: int) -> Any:
        """A touched-rows CSR's values as whole rows (flat ``(k, ncols)``, zeros where not stored)."""


class Backend(Protocol):
    """One kind of array and the loops over it."""

    #: "cpu" or "cuda" (for messages and device keys only)
    name: str

    def owns(self, a: Any) -> bool:
        """True when ``a`` is an array of this backend."""

    def check_param(self, p: Any, where: str) -> None:
        """Raise (naming ``where``) unless ``p`` is a writeable, C-contiguous float32/float64 array."""

    def dtype_of(self, a: Any) -> np.dtype:
        """``a``'s dtype as a numpy dtype."""

    def device_of(self, a: Any) -> Optional[int]:
        """``a``'s device number (None on the CPU)."""

    def check_same_device(self, a: Any, p: Any, where: str) -> None:
        """Raise unless ``a`` lives on ``p``'s device."""

    def context(self, p: Any) -> ContextManager[Any]:
        """A context in which kernels and allocations run on ``p``'s device."""

    def full_like(self, p: Any, value: float) -> Any:
        """A new array of ``p``'s shape and dtype filled with ``value``."""

    def full_rows(self, p: Any, value: float) -> Any:
        """A new 1-D array of ``p``'s dtype on its device, one element per row (``p.shape[0]``),
        filled with ``value``: the state of a row rule."""

    def flat(self, a: Any) -> Any:
        """``a`` as a flat view (no copy)."""

    def to_numpy(self, a: Any) -> np.ndarray:
        """A host copy of ``a``."""

    def copy_into(self, dst: Any, src: np.ndarray) -> None:
        """Copy host array ``src`` into ``dst`` (same shape and dtype)."""

    def memory_span(self, a: Any) -> Tuple[int, int]:
        """``(start, end)`` byte addresses of ``a``'s buffer (overlap checks)."""

    def dense_step(self, rule: Any, p: Any, g: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        """``rule`` over every element of the flat arrays ``p`` and ``g``."""

    def all_finite(self, a: Any) -> bool:
        """True when ``a`` holds no NaN and no infinity."""

    def compressed_full(self, p: Any, value: float, kind: str, signed: bool, seed: int) -> Any:
        """A compressed state buffer for ``p`` (``kind`` "bfloat16" or "int8") whose values are ``value``."""

    def compressed_from(self, p: Any, values: np.ndarray, kind: str, signed: bool, seed: int) -> Any:
        """A compressed state buffer for ``p`` holding the host float ``values`` (rounded to nearest)."""

    def compressed_load(self, p: Any, buf: Any) -> Any:
        """A host :class:`~fastadapt.backends.compressed.CompressedBuffer` (a checked state_dict
        entry of ``p``'s shape) as a compressed buffer of this backend, codes unchanged."""

    #: whether sparse gradients work with compressed state in some mode (see
    #: :meth:`sparse_compressed_supports`; else the optimizer raises first)
    sparse_compressed: bool

    def sparse_compressed_supports(self, plan: Any) -> bool:
        """Whether a sparse step with compressed state runs under ``plan`` ("lazy", "fused" or a
        :class:`~fastadapt.algorithms.Decay`); the optimizer raises NotImplementedError before
        anything is written where not."""

    def codec_step(self, rule: Any, p: Any, g: Any, slots: Any, k: Any, step: int, nearest: bool) -> None:
        """``rule`` over every element of the flat ``p`` and ``g``, with compressed state ``slots``
        (three compressed buffers or None): decoded before the rule, encoded after it."""

    @property
    def sparse_kernels(self) -> SparseKernels:
        """The backend's sparse loops."""

    @property
    def row_kernels(self) -> RowKernels:
        """The backend's loops for row rules."""
